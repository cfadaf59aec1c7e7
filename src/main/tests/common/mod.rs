//! Black-box test harness: runs the real `trellis` binary on loopback ports with a
//! temporary data directory and talks HTTP to it.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// Open registration with cheap password hashing and no rate limits, for tests that
/// create many accounts.
pub const OPEN: &str = "[registration]\nmode = \"open\"\n[auth]\nargon2_memory_kib = 64\n\
argon2_iterations = 1\n[rate_limits]\nenabled = false\n";

/// A loopback port nobody listens on, never the same one twice in this process: tests
/// run in parallel and two of them picking one port before either binds it made a test
/// talk to another test's server.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub base: String,
    pub metrics_base: String,
    pub child: Option<Child>,
    pub config_path: PathBuf,
    pub client: reqwest::Client,
    pub env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts a server whose config is the defaults plus `extra` TOML sections (which
    /// must not be `[server]` or `[metrics]`: ports and data dir are filled in here).
    pub async fn start(extra: &str) -> Self {
        Self::start_with_env(extra, &[]).await
    }

    /// Like `start`, with environment overrides (`TRELLIS_SECTION__KEY`) for the process.
    pub async fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Self {
        let mut server = Self::prepare(extra, env);
        server.launch().await;
        server
    }

    /// Writes the configuration of `start_with_env` without starting the process, for a
    /// test that arranges the data directory first; `launch` starts it.
    pub fn prepare(extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let metrics_port = free_port();
        // The built-in TURN server listens only where a test asks for it.
        let turn = if extra.contains("[turn]") { "" } else { "[turn]\nenabled = false\n" };
        // Likewise the built-in SFU and its UDP port.
        let sfu = if extra.contains("[rtc]") { "" } else { "[rtc]\nsfu = false\n" };
        let config = format!(
            "{extra}\n{turn}{sfu}[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("trellis.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            base: format!("http://127.0.0.1:{port}"),
            metrics_base: format!("http://127.0.0.1:{metrics_port}"),
            child: None,
            config_path,
            client: reqwest::Client::new(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts the process and waits until it answers `/versions`.
    pub async fn launch(&mut self) {
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", std::env::var("TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn trellis");
        self.child = Some(child);
        wait_ready(&self.client, &self.base, self.child.as_mut().unwrap()).await;
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(&c, "TERM");
        wait_exit(&mut c, Duration::from_secs(30))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        json_of(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        json_of(self.client.post(self.url(path)).json(body).send().await.unwrap()).await
    }

    pub async fn get_auth(&self, path: &str, token: &str) -> (u16, Value) {
        json_of(self.client.get(self.url(path)).bearer_auth(token).send().await.unwrap()).await
    }

    pub async fn post_auth(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        json_of(
            self.client.post(self.url(path)).bearer_auth(token).json(body).send().await.unwrap(),
        )
        .await
    }

    pub async fn put_auth(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        json_of(self.client.put(self.url(path)).bearer_auth(token).json(body).send().await.unwrap())
            .await
    }

    pub async fn delete_auth(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        json_of(
            self.client.delete(self.url(path)).bearer_auth(token).json(body).send().await.unwrap(),
        )
        .await
    }

    /// The Prometheus text of the metrics listener.
    pub async fn metrics(&self) -> String {
        let resp = self.client.get(format!("{}/metrics", self.metrics_base)).send().await;
        resp.unwrap().text().await.unwrap()
    }

    /// Registers through the open `m.login.dummy` flow with the password
    /// `password123`; returns (user_id, access_token).
    pub async fn register(&self, username: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "/_matrix/client/v3/register",
                &serde_json::json!({"username": username, "password": "password123",
                                    "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["user_id"].as_str().unwrap().to_owned(),
            body["access_token"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Percent-encodes a query parameter value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A transaction id unique within the test process.
pub fn txn_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("txn{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

impl TestServer {
    /// `createRoom` with `body`; the new room's id.
    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let (status, resp) = self.post_auth("/_matrix/client/v3/createRoom", token, &body).await;
        assert_eq!(status, 200, "{resp}");
        resp["room_id"].as_str().unwrap().to_owned()
    }

    /// Sends an `m.text` message; its event id.
    pub async fn send_text(&self, token: &str, room: &str, body: &str) -> String {
        let (status, resp) = self
            .put_auth(
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", txn_id()),
                token,
                &serde_json::json!({"msgtype": "m.text", "body": body}),
            )
            .await;
        assert_eq!(status, 200, "{resp}");
        resp["event_id"].as_str().unwrap().to_owned()
    }

    /// Uploads `data` as `application/octet-stream`; its `mxc://` URI.
    pub async fn upload_bytes(&self, token: &str, data: &[u8]) -> String {
        let resp = self
            .client
            .post(self.url("/_matrix/media/v3/upload"))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 200, "{body}");
        body["content_uri"].as_str().unwrap().to_owned()
    }

    /// Joins a room by id or alias.
    pub async fn join_room(&self, token: &str, room: &str) {
        let (status, resp) = self
            .post_auth(&format!("/_matrix/client/v3/join/{room}"), token, &serde_json::json!({}))
            .await;
        assert_eq!(status, 200, "{resp}");
    }
}

pub async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    (status, value)
}

pub async fn wait_ready(client: &reqwest::Client, base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("trellis exited during start-up: {status}");
        }
        if let Ok(r) = client.get(format!("{base}/_matrix/client/versions")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "trellis did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run_cli(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(cwd).output().unwrap()
}

/// A real SMTP server (Python's aiosmtpd) on loopback, storing what it receives in a
/// maildir the tests read.
pub struct SmtpServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl SmtpServer {
    pub async fn start() -> Self {
        Self::launch(false).await
    }

    /// A server that offers (and requires) STARTTLS with a certificate from a test CA,
    /// written to `ca_file()`.
    pub async fn start_tls() -> Self {
        Self::launch(true).await
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    async fn launch(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")]);
        if tls {
            mint_certificates(dir.path());
            cmd.arg("--tlscert").arg(dir.path().join("server.pem"));
            cmd.arg("--tlskey").arg(dir.path().join("server.key"));
        }
        let mut child = cmd
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("maildir"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd (installed by .ci/install-deps)");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready when it greets: a bare connect can succeed with nobody listening (a
        // loopback connect from the same ephemeral port connects to itself).
        let greets = || -> bool {
            use std::io::Read;
            let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut banner = [0u8; 3];
            stream.read_exact(&mut banner).is_ok() && &banner == b"220"
        };
        while !greets() {
            assert!(Instant::now() < deadline, "the SMTP server did not start");
            assert!(child.try_wait().unwrap().is_none(), "the SMTP server exited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Something answered; make sure it is our server and it stays up.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(child.try_wait().unwrap().is_none(), "the SMTP server exited (port taken?)");
        Self { port, dir, child }
    }

    /// The `[email]` config section that sends here.
    pub fn config(&self) -> String {
        format!(
            "[email]\nenabled = true\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_security = \"none\"\n\
             from = \"Trellis <noreply@test.example>\"\n",
            self.port
        )
    }

    /// All messages received so far, raw.
    pub fn messages(&self) -> Vec<String> {
        let new = self.dir.path().join("maildir/new");
        let Ok(entries) = std::fs::read_dir(&new) else { return Vec::new() };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect()
    }

    /// Waits for the `n`-th (1-based) message to `to` and returns it.
    pub async fn wait_for(&self, to: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<String> = self
                .messages()
                .into_iter()
                .filter(|m| {
                    m.lines().any(|l| l.to_lowercase().starts_with("to:") && l.contains(to))
                })
                .collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            assert!(Instant::now() < deadline, "no mail #{n} to {to} arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made with openssl.
pub fn mint_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Trellis Test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// The 6-digit code in a verification mail.
pub fn code_in(mail: &str) -> String {
    mail.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .unwrap_or_else(|| panic!("no code in {mail}"))
        .to_owned()
}

/// Undoes quoted-printable encoding (soft line breaks and `=XX` escapes), as a mail
/// client would.
pub fn decode_qp(mail: &str) -> String {
    let joined = mail.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The validation link in a verification mail.
pub fn link_in(mail: &str) -> String {
    decode_qp(mail)
        .split_whitespace()
        .find(|w| w.starts_with("http") && w.contains("/email/validate"))
        .unwrap_or_else(|| panic!("no link in {mail}"))
        .to_owned()
}

/// Runs the matrix-nio E2EE scenario (`interop/e2ee_nio.py`) against `bases` (one
/// server, or Alice's and Bob's); panics with its output unless every step passed.
#[allow(dead_code)]
pub async fn run_nio_scenario(bases: &[String]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/e2ee_nio.py");
    let args = bases.to_vec();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).args(args).output().expect("python3 runs")
    });
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .expect("the interop scenario finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "matrix-nio scenario failed (is matrix-nio[e2e] installed? run .ci/install-deps)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "bob decrypted alice's message",
        "alice decrypted bob's message",
        "bob's new device decrypted the history with a forwarded key",
        "OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

/// Makes the server admin `root` (password "admin password") with the offline CLI,
/// restarting the server around it, and logs it in: its access token.
pub async fn admin_token(s: &mut TestServer) -> String {
    s.terminate();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "admin password\n").unwrap();
    let config = s.config_path.to_str().unwrap().to_owned();
    let args = ["user", "--config", &config, "create", "root", "--admin", "--password-file"];
    let out = run_cli(&[&args[..], &[pwfile.to_str().unwrap()]].concat(), s.dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    let login = serde_json::json!({"type": "m.login.password", "password": "admin password",
                       "identifier": {"type": "m.id.user", "user": "root"}});
    let (status, body) = s.post("/_matrix/client/v3/login", &login).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// Deterministic bytes that do not compress or repeat, different for each seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A real S3-compatible server: moto (installed by .ci/install-deps) on loopback.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    pub async fn start() -> Self {
        let port = free_port();
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]', done by .ci/install-deps)");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(child.try_wait().unwrap().is_none(), "moto_server exited");
            if client.get(format!("http://127.0.0.1:{port}/")).send().await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The S3 listing (XML) of what `bucket` holds under `prefix`.
    pub async fn list(&self, bucket: &str, prefix: &str) -> String {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint());
        reqwest::Client::new().get(url).send().await.unwrap().text().await.unwrap()
    }

    /// Creates a bucket.
    pub async fn bucket(&self, name: &str) {
        let resp =
            reqwest::Client::new().put(format!("{}/{name}", self.endpoint())).send().await.unwrap();
        assert!(resp.status().is_success(), "creating the bucket: {}", resp.status());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
