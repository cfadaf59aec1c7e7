//! "Download my data" (docs/operations.md): a user's archive holds their profile, account
//! data, devices, rooms, the messages they sent and the media they uploaded, and nothing
//! of another user's; it downloads once, by its link.

mod common;

use std::{
    io::{Cursor, Read},
    time::{Duration, Instant},
};

use common::{OPEN, TestServer, noise};
use serde_json::{Value, json};

const EXPORT: &str = "/_trellis/client/v1/export";

/// Waits until export `id` is ready (read at `status_path` with `token`).
async fn ready(s: &TestServer, status_path: &str, token: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = s.get_auth(status_path, token).await;
        assert_eq!(status, 200, "{body}");
        if body["state"] != "running" {
            assert_eq!(body["state"], "ready", "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "export still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every file of a zip archive, by name.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut file = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            file.read_to_end(&mut data).unwrap();
            (file.name().unwrap().into_owned(), data)
        })
        .collect()
}

fn json_file(files: &[(String, Vec<u8>)], name: &str) -> Value {
    let (_, data) = files.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}"));
    serde_json::from_slice(data).unwrap()
}

#[tokio::test]
async fn a_user_downloads_their_data_once() {
    let mut s = TestServer::start(OPEN).await;
    let admin = common::admin_token(&mut s).await;
    let (alice, token) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            &token,
            &json!({"displayname": "Alice Liddell"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{alice}/account_data/org.example.settings"),
            &token,
            &json!({"theme": "dark"}),
        )
        .await;
    assert_eq!(status, 200);
    let room = s.create_room(&token, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    for text in ["first of mine", "second of mine"] {
        s.send_text(&token, &room, text).await;
    }
    s.send_text(&bob, &room, "bob's private words").await;
    let picture = noise(70_000, 11);
    let resp = s
        .client
        .post(s.url("/_matrix/media/v3/upload?filename=cat.bin"))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(picture.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let (status, started) = s.post_auth(EXPORT, &token, &json!({})).await;
    assert_eq!(status, 202, "{started}");
    let id = started["export_id"].as_str().unwrap().to_owned();
    // Another user cannot read it.
    let (status, _) = s.get_auth(&format!("{EXPORT}/{id}"), &bob).await;
    assert_eq!(status, 404);
    let done = ready(&s, &format!("{EXPORT}/{id}"), &token).await;
    let link = done["download_url"].as_str().unwrap().to_owned();

    // The link needs its secret, and works once, without an access token.
    let wrong = link.split("token=").next().unwrap().to_owned() + "token=nope";
    let resp = s.client.get(s.url(&wrong)).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = s.client.get(s.url(&link)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    let archive = resp.bytes().await.unwrap();
    assert_eq!(archive.len() as u64, done["size"].as_u64().unwrap());
    let resp = s.client.get(s.url(&link)).send().await.unwrap();
    assert_eq!(resp.status(), 404, "a second download");
    let (_, gone) = s.get_auth(&format!("{EXPORT}/{id}"), &token).await;
    assert_eq!(gone["state"], "gone");

    let files = unzip(&archive);
    assert_eq!(json_file(&files, "account.json")["user_id"], alice.as_str());
    assert_eq!(json_file(&files, "profile.json")["displayname"], "Alice Liddell");
    let data = json_file(&files, "account_data.json");
    assert_eq!(data["global"]["org.example.settings"]["theme"], "dark");
    assert!(!json_file(&files, "devices.json").as_array().unwrap().is_empty());
    let rooms = json_file(&files, "rooms.json");
    let name = format!("rooms/1-{}.json", room.replace(':', "_"));
    assert_eq!(rooms, json!([{"room_id": room, "membership": "join", "file": name}]));
    let events = json_file(&files, &name)["events"].as_array().unwrap().clone();
    let bodies: Vec<&str> = events.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["first of mine", "second of mine"]);
    assert!(events.iter().any(|e| e["type"] == "m.room.create"), "state alice sent is hers");
    let media = json_file(&files, "media.json");
    assert_eq!(media[0]["filename"], "cat.bin");
    let file = media[0]["file"].as_str().unwrap();
    let (_, bytes) = files.iter().find(|(n, _)| n == file).unwrap();
    assert!(*bytes == picture, "the uploaded file, byte for byte");
    // Nothing of bob's: his message is nowhere in the archive.
    for (name, data) in &files {
        let text = String::from_utf8_lossy(data);
        assert!(!text.contains("bob's private words"), "{name} holds bob's message");
    }

    // An admin can export any local user; the link is the same kind.
    let (status, started) =
        s.post_auth(&format!("/_trellis/admin/v1/users/{alice}/export"), &admin, &json!({})).await;
    assert_eq!(status, 202, "{started}");
    let id = started["export_id"].as_str().unwrap();
    let done = ready(&s, &format!("/_trellis/admin/v1/exports/{id}"), &admin).await;
    let resp = s.client.get(s.url(done["download_url"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _) = s.get_auth(&format!("/_trellis/admin/v1/exports/{id}"), &token).await;
    assert_eq!(status, 403, "only admins");
    let (status, body) =
        s.post_auth("/_trellis/admin/v1/users/@nobody:localhost/export", &admin, &json!({})).await;
    assert_eq!(status, 404, "{body}");
    let (_, audit) = s.get_auth("/_trellis/admin/v1/audit?action=export_requested", &admin).await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 2, "{audit}");
}
