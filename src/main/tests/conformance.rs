//! Behaviour real clients and the reference suites rely on, item by item: fields clients
//! read unconditionally, legacy paths they still call, and the spec's smaller rules on
//! state, membership and sync.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

async fn sync(s: &TestServer, token: &str, query: &str) -> Value {
    let (status, body) = s.get_auth(&format!("/_matrix/client/v3/sync?{query}"), token).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A public room whose history anyone may read, made by `token`'s user.
async fn world_readable_room(s: &TestServer, token: &str) -> String {
    let visibility = json!({"type": "m.room.history_visibility", "state_key": "",
                            "content": {"history_visibility": "world_readable"}});
    s.create_room(token, json!({"preset": "public_chat", "initial_state": [visibility]})).await
}

/// A password login of `user` (registered with the harness's password) on a new device.
async fn log_in(s: &TestServer, user: &str) -> (u16, Value) {
    let body = json!({"type": "m.login.password", "password": "password123",
                      "identifier": {"type": "m.id.user", "user": user}});
    s.post("/_matrix/client/v3/login", &body).await
}

#[tokio::test]
async fn key_query_and_claim_always_carry_failures() {
    let s = TestServer::start(OPEN).await;
    let (alice, token) = s.register("alice").await;
    let (status, body) = s
        .post_auth("/_matrix/client/v3/keys/query", &token, &json!({"device_keys": {alice: []}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["failures"], json!({}), "{body}");
    let (status, body) =
        s.post_auth("/_matrix/client/v3/keys/claim", &token, &json!({"one_time_keys": {}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["failures"], json!({}), "{body}");
}

#[tokio::test]
async fn enabled_capabilities_are_listed() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    let (status, body) = s.get_auth("/_matrix/client/v3/capabilities", &token).await;
    assert_eq!(status, 200, "{body}");
    for name in ["m.change_password", "m.set_displayname", "m.set_avatar_url"] {
        assert_eq!(body["capabilities"][name]["enabled"], true, "{name}: {body}");
    }
}

#[tokio::test]
async fn notifications_name_their_profile_tag() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"invite": [bob_id], "is_direct": true})).await;
    s.join_room(&bob, &room).await;
    s.send_text(&alice, &room, "hello bob").await;
    let (status, body) = s.get_auth("/_matrix/client/v3/notifications", &bob).await;
    assert_eq!(status, 200, "{body}");
    let first = &body["notifications"][0];
    assert_eq!(first["event"]["content"]["body"], "hello bob", "{body}");
    assert!(first.as_object().is_some_and(|n| n.contains_key("profile_tag")), "{body}");
}

#[tokio::test]
async fn r0_and_v3_media_paths_are_served() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    for version in ["r0", "v3"] {
        let (status, body) = s.get_auth(&format!("/_matrix/media/{version}/config"), &token).await;
        assert_eq!(status, 200, "{version}: {body}");
        assert!(body["m.upload.size"].is_u64(), "{body}");
        let resp = s
            .client
            .post(s.url(&format!("/_matrix/media/{version}/upload?filename=a.txt")))
            .bearer_auth(&token)
            .header("content-type", "text/plain")
            .body("picture")
            .send()
            .await
            .unwrap();
        let (status, body) = common::json_of(resp).await;
        assert_eq!(status, 200, "{version}: {body}");
        let uri = body["content_uri"].as_str().unwrap();
        let media = uri.strip_prefix("mxc://").unwrap();
        let resp = s
            .client
            .get(s.url(&format!("/_matrix/client/v1/media/download/{media}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "picture");
    }
}

#[tokio::test]
async fn a_new_user_is_named_after_their_localpart() {
    let s = TestServer::start(OPEN).await;
    let (alice, token) = s.register("alice").await;
    let (status, body) =
        s.get_auth(&format!("/_matrix/client/v3/profile/{alice}/displayname"), &token).await;
    assert_eq!((status, &body["displayname"]), (200, &json!("alice")), "{body}");
    // Their first join carries it, so other members see a name.
    let room = s.create_room(&token, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{alice}");
    let (_, member) = s.get_auth(&path, &token).await;
    assert_eq!(member["displayname"], "alice", "{member}");
}

#[tokio::test]
async fn new_logins_and_renamed_devices_reach_co_members_device_lists() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    let since = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();

    let (status, login) = log_in(&s, "alice").await;
    assert_eq!(status, 200, "{login}");
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(body["device_lists"]["changed"], json!([alice_id]), "{body}");

    let since = body["next_batch"].as_str().unwrap().to_owned();
    let device = login["device_id"].as_str().unwrap();
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/devices/{device}"),
            &alice,
            &json!({"display_name": "phone"}),
        )
        .await;
    assert_eq!(status, 200);
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(body["device_lists"]["changed"], json!([alice_id]), "{body}");
}

#[tokio::test]
async fn openid_userinfo_without_a_token_is_unauthenticated() {
    let s = TestServer::start("").await;
    let (status, body) = s.get("/_matrix/federation/v1/openid/userinfo").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "{body}");
    let (status, body) = s.get("/_matrix/federation/v1/openid/userinfo?access_token=nope").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "{body}");
}

#[tokio::test]
async fn typing_without_a_timeout_takes_a_default() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/typing/{alice_id}");
    let (status, body) = s.put_auth(&path, &alice, &json!({"typing": true})).await;
    assert_eq!(status, 200, "{body}");
    let body = sync(&s, &alice, "").await;
    let ephemeral = &body["rooms"]["join"][&room]["ephemeral"]["events"];
    let typing = ephemeral.as_array().unwrap().iter().find(|e| e["type"] == "m.typing").unwrap();
    assert_eq!(typing["content"]["user_ids"], json!([alice_id]), "{body}");
}

#[tokio::test]
async fn setting_the_same_state_again_returns_the_standing_event() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
    let (_, first) = s.put_auth(&path, &alice, &json!({"topic": "cats"})).await;
    let (status, again) = s.put_auth(&path, &alice, &json!({"topic": "cats"})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(first["event_id"], again["event_id"]);
    let (_, other) = s.put_auth(&path, &alice, &json!({"topic": "dogs"})).await;
    assert_ne!(first["event_id"], other["event_id"]);
    let messages = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50");
    let (_, page) = s.get_auth(&messages, &alice).await;
    let topics = page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.topic");
    assert_eq!(topics.count(), 2, "{page}");
}

#[tokio::test]
async fn kicking_someone_not_in_the_room_is_forbidden() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (carol_id, _) = s.register("carol").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    let kick = format!("/_matrix/client/v3/rooms/{room}/kick");
    let (status, body) = s.post_auth(&kick, &alice, &json!({"user_id": carol_id})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let ban = format!("/_matrix/client/v3/rooms/{room}/ban");
    let (status, _) = s.post_auth(&ban, &alice, &json!({"user_id": bob_id})).await;
    assert_eq!(status, 200);
    let (status, body) = s.post_auth(&kick, &alice, &json!({"user_id": bob_id})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    // Still banned: the kick did not lift it.
    let member = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}");
    let (_, content) = s.get_auth(&member, &alice).await;
    assert_eq!(content["membership"], "ban", "{content}");
}

#[tokio::test]
async fn a_canonical_alias_must_point_to_the_room() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let other = s.create_room(&alice, json!({"room_alias_name": "elsewhere"})).await;
    assert_ne!(room, other);
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/");
    for content in [
        json!({"alias": "#elsewhere:localhost"}),
        json!({"alias": "#nowhere:localhost"}),
        json!({"alt_aliases": ["#elsewhere:localhost"]}),
    ] {
        let (status, body) = s.put_auth(&path, &alice, &content).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_ALIAS")), "{body}");
    }
    let (status, body) = s.put_auth(&path, &alice, &json!({"alias": "not an alias"})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, _) = s
        .put_auth(
            "/_matrix/client/v3/directory/room/%23here:localhost",
            &alice,
            &json!({"room_id": room}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = s.put_auth(&path, &alice, &json!({"alias": "#here:localhost"})).await;
    assert_eq!(status, 200, "{body}");
    // An empty alias names none, as some clients clear it.
    let (status, body) = s.put_auth(&path, &alice, &json!({"alias": ""})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn upgrading_an_unknown_room_is_not_found() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/rooms/!nothere:localhost/upgrade",
            &alice,
            &json!({"new_version": "10"}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");
}

#[tokio::test]
async fn a_timeline_limit_of_zero_sends_no_events() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    s.send_text(&alice, &room, "one").await;
    let filter = common::urlencode(&json!({"room": {"timeline": {"limit": 0}}}).to_string());
    let body = sync(&s, &alice, &format!("filter={filter}")).await;
    let timeline = &body["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["events"], json!([]), "{body}");
    assert_eq!(timeline["limited"], true, "{body}");
}

#[tokio::test]
async fn heroes_are_sent_only_for_rooms_without_a_name() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let unnamed = s.create_room(&alice, json!({"invite": [bob_id]})).await;
    let named = s.create_room(&alice, json!({"invite": [bob_id], "name": "Cats"})).await;
    s.join_room(&bob, &unnamed).await;
    s.join_room(&bob, &named).await;
    let body = sync(&s, &alice, "").await;
    let summary = |room: &str| body["rooms"]["join"][room]["summary"].clone();
    assert_eq!(summary(&unnamed)["m.heroes"], json!([bob_id]), "{body}");
    assert!(summary(&named).get("m.heroes").is_none(), "{body}");
    assert_eq!(summary(&named)["m.joined_member_count"], 2, "{body}");
}

#[tokio::test]
async fn whois_shows_a_users_devices_to_them_and_to_admins_only() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let path = format!("/_matrix/client/v3/admin/whois/{alice_id}");
    let (status, body) = s.get_auth(&path, &alice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], alice_id.as_str());
    let devices = body["devices"].as_object().unwrap();
    assert_eq!(devices.len(), 1, "{body}");
    let (_, device) = devices.iter().next().unwrap();
    let connection = &device["sessions"][0]["connections"][0];
    assert!(connection["ip"].as_str().is_some_and(|ip| ip.contains("127.0.0.1")), "{body}");
    let (status, body) = s.get_auth(&path, &bob).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
}

#[tokio::test]
async fn malformed_push_rule_paths_are_bad_requests() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    let rule = json!({"actions": ["notify"], "pattern": "cats"});
    for path in [
        "/_matrix/client/v3/pushrules",
        "/_matrix/client/v3/pushrules/global",
        "/_matrix/client/v3/pushrules/nonsense/content/r",
        "/_matrix/client/v3/pushrules/global/content/",
        "/_matrix/client/v3/pushrules/global/content/with/slash",
    ] {
        let (status, body) = s.put_auth(path, &token, &rule).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{path}");
    }
    let (status, _) = s.get_auth("/_matrix/client/v3/pushrules/", &token).await;
    assert_eq!(status, 200);
    let path = "/_matrix/client/v3/pushrules/global/content/cats";
    let (status, body) = s.put_auth(path, &token, &rule).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_room_joined_since_the_last_sync_arrives_with_its_latest_events() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat", "name": "Cats"})).await;
    for i in 0..12 {
        s.send_text(&alice, &room, &format!("m{i}")).await;
    }
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
    s.put_auth(&path, &alice, &json!({"topic": "all about cats"})).await;
    let since = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();
    s.join_room(&bob, &room).await;

    let filter = common::urlencode(&json!({"room": {"timeline": {"limit": 3}}}).to_string());
    let body = sync(&s, &bob, &format!("since={since}&timeout=0&filter={filter}")).await;
    let joined = &body["rooms"]["join"][&room];
    let timeline = joined["timeline"]["events"].as_array().unwrap();
    let kinds: Vec<&str> = timeline.iter().map(|e| e["type"].as_str().unwrap()).collect();
    // The newest three: two of them state events, the join last.
    assert_eq!(kinds, ["m.room.message", "m.room.topic", "m.room.member"], "{joined}");
    assert_eq!(timeline[2]["state_key"], bob_id.as_str());
    assert_eq!(joined["timeline"]["limited"], true, "{joined}");
    let prev_batch = joined["timeline"]["prev_batch"].as_str().unwrap();
    // State holds what precedes the timeline, not what it carries.
    let state = joined["state"]["events"].as_array().unwrap();
    let state_kinds: Vec<&str> = state.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(state_kinds.contains(&"m.room.create") && state_kinds.contains(&"m.room.name"));
    assert!(!state_kinds.contains(&"m.room.topic"), "{joined}");
    assert!(
        !state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob_id.as_str()),
        "{joined}"
    );
    // Paging back from prev_batch continues right before the timeline.
    let messages =
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1&from={prev_batch}");
    let (_, page) = s.get_auth(&messages, &bob).await;
    assert_eq!(page["chunk"][0]["content"]["body"], "m10", "{page}");
}

#[tokio::test]
async fn registration_remembers_its_first_request_and_answers_a_replay_alike() {
    let s = TestServer::start(OPEN).await;
    // The first request names the account; the one completing the flow only authenticates.
    let (status, challenge) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "alice", "password": "password123", "device_id": "PHONE"}),
        )
        .await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    let auth = json!({"auth": {"type": "m.login.dummy", "session": session}});
    let (status, first) = s.post("/_matrix/client/v3/register", &auth).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["user_id"], "@alice:localhost", "{first}");
    assert_eq!(first["device_id"], "PHONE", "{first}");
    // The remembered password signs in.
    let (status, _) = log_in(&s, "alice").await;
    assert_eq!(status, 200);
    // The completed session replayed: the same account, not "user in use".
    let (status, again) = s.post("/_matrix/client/v3/register", &auth).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["user_id"], first["user_id"]);
    let token = again["access_token"].as_str().unwrap();
    let (status, whoami) = s.get_auth("/_matrix/client/v3/account/whoami", token).await;
    assert_eq!((status, &whoami["user_id"]), (200, &first["user_id"]), "{whoami}");
}

#[tokio::test]
async fn registration_with_inhibit_login_returns_no_device() {
    let s = TestServer::start(OPEN).await;
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "bot", "password": "password123", "inhibit_login": true,
                    "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@bot:localhost");
    for field in ["device_id", "access_token", "refresh_token"] {
        assert!(body.get(field).is_none(), "{field}: {body}");
    }
}

#[tokio::test]
async fn a_later_joiner_of_a_shared_then_joined_room_sees_what_the_spec_allows() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.send_text(&alice, &room, "shared history").await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/");
    let (status, _) = s.put_auth(&path, &alice, &json!({"history_visibility": "joined"})).await;
    assert_eq!(status, 200);
    s.send_text(&alice, &room, "members only").await;
    s.join_room(&bob, &room).await;
    s.send_text(&alice, &room, "after the join").await;

    let messages = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
    let (status, page) = s.get_auth(&messages, &bob).await;
    assert_eq!(status, 200, "{page}");
    let chunk = page["chunk"].as_array().unwrap();
    let bodies: Vec<&str> = chunk.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["after the join", "shared history"], "{page}");
    // The change itself shows, under the `shared` setting before it.
    assert!(
        chunk.iter().any(|e| e["type"] == "m.room.history_visibility"
            && e["content"]["history_visibility"] == "joined"),
        "{page}"
    );
}

#[tokio::test]
async fn the_deprecated_initial_sync_and_event_endpoints_still_answer() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"name": "Cats"})).await;
    let first = s.send_text(&alice, &room, "one").await;
    s.send_text(&alice, &room, "two").await;

    let (status, body) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/initialSync"), &alice).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["room_id"].as_str(), body["membership"].as_str()),
        (Some(room.as_str()), Some("join"))
    );
    assert_eq!(body["visibility"], "private");
    let chunk = body["messages"]["chunk"].as_array().unwrap();
    let bodies: Vec<&str> = chunk.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["one", "two"], "oldest first: {body}");
    assert!(body["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"));
    // Its start token pages on back through /messages.
    let start = body["messages"]["start"].as_str().unwrap();
    let (status, _) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from={start}"), &alice)
        .await;
    assert_eq!(status, 200);
    // Strangers read nothing of a private room.
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/r0/rooms/{room}/initialSync"), &bob).await;
    assert_eq!(status, 403);

    let data = "/_matrix/client/v3/user/@alice:localhost/account_data/org.example.pet";
    let (status, _) = s.put_auth(data, &alice, &json!({"name": "Tom"})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth("/_matrix/client/v3/initialSync?limit=1", &alice).await;
    assert_eq!(status, 200, "{body}");
    let pet = json!({"type": "org.example.pet", "content": {"name": "Tom"}});
    assert!(body["account_data"].as_array().unwrap().contains(&pet), "{body}");
    assert!(body["end"].as_str().is_some_and(|t| t.starts_with('s')), "{body}");
    let rooms = body["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 1, "{body}");
    assert_eq!(rooms[0]["messages"]["chunk"][0]["content"]["body"], "two", "{body}");

    let (status, event) = s.get_auth(&format!("/_matrix/client/v3/events/{first}"), &alice).await;
    assert_eq!(status, 200, "{event}");
    assert_eq!(event["content"]["body"], "one");
    let (status, event) = s.get_auth(&format!("/_matrix/client/v3/events/{first}"), &bob).await;
    assert_eq!((status, event["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{event}");
    let (status, _) = s.get("/_matrix/client/v3/initialSync").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_deprecated_events_stream_delivers_new_events_once() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let (_, initial) = s.get_auth("/_matrix/client/v3/initialSync?limit=0", &alice).await;
    let from = initial["end"].as_str().unwrap().to_owned();
    s.send_text(&alice, &room, "news").await;

    let (status, body) =
        s.get_auth(&format!("/_matrix/client/v3/events?from={from}&timeout=0"), &alice).await;
    assert_eq!(status, 200, "{body}");
    let chunk = body["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{body}");
    assert_eq!(chunk[0]["content"]["body"], "news");
    assert_eq!(chunk[0]["room_id"], room.as_str());
    assert_eq!(body["start"].as_str(), Some(from.as_str()));
    let end = body["end"].as_str().unwrap();
    let (status, body) =
        s.get_auth(&format!("/_matrix/client/v3/events?from={end}&timeout=50"), &alice).await;
    assert_eq!((status, &body["chunk"]), (200, &json!([])), "{body}");
    let (status, body) = s.get_auth("/_matrix/client/v3/events?from=nonsense", &alice).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
}

#[tokio::test]
async fn user_interactive_auth_takes_the_legacy_user_field() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, login) = log_in(&s, "alice").await;
    let device = login["device_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/devices/{device}");
    let (status, challenge) = s.delete_auth(&path, &alice, &json!({})).await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    for user in [alice_id.as_str(), "alice"] {
        let auth = json!({"auth": {"type": "m.login.password", "user": user,
                                   "password": "wrong", "session": session}});
        let (status, body) = s.delete_auth(&path, &alice, &auth).await;
        assert_eq!((status, body["errcode"].as_str()), (401, Some("M_FORBIDDEN")), "{body}");
    }
    let auth = json!({"auth": {"type": "m.login.password", "user": alice_id,
                               "password": "password123", "session": session}});
    let (status, body) = s.delete_auth(&path, &alice, &auth).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_upgraded_rooms_predecessor_names_the_tombstone() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({"room_version": "10"})).await;
    s.send_text(&alice, &room, "before").await;
    let (status, resp) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/upgrade"),
            &alice,
            &json!({"new_version": "11"}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let new_room = resp["replacement_room"].as_str().unwrap();
    let format = "format=event";
    let (_, tombstone) = s
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.tombstone/?{format}"),
            &alice,
        )
        .await;
    assert_eq!(tombstone["content"]["replacement_room"], new_room, "{tombstone}");
    let (_, create) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{new_room}/state/m.room.create/"), &alice)
        .await;
    assert_eq!(create["predecessor"]["room_id"], room.as_str(), "{create}");
    assert_eq!(create["predecessor"]["event_id"], tombstone["event_id"], "{create}");
}

#[tokio::test]
async fn a_profile_change_does_not_resend_a_rooms_history() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    s.send_text(&alice, &room, "old news").await;
    let since = sync(&s, &alice, "").await["next_batch"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/profile/{alice_id}/displayname");
    let (status, _) = s.put_auth(&path, &alice, &json!({"displayname": "Alice"})).await;
    assert_eq!(status, 200);
    let body = sync(&s, &alice, &format!("since={since}&timeout=0")).await;
    let timeline = &body["rooms"]["join"][&room]["timeline"];
    let events = timeline["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "only the new member event: {body}");
    assert_eq!(events[0]["content"]["displayname"], "Alice");
    assert_eq!(timeline["limited"], false, "{body}");
}

#[tokio::test]
async fn joining_a_room_brings_its_members_presence() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let path = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let status_msg = json!({"presence": "online", "status_msg": "around"});
    assert_eq!(s.put_auth(&path, &alice, &status_msg).await.0, 200);
    let since = sync(&s, &bob, "").await["next_batch"].as_str().unwrap().to_owned();
    s.join_room(&bob, &room).await;
    let body = sync(&s, &bob, &format!("since={since}&timeout=0")).await;
    let events = body["presence"]["events"].as_array().cloned().unwrap_or_default();
    let alices = events.iter().find(|e| e["sender"] == alice_id.as_str());
    assert_eq!(alices.map(|e| &e["content"]["status_msg"]), Some(&json!("around")), "{body}");
}

#[tokio::test]
async fn extra_keys_of_a_member_event_survive() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let room = s.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{alice_id}");
    let content = json!({"membership": "join", "displayname": "Al", "io.example.badge": "gold"});
    let (status, body) = s.put_auth(&path, &alice, &content).await;
    assert_eq!(status, 200, "{body}");
    let (_, stored) = s.get_auth(&path, &alice).await;
    assert_eq!(stored, content);
}

#[tokio::test]
async fn redacting_an_event_of_another_room_changes_nothing() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let here = s.create_room(&alice, json!({})).await;
    let there = s.create_room(&alice, json!({})).await;
    let event = s.send_text(&alice, &there, "keep me").await;
    let path = format!("/_matrix/client/v3/rooms/{here}/redact/{event}/{}", common::txn_id());
    let (status, body) = s.put_auth(&path, &alice, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");
    let (_, original) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{there}/event/{event}"), &alice).await;
    assert_eq!(original["content"]["body"], "keep me", "{original}");
}

#[tokio::test]
async fn guests_join_rooms_that_admit_them_and_upgrade_in_place() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (status, guest) = s.post("/_matrix/client/v3/register?kind=guest", &json!({})).await;
    assert_eq!(status, 200, "{guest}");
    let guest_id = guest["user_id"].as_str().unwrap().to_owned();
    let token = guest["access_token"].as_str().unwrap().to_owned();
    assert!(guest["device_id"].is_string(), "{guest}");
    let localpart = guest_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
    let (_, whoami) = s.get_auth("/_matrix/client/v3/account/whoami", &token).await;
    assert_eq!(whoami["user_id"], guest_id.as_str(), "{whoami}");

    // What the spec does not allow guests.
    let forbidden = |(status, body): (u16, Value)| {
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_GUEST_ACCESS_FORBIDDEN")));
    };
    forbidden(s.post_auth("/_matrix/client/v3/createRoom", &token, &json!({})).await);
    let upload = reqwest::Client::new()
        .post(s.url("/_matrix/media/v3/upload"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    forbidden(common::json_of(upload).await);
    let avatar = format!("/_matrix/client/v3/profile/{guest_id}/avatar_url");
    forbidden(s.put_auth(&avatar, &token, &json!({"avatar_url": "mxc://localhost/x"})).await);
    let name = format!("/_matrix/client/v3/profile/{guest_id}/displayname");
    let (status, body) = s.put_auth(&name, &token, &json!({"displayname": "Visitor"})).await;
    assert_eq!(status, 200, "{body}");

    // A public room that does not admit guests, and one that does.
    let closed = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let (status, body) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{closed}/join"), &token, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    // Nor by setting their membership as state, nor through Trellis's own endpoints.
    let member = format!("/_matrix/client/v3/rooms/{closed}/state/m.room.member/{guest_id}");
    forbidden(s.put_auth(&member, &token, &json!({"membership": "join"})).await);
    let hooks = format!("/_trellis/client/v1/rooms/{closed}/webhooks");
    forbidden(s.post_auth(&hooks, &token, &json!({})).await);
    let open = s
        .create_room(
            &alice,
            json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "can_join"}}
            ]}),
        )
        .await;
    s.join_room(&token, &open).await;
    s.send_text(&token, &open, "hi from a guest").await;
    let (_, page) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{open}/messages?dir=b&limit=5"), &alice)
        .await;
    assert!(
        page["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "hi from a guest")
    );

    // Withdrawing guest access has the guest leave.
    let access = format!("/_matrix/client/v3/rooms/{open}/state/m.room.guest_access/");
    let (status, _) = s.put_auth(&access, &alice, &json!({"guest_access": "forbidden"})).await;
    assert_eq!(status, 200);
    let member = format!("/_matrix/client/v3/rooms/{open}/state/m.room.member/{guest_id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, content) = s.get_auth(&member, &alice).await;
        if content["membership"] == "leave" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the guest is still {content}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Upgrading keeps the user id and lifts the limits.
    let upgrade = json!({"username": localpart, "password": "password123",
                         "guest_access_token": token, "auth": {"type": "m.login.dummy"}});
    let (status, full) = s.post("/_matrix/client/v3/register", &upgrade).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["user_id"], guest_id.as_str());
    let full_token = full["access_token"].as_str().unwrap();
    let (status, body) = s.post_auth("/_matrix/client/v3/createRoom", full_token, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = log_in(&s, &localpart).await;
    assert_eq!(status, 200, "{body}");
    let (_, profile) = s.get(&format!("/_matrix/client/v3/profile/{guest_id}")).await;
    assert_eq!(profile["displayname"], "Visitor", "{profile}");
}

#[tokio::test]
async fn a_redaction_sent_as_an_event_redacts_in_every_room_version() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    for version in ["10", "11"] {
        let room = s.create_room(&alice, json!({"room_version": version})).await;
        let target = s.send_text(&alice, &room, "regret").await;
        let path =
            format!("/_matrix/client/v3/rooms/{room}/send/m.room.redaction/{}", common::txn_id());
        let content = json!({"redacts": target, "reason": "oops"});
        let (status, body) = s.put_auth(&path, &alice, &content).await;
        assert_eq!(status, 200, "{body}");
        let (_, event) =
            s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{target}"), &alice).await;
        assert_eq!(event["content"], json!({}), "room version {version}: {event}");
        assert_eq!(event["unsigned"]["redacted_because"]["event_id"], body["event_id"]);
        let bad =
            format!("/_matrix/client/v3/rooms/{room}/send/m.room.redaction/{}", common::txn_id());
        let (status, body) = s.put_auth(&bad, &alice, &json!({"reason": "no target"})).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{body}");
    }
}

#[tokio::test]
async fn anyone_may_peek_into_a_world_readable_room_through_events() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let readable = world_readable_room(&s, &alice).await;
    let shared = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let peek = |room: &str, from: &str| {
        format!("/_matrix/client/v3/events?room_id={room}&timeout=5000{from}")
    };
    let (status, body) = s.get_auth(&peek(&shared, ""), &bob).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    let (status, first) =
        s.get_auth(&format!("/_matrix/client/v3/events?room_id={readable}&timeout=0"), &bob).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["chunk"], json!([]), "{first}");
    let end = first["end"].as_str().unwrap().to_owned();
    let path = peek(&readable, &format!("&from={end}"));
    let waiting = s.get_auth(&path, &bob);
    let sending = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s.send_text(&alice, &shared, "not for peekers").await;
        s.send_text(&alice, &readable, "for anyone").await
    };
    let ((status, page), sent) = tokio::join!(waiting, sending);
    assert_eq!(status, 200, "{page}");
    let chunk = page["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{page}");
    assert_eq!(chunk[0]["event_id"], sent.as_str());
    assert_eq!(chunk[0]["room_id"], readable.as_str());
    // The next peek starts after it.
    let next = page["end"].as_str().unwrap();
    let after = format!("/_matrix/client/v3/events?room_id={readable}&timeout=0&from={next}");
    let (_, again) = s.get_auth(&after, &bob).await;
    assert_eq!(again["chunk"], json!([]), "{again}");
}

#[tokio::test]
async fn an_erased_users_messages_are_redacted_for_those_who_join_later() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let (_, carol) = s.register("carol").await;
    let room = s.create_room(&bob, json!({"preset": "public_chat"})).await;
    s.join_room(&alice, &room).await;
    let secret = s.send_text(&alice, &room, "my secret").await;
    let auth = json!({"type": "m.login.password", "password": "password123",
                      "identifier": {"type": "m.id.user", "user": "alice"}});
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/account/deactivate",
            &alice,
            &json!({"auth": auth, "erase": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Deactivation leaves the room.
    let member = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{alice_id}");
    let (_, content) = s.get_auth(&member, &bob).await;
    assert_eq!(content["membership"], "leave", "{content}");

    s.join_room(&carol, &room).await;
    let event = format!("/_matrix/client/v3/rooms/{room}/event/{secret}");
    let messages = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50");
    // Bob, in the room before the erasure, still reads it.
    let (_, seen) = s.get_auth(&event, &bob).await;
    assert_eq!(seen["content"]["body"], "my secret", "{seen}");
    let (_, page) = s.get_auth(&messages, &bob).await;
    assert!(page.to_string().contains("my secret"), "{page}");
    // Carol, who joined after it, gets it redacted everywhere.
    let (status, seen) = s.get_auth(&event, &carol).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["content"], json!({}), "{seen}");
    let (_, page) = s.get_auth(&messages, &carol).await;
    assert!(!page.to_string().contains("my secret"), "{page}");
    let synced = sync(&s, &carol, "").await;
    assert!(!synced.to_string().contains("my secret"), "{synced}");
    let timeline = synced["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(timeline.iter().any(|e| e["event_id"] == secret.as_str()), "{synced}");
}

#[tokio::test]
async fn initial_sync_lists_invites_left_rooms_and_co_members_presence() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let shared = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &shared).await;
    let presence = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let (status, _) =
        s.put_auth(&presence, &alice, &json!({"presence": "online", "status_msg": "here"})).await;
    assert_eq!(status, 200);
    let invited = s.create_room(&alice, json!({})).await;
    let invite = format!("/_matrix/client/v3/rooms/{invited}/invite");
    let (status, _) = s.post_auth(&invite, &alice, &json!({"user_id": bob_id})).await;
    assert_eq!(status, 200);
    let gone = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &gone).await;
    let leave = format!("/_matrix/client/v3/rooms/{gone}/leave");
    let (status, _) = s.post_auth(&leave, &bob, &json!({})).await;
    assert_eq!(status, 200);

    let (status, body) = s.get_auth("/_matrix/client/v3/initialSync", &bob).await;
    assert_eq!(status, 200, "{body}");
    let rooms = body["rooms"].as_array().unwrap();
    let membership =
        |room: &str| rooms.iter().find(|r| r["room_id"] == room).map(|r| r["membership"].clone());
    assert_eq!(membership(&shared), Some(json!("join")), "{body}");
    assert_eq!(membership(&invited), Some(json!("invite")), "{body}");
    assert_eq!(membership(&gone), None, "{body}");
    let entry = rooms.iter().find(|r| r["room_id"] == invited.as_str()).unwrap();
    assert_eq!(entry["invite"]["content"]["membership"], "invite", "{entry}");
    let alices =
        body["presence"].as_array().unwrap().iter().find(|p| p["sender"] == alice_id.as_str());
    assert_eq!(alices.map(|p| p["content"]["status_msg"].clone()), Some(json!("here")), "{body}");

    let (_, body) = s.get_auth("/_matrix/client/v3/initialSync?archived=true", &bob).await;
    let left = body["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == gone.as_str());
    assert_eq!(left.map(|r| r["membership"].clone()), Some(json!("leave")), "{body}");
}

#[tokio::test]
async fn room_and_sender_push_rules_take_any_room_or_user_id() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let rule = json!({"actions": ["dont_notify"]});
    // Rooms and users this server has never seen are fine: the id is all a rule needs.
    for path in [
        "/_matrix/client/v3/pushrules/global/room/!elsewhere:other.example",
        "/_matrix/client/v3/pushrules/global/sender/@someone:other.example",
    ] {
        let (status, body) = s.put_auth(path, &alice, &rule).await;
        assert_eq!(status, 200, "{path}: {body}");
        let (status, got) = s.get_auth(path, &alice).await;
        assert_eq!((status, &got["actions"]), (200, &json!(["dont_notify"])), "{got}");
    }
    // The spec names these rules by the room or user id; anything else is refused.
    let (status, body) =
        s.put_auth("/_matrix/client/v3/pushrules/global/room/not-a-room", &alice, &rule).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{body}");
}

#[tokio::test]
async fn element_x_room_rules_members_of_readable_rooms_forward_ends_and_dead_rooms() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    // joined_members of a world-readable room, as its state, for anyone.
    let readable = world_readable_room(&s, &alice).await;
    let shared = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let (status, body) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{readable}/joined_members"), &bob).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["joined"]["@alice:localhost"].is_object(), "{body}");
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{shared}/joined_members"), &bob).await;
    assert_eq!(status, 403);

    // dir=f: an end token whenever the chunk has events.
    s.send_text(&alice, &shared, "one").await;
    let (_, page) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{shared}/messages?dir=f&limit=1000"), &alice)
        .await;
    assert!(!page["chunk"].as_array().unwrap().is_empty());
    let end = page["end"].as_str().expect("an end with a chunk").to_owned();
    let (_, after) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{shared}/messages?dir=f&from={end}"), &alice)
        .await;
    assert_eq!(after["chunk"], json!([]), "{after}");
    assert!(after.get("end").is_none(), "no end for an empty chunk: {after}");

    // A room everyone left cannot be revived by joining it.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{shared}/leave"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{shared}/join"), &bob, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");
}

#[tokio::test]
async fn deleting_a_rooms_canonical_alias_takes_it_out_of_the_room() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let room =
        s.create_room(&alice, json!({"room_alias_name": "cats", "visibility": "public"})).await;
    let (status, _) = s
        .put_auth(
            "/_matrix/client/v3/directory/room/%23kitties:localhost",
            &alice,
            &json!({"room_id": room}),
        )
        .await;
    assert_eq!(status, 200);
    let state = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/");
    let both = json!({"alias": "#cats:localhost", "alt_aliases": ["#kitties:localhost"]});
    let (status, body) = s.put_auth(&state, &alice, &both).await;
    assert_eq!(status, 200, "{body}");

    for alias in ["%23cats:localhost", "%23kitties:localhost"] {
        let path = format!("/_matrix/client/v3/directory/room/{alias}");
        let (status, body) = s.delete_auth(&path, &alice, &json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, content) = s.get_auth(&state, &alice).await;
    assert!(content.get("alias").is_none(), "{content}");
    assert_eq!(content["alt_aliases"], json!([]), "{content}");
    let (_, listed) = s.get("/_matrix/client/v3/publicRooms").await;
    assert!(!listed.to_string().contains("#cats:localhost"), "{listed}");
}
