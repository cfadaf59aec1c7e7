//! Simplified sliding sync (MSC4186): lists ordered by activity with ranges, required
//! state and timeline limits, incremental updates by `pos`, subscriptions, extensions.

mod common;

use std::time::Duration;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn create(s: &TestServer, token: &str, name: &str) -> String {
    let (status, resp) = s
        .post_auth(
            "/_matrix/client/v3/createRoom",
            token,
            &json!({"name": name, "preset": "public_chat"}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    resp["room_id"].as_str().unwrap().to_owned()
}

async fn say(s: &TestServer, token: &str, room: &str, body: &str) {
    let (status, resp) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{body}"),
            token,
            &json!({"msgtype": "m.text", "body": body}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
}

async fn slide(s: &TestServer, token: &str, query: &str, body: &Value) -> (u16, Value) {
    s.post_auth(&format!("{PATH}{query}"), token, body).await
}

fn request() -> Value {
    json!({
        "conn_id": "main",
        "lists": {"all": {
            "ranges": [[0, 1]],
            "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"]],
            "timeline_limit": 2,
        }},
        "extensions": {"typing": {"enabled": true}, "account_data": {"enabled": true}},
    })
}

#[tokio::test]
async fn lists_are_ordered_by_activity_and_cut_by_ranges() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (status, versions) = s.get("/_matrix/client/versions").await;
    assert_eq!(status, 200);
    assert_eq!(versions["unstable_features"]["org.matrix.simplified_msc3575"], true);

    let a = create(&s, &at, "A").await;
    let b = create(&s, &at, "B").await;
    let c = create(&s, &at, "C").await;
    say(&s, &at, &b, "b-latest").await;
    say(&s, &at, &a, "a-later").await;
    say(&s, &at, &c, "c-first").await;
    say(&s, &at, &a, "a-latest").await;

    let (status, first) = slide(&s, &at, "", &request()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["lists"]["all"]["count"], 3);
    let rooms = first["rooms"].as_object().unwrap();
    // Most recent activity first: A, then C; B falls outside [0, 1].
    assert!(rooms.contains_key(&a) && rooms.contains_key(&c) && !rooms.contains_key(&b), "{first}");
    assert!(first["rooms"][&a]["bump_stamp"].as_u64() > first["rooms"][&c]["bump_stamp"].as_u64());
    let room_a = &first["rooms"][&a];
    assert_eq!(room_a["initial"], true);
    assert_eq!(room_a["name"], "A");
    let timeline: Vec<&str> = room_a["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(timeline, vec!["a-later", "a-latest"]);
    assert_eq!(room_a["limited"], true);
    let state_types: Vec<&str> = room_a["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(state_types.contains(&"m.room.name"), "{state_types:?}");
    assert!(!state_types.contains(&"m.room.power_levels"), "only what was asked");
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Nothing new: a short poll returns no rooms.
    let (_, idle) = slide(&s, &at, &format!("?pos={pos}&timeout=200"), &request()).await;
    assert!(idle["rooms"].as_object().is_none_or(|r| r.is_empty()), "{idle}");
    let pos = idle["pos"].as_str().unwrap().to_owned();

    // A message in B moves it to the top; only B comes, with just the new event.
    let token = at.clone();
    let base = s.base.clone();
    let body = request();
    let pos2 = pos.clone();
    let waiting = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}{PATH}?pos={pos2}&timeout=20000"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(&s, &at, &b, "b-new").await;
    let next = waiting.await.unwrap();
    let room_b = &next["rooms"][&b];
    assert!(room_b.is_object(), "{next}");
    assert_eq!(room_b["initial"], true, "B enters the range: sent whole");
    let bodies: Vec<&str> = room_b["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies.last(), Some(&"b-new"));

    // Incremental: a message in A (already sent) comes as a live update.
    let pos = next["pos"].as_str().unwrap().to_owned();
    say(&s, &at, &a, "a-new").await;
    let (_, inc) = slide(&s, &at, &format!("?pos={pos}&timeout=5000"), &request()).await;
    let room_a = &inc["rooms"][&a];
    assert!(room_a.get("initial").is_none(), "{inc}");
    assert_eq!(room_a["num_live"], 1);
    assert_eq!(room_a["timeline"].as_array().unwrap().len(), 1);

    // An unknown position makes the client start over.
    let (status, err) = slide(&s, &at, "?pos=999_999", &request()).await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_UNKNOWN_POS")));
}

#[tokio::test]
async fn subscriptions_invites_and_extensions() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = create(&s, &at, "Sub").await;
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &at,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 200);

    // Bob sees the invite in an invite list, with stripped state.
    let invites = json!({"lists": {"invites": {"ranges": [[0, 9]], "timeline_limit": 1,
        "required_state": [], "filters": {"is_invite": true}}}});
    let (status, resp) = slide(&s, &bt, "", &invites).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["lists"]["invites"]["count"], 1);
    let state = resp["rooms"][&room]["invite_state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.name"), "{resp}");
    let entry = &resp["rooms"][&room];
    assert_eq!(entry["initial"], true, "{entry}");
    assert!(entry["bump_stamp"].is_u64(), "{entry}");
    for absent in ["joined_count", "invited_count", "timeline", "required_state"] {
        assert!(entry.get(absent).is_none(), "{absent} in an invite: {entry}");
    }

    // Lists by room type: spaces apart from rooms.
    let (status, _) = s
        .post_auth(
            "/_matrix/client/v3/createRoom",
            &at,
            &json!({"name": "Space", "creation_content": {"type": "m.space"}}),
        )
        .await;
    assert_eq!(status, 200);
    let typed = json!({"lists": {
        "spaces": {"ranges": [[0, 9]], "timeline_limit": 0, "required_state": [],
            "filters": {"room_types": ["m.space"]}},
        "rooms": {"ranges": [[0, 9]], "timeline_limit": 0, "required_state": [],
            "filters": {"not_room_types": ["m.space"]}},
    }});
    let (status, resp) = slide(&s, &at, "", &typed).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["lists"]["spaces"]["count"], 1, "{resp}");
    assert_eq!(resp["lists"]["rooms"]["count"], 1);

    // A room subscription without lists; typing and account data extensions.
    let body = json!({
        "room_subscriptions": {room.clone(): {"required_state": [["*", "*"]], "timeline_limit": 5}},
        "extensions": {"typing": {"enabled": true}, "account_data": {"enabled": true}},
    });
    let (_, first) = slide(&s, &at, "", &body).await;
    let all_state = first["rooms"][&room]["required_state"].as_array().unwrap();
    assert!(all_state.len() >= 5, "* * is all state: {first}");
    let pos = first["pos"].as_str().unwrap().to_owned();
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/typing/{alice}"),
            &at,
            &json!({"typing": true, "timeout": 10000}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{alice}/account_data/org.example.x"),
            &at,
            &json!({"a": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, next) = slide(&s, &at, &format!("?pos={pos}&timeout=5000"), &body).await;
    let typing = &next["extensions"]["typing"]["rooms"][&room]["content"]["user_ids"];
    assert_eq!(typing, &json!([alice]), "{next}");
    let global = next["extensions"]["account_data"]["global"].as_array().unwrap();
    assert!(global.iter().any(|e| e["type"] == "org.example.x"), "{next}");
}

#[tokio::test]
async fn reactions_and_state_changes_do_not_bump_a_room() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("alice").await;
    let x = create(&s, &at, "X").await;
    let y = create(&s, &at, "Y").await;
    let message = s.send_text(&at, &x, "x-message").await;
    say(&s, &at, &y, "y-message").await;
    // X gets a reaction and a new topic after Y's message: Y stays the most active.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{x}/send/m.reaction/{}", common::txn_id()),
            &at,
            &json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "👍"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{x}/state/m.room.topic"),
            &at,
            &json!({"topic": "t"}),
        )
        .await;
    assert_eq!(status, 200);
    let body = json!({"lists": {"all": {"ranges": [[0, 0]], "timeline_limit": 1}}});
    let (status, resp) = slide(&s, &at, "", &body).await;
    assert_eq!(status, 200, "{resp}");
    let rooms = resp["rooms"].as_object().unwrap();
    assert!(rooms.contains_key(&y) && !rooms.contains_key(&x), "{resp}");
    // A new message in X does move it up.
    say(&s, &at, &x, "x-again").await;
    let (_, resp) = slide(&s, &at, "", &body).await;
    assert!(resp["rooms"].as_object().unwrap().contains_key(&x), "{resp}");
}

/// The bodies of the messages in a room's timeline of a sliding sync answer.
fn bodies<'a>(resp: &'a Value, room: &str) -> Vec<&'a str> {
    resp["rooms"][room]["timeline"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["content"]["body"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn ignored_users_disappear_from_the_timeline() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = create(&s, &at, "Ignoring").await;
    s.join_room(&bt, &room).await;
    s.send_text(&bt, &room, "bob-before").await;
    s.send_text(&at, &room, "alice-before").await;
    let body = json!({
        "conn_id": "main",
        "lists": {"all": {"ranges": [[0, 9]], "required_state": [], "timeline_limit": 10}},
    });

    let (status, first) = slide(&s, &at, "", &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(bodies(&first, &room), vec!["bob-before", "alice-before"], "{first}");
    let pos = first["pos"].as_str().unwrap().to_owned();

    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{alice}/account_data/m.ignored_user_list"),
            &at,
            &json!({"ignored_users": {bob.clone(): {}}}),
        )
        .await;
    assert_eq!(status, 200);
    s.send_text(&bt, &room, "bob-after").await;
    s.send_text(&at, &room, "alice-after").await;

    // The connection's next answer has Alice's new message, not Bob's.
    let (status, next) = slide(&s, &at, &format!("?pos={pos}&timeout=5000"), &body).await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(bodies(&next, &room), vec!["alice-after"], "{next}");
    // A new connection sees none of Bob's messages, old or new.
    let fresh = json!({"conn_id": "fresh", "lists": body["lists"].clone()});
    let (status, again) = slide(&s, &at, "", &fresh).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(bodies(&again, &room), vec!["alice-before", "alice-after"], "{again}");
    // Bob still sees his own messages.
    let (status, his) = slide(&s, &bt, "", &body).await;
    assert_eq!(status, 200, "{his}");
    assert!(bodies(&his, &room).contains(&"bob-after"), "{his}");
}

#[tokio::test]
async fn reading_a_room_resends_it_with_its_new_unread_counts() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("alice").await;
    let (_, bt) = s.register("bob").await;
    let room = create(&s, &at, "Counts").await;
    s.join_room(&bt, &room).await;
    s.send_text(&at, &room, "one").await;
    let last = s.send_text(&at, &room, "two").await;
    let (status, first) = slide(&s, &bt, "?timeout=0", &request()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["rooms"][&room]["notification_count"], 2, "{first}");
    let pos = first["pos"].as_str().unwrap().to_owned();

    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{last}");
    let (status, _) = s.post_auth(&receipt, &bt, &json!({})).await;
    assert_eq!(status, 200);
    let (status, next) = slide(&s, &bt, &format!("?timeout=0&pos={pos}"), &request()).await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["rooms"][&room]["notification_count"], 0, "{next}");
    assert_eq!(next["rooms"][&room]["highlight_count"], 0, "{next}");
    // Nothing changed since: not sent again.
    let pos = next["pos"].as_str().unwrap().to_owned();
    let (_, quiet) = slide(&s, &bt, &format!("?timeout=0&pos={pos}"), &request()).await;
    assert!(quiet["rooms"].get(&room).is_none(), "{quiet}");
}
