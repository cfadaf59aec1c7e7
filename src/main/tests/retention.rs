//! Message retention (docs/operations.md): with `m.room.retention` set, expired messages
//! vanish from every read path, then from disk once the purge has compacted the database;
//! the room's state stays and the room goes on working. A room without a policy keeps
//! its messages.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{OPEN, TestServer, noise, txn_id};
use serde_json::{Value, json};

/// Without compression a word on disk can be found by its bytes; the purge runs every
/// second.
fn config() -> String {
    format!(
        "{OPEN}[storage]\ncompression = \"none\"\nbottommost_compression = \"none\"\n\
         [retention]\npurge_interval_seconds = 1\n"
    )
}

/// Whether any file under `dir` holds `needle`.
fn on_disk(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            on_disk(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        }
    })
}

async fn send(s: &TestServer, token: &str, room: &str, kind: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{}", txn_id());
    let (status, resp) = s.put_auth(&path, token, &content).await;
    assert_eq!(status, 200, "{resp}");
    resp["event_id"].as_str().unwrap().to_owned()
}

async fn search(s: &TestServer, token: &str, term: &str) -> usize {
    let body = json!({"search_categories": {"room_events": {"search_term": term}}});
    let (status, resp) = s.post_auth("/_matrix/client/v3/search", token, &body).await;
    assert_eq!(status, 200, "{resp}");
    resp["search_categories"]["room_events"]["results"].as_array().unwrap().len()
}

/// The bodies of the room's timeline as `/messages` pages it backwards from the end.
async fn bodies(s: &TestServer, token: &str, room: &str) -> Vec<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
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
async fn expired_messages_leave_every_read_path_and_the_disk() {
    let s = TestServer::start(&config()).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room =
        s.create_room(&alice, json!({"preset": "public_chat", "name": "Lasting name"})).await;
    s.join_room(&bob, &room).await;
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"),
            &alice,
            &json!({"topic": "Lasting topic"}),
        )
        .await;
    assert_eq!(status, 200);
    let other = s.create_room(&alice, json!({"preset": "private_chat"})).await;

    // What will expire: a message, a reply that mentions alice (a notification), a
    // reaction, and a file only that message uses.
    let doomed = s.send_text(&alice, &room, "ephemeral zebraquux words").await;
    let mention = format!("zebraquux for {alice_id}");
    let reply = send(
        &s,
        &bob,
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": mention,
               "m.mentions": {"user_ids": [alice_id]},
               "m.relates_to": {"m.in_reply_to": {"event_id": doomed}}}),
    )
    .await;
    send(
        &s,
        &bob,
        &room,
        "m.reaction",
        json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": doomed, "key": "👍"}}),
    )
    .await;
    let mxc = s.upload_bytes(&alice, &noise(5_000, 3)).await;
    send(
        &s,
        &alice,
        &room,
        "m.room.message",
        json!({"msgtype": "m.file", "body": "doomed.bin", "url": mxc}),
    )
    .await;
    let download =
        format!("/_matrix/client/v1/media/download/{}", mxc.trim_start_matches("mxc://"));
    let resp = s.client.get(s.url(&download)).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    s.send_text(&alice, &other, "lasting marmotword words").await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while search(&s, &alice, "zebraquux").await < 2 {
        assert!(Instant::now() < deadline, "the messages were never indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, notes) = s.get_auth("/_matrix/client/v3/notifications", &alice).await;
    assert_eq!(notes["notifications"][0]["event"]["event_id"], reply, "{notes}");
    assert_eq!(bodies(&s, &alice, &room).await.len(), 3);

    // Two seconds' lifetime: everything sent so far expires, the policy itself does not.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.retention/"),
            &alice,
            &json!({"max_lifetime": 2000}),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Every read path.
    assert!(bodies(&s, &alice, &room).await.is_empty(), "/messages");
    assert_eq!(search(&s, &alice, "zebraquux").await, 0, "/search");
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{doomed}"), &alice).await;
    assert_eq!(status, 404, "/event");
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/context/{doomed}"), &alice).await;
    assert_eq!(status, 404, "/context");
    let (_, relations) =
        s.get_auth(&format!("/_matrix/client/v1/rooms/{room}/relations/{doomed}"), &bob).await;
    assert!(relations["chunk"].as_array().is_none_or(|c| c.is_empty()), "{relations}");
    let (_, notes) = s.get_auth("/_matrix/client/v3/notifications", &alice).await;
    assert_eq!(notes["notifications"], json!([]), "/notifications");
    let (status, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    assert_eq!(status, 200);
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(
        timeline.iter().all(|e| !e.to_string().contains("zebraquux") && e["type"] != "m.reaction"),
        "{timeline:?}"
    );

    // Then from disk: the purge prunes the stored events and compacts. The other
    // room's message shows that words are found on disk when they are there.
    let db = s.data_dir().join("db");
    let deadline = Instant::now() + Duration::from_secs(30);
    while on_disk(&db, b"zebraquux") {
        assert!(Instant::now() < deadline, "the expired words are still on disk");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(on_disk(&db, b"marmotword"), "the other room's message is on disk");
    // Purged, the notification no longer counts.
    let (_, sync) = s.get_auth("/_matrix/client/v3/sync", &alice).await;
    let joined = &sync["rooms"]["join"][&room];
    assert_eq!(joined["unread_notifications"]["notification_count"], 0, "{joined}");
    let resp = s.client.get(s.url(&download)).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(resp.status(), 404, "the file only the expired message used");

    // The state is intact and the room still works.
    let (status, name) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), &bob).await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Lasting name")));
    let (_, topic) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"), &bob).await;
    assert_eq!(topic["topic"], "Lasting topic");
    let (_, members) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), &bob).await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 2);
    s.send_text(&bob, &room, "still here").await;
    assert_eq!(bodies(&s, &alice, &room).await, vec!["still here".to_owned()]);
    assert_eq!(bodies(&s, &alice, &other).await, vec!["lasting marmotword words".to_owned()]);
    assert_eq!(search(&s, &alice, "marmotword").await, 1);
}
