//! Moderation through the real server: users report events, rooms and users; admins
//! read and clear the reports through Synapse's admin API.

mod common;

use common::{OPEN, TestServer, admin_token};
use serde_json::{Value, json};

const REPORTS: &str = "/_synapse/admin/v1/event_reports";

fn errcode(body: &Value) -> Option<&str> {
    body["errcode"].as_str()
}

#[tokio::test]
async fn reports_reach_the_admins_and_only_of_what_the_reporter_may_see() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (_, carol) = s.register("carol").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id], "name": "Town square"})).await;
    s.join_room(&bob, &room).await;
    let rude = s.send_text(&bob, &room, "something rude").await;

    // The version that brings room and user reports is advertised.
    let (_, versions) = s.get("/_matrix/client/versions").await;
    let listed = versions["versions"].as_array().unwrap();
    assert!(listed.contains(&json!("v1.13")) && listed.contains(&json!("v1.14")), "{versions}");

    let path = format!("/_matrix/client/v3/rooms/{room}/report/{rude}");
    let (status, body) = s.post_auth(&path, &alice, &json!({"reason": "rude"})).await;
    assert_eq!((status, body), (200, json!({})));
    // Carol is not in the (private) room: she cannot see the event, nor learn it exists.
    let (status, body) = s.post_auth(&path, &carol, &json!({"reason": "?"})).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");
    let missing = format!("/_matrix/client/v3/rooms/{room}/report/$nothing");
    let (status, body) = s.post_auth(&missing, &alice, &json!({})).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");
    let long = json!({"reason": "x".repeat(10_001)});
    let (status, body) = s.post_auth(&path, &alice, &long).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");

    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/report"),
            &carol,
            &json!({"reason": "spam room"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/rooms/!nowhere:localhost/report",
            &carol,
            &json!({"reason": "x"}),
        )
        .await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");
    let user_report = format!("/_matrix/client/v3/users/{}/report", common::urlencode(&bob_id));
    let (status, _) = s.post_auth(&user_report, &carol, &json!({"reason": "harasses me"})).await;
    assert_eq!(status, 200);
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/users/@ghost:localhost/report",
            &carol,
            &json!({"reason": "x"}),
        )
        .await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");

    // Only admins read them; newest first.
    let (status, _) = s.get_auth(REPORTS, &alice).await;
    assert_eq!(status, 403);
    let (status, body) = s.get_auth(REPORTS, &admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"], 3, "{body}");
    let reports = body["event_reports"].as_array().unwrap();
    assert_eq!(reports[0]["target_user_id"], bob_id.as_str());
    assert_eq!(reports[1]["reason"], "spam room");
    let first = &reports[2];
    assert_eq!(first["event_id"], rude.as_str());
    assert_eq!(first["sender"], bob_id.as_str());
    assert_eq!(first["user_id"], "@alice:localhost");
    assert_eq!(first["name"], "Town square");
    let (_, page) = s.get_auth(&format!("{REPORTS}?limit=1&dir=f"), &admin).await;
    assert_eq!(
        (page["event_reports"][0]["reason"].as_str(), page["next_token"].as_u64()),
        (Some("rude"), Some(1))
    );
    let (_, mine) = s.get_auth(&format!("{REPORTS}?user_id=%40carol%3Alocalhost"), &admin).await;
    assert_eq!(mine["total"], 2, "{mine}");

    let id = first["id"].as_u64().unwrap();
    let (status, one) = s.get_auth(&format!("{REPORTS}/{id}"), &admin).await;
    assert_eq!(status, 200);
    assert_eq!(one["event_json"]["content"]["body"], "something rude", "{one}");
    let (status, _) = s.delete_auth(&format!("{REPORTS}/{id}"), &admin, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth(&format!("{REPORTS}/{id}"), &admin).await;
    assert_eq!(status, 404);
    let (_, body) = s.get_auth(REPORTS, &admin).await;
    assert_eq!(body["total"], 2);
}

#[tokio::test]
async fn admins_lock_and_suspend_accounts_reversibly() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (carol_id, carol) = s.register("carol").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &room).await;
    let lock = |user: &str| format!("/_matrix/client/v1/admin/lock/{}", common::urlencode(user));
    let suspend =
        |user: &str| format!("/_matrix/client/v1/admin/suspend/{}", common::urlencode(user));

    let (_, caps) = s.get_auth("/_matrix/client/v3/capabilities", &admin).await;
    assert_eq!(
        caps["capabilities"]["m.account_moderation"],
        json!({"suspend": true, "lock": true})
    );
    let (status, body) = s.put_auth(&lock(&carol_id), &alice, &json!({"locked": true})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")), "only admins");
    let (status, body) =
        s.put_auth(&lock("@carol:elsewhere.example"), &admin, &json!({"locked": true})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = s.get_auth(&lock("@nobody:localhost"), &admin).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");

    // Locked: every request is refused with a soft logout, the token stays.
    let (status, body) = s.put_auth(&lock(&carol_id), &admin, &json!({"locked": true})).await;
    assert_eq!((status, body), (200, json!({"locked": true})));
    let (status, body) = s.get_auth("/_matrix/client/v3/account/whoami", &carol).await;
    assert_eq!(
        (status, errcode(&body), body["soft_logout"].as_bool()),
        (401, Some("M_USER_LOCKED"), Some(true))
    );
    let (_, body) = s.get_auth(&lock(&carol_id), &admin).await;
    assert_eq!(body, json!({"locked": true}));
    s.put_auth(&lock(&carol_id), &admin, &json!({"locked": false})).await;
    let (status, _) = s.get_auth("/_matrix/client/v3/account/whoami", &carol).await;
    assert_eq!(status, 200, "unlocked, the same token works again");
    // A locked account may still log out.
    s.put_auth(&lock(&carol_id), &admin, &json!({"locked": true})).await;
    let (status, body) = s.post_auth("/_matrix/client/v3/logout", &carol, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    s.put_auth(&lock(&carol_id), &admin, &json!({"locked": false})).await;
    let (_, body) = s.get_auth("/_matrix/client/v3/account/whoami", &carol).await;
    assert_eq!(errcode(&body), Some("M_UNKNOWN_TOKEN"));

    // Suspended: reads, leaves and redacts its own, but does not write.
    let mine = s.send_text(&bob, &room, "before").await;
    let (status, body) = s.put_auth(&suspend(&bob_id), &admin, &json!({"suspended": true})).await;
    assert_eq!((status, body), (200, json!({"suspended": true})));
    let send = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", common::txn_id());
    let (status, body) = s.put_auth(&send, &bob, &json!({"msgtype": "m.text", "body": "x"})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_USER_SUSPENDED")), "{body}");
    let name = format!("/_matrix/client/v3/profile/{}/displayname", common::urlencode(&bob_id));
    let (status, body) = s.put_auth(&name, &bob, &json!({"displayname": "B"})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_USER_SUSPENDED")), "{body}");
    let (status, body) = s.post_auth("/_matrix/client/v3/createRoom", &bob, &json!({})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_USER_SUSPENDED")), "{body}");
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), &bob).await;
    assert_eq!(status, 200);
    let theirs = s.send_text(&alice, &room, "alice's").await;
    let other = format!("/_matrix/client/v3/rooms/{room}/redact/{theirs}/{}", common::txn_id());
    let (status, body) = s.put_auth(&other, &bob, &json!({})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_USER_SUSPENDED")), "{body}");
    let redact = format!("/_matrix/client/v3/rooms/{room}/redact/{mine}/{}", common::txn_id());
    let (status, body) = s.put_auth(&redact, &bob, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = s.get_auth(&suspend(&bob_id), &admin).await;
    assert_eq!(body, json!({"suspended": true}));
    s.put_auth(&suspend(&bob_id), &admin, &json!({"suspended": false})).await;
    let (status, _) = s.put_auth(&send, &bob, &json!({"msgtype": "m.text", "body": "back"})).await;
    assert_eq!(status, 200);
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &bob, &json!({})).await;
    assert_eq!(status, 200);
}
