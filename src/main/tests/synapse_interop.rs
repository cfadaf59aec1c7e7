//! Federation with a real Synapse (from PyPI, installed by `scripts/install-synapse`):
//! both servers run TLS federation listeners with certificates from one test CA, on
//! loopback. A Synapse user and a Trellis user join each other's rooms, exchange
//! messages, and see each other's membership and profile.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{OPEN, TestServer, free_port, mint_certificates, urlencode};
use serde_json::{Value, json};

fn synapse_venv() -> PathBuf {
    match std::env::var_os("SYNAPSE_VENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/trellis/synapse-venv"),
    }
}

struct Synapse {
    child: Child,
    client_url: String,
    name: String,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Synapse {
    async fn start(dir: &Path, certs: &Path) -> Self {
        let python = synapse_venv().join("bin/python");
        assert!(python.exists(), "Synapse is not installed: run scripts/install-synapse");
        let client_port = free_port();
        let fed_port = free_port();
        let name = format!("127.0.0.1:{fed_port}");
        let out = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--server-name", &name, "--config-path"])
            .arg(dir.join("homeserver.yaml"))
            .arg("--data-directory")
            .arg(dir)
            .args(["--generate-config", "--report-stats=no"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let d = dir.display();
        let c = certs.display();
        std::fs::write(
            dir.join("log.yaml"),
            format!(
                "version: 1\nformatters:\n  precise:\n    format: '%(asctime)s %(name)s %(levelname)s %(message)s'\n\
                 handlers:\n  file:\n    class: logging.FileHandler\n    formatter: precise\n    filename: {d}/homeserver.log\n\
                 root:\n  level: INFO\n  handlers: [file]\ndisable_existing_loggers: false\n"
            ),
        )
        .unwrap();
        let limit = "{per_second: 1000000, burst_count: 1000000}";
        std::fs::write(
            dir.join("test.yaml"),
            format!(
                "listeners:\n\
                 \x20 - port: {client_port}\n    bind_addresses: ['127.0.0.1']\n    type: http\n    tls: false\n\
                 \x20   resources: [{{names: [client], compress: false}}]\n\
                 \x20 - port: {fed_port}\n    bind_addresses: ['127.0.0.1']\n    type: http\n    tls: true\n\
                 \x20   resources: [{{names: [federation, media], compress: false}}]\n\
                 tls_certificate_path: {c}/server.pem\ntls_private_key_path: {c}/server.key\n\
                 federation_custom_ca_list: ['{c}/ca.pem']\nfederation_verify_certificates: true\n\
                 trusted_key_servers: []\nsuppress_key_server_warning: true\n\
                 ip_range_blacklist: []\nip_range_whitelist: ['127.0.0.0/8']\n\
                 ip_range_blocklist: []\nip_range_allowlist: ['127.0.0.0/8']\n\
                 database: {{name: sqlite3, args: {{database: {d}/homeserver.db}}}}\n\
                 log_config: {d}/log.yaml\nmedia_store_path: {d}/media\n\
                 enable_registration: true\nenable_registration_without_verification: true\n\
                 report_stats: false\npresence: {{enabled: true}}\n\
                 rc_message: {limit}\nrc_registration: {limit}\n\
                 rc_login: {{address: {limit}, account: {limit}, failed_attempts: {limit}}}\n\
                 rc_joins: {{local: {limit}, remote: {limit}}}\nrc_joins_per_room: {limit}\n\
                 rc_invites: {{per_room: {limit}, per_user: {limit}, per_issuer: {limit}}}\n\
                 rc_federation: {{window_size: 1000, sleep_limit: 1000, sleep_delay: 1, reject_limit: 1000, concurrent: 100}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(dir.join("homeserver.yaml"))
            .arg("-c")
            .arg(dir.join("test.yaml"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut synapse = Synapse {
            child,
            client_url: format!("http://127.0.0.1:{client_port}"),
            name,
            dir: dir.to_owned(),
            http: reqwest::Client::new(),
        };
        for _ in 0..240 {
            if let Ok(Some(status)) = synapse.child.try_wait() {
                panic!("Synapse exited ({status}): {}", synapse.log());
            }
            let url = format!("{}/_matrix/client/versions", synapse.client_url);
            if synapse.http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return synapse;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Synapse did not start: {}", synapse.log());
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("homeserver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.client_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        common::json_of(req.send().await.unwrap()).await
    }

    /// Registers through the dummy flow (after the first 401 that opens a session).
    async fn register(&self, username: &str) -> (String, String) {
        let path = "/_matrix/client/v3/register";
        let body = json!({"username": username, "password": "password123"});
        let (status, first) = self.call(reqwest::Method::POST, path, None, Some(&body)).await;
        let done = if status == 200 {
            first
        } else {
            let mut body = body.clone();
            body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
            let (status, done) = self.call(reqwest::Method::POST, path, None, Some(&body)).await;
            assert_eq!(status, 200, "{done}");
            done
        };
        (
            done["user_id"].as_str().unwrap().to_owned(),
            done["access_token"].as_str().unwrap().to_owned(),
        )
    }
}

/// Polls `room`'s recent history through a client API until an event satisfies `pred`.
async fn wait_for<F, Fut>(get: F, room: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", urlencode(room));
    for _ in 0..150 {
        let (status, body) = get(path.clone()).await;
        if status == 200
            && let Some(found) = body["chunk"].as_array().and_then(|c| c.iter().find(|e| pred(e)))
        {
            return found.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = get(path).await;
    panic!("{what} never arrived; history: {body}");
}

fn text(body: &'static str) -> impl Fn(&Value) -> bool {
    move |e: &Value| e["type"] == "m.room.message" && e["content"]["body"] == body
}

#[tokio::test]
async fn trellis_and_synapse_share_rooms() {
    let certs = tempfile::tempdir().unwrap();
    mint_certificates(certs.path());
    let c = certs.path().display();
    let t_name = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{OPEN}[federation]\ntls_listen = \"{t_name}\"\ntls_certificate = \"{c}/server.pem\"\n\
         tls_private_key = \"{c}/server.key\"\nca_file = \"{c}/ca.pem\"\n"
    );
    let trellis =
        TestServer::start_with_env(&config, &[("TRELLIS_SERVER__SERVER_NAME", t_name.as_str())])
            .await;
    let synapse_dir = tempfile::tempdir().unwrap();
    let synapse = Synapse::start(synapse_dir.path(), certs.path()).await;

    let (tom, tom_token) = trellis.register("tom").await;
    let (sam, sam_token) = synapse.register("sam").await;
    let (status, _) = trellis
        .put_auth(
            &format!("/_matrix/client/v3/profile/{tom}/displayname"),
            &tom_token,
            &json!({"displayname": "Tom on Trellis"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = synapse
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", urlencode(&sam)),
            Some(&sam_token),
            Some(&json!({"displayname": "Sam on Synapse"})),
        )
        .await;
    assert_eq!(status, 200);
    let on_trellis = |path: String| {
        let (t, tok) = (&trellis, tom_token.clone());
        async move { t.get_auth(&path, &tok).await }
    };
    let on_synapse = |path: String| {
        let (s, tok) = (&synapse, sam_token.clone());
        async move { s.call(reqwest::Method::GET, &path, Some(&tok), None).await }
    };

    // Sam (Synapse) joins Tom's room on Trellis through its alias.
    let t_room = trellis
        .create_room(
            &tom_token,
            json!({"preset": "public_chat", "room_alias_name": "trellis-lobby"}),
        )
        .await;
    let alias = urlencode(&format!("#trellis-lobby:{t_name}"));
    let (status, body) = synapse
        .call(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/join/{alias}"),
            Some(&sam_token),
            Some(&json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log());
    assert_eq!(body["room_id"], t_room);
    let (status, _) = synapse
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s1", urlencode(&t_room)),
            Some(&sam_token),
            Some(&json!({"msgtype": "m.text", "body": "hi from Synapse"})),
        )
        .await;
    assert_eq!(status, 200);
    wait_for(on_trellis, &t_room, "Sam's message on Trellis", text("hi from Synapse")).await;
    trellis.send_text(&tom_token, &t_room, "hi from Trellis").await;
    wait_for(on_synapse, &t_room, "Tom's message on Synapse", text("hi from Trellis")).await;
    let (status, members) = trellis
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{}/joined_members", urlencode(&t_room)),
            &tom_token,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(members["joined"][&sam]["display_name"], "Sam on Synapse", "{members}");

    // Tom (Trellis) joins Sam's room on Synapse.
    let (status, created) = synapse
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&sam_token),
            Some(&json!({"preset": "public_chat", "name": "Synapse room"})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let s_room = created["room_id"].as_str().unwrap().to_owned();
    let (status, body) = trellis
        .post_auth(
            &format!("/_matrix/client/v3/join/{}?server_name={}", urlencode(&s_room), synapse.name),
            &tom_token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log());
    trellis.send_text(&tom_token, &s_room, "Tom was here").await;
    wait_for(on_synapse, &s_room, "Tom's message in Sam's room", text("Tom was here")).await;
    let (status, _) = synapse
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s2", urlencode(&s_room)),
            Some(&sam_token),
            Some(&json!({"msgtype": "m.text", "body": "welcome, Tom"})),
        )
        .await;
    assert_eq!(status, 200);
    wait_for(on_trellis, &s_room, "Sam's message in his room on Trellis", text("welcome, Tom"))
        .await;

    // Each side sees the other's membership and profile.
    let (status, members) = synapse
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", urlencode(&s_room)),
            Some(&sam_token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(members["joined"][&tom]["display_name"], "Tom on Trellis", "{members}");
    let (status, name) = trellis
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", urlencode(&s_room)),
            &tom_token,
        )
        .await;
    assert_eq!((status, &name["name"]), (200, &json!("Synapse room")), "{name}");
    let (status, profile) =
        trellis.get_auth(&format!("/_matrix/client/v3/profile/{sam}"), &tom_token).await;
    assert_eq!((status, &profile["displayname"]), (200, &json!("Sam on Synapse")), "{profile}");
    let (status, profile) = synapse
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/profile/{}", urlencode(&tom)),
            Some(&sam_token),
            None,
        )
        .await;
    assert_eq!((status, &profile["displayname"]), (200, &json!("Tom on Trellis")), "{profile}");
}
