//! Relations through the client API: edits, reactions, references, threads, their
//! bundled aggregations, `/relations` paging, `/threads`, and ignored users.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

async fn public_room(s: &TestServer, token: &str) -> String {
    let (status, resp) = s
        .post_auth("/_matrix/client/v3/createRoom", token, &json!({"preset": "public_chat"}))
        .await;
    assert_eq!(status, 200, "{resp}");
    resp["room_id"].as_str().unwrap().to_owned()
}

async fn send(s: &TestServer, token: &str, room: &str, kind: &str, content: Value) -> (u16, Value) {
    let txn = format!("{:x}", rand_txn());
    s.put_auth(&format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}"), token, &content).await
}

async fn send_ok(s: &TestServer, token: &str, room: &str, kind: &str, content: Value) -> String {
    let (status, resp) = send(s, token, room, kind, content).await;
    assert_eq!(status, 200, "{resp}");
    resp["event_id"].as_str().unwrap().to_owned()
}

fn rand_txn() -> u128 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
        + u128::from(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

async fn event(s: &TestServer, token: &str, room: &str, id: &str) -> Value {
    let (status, ev) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{id}"), token).await;
    assert_eq!(status, 200, "{ev}");
    ev
}

fn text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

#[tokio::test]
async fn edits_reactions_and_references_are_bundled() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let room = public_room(&s, &at).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/join/{room}"), &bt, &json!({})).await;
    assert_eq!(status, 200);

    let original = send_ok(&s, &at, &room, "m.room.message", text("helo")).await;
    let edit = |body: &str| {
        json!({
            "msgtype": "m.text", "body": format!("* {body}"),
            "m.new_content": {"msgtype": "m.text", "body": body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        })
    };
    send_ok(&s, &at, &room, "m.room.message", edit("hello")).await;
    let latest = send_ok(&s, &at, &room, "m.room.message", edit("hello!")).await;
    // Bob's "edit" of Alice's message is not a valid replacement.
    send_ok(&s, &bt, &room, "m.room.message", edit("hijacked")).await;

    let ev = event(&s, &at, &room, &original).await;
    let replace = &ev["unsigned"]["m.relations"]["m.replace"];
    assert_eq!(replace["event_id"], latest.as_str(), "{ev}");
    assert_eq!(replace["content"]["m.new_content"]["body"], "hello!");
    // The original content is served unchanged.
    assert_eq!(ev["content"]["body"], "helo");

    // Reactions: one per key and sender; the same key twice is refused.
    let react = |key: &str| json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": key}});
    let thumbs = send_ok(&s, &bt, &room, "m.reaction", react("👍")).await;
    let (status, err) = send(&s, &bt, &room, "m.reaction", react("👍")).await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_DUPLICATE_ANNOTATION")));
    send_ok(&s, &at, &room, "m.reaction", react("👍")).await;
    send_ok(&s, &bt, &room, "m.reaction", react("🎉")).await;
    // After redacting the reaction, the same key may be sent again.
    let (status, _) = s
        .put_auth(&format!("/_matrix/client/v3/rooms/{room}/redact/{thumbs}/r1"), &bt, &json!({}))
        .await;
    assert_eq!(status, 200);
    send_ok(&s, &bt, &room, "m.reaction", react("👍")).await;

    let reference = send_ok(
        &s,
        &bt,
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "see above",
            "m.relates_to": {"rel_type": "m.reference", "event_id": original}}),
    )
    .await;
    let ev = event(&s, &at, &room, &original).await;
    assert_eq!(
        ev["unsigned"]["m.relations"]["m.reference"]["chunk"],
        json!([{"event_id": reference}])
    );

    // /relations: all relations newest first, paged; by type; by type and event type.
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{original}");
    let (status, page1) = s.get_auth(&format!("{base}?limit=3"), &at).await;
    assert_eq!(status, 200, "{page1}");
    let chunk1 = page1["chunk"].as_array().unwrap();
    assert_eq!(chunk1.len(), 3);
    assert_eq!(chunk1[0]["event_id"], reference.as_str());
    let next = page1["next_batch"].as_str().expect("a next page");
    let (_, page2) = s.get_auth(&format!("{base}?limit=50&from={next}"), &at).await;
    let chunk2 = page2["chunk"].as_array().unwrap();
    // 3 edits + 3 live reactions + 1 reference; the redacted reaction is gone.
    assert_eq!(chunk1.len() + chunk2.len(), 7, "{page2}");
    assert!(page2.get("next_batch").is_none());
    let (_, reactions) = s.get_auth(&format!("{base}/m.annotation"), &at).await;
    let keys: Vec<&str> = reactions["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["m.relates_to"]["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["👍", "🎉", "👍"]);
    let (_, edits) = s.get_auth(&format!("{base}/m.replace/m.room.message?dir=f"), &at).await;
    let edits = edits["chunk"].as_array().unwrap();
    assert_eq!(edits.len(), 3);
    assert_eq!(edits[0]["content"]["m.new_content"]["body"], "hello");
    let (_, none) = s.get_auth(&format!("{base}/m.replace/m.reaction"), &at).await;
    assert_eq!(none["chunk"], json!([]));

    // An unknown parent is a 404; an outsider may not list relations of a private room.
    let (status, _) = s
        .get_auth(&format!("/_matrix/client/v1/rooms/{room}/relations/$nope:localhost"), &at)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn threads_have_summaries_and_listings() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let (_carol, ct) = s.register("carol").await;
    let room = public_room(&s, &at).await;
    for t in [&bt, &ct] {
        let (status, _) =
            s.post_auth(&format!("/_matrix/client/v3/join/{room}"), t, &json!({})).await;
        assert_eq!(status, 200);
    }
    let reply = |root: &str, body: &str| {
        json!({"msgtype": "m.text", "body": body,
            "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
    };
    let root_a = send_ok(&s, &at, &room, "m.room.message", text("thread A")).await;
    let root_b = send_ok(&s, &ct, &room, "m.room.message", text("thread B")).await;
    send_ok(&s, &bt, &room, "m.room.message", reply(&root_a, "a1")).await;
    send_ok(&s, &ct, &room, "m.room.message", reply(&root_b, "b1")).await;
    let last_a = send_ok(&s, &bt, &room, "m.room.message", reply(&root_a, "a2")).await;

    let ev = event(&s, &at, &room, &root_a).await;
    let thread = &ev["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 2, "{ev}");
    assert_eq!(thread["latest_event"]["event_id"], last_a.as_str());
    assert_eq!(thread["current_user_participated"], true, "alice started it");
    let ev = event(&s, &ct, &room, &root_a).await;
    assert_eq!(ev["unsigned"]["m.relations"]["m.thread"]["current_user_participated"], false);

    // A thread cannot hang off an event that is itself in a thread.
    let (status, err) = send(&s, &at, &room, "m.room.message", reply(&last_a, "nested")).await;
    assert_eq!(status, 400, "{err}");

    // /threads: most recent activity first; `participated` narrows to the user's threads.
    let base = format!("/_matrix/client/v1/rooms/{room}/threads");
    let (status, all) = s.get_auth(&base, &at).await;
    assert_eq!(status, 200, "{all}");
    let ids: Vec<&str> =
        all["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![root_a.as_str(), root_b.as_str()]);
    assert_eq!(all["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    let (_, page) = s.get_auth(&format!("{base}?limit=1"), &at).await;
    assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
    let next = page["next_batch"].as_str().expect("second page");
    let (_, page2) = s.get_auth(&format!("{base}?limit=1&from={next}"), &at).await;
    assert_eq!(page2["chunk"][0]["event_id"], root_b.as_str());
    let (_, mine) = s.get_auth(&format!("{base}?include=participated"), &at).await;
    let ids: Vec<&str> =
        mine["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![root_a.as_str()], "alice took part only in thread A");

    // Bundles also appear on /messages.
    let (_, msgs) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), &at).await;
    let root = msgs["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == root_b.as_str())
        .unwrap()
        .clone();
    assert_eq!(root["unsigned"]["m.relations"]["m.thread"]["count"], 1, "{root}");
}

#[tokio::test]
async fn ignored_users_disappear_from_history() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = public_room(&s, &at).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/join/{room}"), &bt, &json!({})).await;
    assert_eq!(status, 200);
    let from_bob = send_ok(&s, &bt, &room, "m.room.message", text("spam")).await;
    send_ok(&s, &at, &room, "m.room.message", text("hi")).await;

    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{alice}/account_data/m.ignored_user_list"),
            &at,
            &json!({"ignored_users": {bob.clone(): {}}}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, msgs) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), &at).await;
    let senders: Vec<&str> =
        msgs["chunk"].as_array().unwrap().iter().map(|e| e["sender"].as_str().unwrap()).collect();
    assert!(!senders.contains(&bob.as_str()), "{senders:?}");
    assert!(senders.contains(&alice.as_str()));
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{from_bob}"), &at).await;
    assert_eq!(status, 404);
    // Others still see Bob.
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{from_bob}"), &bt).await;
    assert_eq!(status, 200);
}
