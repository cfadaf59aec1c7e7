//! Email: validation codes and links sent through a real SMTP server on loopback, adding
//! and removing addresses, password reset, and registration that requires an address.

mod common;

use common::{OPEN, SmtpServer, TestServer, code_in, link_in};
use serde_json::{Value, json};

const LOGIN: &str = "/_matrix/client/v3/login";

fn password_auth(user: &str, password: &str, session: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
           "password": password, "session": session})
}

async fn request_token(
    s: &TestServer,
    kind: &str,
    email: &str,
    secret: &str,
    attempt: u32,
) -> (u16, Value) {
    let path = match kind {
        "register" => "/_matrix/client/v3/register/email/requestToken",
        "password" => "/_matrix/client/v3/account/password/email/requestToken",
        _ => "/_matrix/client/v3/account/3pid/email/requestToken",
    };
    s.post(path, &json!({"client_secret": secret, "email": email, "send_attempt": attempt})).await
}

async fn submit(
    s: &TestServer,
    submit_url: &str,
    sid: &str,
    secret: &str,
    token: &str,
) -> (u16, Value) {
    common::json_of(
        s.client
            .post(submit_url)
            .json(&json!({"sid": sid, "client_secret": secret, "token": token}))
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn add_address_then_reset_password_by_mail() {
    let smtp = SmtpServer::start().await;
    let s = TestServer::start(&format!("{OPEN}{}", smtp.config())).await;
    let (user, token) = s.register("lena").await;

    // Ask for a code to add an address; the mail arrives at the SMTP server.
    let (status, body) = request_token(&s, "3pid", "Lena@Example.org", "secret1", 1).await;
    assert_eq!(status, 200, "{body}");
    let sid = body["sid"].as_str().unwrap().to_owned();
    let submit_url = body["submit_url"].as_str().unwrap().to_owned();
    let mail = smtp.wait_for("lena@example.org", 1).await;
    assert!(mail.contains("From: Trellis <noreply@test.example>"), "{mail}");
    let code = code_in(&mail);

    // A retry with the same send_attempt sends nothing new and keeps the session.
    let (_, again) = request_token(&s, "3pid", "lena@example.org", "secret1", 1).await;
    assert_eq!(again["sid"], sid.as_str());

    // Adding before validating fails; a wrong code fails; the right one works once.
    let (status, _) = s
        .post_auth("/_matrix/client/v3/account/3pid/add", &token,
            &json!({"sid": sid, "client_secret": "secret1", "auth": {"type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": "lena"}, "password": "password123"}}))
        .await;
    assert_eq!(status, 401);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (status, body) = submit(&s, &submit_url, &sid, "secret1", wrong).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_THREEPID_AUTH_FAILED")));
    let (status, body) = submit(&s, &submit_url, &sid, "wrong secret", &code).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = submit(&s, &submit_url, &sid, "secret1", &code).await;
    assert_eq!((status, body["success"].as_bool()), (200, Some(true)));
    let (status, _) = submit(&s, &submit_url, &sid, "secret1", &code).await;
    assert_eq!(status, 400, "codes are single use");

    let (status, body) = s
        .post_auth(
            "/_matrix/client/v3/account/3pid/add",
            &token,
            &json!({"sid": sid, "client_secret": "secret1"}),
        )
        .await;
    assert_eq!(status, 401);
    let session = body["session"].as_str().unwrap();
    let (status, body) = s
        .post_auth("/_matrix/client/v3/account/3pid/add", &token,
            &json!({"sid": sid, "client_secret": "secret1", "auth": password_auth("lena", "password123", session)}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, list) = s.get_auth("/_matrix/client/v3/account/3pid", &token).await;
    assert_eq!(list["threepids"][0]["medium"], "email");
    assert_eq!(list["threepids"][0]["address"], "lena@example.org");

    // The address is taken now.
    let (status, body) = request_token(&s, "register", "lena@example.org", "other", 1).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_THREEPID_IN_USE")));
    let (status, body) = request_token(&s, "password", "nobody@example.org", "x", 1).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_THREEPID_NOT_FOUND")));

    // Password reset: validate by following the link in the mail, then set a password
    // with no access token.
    let (status, body) = request_token(&s, "password", "lena@example.org", "reset-secret", 1).await;
    assert_eq!(status, 200, "{body}");
    let reset_sid = body["sid"].as_str().unwrap().to_owned();
    let mail = smtp.wait_for("lena@example.org", 2).await;
    let link = link_in(&mail);
    let page = s.client.get(&link).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("verified"));

    let reset = json!({"new_password": "brand new password", "auth": {"type": "m.login.email.identity",
        "threepid_creds": {"sid": reset_sid, "client_secret": "reset-secret"}}});
    let (status, body) = s.post("/_matrix/client/v3/account/password", &reset).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.get_auth("/_matrix/client/v3/account/whoami", &token).await;
    assert_eq!(status, 401, "a reset signs out every device");
    let login = |pw: &str| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "lena"}, "password": pw});
    let (status, _) = s.post(LOGIN, &login("password123")).await;
    assert_eq!(status, 403);
    let (status, body) = s.post(LOGIN, &login("brand new password")).await;
    assert_eq!(status, 200);
    let new_token = body["access_token"].as_str().unwrap().to_owned();
    // The validation is spent.
    let (status, _) = s.post("/_matrix/client/v3/account/password", &reset).await;
    assert_eq!(status, 401);

    let (status, _) = s
        .post_auth(
            "/_matrix/client/v3/account/3pid/delete",
            &new_token,
            &json!({"medium": "email", "address": "lena@example.org"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, list) = s.get_auth("/_matrix/client/v3/account/3pid", &new_token).await;
    // An empty list may be omitted.
    assert!(list["threepids"].as_array().is_none_or(|a| a.is_empty()), "{list}");
    assert_eq!(user, "@lena:localhost");
}

#[tokio::test]
async fn registration_requiring_an_address() {
    let smtp = SmtpServer::start().await;
    let config =
        format!("{}{}", OPEN.replace("mode = \"open\"", "mode = \"email\""), smtp.config());
    let s = TestServer::start(&config).await;

    let (status, body) = s
        .post("/_matrix/client/v3/register", &json!({"username": "max", "password": "password123"}))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.email.identity");
    let session = body["session"].as_str().unwrap().to_owned();

    let (status, body) = request_token(&s, "register", "max@example.org", "reg-secret", 1).await;
    assert_eq!(status, 200, "{body}");
    let sid = body["sid"].as_str().unwrap().to_owned();
    let submit_url = body["submit_url"].as_str().unwrap().to_owned();

    let register = json!({"username": "max", "password": "password123", "auth": {"type": "m.login.email.identity",
        "session": session, "threepid_creds": {"sid": sid, "client_secret": "reg-secret"}}});
    let (status, body) = s.post("/_matrix/client/v3/register", &register).await;
    assert_eq!(status, 401, "not validated yet: {body}");

    let code = code_in(&smtp.wait_for("max@example.org", 1).await);
    let (status, _) = submit(&s, &submit_url, &sid, "reg-secret", &code).await;
    assert_eq!(status, 200);
    let (status, body) = s.post("/_matrix/client/v3/register", &register).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let (_, list) = s.get_auth("/_matrix/client/v3/account/3pid", token).await;
    assert_eq!(list["threepids"][0]["address"], "max@example.org");
}

#[tokio::test]
async fn guessing_codes_voids_the_session() {
    let smtp = SmtpServer::start().await;
    let s = TestServer::start(&format!("{OPEN}{}", smtp.config())).await;
    let (status, body) = request_token(&s, "register", "guess@example.org", "g", 1).await;
    assert_eq!(status, 200, "{body}");
    let sid = body["sid"].as_str().unwrap().to_owned();
    let submit_url = body["submit_url"].as_str().unwrap().to_owned();
    let code = code_in(&smtp.wait_for("guess@example.org", 1).await);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let (status, _) = submit(&s, &submit_url, &sid, "g", wrong).await;
        assert_eq!(status, 400);
    }
    let (status, body) = submit(&s, &submit_url, &sid, "g", &code).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_THREEPID_AUTH_FAILED")));
}

#[tokio::test]
async fn without_mail_configured_the_endpoints_say_so() {
    let s = TestServer::start(OPEN).await;
    let (status, body) = request_token(&s, "register", "a@example.org", "x", 1).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_THREEPID_MEDIUM_NOT_SUPPORTED")));
}

/// STARTTLS to a relay whose certificate comes from a private CA: mail goes through when
/// the CA is configured, and is refused (no unverified TLS) when it is not.
#[tokio::test]
async fn starttls_with_a_private_ca() {
    let smtp = SmtpServer::start_tls().await;
    let tls = smtp.config().replace("smtp_security = \"none\"", "smtp_security = \"starttls\"");
    let with_ca = format!("{OPEN}{tls}smtp_ca_file = \"{}\"\n", smtp.ca_file().display());
    let s = TestServer::start(&with_ca).await;
    let (status, body) = request_token(&s, "register", "tls@example.org", "t", 1).await;
    assert_eq!(status, 200, "{body}");
    let mail = smtp.wait_for("tls@example.org", 1).await;
    assert_eq!(code_in(&mail).len(), 6);

    let without_ca = format!("{OPEN}{tls}");
    let s = TestServer::start(&without_ca).await;
    let (status, body) = request_token(&s, "register", "untrusted@example.org", "u", 1).await;
    assert_eq!((status, body["errcode"].as_str()), (500, Some("M_UNKNOWN")), "{body}");
    assert_eq!(smtp.messages().iter().filter(|m| m.contains("untrusted@example.org")).count(), 0);
}
