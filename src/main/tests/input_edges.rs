//! Small edges of client input that attackers and odd clients reach: file names with
//! paths, devices without names, unknown backup algorithms and unknown auth stages.

mod common;

use common::{OPEN, TestServer};
use serde_json::json;

#[tokio::test]
async fn a_file_name_with_a_path_is_served_without_it() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("alice").await;
    let resp = s
        .client
        .post(s.url("/_matrix/media/v3/upload?filename=..%2F..%2F.bashrc%5Cevil.sh"))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body("echo hi")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mxc: serde_json::Value = resp.json().await.unwrap();
    let path = mxc["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned();
    let resp = s
        .client
        .get(s.url(&format!("/_matrix/client/v1/media/download/{path}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let disposition = resp.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert_eq!(disposition, "attachment; filename=\"evil.sh\"");
}

#[tokio::test]
async fn unset_device_fields_are_absent_not_null() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("bob").await;
    let (status, list) = s.get_auth("/_matrix/client/v3/devices", &token).await;
    assert_eq!(status, 200, "{list}");
    let device = &list["devices"][0];
    assert!(device.get("display_name").is_none(), "{list}");
    assert!(device["device_id"].is_string());
    let id = device["device_id"].as_str().unwrap();
    let (_, one) = s.get_auth(&format!("/_matrix/client/v3/devices/{id}"), &token).await;
    assert!(one.get("display_name").is_none(), "{one}");
    assert!(one.as_object().unwrap().values().all(|v| !v.is_null()), "{one}");
}

#[tokio::test]
async fn backups_need_a_known_algorithm_and_auth_stages_must_be_offered() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("carol").await;
    let path = "/_matrix/client/v3/room_keys/version";
    let (status, err) = s
        .post_auth(path, &token, &json!({"algorithm": "org.example.rot13", "auth_data": {}}))
        .await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{err}");
    let (status, err) = s
        .post_auth(
            path,
            &token,
            &json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {}}),
        )
        .await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{err}");
    let good = json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
                      "auth_data": {"public_key": "abc", "signatures": {}}});
    let (status, made) = s.post_auth(path, &token, &good).await;
    assert_eq!(status, 200, "{made}");

    // Deleting a device takes user-interactive auth; a stage type that is not offered is
    // a 400 that says so, not `M_UNRECOGNIZED` (which reads as "no such endpoint").
    let (_, list) = s.get_auth("/_matrix/client/v3/devices", &token).await;
    let id = list["devices"][0]["device_id"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/devices/{id}");
    let (status, challenge) = s.delete_auth(&path, &token, &json!({})).await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    let (status, err) = s
        .delete_auth(&path, &token, &json!({"auth": {"type": "m.login.bogus", "session": session}}))
        .await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{err}");
    assert!(err["error"].as_str().unwrap().contains("m.login.password"), "{err}");
}
