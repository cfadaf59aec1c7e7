//! Accounts through the HTTP API: login, refresh, logout, devices, passwords,
//! deactivation, login tokens, rate limits and brute-force protection.

mod common;

use std::time::Duration;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

const LOGIN: &str = "/_matrix/client/v3/login";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

fn password_login(user: &str, password: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password})
}

fn password_auth(user: &str, password: &str, session: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
           "password": password, "session": session})
}

#[tokio::test]
async fn login_flows_and_password_login() {
    let s = TestServer::start(OPEN).await;
    let (status, body) = s.get(LOGIN).await;
    assert_eq!(status, 200);
    let types: Vec<&str> =
        body["flows"].as_array().unwrap().iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"m.login.password") && types.contains(&"m.login.token"), "{body}");

    s.register("alice").await;
    let mut login = password_login("alice", "password123");
    login["device_id"] = json!("LAPTOP");
    login["initial_device_display_name"] = json!("Alice's laptop");
    let (status, body) = s.post(LOGIN, &login).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    assert_eq!(body["device_id"], "LAPTOP");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let (status, who) = s.get_auth(WHOAMI, &token).await;
    assert_eq!((status, who["device_id"].as_str()), (200, Some("LAPTOP")));

    // Full user id and the deprecated `user` field work too.
    let (status, _) = s.post(LOGIN, &password_login("@alice:localhost", "password123")).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            LOGIN,
            &json!({"type": "m.login.password", "user": "alice", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200);

    // Logging in again on the same device replaces its token.
    let (status, body) = s.post(LOGIN, &login).await;
    assert_eq!(status, 200);
    let (status, _) = s.get_auth(WHOAMI, &token).await;
    assert_eq!(status, 401, "old token of a re-used device must be revoked");
    let (status, _) = s.get_auth(WHOAMI, body["access_token"].as_str().unwrap()).await;
    assert_eq!(status, 200);

    for (user, pw) in [("alice", "wrong password"), ("nobody", "password123"), ("Bad Name!", "x")] {
        let (status, body) = s.post(LOGIN, &password_login(user, pw)).await;
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{user}");
    }
    // A login body without a type is a bad request, never a crash.
    let (status, body) = s.post(LOGIN, &json!({"password": "x"})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let (status, _) = s.post(LOGIN, &json!({"type": "m.login.sso"})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_expire() {
    let s = TestServer::start(
        &OPEN.replace("[rate_limits]", "access_token_lifetime_seconds = 1\n[rate_limits]"),
    )
    .await;
    let _ = s.register("bob").await;
    let mut login = password_login("bob", "password123");
    login["refresh_token"] = json!(true);
    let (status, body) = s.post(LOGIN, &login).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in_ms"], 1000);
    let access = body["access_token"].as_str().unwrap().to_owned();
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();

    // Expired: 401 with soft_logout, telling the client to refresh.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = s.get_auth(WHOAMI, &access).await;
    assert_eq!(
        (status, body["errcode"].as_str(), body["soft_logout"].as_bool()),
        (401, Some("M_UNKNOWN_TOKEN"), Some(true))
    );

    let (status, body) =
        s.post("/_matrix/client/v3/refresh", &json!({"refresh_token": refresh})).await;
    assert_eq!(status, 200, "{body}");
    let access2 = body["access_token"].as_str().unwrap().to_owned();
    let refresh2 = body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh, refresh2);

    // The old refresh token still works until the new access token is used...
    let (status, body) =
        s.post("/_matrix/client/v3/refresh", &json!({"refresh_token": refresh})).await;
    assert_eq!(status, 200, "{body}");
    let access3 = body["access_token"].as_str().unwrap().to_owned();
    let (status, _) = s.get_auth(WHOAMI, &access2).await;
    assert_eq!(status, 401, "a refresh revokes the previous access token");
    let (status, _) = s.get_auth(WHOAMI, &access3).await;
    assert_eq!(status, 200);
    // ...and is spent once it has been.
    let (status, body) =
        s.post("/_matrix/client/v3/refresh", &json!({"refresh_token": refresh})).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (status, _) =
        s.post("/_matrix/client/v3/refresh", &json!({"refresh_token": "nonsense"})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn logout_and_logout_all() {
    let s = TestServer::start(OPEN).await;
    let (_, t1) = s.register("carol").await;
    let (_, b) = s.post(LOGIN, &password_login("carol", "password123")).await;
    let t2 = b["access_token"].as_str().unwrap().to_owned();
    let (_, b) = s.post(LOGIN, &password_login("carol", "password123")).await;
    let t3 = b["access_token"].as_str().unwrap().to_owned();

    let (status, _) = s.post_auth("/_matrix/client/v3/logout", &t1, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(WHOAMI, &t1).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (_, devices) = s.get_auth("/_matrix/client/v3/devices", &t2).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);

    let (status, _) = s.post_auth("/_matrix/client/v3/logout/all", &t2, &json!({})).await;
    assert_eq!(status, 200);
    for t in [&t2, &t3] {
        let (status, _) = s.get_auth(WHOAMI, t).await;
        assert_eq!(status, 401);
    }
}

#[tokio::test]
async fn devices_list_rename_and_delete_with_uia() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("dave").await;
    let mut login = password_login("dave", "password123");
    login["device_id"] = json!("PHONE");
    login["initial_device_display_name"] = json!("Dave's phone");
    let (_, b) = s.post(LOGIN, &login).await;
    let phone_token = b["access_token"].as_str().unwrap().to_owned();

    let (status, body) = s.get_auth("/_matrix/client/v3/devices/PHONE", &token).await;
    assert_eq!(status, 200);
    assert_eq!(body["display_name"], "Dave's phone");
    assert!(body["last_seen_ts"].as_u64().is_some());
    let (status, body) = s.get_auth("/_matrix/client/v3/devices/NOPE", &token).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    let (status, _) = s
        .put_auth(
            "/_matrix/client/v3/devices/PHONE",
            &token,
            &json!({"display_name": "Work phone"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth("/_matrix/client/v3/devices/PHONE", &token).await;
    assert_eq!(body["display_name"], "Work phone");
    let (status, _) =
        s.put_auth("/_matrix/client/v3/devices/NOPE", &token, &json!({"display_name": "x"})).await;
    assert_eq!(status, 404);

    // Deleting asks for the password first.
    let (status, body) =
        s.delete_auth("/_matrix/client/v3/devices/PHONE", &token, &json!({})).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["flows"][0]["stages"][0], "m.login.password");
    let session = body["session"].as_str().unwrap().to_owned();
    let (status, body) = s
        .delete_auth(
            "/_matrix/client/v3/devices/PHONE",
            &token,
            &json!({"auth": password_auth("dave", "wrong", &session)}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_FORBIDDEN")));
    assert!(body["flows"].is_array());
    let (status, body) = s
        .delete_auth(
            "/_matrix/client/v3/devices/PHONE",
            &token,
            &json!({"auth": password_auth("dave", "password123", &session)}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.get_auth(WHOAMI, &phone_token).await;
    assert_eq!(status, 401, "deleting a device revokes its token");

    // Bulk deletion, unknown ids ignored; the session cannot be replayed.
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/delete_devices",
            &token,
            &json!({"devices": ["X", "Y"],
            "auth": password_auth("dave", "password123", &session)}),
        )
        .await;
    assert_eq!(status, 400, "a spent UIA session must not be reusable: {body}");
    let (status, _) = s
        .post_auth("/_matrix/client/v3/delete_devices", &token, &json!({"devices": ["X", "Y"],
            "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "dave"}, "password": "password123"}}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn password_change_signs_out_other_devices() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("erin").await;
    let (_, b) = s.post(LOGIN, &password_login("erin", "password123")).await;
    let other = b["access_token"].as_str().unwrap().to_owned();

    let (status, body) = s
        .post_auth("/_matrix/client/v3/account/password", &token, &json!({"new_password": "short"}))
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_WEAK_PASSWORD")));
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/account/password",
            &token,
            &json!({"new_password": "a new password"}),
        )
        .await;
    assert_eq!(status, 401);
    let session = body["session"].as_str().unwrap();
    let (status, body) = s
        .post_auth("/_matrix/client/v3/account/password", &token,
            &json!({"new_password": "a new password", "auth": password_auth("erin", "password123", session)}))
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, _) = s.get_auth(WHOAMI, &token).await;
    assert_eq!(status, 200, "the device that changed the password stays signed in");
    let (status, _) = s.get_auth(WHOAMI, &other).await;
    assert_eq!(status, 401);
    let (status, _) = s.post(LOGIN, &password_login("erin", "password123")).await;
    assert_eq!(status, 403);
    let (status, _) = s.post(LOGIN, &password_login("erin", "a new password")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn deactivation_is_final() {
    let s = TestServer::start(OPEN).await;
    let (user, token) = s.register("frank").await;
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/profile/{user}/displayname"),
            &token,
            &json!({"displayname": "Frank"}),
        )
        .await;
    assert_eq!(status, 200);
    // Erasure deletes what the user uploaded; the same bytes uploaded by someone else
    // stay theirs.
    let (_, other) = s.register("grace").await;
    let upload = |token: String| {
        let req = s.client.post(s.url("/_matrix/media/v3/upload")).bearer_auth(token);
        async move {
            let resp = req.header("content-type", "text/plain").body("frank's file").send();
            let body: serde_json::Value = resp.await.unwrap().json().await.unwrap();
            body["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned()
        }
    };
    let (franks, graces) = (upload(token.clone()).await, upload(other.clone()).await);
    let download = |media: &str| {
        let path = format!("/_matrix/client/v1/media/download/{media}");
        s.client.get(s.url(&path)).bearer_auth(&other).send()
    };
    assert_eq!(download(&franks).await.unwrap().status(), 200);
    let (status, body) =
        s.post_auth("/_matrix/client/v3/account/deactivate", &token, &json!({})).await;
    assert_eq!(status, 401);
    let session = body["session"].as_str().unwrap();
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/account/deactivate",
            &token,
            &json!({"erase": true, "auth": password_auth("frank", "password123", session)}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id_server_unbind_result"], "no-support");

    let (status, _) = s.get_auth(WHOAMI, &token).await;
    assert_eq!(status, 401);
    let (status, body) = s.post(LOGIN, &password_login("frank", "password123")).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_USER_DEACTIVATED")));
    assert_eq!(download(&franks).await.unwrap().status(), 404, "an erased user's upload");
    assert_eq!(download(&graces).await.unwrap().status(), 200);
    let (status, _) = s.get(&format!("/_matrix/client/v3/profile/{user}")).await;
    assert_eq!(status, 404);
    let (status, body) = s.get("/_matrix/client/v3/register/available?username=frank").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_USER_IN_USE")),
        "ids are never reused"
    );
}

#[tokio::test]
async fn login_tokens_are_single_use() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("gina").await;
    let (status, body) =
        s.post_auth("/_matrix/client/v1/login/get_token", &token, &json!({})).await;
    assert_eq!(status, 401);
    let session = body["session"].as_str().unwrap();
    let (status, body) = s
        .post_auth(
            "/_matrix/client/v1/login/get_token",
            &token,
            &json!({"auth": password_auth("gina", "password123", session)}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in_ms"].as_u64().unwrap() > 0);
    let login_token = body["login_token"].as_str().unwrap();

    let (status, body) =
        s.post(LOGIN, &json!({"type": "m.login.token", "token": login_token})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@gina:localhost");
    let (status, body) =
        s.post(LOGIN, &json!({"type": "m.login.token", "token": login_token})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
}

#[tokio::test]
async fn rate_limit_answers_429_then_recovers() {
    let s = TestServer::start(
        "[registration]\nmode = \"open\"\n[auth]\nargon2_memory_kib = 64\nargon2_iterations = 1\n\
         [rate_limits]\nlogin = { per_second = 5.0, burst = 2 }\n",
    )
    .await;
    let body = password_login("nobody", "whatever1");
    for _ in 0..2 {
        let (status, _) = s.post(LOGIN, &body).await;
        assert_eq!(status, 403);
    }
    let (status, limited) = s.post(LOGIN, &body).await;
    assert_eq!((status, limited["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")));
    let wait = limited["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0);
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let (status, _) = s.post(LOGIN, &body).await;
    assert_eq!(status, 403, "after retry_after_ms the limit has recovered");
}

#[tokio::test]
async fn repeated_failed_logins_back_off() {
    let s = TestServer::start(
        &OPEN.replace("[rate_limits]", "failed_login_threshold = 3\n[rate_limits]"),
    )
    .await;
    s.register("hank").await;
    for _ in 0..3 {
        let (status, _) = s.post(LOGIN, &password_login("hank", "guess")).await;
        assert_eq!(status, 403);
    }
    // Now even the right password has to wait.
    let (status, body) = s.post(LOGIN, &password_login("hank", "password123")).await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")));
    let wait = body["retry_after_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let (status, _) = s.post(LOGIN, &password_login("hank", "password123")).await;
    assert_eq!(status, 200);
}

/// Someone guessing a user's password from one address cannot lock the user out: the
/// owner's right password from an address that has not failed still logs in, while the
/// guessing address keeps waiting; the lockout is in the audit log.
#[tokio::test]
async fn guessing_from_one_address_does_not_lock_the_owner_out() {
    let mut s = TestServer::start(
        &OPEN.replace("[rate_limits]", "failed_login_threshold = 3\n[rate_limits]"),
    )
    .await;
    let admin = common::admin_token(&mut s).await;
    s.register("ines").await;
    for _ in 0..4 {
        let (status, _) = s.post(LOGIN, &password_login("ines", "guess")).await;
        assert!(status == 403 || status == 429, "{status}");
    }
    let (status, body) = s.post(LOGIN, &password_login("ines", "password123")).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED")),
        "the guesser waits"
    );

    let owner = reqwest::Client::builder().local_address("127.0.0.2".parse().ok()).build().unwrap();
    let resp =
        owner.post(s.url(LOGIN)).json(&password_login("ines", "password123")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the owner, from elsewhere, gets in");
    // A second address that starts guessing is held back by the account's wait at once.
    let resp =
        owner.post(s.url(LOGIN)).json(&password_login("ines", "guess")).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let (status, _) = s.post(LOGIN, &password_login("ines", "guess")).await;
    assert_eq!(status, 429);

    let (status, audit) = s.get_auth("/_trellis/admin/v1/audit?action=login_lockout", &admin).await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["actor"], "@ines:localhost", "{audit}");
}

#[tokio::test]
async fn profiles_and_account_data() {
    let s = TestServer::start(OPEN).await;
    let (user, token) = s.register("ivy").await;
    let (other, other_token) = s.register("jay").await;
    let base = format!("/_matrix/client/v3/profile/{user}");

    for (field, value) in [
        ("displayname", json!("Ivy")),
        ("avatar_url", json!("mxc://localhost/abc")),
        ("m.tz", json!("Europe/Paris")),
        ("org.example.pronouns", json!({"en": "she/her"})),
    ] {
        let (status, body) =
            s.put_auth(&format!("{base}/{field}"), &token, &json!({ field: value })).await;
        assert_eq!(status, 200, "{field}: {body}");
    }
    let (status, body) = s.get(&base).await;
    assert_eq!(status, 200);
    assert_eq!(body["displayname"], "Ivy");
    assert_eq!(body["avatar_url"], "mxc://localhost/abc");
    assert_eq!(body["m.tz"], "Europe/Paris");
    assert_eq!(body["org.example.pronouns"]["en"], "she/her");
    let (status, body) = s.get(&format!("{base}/displayname")).await;
    assert_eq!((status, body["displayname"].as_str()), (200, Some("Ivy")));

    let (status, _) = s.delete_auth(&format!("{base}/m.tz"), &token, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get(&format!("{base}/m.tz")).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = s
        .put_auth(&format!("{base}/displayname"), &other_token, &json!({"displayname": "x"}))
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, _) = s.get("/_matrix/client/v3/profile/@ghost:localhost").await;
    assert_eq!(status, 404);
    let huge = "x".repeat(70 * 1024);
    let (status, _) = s
        .put_auth(&format!("{base}/org.example.big"), &token, &json!({"org.example.big": huge}))
        .await;
    assert!(status == 413, "{status}");

    let ad = format!("/_matrix/client/v3/user/{user}/account_data/org.example.settings");
    let (status, body) = s.get_auth(&ad, &token).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, _) = s.put_auth(&ad, &token, &json!({"theme": "dark"})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(&ad, &token).await;
    assert_eq!((status, body), (200, json!({"theme": "dark"})));
    let (status, _) = s
        .get_auth(
            &format!("/_matrix/client/v3/user/{other}/account_data/org.example.settings"),
            &token,
        )
        .await;
    assert_eq!(status, 403);
    let (status, body) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{user}/account_data/m.fully_read"),
            &token,
            &json!({"event_id": "$x"}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (405, Some("M_BAD_JSON")));

    let room_ad =
        format!("/_matrix/client/v3/user/{user}/rooms/!room:localhost/account_data/m.tag.test");
    let (status, _) = s.put_auth(&room_ad, &token, &json!({"a": 1})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&room_ad, &token).await;
    assert_eq!(body, json!({"a": 1}));
    let (status, _) = s.get_auth(&ad.replace("org.example.settings", "m.tag.test"), &token).await;
    assert_eq!(status, 404, "room and global account data are separate");

    let (status, caps) = s.get_auth("/_matrix/client/v3/capabilities", &token).await;
    assert_eq!(status, 200);
    // m.change_password may be omitted: absent means enabled.
    assert_ne!(caps["capabilities"]["m.change_password"]["enabled"], false, "{caps}");
    assert_eq!(caps["capabilities"]["m.3pid_changes"]["enabled"], false);
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "11");
    assert_eq!(caps["capabilities"]["m.room_versions"]["available"]["12"], "stable");
    assert_eq!(caps["capabilities"]["m.room_versions"]["available"].as_object().unwrap().len(), 12);
    assert_eq!(caps["capabilities"]["m.get_login_token"]["enabled"], true);
}

/// Tokens are stored only as hashes: after a clean shutdown, no byte sequence of any
/// token handed out is anywhere in the data directory (compression off, so a plaintext
/// token could not hide in a compressed block).
#[tokio::test]
async fn no_token_is_stored_in_plaintext() {
    let config = OPEN.replace(
        "[rate_limits]",
        "[storage]\ncompression = \"none\"\nbottommost_compression = \"none\"\n[rate_limits]",
    );
    let mut s = TestServer::start(&config).await;
    let mut secrets = Vec::new();
    let (_, access) = s.register("kim").await;
    secrets.push(access.clone());
    let mut login = password_login("kim", "password123");
    login["refresh_token"] = json!(true);
    let (_, b) = s.post(LOGIN, &login).await;
    secrets.push(b["access_token"].as_str().unwrap().to_owned());
    secrets.push(b["refresh_token"].as_str().unwrap().to_owned());
    let (_, b) = s.post_auth("/_matrix/client/v1/login/get_token", &access, &json!({})).await;
    let session = b["session"].as_str().unwrap().to_owned();
    let (_, b) = s
        .post_auth(
            "/_matrix/client/v1/login/get_token",
            &access,
            &json!({"auth": password_auth("kim", "password123", &session)}),
        )
        .await;
    secrets.push(b["login_token"].as_str().unwrap().to_owned());
    // The password itself must not be there either.
    secrets.push("password123".to_owned());

    assert!(s.terminate().success());
    let mut files = 0;
    let mut stack = vec![s.data_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for secret in &secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret:?} found in {}",
                    path.display()
                );
            }
        }
    }
    assert!(files > 3, "the data directory was not written");
    // The accounts themselves are stored (positive control for the scan above).
    let db_has_user = std::fs::read_dir(s.data_dir().join("db"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .any(|b| b.windows(3).any(|w| w == b"kim"));
    assert!(db_has_user);
}

#[tokio::test]
async fn cli_user_commands() {
    let mut s = TestServer::start(OPEN).await;
    s.terminate();
    let config = s.config_path.to_str().unwrap().to_owned();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "cli password 1\n").unwrap();
    let cwd = s.dir.path().to_owned();
    let cli =
        |args: &[&str]| common::run_cli(&[&["user", "--config", &config], args].concat(), &cwd);

    let out = cli(&["create", "admin", "--admin", "--password-file", pwfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("@admin:localhost"));
    let out = cli(&["create", "admin", "--password-file", pwfile.to_str().unwrap()]);
    assert!(!out.status.success(), "duplicate names are refused");

    s.launch().await;
    let (status, _) = s.post(LOGIN, &password_login("admin", "cli password 1")).await;
    assert_eq!(status, 200);
    s.terminate();

    std::fs::write(&pwfile, "cli password 2\n").unwrap();
    let out = cli(&["reset-password", "admin", "--password-file", pwfile.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["reset-password", "nobody", "--password-file", pwfile.to_str().unwrap()]);
    assert!(!out.status.success());

    s.launch().await;
    let (status, _) = s.post(LOGIN, &password_login("admin", "cli password 1")).await;
    assert_eq!(status, 403);
    let (status, _) = s.post(LOGIN, &password_login("admin", "cli password 2")).await;
    assert_eq!(status, 200);
    // While the server runs, the database is locked and the command says so.
    let out = cli(&["deactivate", "admin"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the server running"));
    s.terminate();

    let out = cli(&["deactivate", "admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    let (status, body) = s.post(LOGIN, &password_login("admin", "cli password 2")).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_USER_DEACTIVATED")));
}

#[tokio::test]
async fn registration_tokens_gate_registration() {
    let config = OPEN.replace("mode = \"open\"", "mode = \"token\"");
    let mut s = TestServer::start(&config).await;
    s.terminate();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "admin password\n").unwrap();
    let out = common::run_cli(
        &[
            "user",
            "--config",
            s.config_path.to_str().unwrap(),
            "create",
            "root_admin",
            "--admin",
            "--password-file",
            pwfile.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    let (_, b) = s.post(LOGIN, &password_login("root_admin", "admin password")).await;
    let admin = b["access_token"].as_str().unwrap().to_owned();

    let admin_api = "/_synapse/admin/v1/registration_tokens";
    let (status, token) =
        s.post_auth(&format!("{admin_api}/new"), &admin, &json!({"uses_allowed": 1})).await;
    assert_eq!(status, 200, "{token}");
    assert_eq!((token["uses_allowed"].as_u64(), token["completed"].as_u64()), (Some(1), Some(0)));
    let code = token["token"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 16);
    let (status, _) =
        s.post_auth(&format!("{admin_api}/new"), &admin, &json!({"token": code})).await;
    assert_eq!(status, 400, "duplicate tokens are refused");

    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity?token=";
    let (status, body) = s.get(&format!("{validity}{code}")).await;
    assert_eq!((status, body["valid"].as_bool()), (200, Some(true)));
    let (_, body) = s.get(&format!("{validity}nope")).await;
    assert_eq!(body["valid"], false);

    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "newbie", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.registration_token");
    let session = body["session"].as_str().unwrap().to_owned();
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "newbie", "password": "password123",
            "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_FORBIDDEN")));
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "newbie", "password": "password123",
            "auth": {"type": "m.login.registration_token", "token": code, "session": session}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let newbie = body["access_token"].as_str().unwrap().to_owned();

    // Used up: the next registration with it fails, and validity says so.
    let (status, _) = s
        .post(
            "/_matrix/client/v3/register",
            &json!({"username": "second",
            "auth": {"type": "m.login.registration_token", "token": code}}),
        )
        .await;
    assert_eq!(status, 401);
    let (_, body) = s.get(&format!("{validity}{code}")).await;
    assert_eq!(body["valid"], false);

    let (status, body) = s.get_auth(&format!("{admin_api}/{code}"), &admin).await;
    assert_eq!((status, body["completed"].as_u64()), (200, Some(1)));
    let (status, body) = s.get_auth(&format!("{admin_api}?valid=false"), &admin).await;
    assert_eq!(status, 200);
    assert_eq!(body["registration_tokens"].as_array().unwrap().len(), 1);
    let (status, body) =
        s.put_auth(&format!("{admin_api}/{code}"), &admin, &json!({"uses_allowed": null})).await;
    assert_eq!((status, body["uses_allowed"].is_null()), (200, true));
    let (_, body) = s.get(&format!("{validity}{code}")).await;
    assert_eq!(body["valid"], true, "unlimited again");

    let (status, body) = s.get_auth(admin_api, &newbie).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "only admins");
    let (status, _) = s.get(admin_api).await;
    assert_eq!(status, 401);

    let (status, _) = s.delete_auth(&format!("{admin_api}/{code}"), &admin, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(&format!("{admin_api}/{code}"), &admin).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
}

#[tokio::test]
async fn user_directory_search() {
    let search = "/_matrix/client/v3/user_directory/search";
    let s = TestServer::start(
        &OPEN.replace("[rate_limits]", "[user_directory]\nsearch_all_users = true\n[rate_limits]"),
    )
    .await;
    let (alice, alice_token) = s.register("alice.smith").await;
    let (_, _) = s.register("alicia").await;
    let (bob, bob_token) = s.register("bob").await;
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            &alice_token,
            &json!({"displayname": "Wonder Woman"}),
        )
        .await;
    assert_eq!(status, 200);

    let names = |body: &Value| -> Vec<String> {
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["user_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = s.post_auth(search, &bob_token, &json!({"search_term": "wond"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body), std::slice::from_ref(&alice));
    assert_eq!(body["results"][0]["display_name"], "Wonder Woman");
    let (_, body) = s.post_auth(search, &bob_token, &json!({"search_term": "smith WOM"})).await;
    assert_eq!(names(&body), std::slice::from_ref(&alice));
    let (_, body) = s.post_auth(search, &bob_token, &json!({"search_term": "ali"})).await;
    assert_eq!(names(&body).len(), 2);
    let (_, body) =
        s.post_auth(search, &bob_token, &json!({"search_term": "ali", "limit": 1})).await;
    assert_eq!((names(&body).len(), body["limited"].as_bool()), (1, Some(true)));
    let (_, body) = s.post_auth(search, &bob_token, &json!({"search_term": "nobody here"})).await;
    assert!(names(&body).is_empty());

    // Renaming moves the user in the index.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            &alice_token,
            &json!({"displayname": "Queen"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, body) = s.post_auth(search, &bob_token, &json!({"search_term": "wonder"})).await;
    assert!(names(&body).is_empty());
    let (_, body) = s.post_auth(search, &bob_token, &json!({"search_term": "quee"})).await;
    assert_eq!(names(&body), std::slice::from_ref(&alice));
    let (status, _) = s.post(search, &json!({"search_term": "x"})).await;
    assert_eq!(status, 401);

    // By default only users sharing a room are found, never the searcher.
    let s2 = TestServer::start(OPEN).await;
    let (carol, carol_token) = s2.register("carol").await;
    s2.register("dave").await;
    let (_, body) = s2.post_auth(search, &carol_token, &json!({"search_term": "dave"})).await;
    assert!(names(&body).is_empty(), "{body}");
    let (_, body) = s2.post_auth(search, &carol_token, &json!({"search_term": "carol"})).await;
    assert!(names(&body).is_empty(), "{body}");
    assert_eq!(carol, "@carol:localhost");
    // Once they share a room, Dave is found.
    let (_, dave_login) = s2.post(LOGIN, &password_login("dave", "password123")).await;
    let dave_token = dave_login["access_token"].as_str().unwrap().to_owned();
    let (status, room) = s2
        .post_auth("/_matrix/client/v3/createRoom", &carol_token, &json!({"preset": "public_chat"}))
        .await;
    assert_eq!(status, 200);
    let room_id = room["room_id"].as_str().unwrap();
    let (status, _) = s2
        .post_auth(&format!("/_matrix/client/v3/rooms/{room_id}/join"), &dave_token, &json!({}))
        .await;
    assert_eq!(status, 200);
    let (_, body) = s2.post_auth(search, &carol_token, &json!({"search_term": "dave"})).await;
    assert_eq!(names(&body), ["@dave:localhost"]);
    assert_eq!(bob, "@bob:localhost");

    // Members of a room published in the directory are found by anyone; of an
    // unpublished room, only by its members.
    let (erin, _) = s2.register("erin").await;
    let (_, erin_login) = s2.post(LOGIN, &password_login("erin", "password123")).await;
    let erin_token = erin_login["access_token"].as_str().unwrap().to_owned();
    let (status, _) = s2
        .post_auth(
            "/_matrix/client/v3/createRoom",
            &dave_token,
            &json!({"preset": "public_chat", "visibility": "public"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, body) = s2.post_auth(search, &erin_token, &json!({"search_term": "dave"})).await;
    assert_eq!(names(&body), ["@dave:localhost"], "dave is in a published room");
    let (_, body) = s2.post_auth(search, &erin_token, &json!({"search_term": "carol"})).await;
    assert!(names(&body).is_empty(), "carol's room is not published: {body}");
    assert_eq!(erin, "@erin:localhost");
}

#[tokio::test]
async fn openid_tokens_prove_who_the_user_is() {
    let s = TestServer::start(OPEN).await;
    let (alice, token) = s.register("alice").await;
    let (_, bob_token) = s.register("bob").await;
    let path = |user: &str| format!("/_matrix/client/v3/user/{user}/openid/request_token");

    let (status, body) = s.post_auth(&path(&alice), &token, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["matrix_server_name"], alice.split(':').nth(1).unwrap());
    assert_eq!(body["expires_in"], 3600);
    let openid = body["access_token"].as_str().unwrap().to_owned();

    // Another service asks who the token is, without signing (it is not a homeserver).
    let userinfo = |t: &str| format!("/_matrix/federation/v1/openid/userinfo?access_token={t}");
    let (status, body) = s.get(&userinfo(&openid)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sub"], alice);

    // The token grants nothing on the client API.
    let (status, body) = s.get_auth(WHOAMI, &openid).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    // An access token is not an OpenID token.
    let (status, body) = s.get(&userinfo(&token)).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (status, body) = s.get(&userinfo("nonsense")).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    // Nobody gets a token in another user's name.
    let (status, body) = s.post_auth(&path(&alice), &bob_token, &json!({})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));

    // A deactivated account proves nothing any more.
    let deactivate = "/_matrix/client/v3/account/deactivate";
    let (_, body) = s.post_auth(deactivate, &token, &json!({})).await;
    let session = body["session"].as_str().unwrap();
    let auth = json!({"auth": password_auth("alice", "password123", session)});
    let (status, body) = s.post_auth(deactivate, &token, &auth).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.get(&userinfo(&openid)).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
}

#[tokio::test]
async fn erasing_offline_redacts_for_later_joiners_too() {
    let mut s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let secret = s.send_text(&alice, &room, "offline secret").await;
    s.terminate();
    let config = s.config_path.to_str().unwrap().to_owned();
    let cwd = s.dir.path().to_owned();
    let out =
        common::run_cli(&["user", "--config", &config, "deactivate", "alice", "--erase"], &cwd);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    s.join_room(&bob, &room).await;
    let (_, event) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/event/{secret}"), &bob).await;
    assert_eq!(event["content"], json!({}), "{event}");
}

#[tokio::test]
async fn erasure_can_redact_for_everyone() {
    let s = TestServer::start(&format!("{OPEN}[retention]\nerase_for_everyone = true\n")).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    let secret = s.send_text(&alice, &room, "soon erased").await;
    let event = format!("/_matrix/client/v3/rooms/{room}/event/{secret}");
    let (_, seen) = s.get_auth(&event, &bob).await;
    assert_eq!(seen["content"]["body"], "soon erased");
    let deactivate = "/_matrix/client/v3/account/deactivate";
    let (_, body) = s.post_auth(deactivate, &alice, &json!({})).await;
    let session = body["session"].as_str().unwrap();
    let auth = json!({"erase": true, "auth": password_auth("alice", "password123", session)});
    let (status, body) = s.post_auth(deactivate, &alice, &auth).await;
    assert_eq!(status, 200, "{body}");
    // Bob saw it before the erasure; with the stricter setting he gets it redacted too.
    let (_, seen) = s.get_auth(&event, &bob).await;
    assert_eq!(seen["content"], json!({}), "{seen}");
    let (_, page) =
        s.get_auth(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), &bob).await;
    assert!(!page.to_string().contains("soon erased"), "{page}");
}
