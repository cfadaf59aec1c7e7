//! Reading history: visibility rules, `/messages` filters and lazy-loaded members,
//! `/timestamp_to_event`, `/members` at a point in time; and the room life events that
//! change who reads what: knocking, upgrades, oversized events.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

async fn set_state(s: &TestServer, token: &str, room: &str, kind: &str, content: Value) {
    let (status, resp) = s
        .put_auth(&format!("/_matrix/client/v3/rooms/{room}/state/{kind}/"), token, &content)
        .await;
    assert_eq!(status, 200, "{resp}");
}

/// Message bodies `token` reads, oldest first.
async fn bodies(s: &TestServer, token: &str, room: &str) -> (u16, Vec<String>) {
    let (status, resp) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100"), token)
        .await;
    let bodies = resp["chunk"]
        .as_array()
        .map(|c| {
            c.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default();
    (status, bodies)
}

#[tokio::test]
async fn history_visibility_decides_what_each_user_reads() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let (_carol, ct) = s.register("carol").await;
    let (_dave, dt) = s.register("dave").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;

    // `joined`: Bob, joining later, does not see what came before him.
    set_state(&s, &at, &room, "m.room.history_visibility", json!({"history_visibility": "joined"}))
        .await;
    s.send_text(&at, &room, "before-bob").await;
    s.join_room(&bt, &room).await;
    s.send_text(&at, &room, "with-bob").await;
    let (_, seen) = bodies(&s, &bt, &room).await;
    assert_eq!(seen, vec!["with-bob"]);

    // `shared`: Carol, joining later, sees everything since the switch to shared.
    set_state(&s, &at, &room, "m.room.history_visibility", json!({"history_visibility": "shared"}))
        .await;
    s.send_text(&at, &room, "shared-1").await;
    s.join_room(&ct, &room).await;
    let (_, seen) = bodies(&s, &ct, &room).await;
    assert_eq!(seen, vec!["shared-1"], "joined-era messages stay hidden");

    // A user who left reads up to their departure, not after it.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &bt, &json!({})).await;
    assert_eq!(status, 200);
    s.send_text(&at, &room, "after-bob-left").await;
    let (status, seen) = bodies(&s, &bt, &room).await;
    assert_eq!(status, 200);
    assert!(seen.contains(&"shared-1".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"after-bob-left".to_owned()), "{seen:?}");

    // A user never in the room reads nothing, unless it is world readable.
    let (status, _) = bodies(&s, &dt, &room).await;
    assert_eq!(status, 403);
    set_state(
        &s,
        &at,
        &room,
        "m.room.history_visibility",
        json!({"history_visibility": "world_readable"}),
    )
    .await;
    let open = s.send_text(&at, &room, "for-everyone").await;
    let (status, seen) = bodies(&s, &dt, &room).await;
    assert_eq!(status, 200);
    assert!(seen.contains(&"for-everyone".to_owned()));
    assert!(!seen.contains(&"before-bob".to_owned()), "{seen:?}");
    let (status, ev) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{open}"), &dt).await;
    assert_eq!((status, ev["content"]["body"].as_str()), (200, Some("for-everyone")));
}

#[tokio::test]
async fn message_filters_and_lazy_members() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    for i in 0..5 {
        s.send_text(&at, &room, &format!("a{i}")).await;
        s.send_text(&bt, &room, &format!("b{i}")).await;
    }
    let filter = |f: Value| {
        let f = serde_json::to_string(&f).unwrap();
        let f: String = common::urlencode(&f);
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=3&filter={f}")
    };
    // Only Bob's messages, newest first, paged by 3 with the filter kept.
    let (status, page) =
        s.get_auth(&filter(json!({"senders": [bob], "types": ["m.room.*"]})), &at).await;
    assert_eq!(status, 200, "{page}");
    let got: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec!["b4", "b3", "b2"]);
    let end = page["end"].as_str().unwrap();
    let (_, page2) = s
        .get_auth(
            &format!("{}&from={end}", filter(json!({"senders": [bob], "types": ["m.room.*"]}))),
            &at,
        )
        .await;
    let got: Vec<&str> = page2["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(got, vec!["b1", "b0"]);

    // not_types drops messages; lazy loading returns the senders' member events.
    let (_, page) = s
        .get_auth(&filter(json!({"not_types": ["m.room.message"], "lazy_load_members": true})), &at)
        .await;
    assert!(page["chunk"].as_array().unwrap().iter().all(|e| e["type"] != "m.room.message"));
    let (_, page) = s.get_auth(&filter(json!({"lazy_load_members": true})), &at).await;
    let members: Vec<&str> = page["state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert!(members.contains(&alice.as_str()) && members.contains(&bob.as_str()), "{page}");

    // A malformed filter is a clear error.
    let (status, err) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&filter=%7Bnope"), &at)
        .await;
    assert_eq!(status, 400, "{err}");
}

#[tokio::test]
async fn timestamps_and_members_at_a_point() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    let first = s.send_text(&at, &room, "first").await;
    let (_, ev) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{first}"), &at).await;
    let ts = ev["origin_server_ts"].as_u64().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    s.join_room(&bt, &room).await;
    let later = s.send_text(&bt, &room, "later").await;

    let url = |t: u64, dir: &str| {
        format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={t}&dir={dir}")
    };
    let (status, found) = s.get_auth(&url(ts, "b"), &at).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["event_id"], first.as_str());
    assert_eq!(found["origin_server_ts"], ts);
    let (_, found) = s.get_auth(&url(ts + 1, "f"), &at).await;
    assert_ne!(found["event_id"], first.as_str());
    let (status, err) = s.get_auth(&url(u64::from(u32::MAX) * 1000, "f"), &at).await;
    assert_eq!((status, err["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, _) = s.get_auth(&url(0, "b"), &at).await;
    assert_eq!(status, 404);
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts=1"), &at).await;
    assert_eq!(status, 400, "dir is required");

    // /members at a token from before Bob joined lists only Alice.
    let (_, msgs) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=2"), &at).await;
    assert_eq!(msgs["chunk"][0]["event_id"], later.as_str());
    let before_bob = msgs["end"].as_str().unwrap();
    let (status, members) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/members?at={before_bob}"), &at).await;
    assert_eq!(status, 200, "{members}");
    let who: Vec<&str> = members["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(who, vec![alice.as_str()]);
    let (_, members) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/members"), &at).await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);
    let _ = bob;
}

#[tokio::test]
async fn knocking_and_upgrades() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let (carol, ct) = s.register("carol").await;
    let room = s
        .create_room(
            &at,
            json!({"preset": "private_chat", "room_version": "11", "room_alias_name": "club",
            "name": "Club"}),
        )
        .await;

    // Knocking needs the knock join rule.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/knock/{room}"), &bt, &json!({})).await;
    assert_eq!(status, 403);
    set_state(&s, &at, &room, "m.room.join_rules", json!({"join_rule": "knock"})).await;
    let (status, resp) = s
        .post_auth(
            "/_matrix/client/v3/knock/%23club:localhost",
            &bt,
            &json!({"reason": "let me in"}),
        )
        .await;
    assert_eq!((status, resp["room_id"].as_str()), (200, Some(room.as_str())), "{resp}");
    let (_, member) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob}"), &at)
        .await;
    assert_eq!(member["membership"], "knock");
    assert_eq!(member["reason"], "let me in");
    // A knocking user cannot just join; the moderator lets them in by inviting.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bt, &json!({})).await;
    assert_eq!(status, 403);
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &at,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 200);
    s.join_room(&bt, &room).await;

    // Upgrades: only someone with the power to send a tombstone.
    let upgrade = format!("/_matrix/client/v3/rooms/{room}/upgrade");
    let (status, _) = s.post_auth(&upgrade, &bt, &json!({"new_version": "12"})).await;
    assert_eq!(status, 403);
    let (status, err) = s.post_auth(&upgrade, &at, &json!({"new_version": "99"})).await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_UNSUPPORTED_ROOM_VERSION")));
    let (status, banned) = s
        .post_auth(&format!("/_matrix/client/v3/rooms/{room}/ban"), &at, &json!({"user_id": carol}))
        .await;
    assert_eq!(status, 200, "{banned}");
    let (status, resp) = s.post_auth(&upgrade, &at, &json!({"new_version": "12"})).await;
    assert_eq!(status, 200, "{resp}");
    let new_room = resp["replacement_room"].as_str().unwrap().to_owned();

    let state = |room: &str, kind: &str| {
        let url = format!("/_matrix/client/v3/rooms/{room}/state/{kind}/");
        let token = at.clone();
        let s = &s;
        async move { s.get_auth(&url, &token).await }
    };
    let (_, tombstone) = state(&room, "m.room.tombstone").await;
    assert_eq!(tombstone["replacement_room"], new_room.as_str());
    let (_, create_ev) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{new_room}/state/m.room.create/"), &at).await;
    assert_eq!(create_ev["predecessor"]["room_id"], room.as_str());
    assert_eq!(create_ev["room_version"], "12");
    let (_, name) = state(&new_room, "m.room.name").await;
    assert_eq!(name["name"], "Club");
    let (_, rules) = state(&new_room, "m.room.join_rules").await;
    assert_eq!(rules["join_rule"], "knock");
    let (_, alias) = s.get("/_matrix/client/v3/directory/room/%23club:localhost").await;
    assert_eq!(alias["room_id"], new_room.as_str());
    let (_, canonical) = state(&new_room, "m.room.canonical_alias").await;
    assert_eq!(canonical["alias"], "#club:localhost");
    let (_, ban) = s
        .get_auth(&format!("/_matrix/client/v3/rooms/{new_room}/state/m.room.member/{carol}"), &at)
        .await;
    assert_eq!(ban["membership"], "ban", "bans carry over");
    // The old room is closed to ordinary members; the upgrader is a creator of the new.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/late"),
            &bt,
            &json!({"msgtype": "m.text", "body": "late"}),
        )
        .await;
    assert_eq!(status, 403);
    let (_, levels) = state(&new_room, "m.room.power_levels").await;
    assert!(levels["users"].get(&alice).is_none(), "v12 creators are not listed: {levels}");
    let (status, _) = s.post_auth(&upgrade, &at, &json!({"new_version": "12"})).await;
    assert_eq!(status, 400, "a room is upgraded once");
    let _ = ct;
}

#[tokio::test]
async fn oversized_events_are_refused() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let room = s.create_room(&at, json!({})).await;
    let big = "x".repeat(70_000);
    let (status, err) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big"),
            &at,
            &json!({"msgtype": "m.text", "body": big}),
        )
        .await;
    assert_eq!((status, err["errcode"].as_str()), (413, Some("M_TOO_LARGE")), "{err}");
    let (status, err) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"),
            &at,
            &json!({"topic": big}),
        )
        .await;
    assert_eq!((status, err["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    // Nothing was stored: the last event is still the room's own setup.
    let (_, msgs) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), &at).await;
    assert_ne!(msgs["chunk"][0]["type"], "m.room.message");
}

#[tokio::test]
async fn state_reads_after_leaving_show_the_room_as_it_was() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let (_carol, ct) = s.register("carol").await;
    let room = s.create_room(&at, json!({"preset": "public_chat", "name": "Before"})).await;
    let early = s.send_text(&at, &room, "early").await;
    s.join_room(&bt, &room).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &bt, &json!({})).await;
    assert_eq!(status, 200);
    set_state(&s, &at, &room, "m.room.name", json!({"name": "After"})).await;

    let (status, name) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), &bt).await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Before")), "{name}");
    let (status, all) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state"), &bt).await;
    assert_eq!(status, 200);
    assert!(all.as_array().unwrap().iter().any(|e| e["content"]["name"] == "Before"));
    // A stranger reads nothing; the members read the present.
    let (status, _) = s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state"), &ct).await;
    assert_eq!(status, 403);
    let (_, name) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), &at).await;
    assert_eq!(name["name"], "After");
    // `/context` gives the state at the last event it returns, not today's.
    let (status, ctx) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/context/{early}?limit=0"), &at).await;
    assert_eq!(status, 200, "{ctx}");
    let names: Vec<&Value> = ctx["state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.name")
        .map(|e| &e["content"]["name"])
        .collect();
    assert_eq!(names, vec![&json!("Before")]);
}

/// Bodies of a `/messages` page read from `from` in direction `dir`.
async fn page_from(s: &TestServer, token: &str, room: &str, dir: &str, from: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir={dir}&from={from}&limit=10");
    let (status, resp) = s.get_auth(&path, token).await;
    assert_eq!(status, 200, "{resp}");
    resp["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_sync_token_pages_from_where_that_sync_left_off() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let room = s.create_room(&at, json!({})).await;
    s.send_text(&at, &room, "one").await;
    s.send_text(&at, &room, "two").await;
    let (status, first) = s.get_auth("/_matrix/client/v3/sync?timeout=0", &at).await;
    assert_eq!(status, 200, "{first}");
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // Back from the sync's token: its newest event comes first (matrix-commander reads
    // the last message this way).
    let back = page_from(&s, &at, &room, "b", &since).await;
    assert_eq!(back.first().map(String::as_str), Some("two"), "{back:?}");

    s.send_text(&at, &room, "three").await;
    let (_, second) = s.get_auth(&format!("/_matrix/client/v3/sync?since={since}"), &at).await;
    let delivered: Vec<&str> = second["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(delivered, vec!["three"]);
    // Forward from the first sync's token: exactly what the second sync delivered, nothing
    // the first one already had.
    let forward = page_from(&s, &at, &room, "f", &since).await;
    assert_eq!(forward, vec!["three"]);
    // Forward from the second sync's token: nothing yet; back from it: newest first.
    let next = second["next_batch"].as_str().unwrap().to_owned();
    assert!(page_from(&s, &at, &room, "f", &next).await.is_empty());
    assert_eq!(page_from(&s, &at, &room, "b", &next).await, vec!["three", "two", "one"]);
}
