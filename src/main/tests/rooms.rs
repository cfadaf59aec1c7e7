//! Rooms through the client API: creation with presets, sending (idempotent per
//! device), state, history pagination, membership changes enforced by the auth rules.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

async fn create(s: &TestServer, token: &str, body: Value) -> String {
    let (status, resp) = s.post_auth("/_matrix/client/v3/createRoom", token, &body).await;
    assert_eq!(status, 200, "{resp}");
    resp["room_id"].as_str().unwrap().to_owned()
}

async fn send(s: &TestServer, token: &str, room: &str, txn: &str, body: &str) -> (u16, Value) {
    s.put_auth(
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
        token,
        &json!({"msgtype": "m.text", "body": body}),
    )
    .await
}

#[tokio::test]
async fn private_room_lifecycle() {
    let mut s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room =
        create(&s, &at, json!({"name": "Plans", "topic": "Weekend", "preset": "private_chat"}))
            .await;

    let (status, state) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state"), &at).await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> =
        state.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for k in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let (status, name) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), &at).await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Plans")));
    let (_, rules) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/"), &at).await;
    assert_eq!(rules["join_rule"], "invite");

    // Sending is idempotent per device and transaction id.
    let (status, first) = send(&s, &at, &room, "t1", "hello").await;
    assert_eq!(status, 200, "{first}");
    let (_, again) = send(&s, &at, &room, "t1", "hello").await;
    assert_eq!(first["event_id"], again["event_id"]);
    let (status, event) = s
        .get_auth(
            &format!(
                "/_matrix/client/v3/rooms/{room}/event/{}",
                first["event_id"].as_str().unwrap()
            ),
            &at,
        )
        .await;
    assert_eq!((status, event["content"]["body"].as_str()), (200, Some("hello")));
    assert_eq!(event["sender"], alice.as_str());

    // Bob may not join an invite-only room, nor read it, until invited.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bt, &json!({})).await;
    assert_eq!(status, 403);
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), &bt).await;
    assert_eq!(status, 403);
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &at,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bt, &json!({})).await;
    assert_eq!(status, 200);
    let (_, members) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), &bt).await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 2, "{members}");
    for i in 0..5 {
        let (status, _) = send(&s, &bt, &room, &format!("b{i}"), &format!("msg {i}")).await;
        assert_eq!(status, 200);
    }
    // Power levels hold: Bob (0) cannot rename the room; Alice (100) can.
    let (status, body) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
            &bt,
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));

    // History, newest first, in pages.
    let (status, page) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=3"), &bt).await;
    assert_eq!(status, 200, "{page}");
    let bodies = |p: &Value| -> Vec<String> {
        p["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(bodies(&page), ["msg 4", "msg 3", "msg 2"]);
    let end = page["end"].as_str().unwrap();
    let (_, next) = s
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=3&from={end}"),
            &bt,
        )
        .await;
    assert_eq!(bodies(&next), ["msg 1", "msg 0"]);
    let (_, fwd) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=2"), &bt).await;
    assert_eq!(fwd["chunk"][0]["type"], "m.room.create");
    let (status, _) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from=garbage"), &bt)
        .await;
    assert_eq!(status, 400);

    let (_, joined) = s.get_auth("/_matrix/client/v3/joined_rooms", &bt).await;
    assert_eq!(joined["joined_rooms"], json!([room]));

    // Kick, then ban: Bob keeps only the state as it was when he left (the spec's rule
    // for `/state` after leaving); unban leaves him out.
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/kick"),
            &at,
            &json!({"user_id": bob, "reason": "bye"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, state) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state"), &bt).await;
    assert_eq!(status, 200);
    let own = state.as_array().unwrap().iter().find(|e| e["state_key"] == bob.as_str()).cloned();
    assert_eq!(own.map(|e| e["content"]["membership"].clone()), Some(json!("leave")));
    let (status, _) = s
        .post_auth(&format!("/_matrix/client/v3/rooms/{room}/ban"), &at, &json!({"user_id": bob}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &at,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 403, "a banned user cannot be invited");
    let (status, _) = s
        .post_auth(&format!("/_matrix/client/v3/rooms/{room}/unban"), &at, &json!({"user_id": bob}))
        .await;
    assert_eq!(status, 200);

    // Everything survives a restart, and the DAG continues from where it was.
    s.terminate();
    s.launch().await;
    let (status, resent) = send(&s, &at, &room, "t2", "after restart").await;
    assert_eq!(status, 200);
    let (_, page) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=2"), &at).await;
    assert_eq!(page["chunk"][0]["event_id"], resent["event_id"]);
    assert_eq!(page["chunk"][1]["content"]["membership"], "leave");
}

#[tokio::test]
async fn public_rooms_versions_and_errors() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("carol").await;
    let (_, bt) = s.register("dan").await;
    let room = create(&s, &at, json!({"preset": "public_chat"})).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bt, &json!({})).await;
    assert_eq!(status, 200, "anyone may join a public room");

    for version in ["1", "10", "12"] {
        let room = create(&s, &at, json!({"room_version": version})).await;
        let (_, create_ev) =
            s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.create/"), &at).await;
        assert_eq!(create_ev["room_version"], version);
        let (status, _) = send(&s, &at, &room, "x", "works").await;
        assert_eq!(status, 200, "room version {version}");
    }
    let (status, body) =
        s.post_auth("/_matrix/client/v3/createRoom", &at, &json!({"room_version": "999"})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_UNSUPPORTED_ROOM_VERSION")));
    let (status, _) =
        s.post_auth("/_matrix/client/v3/createRoom", &at, &json!({"preset": "nonsense"})).await;
    assert_eq!(status, 400);
    let (status, _) =
        s.post_auth("/_matrix/client/v3/rooms/!nope:localhost/join", &bt, &json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = send(&s, &bt, "!nope:localhost", "t", "x").await;
    assert_eq!(status, 403);
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/$unknown"), &at).await;
    assert_eq!(status, 404);
    let (status, _) = s.post("/_matrix/client/v3/createRoom", &json!({})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn profile_changes_reach_joined_rooms() {
    let s = TestServer::start(OPEN).await;
    let (erin, et) = s.register("erin").await;
    let room = create(&s, &et, json!({})).await;
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/profile/{erin}/displayname"),
            &et,
            &json!({"displayname": "Erin E."}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, member) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{erin}"), &et)
        .await;
    assert_eq!(member["displayname"], "Erin E.");
    assert_eq!(member["membership"], "join");
    // A room created after the change gets the name from the start.
    let room2 = create(&s, &et, json!({})).await;
    let (_, member) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room2}/state/m.room.member/{erin}"), &et)
        .await;
    assert_eq!(member["displayname"], "Erin E.");
}

#[tokio::test]
async fn redactions_remove_content() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("fay").await;
    let (_, bt) = s.register("gus").await;
    for version in ["10", "11"] {
        let room = create(&s, &at, json!({"preset": "public_chat", "room_version": version})).await;
        let (status, _) =
            s.post_auth(&format!("/_matrix/client/v3/join/{room}"), &bt, &json!({})).await;
        assert_eq!(status, 200, "join by id through /join/{{roomIdOrAlias}}");
        let (_, mine) = send(&s, &at, &room, "a1", "alice's secret").await;
        let (_, theirs) = send(&s, &bt, &room, "b1", "gus's secret").await;
        let mine = mine["event_id"].as_str().unwrap().to_owned();
        let theirs = theirs["event_id"].as_str().unwrap().to_owned();

        // Gus (power 0) cannot redact Fay's message; he can redact his own.
        let (status, body) = s
            .put_auth(
                &format!("/_matrix/client/v3/rooms/{room}/redact/{mine}/r1"),
                &bt,
                &json!({"reason": "no"}),
            )
            .await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{version}: {body}"
        );
        let (status, body) = s
            .put_auth(
                &format!("/_matrix/client/v3/rooms/{room}/redact/{theirs}/r2"),
                &bt,
                &json!({"reason": "oops"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        // Fay (power 100) can redact anyone's.
        let (status, _) = s
            .put_auth(&format!("/_matrix/client/v3/rooms/{room}/redact/{mine}/r3"), &at, &json!({}))
            .await;
        assert_eq!(status, 200);

        for id in [&mine, &theirs] {
            let (_, event) =
                s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{id}"), &at).await;
            assert_eq!(event["content"], json!({}), "{version}: {event}");
            assert_eq!(event["unsigned"]["redacted_because"]["type"], "m.room.redaction");
        }
        let (_, page) = s
            .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), &at)
            .await;
        let text = page.to_string();
        assert!(!text.contains("secret"), "{text}");
        let (status, _) = s
            .put_auth(&format!("/_matrix/client/v3/rooms/{room}/redact/$nope/r4"), &at, &json!({}))
            .await;
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn members_and_forget() {
    let s = TestServer::start(OPEN).await;
    let (hal, ht) = s.register("hal").await;
    let (ivy, it) = s.register("ivy").await;
    let room = create(&s, &ht, json!({"preset": "public_chat"})).await;
    let joined_rooms = |token: String| {
        let s = &s;
        async move {
            let (status, body) = s.get_auth("/_matrix/client/v3/joined_rooms", &token).await;
            assert_eq!(status, 200, "{body}");
            body["joined_rooms"].clone()
        }
    };
    // Read before each change: a list kept from before a change must not be served.
    assert_eq!(joined_rooms(it.clone()).await, json!([]));
    s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &it, &json!({})).await;
    assert_eq!(joined_rooms(it.clone()).await, json!([room]));
    let (status, members) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/members"), &ht).await;
    assert_eq!(status, 200);
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);
    let (_, left) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/members?membership=leave"), &ht).await;
    assert_eq!(left["chunk"].as_array().unwrap().len(), 0);

    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/forget"), &it, &json!({})).await;
    assert_eq!(status, 400, "must leave first");
    s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &it, &json!({})).await;
    let (_, left) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/members?not_membership=join"), &ht)
        .await;
    assert_eq!(left["chunk"][0]["state_key"], ivy.as_str());
    assert_eq!(joined_rooms(it.clone()).await, json!([]));
    let with_left = r#"{"room":{"include_leave":true}}"#;
    let sync_path = format!("/_matrix/client/v3/sync?filter={with_left}");
    let (_, before) = s.get_auth(&sync_path, &it).await;
    assert!(before["rooms"]["leave"].get(&room).is_some(), "{before}");
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/forget"), &it, &json!({})).await;
    assert_eq!(status, 200);
    let (_, after) = s.get_auth(&sync_path, &it).await;
    assert!(after["rooms"]["leave"].get(&room).is_none(), "{after}");
    let (status, _) =
        s.post_auth("/_matrix/client/v3/join/%23alias:localhost", &it, &json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(hal, "@hal:localhost");
}

#[tokio::test]
async fn context_around_an_event() {
    let s = TestServer::start(OPEN).await;
    let (_, t) = s.register("jo").await;
    let room = create(&s, &t, json!({})).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let (_, r) = send(&s, &t, &room, &format!("c{i}"), &format!("m{i}")).await;
        ids.push(r["event_id"].as_str().unwrap().to_owned());
    }
    let (status, c) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=4", ids[3]), &t)
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["event"]["content"]["body"], "m3");
    let body = |v: &Value| v["content"]["body"].as_str().unwrap_or("").to_owned();
    let before: Vec<String> = c["events_before"].as_array().unwrap().iter().map(body).collect();
    let after: Vec<String> = c["events_after"].as_array().unwrap().iter().map(body).collect();
    assert_eq!(before, ["m2", "m1"]);
    assert_eq!(after, ["m4", "m5"]);
    // The tokens continue the pagination on both sides.
    let start = c["start"].as_str().unwrap();
    let (_, older) = s
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1&from={start}"),
            &t,
        )
        .await;
    assert_eq!(older["chunk"][0]["content"]["body"], "m0");
    let end = c["end"].as_str().unwrap();
    let (_, newer) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=1&from={end}"), &t)
        .await;
    assert_eq!(newer["chunk"][0]["content"]["body"], "m6");
    assert!(c["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/context/$missing"), &t).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn room_aliases() {
    let s = TestServer::start(OPEN).await;
    let (_, kt) = s.register("kim").await;
    let (_, lt) = s.register("lou").await;
    let room = create(&s, &kt, json!({"preset": "public_chat", "room_alias_name": "lounge"})).await;
    let (status, body) = s.get("/_matrix/client/v3/directory/room/%23lounge:localhost").await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(room.as_str())));
    assert_eq!(body["servers"], json!(["localhost"]));
    let (_, canonical) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias"), &kt)
        .await;
    assert_eq!(canonical["alias"], "#lounge:localhost");
    let (status, body) = s
        .post_auth("/_matrix/client/v3/createRoom", &kt, &json!({"room_alias_name": "lounge"}))
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_ROOM_IN_USE")));

    // Join by alias.
    let (status, body) =
        s.post_auth("/_matrix/client/v3/join/%23lounge:localhost", &lt, &json!({})).await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(room.as_str())));

    let path = "/_matrix/client/v3/directory/room/%23second:localhost";
    let (status, _) = s.put_auth(path, &lt, &json!({"room_id": room})).await;
    assert_eq!(status, 200);
    let (status, _) = s.put_auth(path, &kt, &json!({"room_id": room})).await;
    assert_eq!(status, 409);
    let (status, _) = s
        .put_auth(
            "/_matrix/client/v3/directory/room/%23x:elsewhere.example",
            &kt,
            &json!({"room_id": room}),
        )
        .await;
    assert_eq!(status, 400);
    let (_, list) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/aliases"), &kt).await;
    assert_eq!(list["aliases"].as_array().unwrap().len(), 2, "{list}");

    // Lou (power 0) may remove his own alias but not Kim's.
    let (status, _) = s
        .delete_auth("/_matrix/client/v3/directory/room/%23lounge:localhost", &lt, &json!({}))
        .await;
    assert_eq!(status, 403);
    let (status, _) = s.delete_auth(path, &lt, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .delete_auth("/_matrix/client/v3/directory/room/%23lounge:localhost", &kt, &json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = s.get("/_matrix/client/v3/directory/room/%23lounge:localhost").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
}

#[tokio::test]
async fn mutual_rooms_lists_the_rooms_both_users_are_joined_to() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let shared = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.join_room(&bob, &shared).await;
    let invited_only = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    s.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v1/mutual_rooms?user_id={}", common::urlencode(&bob_id));
    let (status, body) = s.get_auth(&path, &alice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["joined"], json!([shared]), "invites and rooms without bob are not shared");
    assert_eq!(body["count"], 1);
    assert!(body.get("next_batch").is_none());
    assert!(!body.to_string().contains(&invited_only));
    let own = "/_matrix/client/v1/mutual_rooms?user_id=%40alice%3Alocalhost";
    let (status, body) = s.get_auth(own, &alice).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) =
        s.get_auth("/_matrix/client/v1/mutual_rooms?user_id=%40ghost%3Alocalhost", &alice).await;
    assert_eq!((status, body["joined"].clone()), (200, json!([])), "{body}");
}
