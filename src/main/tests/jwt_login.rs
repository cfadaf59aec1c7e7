//! JWT login (`org.matrix.login.jwt`) with HS256 and EdDSA issuers.

mod common;

use common::TestServer;
use ed25519_dalek::{
    SigningKey,
    pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const LOGIN: &str = "/_matrix/client/v3/login";
const SECRET: &str = "a shared secret of decent length";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .unwrap()
}

fn jwt_login(token: &str) -> Value {
    json!({"type": "org.matrix.login.jwt", "token": token})
}

#[tokio::test]
async fn hs256_tokens_log_in_and_bad_ones_do_not() {
    let config = format!(
        "[jwt]\nenabled = true\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\nissuer = \"https://idp.example\"\n\
         audiences = [\"trellis\"]\n[rate_limits]\nenabled = false\n"
    );
    let s = TestServer::start(&config).await;
    let (_, flows) = s.get(LOGIN).await;
    assert!(
        flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "org.matrix.login.jwt"),
        "{flows}"
    );

    let good =
        json!({"sub": "alice", "iss": "https://idp.example", "aud": "trellis", "exp": now() + 300});
    let (status, body) = s.post(LOGIN, &jwt_login(&hs256(&good, SECRET))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    let (status, who) = s
        .get_auth("/_matrix/client/v3/account/whoami", body["access_token"].as_str().unwrap())
        .await;
    assert_eq!((status, who["user_id"].as_str()), (200, Some("@alice:localhost")));
    // The account now exists; a second login uses it.
    let (status, _) = s.post(LOGIN, &jwt_login(&hs256(&good, SECRET))).await;
    assert_eq!(status, 200);
    let (_, avail) = s.get("/_matrix/client/v3/register/available?username=alice").await;
    assert_eq!(avail["errcode"], "M_USER_IN_USE");

    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut bad_user = good.clone();
    bad_user["sub"] = json!("@mallory:elsewhere.example");
    for (name, token) in [
        ("expired", hs256(&expired, SECRET)),
        ("wrong issuer", hs256(&wrong_iss, SECRET)),
        ("wrong audience", hs256(&wrong_aud, SECRET)),
        ("no exp", hs256(&no_exp, SECRET)),
        ("other server's user", hs256(&bad_user, SECRET)),
        ("wrong secret", hs256(&good, "not the secret at all")),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let (status, body) = s.post(LOGIN, &jwt_login(&token)).await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{name}: {body}"
        );
    }
    let (status, _) = s.post(LOGIN, &json!({"type": "org.matrix.login.jwt"})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn eddsa_tokens_from_a_public_key_file() {
    let signing = SigningKey::from_bytes(&[7u8; 32]);
    let private_pem = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public_pem = signing.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let key_dir = tempfile::tempdir().unwrap();
    let key_path = key_dir.path().join("issuer.pem");
    std::fs::write(&key_path, public_pem).unwrap();

    let config = format!(
        "[jwt]\nenabled = true\nalgorithm = \"EdDSA\"\npublic_key_path = \"{}\"\n",
        key_path.display()
    );
    let s = TestServer::start(&config).await;
    let claims = json!({"sub": "@bob:localhost", "exp": now() + 300});
    let key = EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap();
    let token = encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
    let (status, body) = s.post(LOGIN, &jwt_login(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@bob:localhost");

    // An HS256 token is refused by an EdDSA-configured server.
    let (status, _) = s.post(LOGIN, &jwt_login(&hs256(&claims, SECRET))).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn jwt_login_is_refused_when_disabled() {
    let s = TestServer::start("").await;
    let token = hs256(&json!({"sub": "x", "exp": now() + 60}), SECRET);
    let (status, _) = s.post(LOGIN, &jwt_login(&token)).await;
    assert_eq!(status, 400);
}
