//! The admin API (Synapse's shapes) through HTTP against the real binary: accounts,
//! rooms, media, server notices and the audit log, each for admins only.

mod common;

use common::{OPEN, TestServer, admin_token, json_of, txn_id, urlencode};
use serde_json::{Value, json};

const A: &str = "/_synapse/admin";

fn user_path(template: &str, user: &str) -> String {
    template.replace("{u}", &urlencode(user))
}

/// Every admin route, with a body where it takes one: what a non-admin must be refused.
fn admin_routes(user: &str, room: &str) -> Vec<(&'static str, String)> {
    let u = |t: &str| user_path(t, user);
    let r = |t: &str| t.replace("{r}", &urlencode(room));
    vec![
        ("GET", format!("{A}/v2/users")),
        ("GET", format!("{A}/v3/users")),
        ("GET", u(&format!("{A}/v2/users/{{u}}"))),
        ("PUT", u(&format!("{A}/v2/users/{{u}}"))),
        ("POST", u(&format!("{A}/v1/deactivate/{{u}}"))),
        ("POST", u(&format!("{A}/v1/reset_password/{{u}}"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/admin"))),
        ("PUT", u(&format!("{A}/v1/users/{{u}}/admin"))),
        ("POST", u(&format!("{A}/v1/users/{{u}}/shadow_ban"))),
        ("DELETE", u(&format!("{A}/v1/users/{{u}}/shadow_ban"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/override_ratelimit"))),
        ("POST", u(&format!("{A}/v1/users/{{u}}/override_ratelimit"))),
        ("DELETE", u(&format!("{A}/v1/users/{{u}}/override_ratelimit"))),
        ("PUT", u(&format!("{A}/v1/suspend/{{u}}"))),
        ("GET", u(&format!("{A}/v2/users/{{u}}/devices"))),
        ("POST", u(&format!("{A}/v2/users/{{u}}/devices"))),
        ("GET", u(&format!("{A}/v2/users/{{u}}/devices/DEV"))),
        ("PUT", u(&format!("{A}/v2/users/{{u}}/devices/DEV"))),
        ("DELETE", u(&format!("{A}/v2/users/{{u}}/devices/DEV"))),
        ("POST", u(&format!("{A}/v2/users/{{u}}/delete_devices"))),
        ("GET", u(&format!("{A}/v1/whois/{{u}}"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/joined_rooms"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/memberships"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/media"))),
        ("DELETE", u(&format!("{A}/v1/users/{{u}}/media"))),
        ("POST", u(&format!("{A}/v1/users/{{u}}/login"))),
        ("GET", format!("{A}/v1/username_available?username=x")),
        ("GET", u(&format!("{A}/v1/users/{{u}}/pushers"))),
        ("GET", u(&format!("{A}/v1/users/{{u}}/accountdata"))),
        ("GET", format!("{A}/v1/threepid/email/users/a%40b.c")),
        ("GET", format!("{A}/v1/rooms")),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}"))),
        ("DELETE", r(&format!("{A}/v1/rooms/{{r}}"))),
        ("DELETE", r(&format!("{A}/v2/rooms/{{r}}"))),
        ("GET", r(&format!("{A}/v2/rooms/{{r}}/delete_status"))),
        ("GET", format!("{A}/v2/rooms/delete_status/x")),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/members"))),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/state"))),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/messages"))),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/timestamp_to_event?ts=1"))),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/block"))),
        ("PUT", r(&format!("{A}/v1/rooms/{{r}}/block"))),
        ("POST", r(&format!("{A}/v1/rooms/{{r}}/make_room_admin"))),
        ("GET", r(&format!("{A}/v1/rooms/{{r}}/forward_extremities"))),
        ("DELETE", r(&format!("{A}/v1/rooms/{{r}}/forward_extremities"))),
        ("GET", format!("{A}/v1/statistics/database/rooms")),
        ("POST", r(&format!("{A}/v1/join/{{r}}"))),
        ("GET", r(&format!("{A}/v1/room/{{r}}/media"))),
        ("POST", r(&format!("{A}/v1/room/{{r}}/media/quarantine"))),
        ("POST", u(&format!("{A}/v1/user/{{u}}/media/quarantine"))),
        ("POST", format!("{A}/v1/media/quarantine/localhost/abc")),
        ("POST", format!("{A}/v1/media/unquarantine/localhost/abc")),
        ("POST", format!("{A}/v1/media/protect/abc")),
        ("POST", format!("{A}/v1/media/unprotect/abc")),
        ("GET", format!("{A}/v1/media/localhost/abc")),
        ("DELETE", format!("{A}/v1/media/localhost/abc")),
        ("POST", format!("{A}/v1/media/delete?before_ts=99999999999999")),
        ("POST", format!("{A}/v1/purge_media_cache?before_ts=99999999999999")),
        ("POST", format!("{A}/v1/send_server_notice")),
        ("PUT", format!("{A}/v1/send_server_notice/t1")),
        ("GET", format!("{A}/v1/statistics/users/media")),
        ("GET", format!("{A}/v1/federation/destinations")),
        ("GET", format!("{A}/v1/federation/destinations/x.example")),
        ("GET", format!("{A}/v1/federation/destinations/x.example/rooms")),
        ("POST", format!("{A}/v1/federation/destinations/x.example/reset_connection")),
        ("PUT", "/_trellis/admin/v1/reports/1".to_owned()),
        ("GET", "/_trellis/admin/v1/dashboard".to_owned()),
        ("GET", format!("{A}/v1/background_updates/enabled")),
        ("POST", format!("{A}/v1/background_updates/enabled")),
        ("GET", format!("{A}/v1/background_updates/status")),
        ("POST", format!("{A}/v1/background_updates/start_job")),
        ("GET", "/_trellis/admin/v1/analytics".to_owned()),
        ("GET", "/_trellis/admin/v1/calls".to_owned()),
        ("GET", format!("{A}/v1/registration_tokens")),
        ("POST", format!("{A}/v1/registration_tokens/new")),
        ("GET", format!("{A}/v1/registration_tokens/abc")),
        ("PUT", format!("{A}/v1/registration_tokens/abc")),
        ("DELETE", format!("{A}/v1/registration_tokens/abc")),
        ("GET", format!("{A}/v1/event_reports")),
        ("GET", format!("{A}/v1/event_reports/1")),
        ("DELETE", format!("{A}/v1/event_reports/1")),
        ("POST", format!("{A}/v1/media/localhost/delete?before_ts=99999999999999")),
        ("POST", r(&format!("{A}/v1/quarantine_media/{{r}}"))),
        ("POST", "/_trellis/admin/v1/appservices".to_owned()),
        ("DELETE", "/_trellis/admin/v1/appservices/x".to_owned()),
        ("GET", "/_trellis/admin/v1/audit".to_owned()),
        ("GET", "/_trellis/admin/v1/appservices".to_owned()),
    ]
}

async fn call(s: &TestServer, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = s.client.request(method, s.url(path)).json(&json!({}));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    json_of(req.send().await.unwrap()).await
}

#[tokio::test]
async fn only_admins_reach_the_admin_api_and_every_call_is_audited() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;

    let (status, body) = s.get(&format!("{A}/v1/server_version")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["server_version"].as_str().unwrap().starts_with("Trellis"), "{body}");

    for (method, path) in admin_routes(&alice_id, &room) {
        let (status, body) = call(&s, method, &path, Some(&alice)).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(body["errcode"], "M_FORBIDDEN", "{method} {path}");
        let (status, body) = call(&s, method, &path, None).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(body["errcode"], "M_MISSING_TOKEN", "{method} {path}");
    }
    // Nothing was changed by the refused calls.
    let (status, body) =
        s.get_auth(&user_path(&format!("{A}/v2/users/{{u}}"), &alice_id), &admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["admin"], false);
    assert_eq!(body["deactivated"], false);
    assert_eq!(body["shadow_banned"], false);

    // The refusals and the admin's own call are in the audit log, with who and what.
    let (status, body) =
        s.get_auth("/_trellis/admin/v1/audit?action=admin_api&actor=alice&limit=500", &admin).await;
    assert_eq!(status, 200, "{body}");
    let entries = body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), admin_routes(&alice_id, &room).len(), "{body}");
    assert!(entries.iter().all(|e| e["outcome"] == "forbidden" && e["actor"] == alice_id));
    assert!(
        entries.iter().any(|e| e["detail"] == format!("PUT {A}/v2/users/{alice_id}")),
        "{body}"
    );
    // Newest first: the admin's last call was the audit query above.
    let (_, body) = s.get_auth("/_trellis/admin/v1/audit?actor=root&limit=1", &admin).await;
    let newest = &body["entries"][0];
    assert_eq!(newest["actor"], "@root:localhost", "{body}");
    assert_eq!(newest["detail"], "GET /_trellis/admin/v1/audit", "{body}");
    assert_eq!(newest["outcome"], "ok");
    // Paging goes on from the last record shown, older ones next.
    let next = body["next_token"].as_str().unwrap().to_owned();
    let (_, more) = s
        .get_auth(&format!("/_trellis/admin/v1/audit?actor=root&limit=1&from={next}"), &admin)
        .await;
    assert_eq!(more["entries"][0]["detail"], format!("GET {A}/v2/users/{alice_id}"), "{more}");
}

#[tokio::test]
async fn admins_list_create_change_and_deactivate_accounts() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    for name in ["bob", "carol", "dave"] {
        s.register(name).await;
    }

    // Created through the API: 201, with the details in the answer.
    let eve = "@eve:localhost";
    let eve_path = user_path(&format!("{A}/v2/users/{{u}}"), eve);
    let body = json!({"password": "eve's password", "displayname": "Eve Example",
                      "threepids": [{"medium": "email", "address": "Eve@Example.org"}],
                      "user_type": "bot"});
    let resp = s.client.put(s.url(&eve_path)).bearer_auth(&admin).json(&body).send().await.unwrap();
    let (status, created) = json_of(resp).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], eve);
    assert_eq!(created["displayname"], "Eve Example");
    assert_eq!(created["user_type"], "bot");
    assert_eq!(created["threepids"][0]["address"], "eve@example.org", "{created}");
    let login = json!({"type": "m.login.password", "password": "eve's password",
                       "identifier": {"type": "m.id.user", "user": "eve"}});
    let (status, _) = s.post("/_matrix/client/v3/login", &login).await;
    assert_eq!(status, 200);
    let (status, body) =
        s.get_auth(&format!("{A}/v1/threepid/email/users/eve%40example.org"), &admin).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some(eve)), "{body}");

    // Changed: 200; made an admin.
    let (status, changed) =
        s.put_auth(&eve_path, &admin, &json!({"displayname": "Eve", "admin": true})).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (changed["displayname"].as_str(), changed["admin"].as_bool()),
        (Some("Eve"), Some(true))
    );
    let (_, body) = s.get_auth(&user_path(&format!("{A}/v1/users/{{u}}/admin"), eve), &admin).await;
    assert_eq!(body["admin"], true);
    // An admin cannot demote themself.
    let root_admin = user_path(&format!("{A}/v1/users/{{u}}/admin"), "@root:localhost");
    let (status, _) = s.put_auth(&root_admin, &admin, &json!({"admin": false})).await;
    assert_eq!(status, 400);

    // Listing: filters, order and pages.
    let (status, page1) = s.get_auth(&format!("{A}/v2/users?limit=2&order_by=name"), &admin).await;
    assert_eq!(status, 200, "{page1}");
    assert_eq!(page1["total"], 5, "{page1}");
    let names: Vec<&str> =
        page1["users"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["@bob:localhost", "@carol:localhost"]);
    assert_eq!(page1["next_token"], "2");
    let (_, page3) = s.get_auth(&format!("{A}/v2/users?limit=2&from=4"), &admin).await;
    assert_eq!(page3["users"][0]["name"], "@root:localhost");
    assert!(page3.get("next_token").is_none(), "{page3}");
    let (_, by_name) = s.get_auth(&format!("{A}/v2/users?name=car"), &admin).await;
    assert_eq!(by_name["total"], 1);
    let (_, admins) = s.get_auth(&format!("{A}/v2/users?admins=true&dir=b"), &admin).await;
    let names: Vec<&str> =
        admins["users"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["@root:localhost", eve]);
    let (_, no_bots) = s.get_auth(&format!("{A}/v2/users?not_user_type=bot"), &admin).await;
    assert_eq!(no_bots["total"], 4);
    let (status, body) = s.get_auth(&format!("{A}/v2/users?order_by=shoe_size"), &admin).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));

    // Password reset signs the user out; the new password works.
    let (_, bob) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "password": "password123",
                "identifier": {"type": "m.id.user", "user": "bob"}}),
        )
        .await;
    let bob_token = bob["access_token"].as_str().unwrap();
    let bob_id = "@bob:localhost";
    // Seen with its user agent.
    let resp = s
        .client
        .get(s.url("/_matrix/client/v3/account/whoami"))
        .bearer_auth(bob_token)
        .header("user-agent", "TestClient/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, devices) =
        s.get_auth(&user_path(&format!("{A}/v2/users/{{u}}/devices"), bob_id), &admin).await;
    assert_eq!(devices["total"], 2, "{devices}");
    let agents: Vec<&Value> =
        devices["devices"].as_array().unwrap().iter().map(|d| &d["last_seen_user_agent"]).collect();
    assert!(agents.contains(&&json!("TestClient/1.0")), "{devices}");
    let (_, whois) = s.get_auth(&user_path(&format!("{A}/v1/whois/{{u}}"), bob_id), &admin).await;
    assert_eq!(whois["devices"].as_object().unwrap().len(), 2, "{whois}");
    let reset = user_path(&format!("{A}/v1/reset_password/{{u}}"), bob_id);
    let (status, _) = s.post_auth(&reset, &admin, &json!({})).await;
    assert_eq!(status, 400, "new_password is required");
    let (status, _) = s.post_auth(&reset, &admin, &json!({"new_password": "fresh one"})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth("/_matrix/client/v3/account/whoami", bob_token).await;
    assert_eq!(status, 401);

    // Logging in as a user gives a token of theirs, on a device they can see.
    let login_path = user_path(&format!("{A}/v1/users/{{u}}/login"), "@carol:localhost");
    let (status, body) = s.post_auth(&login_path, &admin, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, who) = s
        .get_auth("/_matrix/client/v3/account/whoami", body["access_token"].as_str().unwrap())
        .await;
    assert_eq!(who["user_id"], "@carol:localhost");

    // Rate-limit overrides are stored and removed.
    let rl = user_path(&format!("{A}/v1/users/{{u}}/override_ratelimit"), bob_id);
    let (_, body) = s.get_auth(&rl, &admin).await;
    assert_eq!(body, json!({}));
    let (_, body) =
        s.post_auth(&rl, &admin, &json!({"messages_per_second": 0, "burst_count": 0})).await;
    assert_eq!(body, json!({"messages_per_second": 0, "burst_count": 0}));
    let (status, _) = s.post_auth(&rl, &admin, &json!({"messages_per_second": -1})).await;
    assert_eq!(status, 400);
    let (_, body) = s.get_auth(&rl, &admin).await;
    assert_eq!(body["burst_count"], 0);
    s.delete_auth(&rl, &admin, &json!({})).await;
    let (_, body) = s.get_auth(&rl, &admin).await;
    assert_eq!(body, json!({}));

    // Usernames: taken, reserved, free.
    let (status, body) =
        s.get_auth(&format!("{A}/v1/username_available?username=bob"), &admin).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (_, body) = s.get_auth(&format!("{A}/v1/username_available?username=frank"), &admin).await;
    assert_eq!(body["available"], true);

    // Deactivation with erasure: gone from the v2 listing, there with deactivated=true.
    let dave = "@dave:localhost";
    let (status, body) = s
        .post_auth(
            &user_path(&format!("{A}/v1/deactivate/{{u}}"), dave),
            &admin,
            &json!({"erase": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = s.get_auth(&format!("{A}/v2/users?name=dave"), &admin).await;
    assert_eq!(listed["total"], 0);
    let (_, listed) = s.get_auth(&format!("{A}/v3/users?deactivated=true"), &admin).await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["users"][0]["erased"], true);
    let (status, _) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "password": "password123",
                "identifier": {"type": "m.id.user", "user": "dave"}}),
        )
        .await;
    assert_eq!(status, 403);
    // An admin brings the account back with a password.
    let dave_path = user_path(&format!("{A}/v2/users/{{u}}"), dave);
    let (status, _) = s.put_auth(&dave_path, &admin, &json!({"deactivated": false})).await;
    assert_eq!(status, 400, "reactivation needs a password");
    let (status, body) = s
        .put_auth(&dave_path, &admin, &json!({"deactivated": false, "password": "back again"}))
        .await;
    assert_eq!((status, body["deactivated"].as_bool()), (200, Some(false)), "{body}");

    // Locked through the user's record: its token answers M_USER_LOCKED.
    let (status, body) =
        s.put_auth(&eve_path, &admin, &json!({"locked": true, "admin": false})).await;
    assert_eq!(status, 200, "{body}");
    let (_, eve_login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password",
        "password": "eve's password", "identifier": {"type": "m.id.user", "user": "eve"}}),
        )
        .await;
    assert_eq!(eve_login["errcode"], "M_USER_LOCKED", "{eve_login}");
    // Suspension through Synapse's path.
    let (status, body) = s
        .put_auth(
            &user_path(&format!("{A}/v1/suspend/{{u}}"), "@carol:localhost"),
            &admin,
            &json!({"suspend": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_@carol:localhost_suspended"], true, "{body}");
    let (status, body) =
        s.get_auth(&user_path(&format!("{A}/v2/users/{{u}}"), "@carol:localhost"), &admin).await;
    assert_eq!((status, body["suspended"].as_bool()), (200, Some(true)));
    let (status, _) =
        s.get_auth(&user_path(&format!("{A}/v2/users/{{u}}"), "@nobody:localhost"), &admin).await;
    assert_eq!(status, 404);
    let (status, _) = s
        .get_auth(&user_path(&format!("{A}/v2/users/{{u}}"), "@x:elsewhere.example"), &admin)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_shadow_banned_user_is_told_it_sent_what_nobody_receives() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (mallory_id, mallory) = s.register("mallory").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&mallory, &room).await;
    let ban = user_path(&format!("{A}/v1/users/{{u}}/shadow_ban"), &mallory_id);
    let (status, _) = s.post_auth(&ban, &admin, &json!({})).await;
    assert_eq!(status, 200);

    let hidden = s.send_text(&mallory, &room, "spam spam spam").await;
    assert!(hidden.starts_with('$'));
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{mallory_id}");
    let (status, _) =
        s.put_auth(&typing, &mallory, &json!({"typing": true, "timeout": 30000})).await;
    assert_eq!(status, 200);
    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    let ephemeral = sync["rooms"]["join"][&room]["ephemeral"]["events"].to_string();
    assert!(!ephemeral.contains(&mallory_id), "nobody sees the banned user typing: {ephemeral}");
    // The ban outlives a restart.
    s.terminate();
    s.launch().await;
    let hidden_later = s.send_text(&mallory, &room, "more spam").await;
    let (_, carol) = s.register("carol").await;
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &mallory,
            &json!({"user_id": "@carol:localhost"}),
        )
        .await;
    assert_eq!(status, 200, "the invite seems to work");
    s.create_room(&mallory, json!({"invite": ["@carol:localhost"]})).await;
    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &carol).await;
    let invites = sync["rooms"]["invite"].as_object().map_or(0, |o| o.len());
    assert_eq!(invites, 0, "neither invite arrives: {sync}");

    s.delete_auth(&ban, &admin, &json!({})).await;
    let seen = s.send_text(&mallory, &room, "hello, honestly").await;
    let (_, messages) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), &alice)
        .await;
    let ids: Vec<&str> = messages["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert!(ids.contains(&seen.as_str()), "{messages}");
    assert!(!ids.contains(&hidden.as_str()), "{messages}");
    assert!(!ids.contains(&hidden_later.as_str()), "{messages}");
}

#[tokio::test]
async fn admins_inspect_block_and_shut_down_rooms() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (_, carol) = s.register("carol").await;
    let big = s
        .create_room(
            &alice,
            json!({"name": "Big Room", "preset": "public_chat",
                                     "room_alias_name": "big", "visibility": "public"}),
        )
        .await;
    let small = s.create_room(&alice, json!({"name": "Small talk"})).await;
    s.join_room(&bob, &big).await;
    s.join_room(&carol, &big).await;
    let first_words = s.send_text(&alice, &big, "first words").await;

    let (status, list) = s.get_auth(&format!("{A}/v1/rooms?order_by=joined_members"), &admin).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total_rooms"], 2);
    assert_eq!(list["rooms"][0]["room_id"], big, "largest first: {list}");
    assert_eq!(list["rooms"][0]["joined_members"], 3);
    assert_eq!(list["rooms"][0]["public"], true);
    assert_eq!(list["rooms"][0]["canonical_alias"], "#big:localhost");
    let (_, found) = s.get_auth(&format!("{A}/v1/rooms?search_term=small"), &admin).await;
    assert_eq!(found["total_rooms"], 1);
    assert_eq!(found["rooms"][0]["name"], "Small talk");
    let (_, page) = s.get_auth(&format!("{A}/v1/rooms?limit=1"), &admin).await;
    assert_eq!(
        (page["next_batch"].as_u64(), page["offset"].as_u64()),
        (Some(1), Some(0)),
        "{page}"
    );

    let big_path = format!("{A}/v1/rooms/{}", urlencode(&big));
    let (status, details) = s.get_auth(&big_path, &admin).await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(
        (details["name"].as_str(), details["creator"].as_str()),
        (Some("Big Room"), Some(alice_id.as_str()))
    );
    assert_eq!(details["join_rules"], "public");
    let (_, members) = s.get_auth(&format!("{big_path}/members"), &admin).await;
    assert_eq!(members["total"], 3);
    let (_, state) = s.get_auth(&format!("{big_path}/state?type=m.room.name"), &admin).await;
    assert_eq!(state["state"][0]["content"]["name"], "Big Room", "{state}");
    // The admin reads history without being in the room.
    let (status, messages) =
        s.get_auth(&format!("{big_path}/messages?dir=b&limit=5"), &admin).await;
    assert_eq!(status, 200, "{messages}");
    assert_eq!(messages["chunk"][0]["content"]["body"], "first words", "{messages}");
    let (status, _) =
        s.get_auth(&format!("{A}/v1/rooms/{}", urlencode("!nope:localhost")), &admin).await;
    assert_eq!(status, 404);
    let (_, sizes) = s.get_auth(&format!("{A}/v1/statistics/database/rooms"), &admin).await;
    assert_eq!(sizes["rooms"][0]["room_id"], big, "the room with most events first: {sizes}");
    let size = |i: usize| sizes["rooms"][i]["estimated_size"].as_u64().unwrap();
    assert!(size(0) > size(1), "{sizes}");
    let (_, extremities) = s.get_auth(&format!("{big_path}/forward_extremities"), &admin).await;
    assert_eq!(extremities["count"], 1, "{extremities}");
    let (status, trimmed) =
        s.delete_auth(&format!("{big_path}/forward_extremities"), &admin, &json!({})).await;
    assert_eq!((status, trimmed["deleted"].as_u64()), (200, Some(0)), "one extremity is kept");

    // Making bob the room's admin: alice (power 100) grants him her level.
    let (status, body) = s
        .post_auth(&format!("{big_path}/make_room_admin"), &admin, &json!({"user_id": bob_id}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, power) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{big}/state/m.room.power_levels/"), &alice)
        .await;
    assert_eq!(power["users"][&bob_id], 100, "{power}");

    // A user joined by an admin to an invite-only room the admin is in.
    let (status, body) = s
        .post_auth(
            &format!("{A}/v1/join/{}", urlencode(&small)),
            &admin,
            &json!({"user_id": bob_id}),
        )
        .await;
    assert_eq!(status, 403, "the admin is not in the room to invite: {body}");

    // Blocked: nobody of this server joins.
    let block = format!("{A}/v1/rooms/{}/block", urlencode(&small));
    let (status, body) = s.put_auth(&block, &admin, &json!({"block": true})).await;
    assert_eq!((status, body["block"].as_bool()), (200, Some(true)));
    let (_, body) = s.get_auth(&block, &admin).await;
    assert_eq!(body, json!({"block": true, "user_id": "@root:localhost"}));
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{small}/invite"),
            &alice,
            &json!({"user_id": bob_id}),
        )
        .await;
    assert_eq!(status, 403);
    s.put_auth(&block, &admin, &json!({"block": false})).await;

    // Shut down: everyone moves to a new room that says why; the alias follows.
    let v2 = format!("{A}/v2/rooms/{}", urlencode(&big));
    let body = json!({"new_room_user_id": "@moderator:localhost", "room_name": "Closed",
                      "message": "This room broke the rules.", "block": true});
    let (status, started) = s.delete_auth(&v2, &admin, &body).await;
    assert_eq!(status, 200, "{started}");
    let delete_id = started["delete_id"].as_str().unwrap().to_owned();
    let mut done = Value::Null;
    for _ in 0..100 {
        let (_, status) =
            s.get_auth(&format!("{A}/v2/rooms/delete_status/{delete_id}"), &admin).await;
        if status["status"] == "complete" || status["status"] == "failed" {
            done = status;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "complete", "{done}");
    let result = &done["shutdown_room"];
    assert_eq!(result["kicked_users"].as_array().unwrap().len(), 3, "{done}");
    assert_eq!(result["local_aliases"], json!(["#big:localhost"]));
    let new_room = result["new_room_id"].as_str().unwrap();
    let (_, joined) = s.get_auth("/_matrix/client/v3/joined_rooms", &carol).await;
    assert_eq!(joined["joined_rooms"], json!([new_room]), "{joined}");
    let (_, alias) = s.get("/_matrix/client/v3/directory/room/%23big:localhost").await;
    assert_eq!(alias["room_id"], new_room);
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/join/{big}"), &carol, &json!({})).await;
    assert_eq!(status, 403, "the room is blocked");
    let (_, statuses) = s.get_auth(&format!("{v2}/delete_status"), &admin).await;
    assert_eq!(statuses["results"][0]["delete_id"], delete_id.as_str());

    // Purged (the default): nothing of the old room is served any more, before or after
    // a restart.
    assert_eq!(result["purged"], true, "{done}");
    for round in 0..2 {
        let (status, _) = s.get_auth(&big_path, &admin).await;
        assert_eq!(status, 404, "round {round}");
        let (_, list) = s.get_auth(&format!("{A}/v1/rooms"), &admin).await;
        let ids: Vec<&str> = list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&big.as_str()), "{list}");
        let (status, _) = s.get_auth(&format!("{big_path}/messages?dir=b"), &admin).await;
        assert_eq!(status, 404, "round {round}");
        let (status, _) = s
            .get_auth(&format!("/_matrix/client/v3/rooms/{big}/event/{first_words}"), &alice)
            .await;
        assert_eq!(status, 403, "round {round}");
        let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &carol).await;
        assert!(sync["rooms"]["leave"].get(&big).is_none(), "{sync}");
        assert!(!sync.to_string().contains("first words"), "{sync}");
        let (_, found) = s
            .post_auth(
                "/_matrix/client/v3/search",
                &alice,
                &json!({"search_categories": {"room_events": {"search_term": "first"}}}),
            )
            .await;
        assert_eq!(found["search_categories"]["room_events"]["results"], json!([]), "{found}");
        if round == 0 {
            s.terminate();
            s.launch().await;
        }
    }
    // The new room says why (its members read; they do not speak there).
    let (_, messages) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{new_room}/messages?dir=b&limit=20"), &carol)
        .await;
    assert!(messages.to_string().contains("This room broke the rules."), "{messages}");
}

#[tokio::test]
async fn admins_manage_media_and_see_who_stores_what() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let mut ids = Vec::new();
    for (i, size) in [10usize, 2000, 300].into_iter().enumerate() {
        let resp = s
            .client
            .post(s.url(&format!("/_matrix/media/v3/upload?filename=f{i}.bin")))
            .bearer_auth(&alice)
            .header("content-type", "application/octet-stream")
            .body(vec![i as u8; size])
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned());
    }
    let media = user_path(&format!("{A}/v1/users/{{u}}/media"), &alice_id);
    let (status, list) = s.get_auth(&format!("{media}?order_by=media_length&dir=b"), &admin).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 3);
    assert_eq!(list["media"][0]["media_length"], 2000);
    assert_eq!(list["media"][0]["upload_name"], "f1.bin");

    let (_, stats) = s.get_auth(&format!("{A}/v1/statistics/users/media"), &admin).await;
    assert_eq!(
        stats["users"][0],
        json!({"user_id": alice_id, "displayname": "alice",
                                         "media_count": 3, "media_length": 2310}),
        "{stats}"
    );

    // Protected media survives the user's quarantine; the rest is served to nobody.
    let (status, _) =
        s.post_auth(&format!("{A}/v1/media/protect/{}", ids[0]), &admin, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s
        .post_auth(
            &user_path(&format!("{A}/v1/user/{{u}}/media/quarantine"), &alice_id),
            &admin,
            &json!({}),
        )
        .await;
    assert_eq!((status, body["num_quarantined"].as_u64()), (200, Some(2)), "{body}");
    let download = |id: &str| format!("/_matrix/client/v1/media/download/localhost/{id}");
    let status =
        s.client.get(s.url(&download(&ids[1]))).bearer_auth(&alice).send().await.unwrap().status();
    assert_eq!(status, 404);
    let status =
        s.client.get(s.url(&download(&ids[0]))).bearer_auth(&alice).send().await.unwrap().status();
    assert_eq!(status, 200);
    let (_, info) = s.get_auth(&format!("{A}/v1/media/localhost/{}", ids[1]), &admin).await;
    assert_eq!(info["media_info"]["quarantined_by"], "@root:localhost", "{info}");
    s.post_auth(&format!("{A}/v1/media/unquarantine/localhost/{}", ids[1]), &admin, &json!({}))
        .await;
    let status =
        s.client.get(s.url(&download(&ids[1]))).bearer_auth(&alice).send().await.unwrap().status();
    assert_eq!(status, 200);

    // Clean-ups by age and size: only the large unprotected file goes.
    let (status, body) =
        s.post_auth(&format!("{A}/v1/media/delete?before_ts=1000"), &admin, &json!({})).await;
    assert_eq!(status, 400, "seconds, not milliseconds: {body}");
    let far_future = 99_999_999_999_999u64;
    let (status, body) = s
        .post_auth(
            &format!("{A}/v1/media/delete?before_ts={far_future}&size_gt=1000"),
            &admin,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted_media"], json!([ids[1]]));
    let (_, list) = s.get_auth(&media, &admin).await;
    assert_eq!(list["total"], 2);
    let (status, _) =
        s.delete_auth(&format!("{A}/v1/media/localhost/{}", ids[2]), &admin, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth(&format!("{A}/v1/media/localhost/{}", ids[2]), &admin).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn server_notices_reach_the_user_in_a_room_of_their_own() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let notice = json!({"user_id": alice_id, "content": {"msgtype": "m.text", "body": "Maintenance at noon"}});
    let path = format!("{A}/v1/send_server_notice/{}", txn_id());
    let (status, first) = s.put_auth(&path, &admin, &notice).await;
    assert_eq!(status, 200, "{first}");
    let (_, again) = s.put_auth(&path, &admin, &notice).await;
    assert_eq!(again["event_id"], first["event_id"], "a retried transaction sends nothing new");

    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    let invites = sync["rooms"]["invite"].as_object().unwrap();
    assert_eq!(invites.len(), 1, "{sync}");
    let room = invites.keys().next().unwrap().clone();
    // The invite cannot be turned down.
    let (status, body) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &alice, &json!({})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_CANNOT_LEAVE_SERVER_NOTICE_ROOM"))
    );
    s.join_room(&alice, &room).await;
    let (_, tags) =
        s.get_auth(&format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags"), &alice).await;
    assert!(tags["tags"].get("m.server_notice").is_some(), "{tags}");
    let (_, messages) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=5"), &alice)
        .await;
    let notice_event = messages["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.message")
        .unwrap();
    assert_eq!(notice_event["content"]["body"], "Maintenance at noon");
    assert_eq!(notice_event["sender"], "@_server:localhost");
    // The user only reads there.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", txn_id()),
            &alice,
            &json!({"msgtype": "m.text", "body": "reply"}),
        )
        .await;
    assert_eq!(status, 403);
    // A second notice lands in the same room.
    let (status, _) = s
        .post_auth(
            &format!("{A}/v1/send_server_notice"),
            &admin,
            &json!({"user_id": alice_id, "content": {"msgtype": "m.text", "body": "Done"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, joined) = s.get_auth("/_matrix/client/v3/joined_rooms", &alice).await;
    assert_eq!(joined["joined_rooms"], json!([room]));
    let (status, body) = s
        .post_auth(
            &format!("{A}/v1/send_server_notice"),
            &admin,
            &json!({"user_id": "@ghost:localhost", "content": {"body": "x"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
}

/// synadm, the Synapse admin command line from PyPI (installed by `.ci/install-deps`),
/// in JSON output mode: what it prints.
fn synadm(config: &std::path::Path, args: &[&str]) -> Value {
    let out = std::process::Command::new("python3")
        .args(["-m", "synadm", "-c", config.to_str().unwrap(), "--batch", "-o", "minified"])
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "synadm {args:?}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Some commands print the state before a change, then the answer: the last line.
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{') || l.starts_with('[') || l.starts_with('"'));
    serde_json::from_str(last.unwrap_or("null"))
        .unwrap_or_else(|_| panic!("synadm {args:?}: {stdout}"))
}

#[tokio::test]
async fn synadm_manages_users_rooms_and_notices() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let room =
        s.create_room(&alice, json!({"name": "Town square", "room_alias_name": "town"})).await;
    let config = s.dir.path().join("synadm.yaml");
    std::fs::write(
        &config,
        format!(
            "user: \"@root:localhost\"\ntoken: \"{admin}\"\nprotocol: http\nbase_url: \"{}\"\n\
             admin_path: /_synapse/admin\nmatrix_path: /_matrix\nformat: json\ntimeout: 30\n\
             homeserver: localhost\nserver_discovery: well-known\nssl_verify: false\n",
            s.base
        ),
    )
    .unwrap();

    let version = synadm(&config, &["version"]);
    assert!(version["server_version"].as_str().unwrap().starts_with("Trellis"), "{version}");
    let users = synadm(&config, &["user", "list"]);
    assert_eq!(users["total"], 2, "{users}");
    let found = synadm(&config, &["user", "search", "ali"]);
    assert_eq!(found["users"][0]["name"], alice_id.as_str(), "{found}");
    let changed = synadm(&config, &["user", "modify", &alice_id, "--display-name", "Alice A."]);
    assert_eq!(changed["displayname"], "Alice A.", "{changed}");

    let rooms = synadm(&config, &["room", "list"]);
    assert_eq!(rooms["rooms"][0]["name"], "Town square", "{rooms}");
    assert_eq!(synadm(&config, &["room", "resolve", "#town:localhost"]), json!(room));
    let details = synadm(&config, &["room", "details", &room]);
    assert_eq!(details["canonical_alias"], "#town:localhost", "{details}");
    let members = synadm(&config, &["room", "members", &room]);
    assert_eq!(members["members"], json!([alice_id]), "{members}");
    assert_eq!(synadm(&config, &["room", "block", &room])["block"], true);
    assert_eq!(synadm(&config, &["room", "block-status", &room])["user_id"], "@root:localhost");

    let sent = synadm(&config, &["notice", "send", &alice_id, "Hello from synadm"]);
    assert!(sent[0]["event_id"].as_str().unwrap().starts_with('$'), "{sent}");
    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    assert_eq!(sync["rooms"]["invite"].as_object().unwrap().len(), 1, "{sync}");

    synadm(&config, &["user", "deactivate", &alice_id]);
    let details = synadm(&config, &["user", "details", &alice_id]);
    assert_eq!(details["deactivated"], true, "{details}");
    let (status, _) = s.get_auth("/_matrix/client/v3/account/whoami", &alice).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn reports_are_triaged_with_status_assignee_and_notes() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, _) = s.register("bob").await;
    let room = s.create_room(&alice, json!({})).await;
    let event = s.send_text(&alice, &room, "look at this").await;
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/report/{event}"),
            &alice,
            &json!({"reason": "spam"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/users/{bob_id}/report"),
            &alice,
            &json!({"reason": "rude"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, list) = s.get_auth(&format!("{A}/v1/event_reports?status=open"), &admin).await;
    assert_eq!(list["total"], 2, "{list}");
    let id = list["event_reports"][0]["id"].as_u64().unwrap();
    let triage = format!("/_trellis/admin/v1/reports/{id}");

    let (status, report) = s
        .put_auth(
            &triage,
            &admin,
            &json!({"assignee": "@root:localhost", "note": "looking into it"}),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["status"], "assigned");
    assert_eq!(report["assignee"], "@root:localhost");
    assert_eq!(report["notes"][0]["text"], "looking into it");
    assert_eq!(report["notes"][0]["author"], "@root:localhost");
    let (_, report) =
        s.put_auth(&triage, &admin, &json!({"status": "resolved", "note": "warned"})).await;
    assert_eq!(report["status"], "resolved");
    assert_eq!(report["notes"].as_array().unwrap().len(), 2);
    let (status, _) = s.put_auth(&triage, &admin, &json!({"status": "closed"})).await;
    assert_eq!(status, 400);
    let (status, _) =
        s.put_auth("/_trellis/admin/v1/reports/999", &admin, &json!({"note": "x"})).await;
    assert_eq!(status, 404);

    let (_, open) = s.get_auth(&format!("{A}/v1/event_reports?status=open"), &admin).await;
    assert_eq!(open["total"], 1);
    let (_, resolved) = s.get_auth(&format!("{A}/v1/event_reports?status=resolved"), &admin).await;
    assert_eq!(resolved["event_reports"][0]["id"], id);
    let (_, audit) = s.get_auth("/_trellis/admin/v1/audit?action=report_triage", &admin).await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 2, "{audit}");
}

const POLICY: &str = "[content_policy]\nwords = [\"scam\"]\nlink_domains = [\"bad.example\"]\n\
check_names = true\n";

#[tokio::test]
async fn the_content_policy_refuses_what_public_rooms_may_not_carry() {
    let s = TestServer::start(&format!("{OPEN}{POLICY}")).await;
    let (_, alice) = s.register("alice").await;
    let public = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let private = s.create_room(&alice, json!({"preset": "private_chat"})).await;
    let send = |room: &str, body: &str| {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", txn_id());
        (path, json!({"msgtype": "m.text", "body": body}))
    };
    for body in ["total SCAM here", "visit https://www.bad.example/win"] {
        let (path, content) = send(&public, body);
        let (status, resp) = s.put_auth(&path, &alice, &content).await;
        assert_eq!(
            (status, resp["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{body}: {resp}"
        );
    }
    // An edit is held to the policy by the text it shows.
    let original = s.send_text(&alice, &public, "all fine").await;
    let (path, _) = send(&public, "");
    let edit = json!({"msgtype": "m.text", "body": "* all fine",
        "m.new_content": {"msgtype": "m.text", "body": "a scam after all"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original}});
    let (status, resp) = s.put_auth(&path, &alice, &edit).await;
    assert_eq!(status, 403, "{resp}");
    for (room, body) in [
        (&public, "scampi are tasty"),
        (&public, "notbad.example is fine"),
        (&private, "a scam among friends"),
    ] {
        let (path, content) = send(room, body);
        let (status, resp) = s.put_auth(&path, &alice, &content).await;
        assert_eq!(status, 200, "{body}: {resp}");
    }
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "scammer", "password": "password123",
                "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_USERNAME")), "{body}");
}

#[tokio::test]
async fn flagged_content_lands_in_the_reports_queue() {
    let mut s = TestServer::start(&format!("{OPEN}{POLICY}action = \"flag\"\n")).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let public = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let flagged = s.send_text(&alice, &public, "a scam, honestly").await;
    let (_, scammer) = s.register("scammer").await;
    assert!(!scammer.is_empty());

    let (_, list) = s.get_auth(&format!("{A}/v1/event_reports?dir=f"), &admin).await;
    assert_eq!(list["total"], 2, "{list}");
    let first = &list["event_reports"][0];
    assert_eq!(first["event_id"], flagged.as_str());
    assert_eq!(first["user_id"], "localhost", "filed by the server: {first}");
    assert!(first["reason"].as_str().unwrap().contains("scam"), "{first}");
    assert_eq!(list["event_reports"][1]["target_user_id"], "@scammer:localhost");
}

#[tokio::test]
async fn federation_destinations_show_how_sending_goes() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    // A server nobody answers at: the to-device message waits in its queue.
    let dead = "127.0.0.1:1";
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/sendToDevice/m.test/{}", txn_id()),
            &alice,
            &json!({"messages": {format!("@bob:{dead}"): {"*": {"hello": 1}}}}),
        )
        .await;
    assert_eq!(status, 200);
    let mut found = Value::Null;
    for _ in 0..100 {
        let (_, list) = s.get_auth(&format!("{A}/v1/federation/destinations"), &admin).await;
        if list["destinations"][0]["failures"].as_u64().unwrap_or(0) > 0 {
            found = list;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let d = &found["destinations"][0];
    assert_eq!(d["destination"], dead, "{found}");
    assert!(d["retry_last_ts"].as_u64().unwrap() > 0, "{d}");
    assert!(d["failure_ts"].as_u64().is_some(), "{d}");
    assert_eq!(d["queued"], 1, "{d}");
    assert_eq!(found["total"], 1);
    let one = format!("{A}/v1/federation/destinations/{dead}");
    let (status, body) = s.get_auth(&one, &admin).await;
    assert_eq!((status, body["destination"].as_str()), (200, Some(dead)));
    let (_, rooms) = s.get_auth(&format!("{one}/rooms"), &admin).await;
    assert_eq!(rooms["total"], 0);
    let (status, body) = s.post_auth(&format!("{one}/reset_connection"), &admin, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) =
        s.get_auth(&format!("{A}/v1/federation/destinations/nowhere.example"), &admin).await;
    assert_eq!(status, 404);
    let (_, filtered) =
        s.get_auth(&format!("{A}/v1/federation/destinations?destination=nowhere"), &admin).await;
    assert_eq!(filtered["total"], 0);
}

#[tokio::test]
async fn the_dashboard_and_analytics_count_what_users_do() {
    let mut s = TestServer::start(OPEN).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    for text in ["one", "two", "three"] {
        s.send_text(&alice, &room, text).await;
    }
    let last = s.send_text(&bob, &room, "four").await;
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{last}"),
            &alice,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, dash) = s.get_auth("/_trellis/admin/v1/dashboard", &admin).await;
    assert_eq!(status, 200, "{dash}");
    assert_eq!(dash["users"]["total"], 3, "{dash}");
    assert_eq!(dash["rooms"], 1);
    assert_eq!(dash["messages_per_hour"].as_array().unwrap().len(), 24);
    assert_eq!(dash["messages_per_hour"][23]["messages"], 4, "{dash}");
    assert!(dash["users"]["active_now"].as_u64().unwrap() >= 2, "{dash}");
    assert!(dash["requests"]["total"].as_u64().unwrap() > 10);
    assert_eq!(dash["federation"]["failing"], 0);

    let (status, report) = s.get_auth("/_trellis/admin/v1/analytics?days=7", &admin).await;
    assert_eq!(status, 200, "{report}");
    let today = &report["daily"][6];
    assert_eq!(today["messages_sent"], 4, "{report}");
    assert_eq!(today["read_receipts"], 1, "{report}");
    assert_eq!(today["active_users"], 3, "{report}");
    assert_eq!(report["daily_active_users"], 3);
    assert_eq!(report["rooms"][0], json!({"room_id": room, "messages": 4}));
    assert_eq!(report["cohorts"][0]["registered"], 3, "{report}");
    assert_eq!(report["cohorts"][0]["active_day_1"], Value::Null);
    let (status, _) = s.get_auth("/_trellis/admin/v1/analytics?days=0", &admin).await;
    assert_eq!(status, 400);

    // Kept across a restart, and in Prometheus.
    s.terminate();
    s.launch().await;
    let (_, report) = s.get_auth("/_trellis/admin/v1/analytics?days=1", &admin).await;
    assert_eq!(report["daily"][0]["messages_sent"], 4, "{report}");
    s.send_text(&bob, &room, "five").await;
    let text = s.metrics().await;
    assert!(text.contains("trellis_messages_total{direction=\"sent\"} 1"), "{text}");
    assert!(text.contains("trellis_active_users{window=\"day\"} 3"), "{text}");
    assert!(text.contains("trellis_process_start_time_seconds"), "{text}");

    // Polling the dashboard leaves no audit records; other calls do.
    let (_, audit) = s.get_auth("/_trellis/admin/v1/audit?target=dashboard", &admin).await;
    assert_eq!(audit["entries"], json!([]), "{audit}");
    let (_, audit) = s.get_auth("/_trellis/admin/v1/audit?target=analytics", &admin).await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "only the refused read: {audit}");
    assert_eq!(audit["entries"][0]["outcome"], "400");
}

#[tokio::test]
async fn the_admin_panel_is_served_with_a_strict_policy() {
    let s = TestServer::start(OPEN).await;
    let resp = s.client.get(s.url("/_trellis/admin/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let page = resp.text().await.unwrap();
    assert!(page.contains("<script src=\"app.js\" defer></script>"));
    assert!(!page.contains("<script>"), "no inline script");
    for (path, kind) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let resp = s.client.get(s.url(&format!("/_trellis/admin/{path}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }
    let resp = s.client.get(s.url("/_trellis/admin")).send().await.unwrap();
    assert_eq!(resp.url().path(), "/_trellis/admin/", "redirected to the panel");
}

/// The panel in Debian's headless Chromium (installed by `.ci/install-deps`), driven by
/// `tests/interop/admin_panel.py` through Selenium; its screenshots are kept under the
/// test target directory (`admin-panel/`).
#[tokio::test]
async fn the_admin_panel_works_in_a_real_browser() {
    let mut s = TestServer::start(OPEN).await;
    admin_token(&mut s).await;
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, _) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"name": "Lobby", "preset": "public_chat"})).await;
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/users/{bob_id}/report"),
            &alice,
            &json!({"reason": "rude"}),
        )
        .await;
    assert_eq!(status, 200);
    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-panel");
    let _ = std::fs::remove_dir_all(&artefacts);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/admin_panel.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &s.base, "root", "admin password", &alice, &room, &bob_id])
        .arg(&artefacts)
        .arg(&alice_id)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
    assert!(artefacts.join("01-login.png").exists());

    // What the browser did is real: bob is deactivated, the report resolved.
    let admin = {
        let login = json!({"type": "m.login.password", "password": "admin password",
                           "identifier": {"type": "m.id.user", "user": "root"}});
        let (_, body) = s.post("/_matrix/client/v3/login", &login).await;
        body["access_token"].as_str().unwrap().to_owned()
    };
    let (_, bob) = s.get_auth(&user_path(&format!("{A}/v2/users/{{u}}"), &bob_id), &admin).await;
    assert_eq!(bob["deactivated"], true, "{bob}");
    let (_, reports) = s.get_auth(&format!("{A}/v1/event_reports?status=resolved"), &admin).await;
    assert_eq!(reports["total"], 1, "{reports}");
    assert_eq!(reports["event_reports"][0]["notes"][0]["text"], "handled in the panel");
    let (_, tokens) = s.get_auth(&format!("{A}/v1/registration_tokens"), &admin).await;
    assert_eq!(tokens["registration_tokens"].as_array().unwrap().len(), 1);
    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    assert_eq!(sync["rooms"]["invite"].as_object().unwrap().len(), 1, "the notice's room: {sync}");
}

#[tokio::test]
async fn background_jobs_regenerate_the_user_directory() {
    let mut s =
        TestServer::start(&format!("{OPEN}[user_directory]\nsearch_all_users = true\n")).await;
    let admin = admin_token(&mut s).await;
    let (_, alice) = s.register("alice").await;
    s.register("bob").await;
    let (_, body) = s.get_auth(&format!("{A}/v1/background_updates/enabled"), &admin).await;
    assert_eq!(body["enabled"], true);
    let (status, _) = s
        .post_auth(
            &format!("{A}/v1/background_updates/enabled"),
            &admin,
            &json!({"enabled": false}),
        )
        .await;
    assert_eq!(status, 400, "Trellis's background work cannot be paused");
    let start = format!("{A}/v1/background_updates/start_job");
    let (status, body) = s.post_auth(&start, &admin, &json!({"job_name": "event_resign"})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = s.post_auth(&start, &admin, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_MISSING_PARAM")));
    let (status, body) =
        s.post_auth(&start, &admin, &json!({"job_name": "regenerate_directory"})).await;
    assert_eq!(status, 200, "{body}");
    let mut idle = false;
    for _ in 0..100 {
        let (_, status) = s.get_auth(&format!("{A}/v1/background_updates/status"), &admin).await;
        if status["current_updates"] == json!({}) {
            idle = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(idle, "the job ends");
    let (_, found) = s
        .post_auth(
            "/_matrix/client/v3/user_directory/search",
            &alice,
            &json!({"search_term": "bob"}),
        )
        .await;
    assert_eq!(found["results"][0]["user_id"], "@bob:localhost", "{found}");
    let (_, audit) = s.get_auth("/_trellis/admin/v1/audit?target=start_job", &admin).await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 3, "{audit}");
}

/// docs/grafana-dashboard.json asks Prometheus only for metrics the server exports.
#[tokio::test]
async fn the_grafana_dashboard_names_metrics_that_exist() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    s.send_text(&alice, &room, "hello").await;
    let text = s.metrics().await;
    let dashboard: Value =
        serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("trellis_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // Families without samples yet are still declared (`# TYPE`).
                let base = ["_total", "_bucket"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name);
                assert!(text.contains(&format!("# TYPE {base} ")), "{name} is not exported");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");
}
