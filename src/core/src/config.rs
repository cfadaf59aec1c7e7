//! Server configuration: TOML with every key defaulted, plus `TRELLIS_<SECTION>__<KEY>`
//! environment overrides.
//!
//! Validation reports *every* problem by its dotted key name rather than stopping at the
//! first, because an operator fixing a config file wants the whole list at once.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "TRELLIS_";

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub well_known: WellKnownConfig,
    pub federation: FederationConfig,
    pub registration: RegistrationConfig,
    pub auth: AuthConfig,
    pub jwt: JwtConfig,
    pub email: EmailConfig,
    pub user_directory: UserDirectoryConfig,
    pub appservice: AppserviceConfig,
    pub rooms: RoomsConfig,
    pub presence: PresenceConfig,
    pub push: PushConfig,
    pub voip: VoipConfig,
    pub turn: TurnConfig,
    pub rtc: RtcConfig,
    pub search: SearchConfig,
    pub admin: AdminConfig,
    pub content_policy: ContentPolicyConfig,
    pub rate_limits: RateLimitsConfig,
    pub media: MediaConfig,
    pub backup: BackupConfig,
    pub retention: RetentionConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The server name: the part after the colon in user ids. Cannot change later.
    pub server_name: String,
    /// Address of the client-server (and, until TLS lands, federation) listener.
    pub listen: SocketAddr,
    /// Directory for all persistent state: the database and the signing key.
    pub data_dir: PathBuf,
    /// Signing key file; empty means `<data_dir>/signing.key`.
    pub signing_key_path: PathBuf,
    /// Where users are told to turn when the server hits a resource limit (the
    /// `admin_contact` of `M_RESOURCE_LIMIT_EXCEEDED`), such as `mailto:` or `https:`
    /// URI; empty means `mailto:admin@<server_name>`.
    pub admin_contact: String,
}

impl ServerConfig {
    /// The configured admin contact, or `mailto:admin@<server_name>`.
    pub fn admin_contact(&self) -> String {
        if self.admin_contact.is_empty() {
            format!("mailto:admin@{}", self.server_name)
        } else {
            self.admin_contact.clone()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            data_dir: PathBuf::from("./data"),
            signing_key_path: PathBuf::new(),
            admin_contact: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Shared RocksDB block cache, in MiB.
    pub block_cache_mb: u64,
    /// Memtable size per column family, in MiB.
    pub write_buffer_mb: u64,
    /// Compression for all but the last level: `none`, `lz4` or `zstd`.
    pub compression: Compression,
    /// Compression for the bottommost level, where most data lives.
    pub bottommost_compression: Compression,
    /// Limit on open SST files (-1 = unlimited).
    pub max_open_files: i32,
    /// fsync the write-ahead log before acknowledging a write. Off still survives a
    /// process crash (`kill -9`); on also survives power loss.
    pub sync_writes: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            block_cache_mb: 256,
            write_buffer_mb: 32,
            compression: Compression::Lz4,
            bottommost_compression: Compression::Zstd,
            max_open_files: 1024,
            sync_writes: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
    Zstd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest accepted request body, in bytes (media uploads have their own limit).
    pub max_request_bytes: usize,
    /// Seconds to wait for in-flight requests on shutdown before closing anyway.
    pub shutdown_grace_seconds: u64,
    /// Take the client address from the left-most `X-Forwarded-For` entry (only behind a
    /// reverse proxy that sets it), for per-address rate limits and the audit log.
    pub x_forwarded_for: bool,
    /// Connections open at once on each listener; 0: as many as the open-file limit
    /// leaves room for (the storage engine's files and a margin kept aside).
    pub max_connections: usize,
    /// Connections one client address may hold open at once.
    pub max_connections_per_ip: usize,
    /// Addresses or networks (CIDR) the per-address cap does not apply to: where a
    /// reverse proxy connects from, since every client behind it shares its address.
    pub connection_limit_exempt: Vec<String>,
    /// A request body must keep arriving: each window of this many seconds must bring
    /// at least `body_min_bytes_per_second` times its length (or the rest of the body),
    /// else the connection is cut.
    pub body_read_window_seconds: u64,
    pub body_min_bytes_per_second: u64,
    /// Once a listener holds this percentage of `max_connections`, requests without an
    /// access token (or federation signature) are answered 429 and their connection
    /// closed, so that signed-in users keep being served; 100: never.
    pub shed_anonymous_percent: u8,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            shutdown_grace_seconds: 10,
            x_forwarded_for: false,
            max_connections: 0,
            max_connections_per_ip: 256,
            connection_limit_exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
            body_read_window_seconds: 30,
            body_min_bytes_per_second: 256,
            shed_anonymous_percent: 80,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WellKnownConfig {
    /// Base URL clients should use (`m.homeserver.base_url`); empty: `email.public_base_url`
    /// if set, else the address the client reached this server at (its `Host` header).
    pub client: String,
    /// `host[:port]` other servers should use (`m.server`); empty disables
    /// `/.well-known/matrix/server` (404).
    pub server: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Whether this server talks to other servers at all: when off, federation endpoints
    /// answer 403 and nothing is sent out.
    pub enabled: bool,
    /// How long other servers may cache our signing key (`valid_until_ts`), in hours.
    pub key_validity_hours: u64,
    /// The TLS listener other servers connect to (the spec's default port is 8448);
    /// empty when a reverse proxy terminates TLS and forwards to `server.listen`.
    pub tls_listen: String,
    /// PEM certificate chain and private key of the TLS listener; re-read on SIGHUP.
    /// Empty paths: unset.
    pub tls_certificate: PathBuf,
    pub tls_private_key: PathBuf,
    /// Extra PEM CA certificates trusted for outbound federation, besides the system's
    /// (empty: none).
    pub ca_file: PathBuf,
    /// Seconds an outbound federation request may take.
    pub request_timeout_seconds: u64,
    /// Server names never contacted and whose requests are refused.
    pub denied_servers: Vec<String>,
    /// Signing keys this server used before (key rotation): published as
    /// `old_verify_keys` so that events and requests they signed still verify.
    pub old_signing_keys: Vec<OldSigningKey>,
}

/// A retired signing key: its id, its public key (unpadded base64, as the key server
/// published it) and when it stopped being used (ms since the epoch).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OldSigningKey {
    pub key_id: String,
    pub public_key: String,
    pub expired_ts: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            key_validity_hours: 24,
            tls_listen: String::new(),
            tls_certificate: PathBuf::new(),
            tls_private_key: PathBuf::new(),
            ca_file: PathBuf::new(),
            request_timeout_seconds: 30,
            denied_servers: Vec::new(),
            old_signing_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// `closed` (only admins create accounts), `open` (anyone, `m.login.dummy`),
    /// `token` (a registration token made by an admin is required) or `email` (a verified
    /// email address is required).
    pub mode: RegistrationMode,
    /// Localparts nobody may register through the API (admins can still create them).
    pub reserved_usernames: Vec<String>,
    /// Whether anyone may get a guest account (`POST /register?kind=guest`) on a server
    /// whose `mode` is not `closed`: guests read and join only rooms that allow guests,
    /// and may upgrade to a full account.
    pub guest_access: bool,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: RegistrationMode::Closed,
            reserved_usernames: [
                "admin",
                "administrator",
                "root",
                "support",
                "abuse",
                "postmaster",
                "security",
            ]
            .map(String::from)
            .to_vec(),
            guest_access: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Minimum password length.
    pub password_min_length: usize,
    /// argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
    /// Threads hashing passwords (at low priority); 0 = one per CPU core.
    pub password_hash_threads: usize,
    /// Seconds a user-interactive auth session lives.
    pub uia_session_ttl_seconds: u64,
    /// Lifetime of access tokens issued with a refresh token, in seconds.
    pub access_token_lifetime_seconds: u64,
    /// Lifetime of `m.login.token` tokens from `/login/get_token`, in seconds.
    pub login_token_lifetime_seconds: u64,
    /// Failed logins (per account and per address) tolerated before backing off.
    pub failed_login_threshold: u32,
    /// Longest wait imposed after repeated failures, in seconds.
    pub failed_login_max_backoff_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            password_min_length: 8,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            password_hash_threads: 0,
            uia_session_ttl_seconds: 600,
            access_token_lifetime_seconds: 3600,
            login_token_lifetime_seconds: 120,
            failed_login_threshold: 5,
            failed_login_max_backoff_seconds: 900,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Offer `org.matrix.login.jwt`: log in (creating the account on first login) with a
    /// JSON Web Token signed by a trusted issuer.
    pub enabled: bool,
    /// `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256`, `ES384` or `EdDSA`.
    pub algorithm: String,
    /// The shared secret for the HS* algorithms.
    pub secret: String,
    /// PEM file with the issuer's public key for the RS*, ES* and EdDSA algorithms.
    pub public_key_path: PathBuf,
    /// When set, the token's `iss` must equal it.
    pub issuer: String,
    /// When set, the token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// The claim holding the user (a localpart or a full user id on this server).
    pub subject_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: "HS256".into(),
            secret: String::new(),
            public_key_path: PathBuf::new(),
            issuer: String::new(),
            audiences: Vec::new(),
            subject_claim: "sub".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// Send mail: verification codes for registration, adding addresses and password
    /// resets. Off, those endpoints answer `M_THREEPID_MEDIUM_NOT_SUPPORTED`.
    pub enabled: bool,
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `starttls`, `tls` (implicit TLS, usually port 465) or `none` (local relays only).
    pub smtp_security: SmtpSecurity,
    pub smtp_username: String,
    pub smtp_password: String,
    /// PEM file with extra CA certificates to trust for the SMTP server's certificate
    /// (for relays with a private CA); the public web roots are always trusted.
    pub smtp_ca_file: PathBuf,
    /// The sender, e.g. `Trellis <noreply@example.org>`.
    pub from: String,
    /// Public base URL of this server for the links in mails, e.g.
    /// `https://matrix.example.org`. Empty: `http://<server.listen>`.
    pub public_base_url: String,
    /// How long a mailed code or link stays valid, in seconds.
    pub code_lifetime_seconds: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            smtp_host: "localhost".into(),
            smtp_port: 587,
            smtp_security: SmtpSecurity::Starttls,
            smtp_username: String::new(),
            smtp_password: String::new(),
            smtp_ca_file: PathBuf::new(),
            from: "Trellis <noreply@localhost>".into(),
            public_base_url: String::new(),
            code_lifetime_seconds: 900,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    Starttls,
    Tls,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct UserDirectoryConfig {
    /// Let searches find every local user, not only those sharing a room with the
    /// searcher or sitting in public rooms.
    pub search_all_users: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppserviceConfig {
    /// Application service registration files (the standard YAML), re-read on SIGHUP.
    pub registration_files: Vec<PathBuf>,
    /// Addresses (CIDR) outgoing webhooks may reach although they are private, loopback
    /// or otherwise special (refused by default, as room members choose the URL).
    pub outgoing_webhook_ip_allow: Vec<String>,
    /// An outgoing webhook whose URL has failed every delivery for this long is removed
    /// (its queue would otherwise grow for ever).
    pub outgoing_webhook_give_up_seconds: u64,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            registration_files: Vec::new(),
            outgoing_webhook_ip_allow: Vec::new(),
            outgoing_webhook_give_up_seconds: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Room version of new rooms when the client does not choose one.
    pub default_room_version: String,
    /// Who may publish a room in (or remove it from) the published room directory.
    pub publish: RoomPublishing,
    /// Require an access token for `GET /publicRooms` (the spec lets anyone list it).
    pub public_rooms_require_auth: bool,
    /// The longest delay a delayed event (MSC4140) may ask for, in milliseconds.
    pub max_event_delay_ms: u64,
    /// Delayed events one user may have waiting at once.
    pub max_delayed_events_per_user: usize,
}

/// How long rooms keep their messages (`m.room.retention`), and the server's bounds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Honour rooms' `m.room.retention` and the default below. Off, nothing expires.
    pub enabled: bool,
    /// Lifetime of messages in rooms without a policy, in seconds; 0 keeps them forever.
    pub default_max_lifetime_seconds: u64,
    /// Bounds a room's `max_lifetime` is held within, in seconds; 0 is no bound.
    pub min_lifetime_seconds: u64,
    pub max_lifetime_seconds: u64,
    /// How often expired messages are purged from storage, in seconds. They are hidden
    /// from every read as soon as they expire; the purge removes them from disk.
    pub purge_interval_seconds: u64,
    /// Erased users' messages are served redacted to everyone, also to those who saw
    /// them before the erasure. Off, as the spec describes erasure: only users who join
    /// afterwards get redacted copies.
    pub erase_for_everyone: bool,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_max_lifetime_seconds: 0,
            min_lifetime_seconds: 0,
            max_lifetime_seconds: 0,
            purge_interval_seconds: 3600,
            erase_for_everyone: false,
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_room_version: "11".into(),
            publish: RoomPublishing::AnyoneWithPower,
            public_rooms_require_auth: false,
            max_event_delay_ms: 86_400_000,
            max_delayed_events_per_user: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Track and serve presence. Off, every user reads as `offline` and updates are
    /// accepted but ignored (presence costs work on every request and sync).
    pub enabled: bool,
    /// Seconds without activity after which an `online` user reads as `unavailable`.
    pub idle_timeout_seconds: u64,
    /// Seconds without any activity (no sync, no request) after which a user who was
    /// `online` reads as `offline`: their clients have gone away.
    pub offline_timeout_seconds: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true, idle_timeout_seconds: 300, offline_timeout_seconds: 1800 }
    }
}

/// The TURN/STUN server built into Trellis. It runs unless it is switched off or an
/// external TURN server is configured (`voip.turn_uris`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    pub enabled: bool,
    /// UDP listener (STUN and TURN).
    pub listen_udp: SocketAddr,
    /// TCP listener for clients whose networks block UDP; empty: none.
    pub listen_tcp: String,
    /// The address clients and their peers reach the relay at, handed out in every
    /// allocation. Empty: the address of the interface the default route leaves by,
    /// which is right unless the server sits behind NAT.
    pub public_ip: String,
    /// Host name put in the `turn:` URIs of `/voip/turnServer`. Empty: `public_ip` if
    /// set, else the server name's host.
    pub uri_host: String,
    /// Relayed traffic uses UDP ports in this range (open them in the firewall).
    pub relay_min_port: u16,
    pub relay_max_port: u16,
    /// Allocations one user may hold at once.
    pub max_allocations_per_user: usize,
    /// Relayed traffic one user may move, in kilobits per second (0: no cap).
    pub user_bandwidth_kbps: u64,
    /// Refuse relaying to loopback, private, link-local and other non-public
    /// addresses, so that the relay cannot reach into the server's own network.
    pub deny_private_peers: bool,
    /// Peer networks (CIDR) always allowed, even if private (a LAN deployment).
    pub allowed_peer_ips: Vec<String>,
    /// The secret credentials are derived from. Empty: one derived from the server's
    /// signing key, which stays the same over restarts.
    pub shared_secret: String,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen_udp: SocketAddr::from(([0, 0, 0, 0], 3478)),
            listen_tcp: "0.0.0.0:3478".into(),
            public_ip: String::new(),
            uri_host: String::new(),
            relay_min_port: 49152,
            relay_max_port: 65535,
            max_allocations_per_user: 10,
            user_bandwidth_kbps: 20_000,
            deny_private_peers: true,
            allowed_peer_ips: Vec::new(),
            shared_secret: String::new(),
        }
    }
}

/// MatrixRTC group calls (Element Call): the SFU clients are sent to, and the access
/// tokens this server issues for it (what lk-jwt-service does elsewhere).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RtcConfig {
    /// A LiveKit SFU's WebSocket URL (`wss://livekit.example.org`). Empty: no focus is
    /// advertised and the token endpoints answer 404.
    pub livekit_url: String,
    /// The API key and secret the LiveKit SFU is configured with.
    pub livekit_api_key: String,
    pub livekit_api_secret: String,
    /// How long an issued LiveKit token is valid, in seconds.
    pub token_lifetime_seconds: u64,
    /// Users of these other servers may start calls on the SFU (users of this server
    /// always may); users of any server may join calls already running.
    pub full_access_servers: Vec<String>,
    /// Run the built-in SFU (when `livekit_url` names no external one): group calls
    /// then need nothing but this server.
    pub sfu: bool,
    /// The UDP address all of the built-in SFU's media goes through.
    pub sfu_udp_listen: String,
    /// The address clients reach that port at; empty: the default route's interface.
    pub sfu_public_ip: String,
    /// Participants one call may hold.
    pub sfu_max_participants: usize,
    /// Participants of one call that may publish media (0: every participant may).
    pub sfu_max_publishers: usize,
    /// Video one participant may send, all tracks and simulcast layers together, in
    /// kbit/s: the SFU tells its client so (REMB) and the client keeps under it. 0: no
    /// ceiling.
    pub sfu_max_publish_kbps: u64,
    /// Estimate each receiver's bandwidth from transport-wide congestion feedback on
    /// packets the SFU stamps (receivers then send that instead of REMB); off: receivers'
    /// own REMB, for less CPU per forwarded packet.
    pub sfu_send_side_estimate: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            livekit_url: String::new(),
            livekit_api_key: String::new(),
            livekit_api_secret: String::new(),
            token_lifetime_seconds: 3600,
            full_access_servers: Vec::new(),
            sfu: true,
            sfu_udp_listen: "0.0.0.0:7882".into(),
            sfu_public_ip: String::new(),
            sfu_max_participants: 100,
            sfu_max_publishers: 0,
            sfu_max_publish_kbps: 8000,
            sfu_send_side_estimate: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VoipConfig {
    /// TURN servers clients relay calls through (`GET /voip/turnServer`), e.g.
    /// `turn:turn.example.org:3478?transport=udp`. Empty: no TURN server is offered.
    pub turn_uris: Vec<String>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`): each user
    /// gets short-lived credentials made from it (the TURN REST API scheme).
    pub turn_shared_secret: String,
    /// Fixed credentials instead, when the TURN server has no shared secret.
    pub turn_username: String,
    pub turn_password: String,
    /// How long the credentials handed out stay valid, in seconds.
    pub turn_user_lifetime_seconds: u64,
    /// Guests get TURN credentials too.
    pub turn_allow_guests: bool,
}

impl Default for VoipConfig {
    fn default() -> Self {
        Self {
            turn_uris: Vec::new(),
            turn_shared_secret: String::new(),
            turn_username: String::new(),
            turn_password: String::new(),
            turn_user_lifetime_seconds: 86_400,
            turn_allow_guests: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Localpart of the account that sends server notices (made when first needed).
    pub notices_localpart: String,
    /// Its display name, and the name of the room each user gets notices in.
    pub notices_display_name: String,
    pub notices_room_name: String,
    /// Audit log records older than this many days are removed; 0 keeps them all.
    pub audit_retention_days: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            notices_localpart: "_server".to_owned(),
            notices_display_name: "Server Notices".to_owned(),
            notices_room_name: "Server Notices".to_owned(),
            audit_retention_days: 365,
        }
    }
}

/// What happens to a message or name the content policy catches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Refused (403 `M_FORBIDDEN`, or `M_INVALID_USERNAME` for a name).
    #[default]
    Reject,
    /// Let through, and reported to the admins.
    Flag,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ContentPolicyConfig {
    /// Words (any case) that messages in public rooms may not contain as words, and
    /// names of new accounts may not contain at all.
    pub words: Vec<String>,
    /// Regular expressions checked against the same texts.
    pub patterns: Vec<String>,
    /// Link domains (and their subdomains) messages in public rooms may not link to.
    pub link_domains: Vec<String>,
    /// `reject` or `flag`.
    pub action: PolicyAction,
    /// Also check the names of accounts being registered.
    pub check_names: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// Index messages for `POST /search`. Off: searches find nothing, and no index is
    /// kept.
    pub enabled: bool,
    /// The index's directory; empty means `<data_dir>/search`.
    pub path: PathBuf,
    /// The language (ISO 639-1 code) messages are stemmed in when their room names none
    /// (`m.room.language`).
    pub default_language: String,
    /// The languages a search term is stemmed in, so that `meetings` finds `meeting`
    /// whatever the room's language. Codes without a stemmer are ignored.
    pub languages: Vec<String>,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::new(),
            default_language: "en".to_owned(),
            languages: ["en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "ru"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Addresses (CIDR) push gateways may be reached at although they are private,
    /// loopback or otherwise special (refused by default, as users choose the URL).
    pub gateway_ip_allow: Vec<String>,
    /// A push that cannot reach its gateway (or gets 5xx, 408 or 429) is dropped once it
    /// is this old, in seconds; other refusals drop it at once.
    pub max_push_age_seconds: u64,
    /// Email notifications: mail a user whose notifying messages have stayed unread
    /// this long (seconds) while they were not active.
    pub email_delay_seconds: u64,
    /// And at most one mail per this many seconds.
    pub email_period_seconds: u64,
    /// The web client the mails link to (`{web_client_url}/#/room/{room}`); empty: a
    /// `https://matrix.to` link.
    pub web_client_url: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            gateway_ip_allow: Vec::new(),
            max_push_age_seconds: 24 * 3600,
            email_delay_seconds: 600,
            email_period_seconds: 3600,
            web_client_url: String::new(),
        }
    }
}

/// Who may change a room's visibility in the published room directory. Server admins
/// always may.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoomPublishing {
    /// Members of the room with the power to send `m.room.canonical_alias` (its
    /// moderators and admins).
    AnyoneWithPower,
    /// Server admins only.
    Admins,
}

pub const JWT_ALGORITHMS: &[&str] =
    &["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"];

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Turn all rate limiting off (for tests and benchmarks only).
    pub enabled: bool,
    /// Accounts marked as bots (`trellis user create --bot`) are not rate-limited.
    pub exempt_bots: bool,
    /// Registrations per client address.
    pub register: RateLimit,
    /// Login attempts per client address.
    pub login: RateLimit,
    /// Every other rate-limited endpoint, per user (or per address when anonymous).
    pub default: RateLimit,
    /// Messages sent, per user.
    pub message: RateLimit,
    /// Room joins, per user.
    pub join: RateLimit,
    /// Media uploads, per user.
    pub media_upload: RateLimit,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exempt_bots: true,
            register: RateLimit::new(0.2, 5),
            login: RateLimit::new(0.5, 10),
            default: RateLimit::new(20.0, 100),
            message: RateLimit::new(10.0, 50),
            join: RateLimit::new(1.0, 10),
            media_upload: RateLimit::new(2.0, 20),
        }
    }
}

/// Online backups (docs/operations.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups go: a directory (best on another disk or machine), or
    /// `s3://bucket/prefix` for S3-compatible storage (the `s3_*` keys). Empty: backups
    /// only where `trellis backup --to` says.
    pub destination: String,
    /// Take a backup every this many hours (24: daily, 168: weekly); 0 takes them only
    /// on demand.
    pub interval_hours: u64,
    /// After each scheduled backup, keep this many (the newest) and remove the files only
    /// older ones held; 0 keeps every backup.
    pub keep: usize,
    pub s3_region: String,
    /// Endpoint URL for S3-compatible services (MinIO, Garage...); empty means AWS.
    pub s3_endpoint: String,
    /// Credentials; empty takes them from the environment (`AWS_ACCESS_KEY_ID`...).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    /// Allow a plain `http://` endpoint (local test servers only).
    pub s3_allow_http: bool,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            destination: String::new(),
            interval_hours: 0,
            keep: 7,
            s3_region: "us-east-1".into(),
            s3_endpoint: String::new(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_allow_http: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Where file contents live: `filesystem` (under `path`) or `s3` (the `s3_*` keys).
    /// Metadata is always in the database.
    pub backend: MediaBackend,
    /// Directory of the filesystem backend, and of upload temp files for every backend;
    /// empty means `<data_dir>/media`.
    pub path: PathBuf,
    /// Largest upload in bytes (advertised as `m.upload.size`).
    pub max_upload_bytes: u64,
    /// Bytes each user may have uploaded in total; 0 = no quota.
    pub user_quota_bytes: u64,
    /// Content types that may be uploaded (`image/png`, or `image/*`); empty allows any.
    pub allowed_content_types: Vec<String>,
    /// Serve the deprecated unauthenticated `/_matrix/media/v3/download` and `/thumbnail`
    /// endpoints. Off, they answer 404 `M_NOT_FOUND` for all media (the spec's freeze).
    pub legacy_unauthenticated: bool,
    /// Longest a download may wait for an async upload to arrive (`timeout_ms` cap).
    pub max_download_wait_seconds: u64,
    /// How long an id from `/create` stays valid for its upload, in seconds.
    pub unused_id_lifetime_seconds: u64,
    /// Images with more pixels than this are never decoded (decompression bombs); their
    /// thumbnails answer 413 `M_TOO_LARGE`.
    pub max_image_pixels: u64,
    /// Thumbnails generated at once (each decodes a whole image in memory).
    pub thumbnail_concurrency: usize,
    /// Images wider or taller than this get a downscaled rendition, kept beside the
    /// untouched original, that thumbnails are made from.
    pub rendition_max_side: u32,
    /// Serve `preview_url`.
    pub url_preview: bool,
    /// Addresses (CIDR, e.g. `127.0.0.1/32`) previews may fetch from even though they are
    /// private, loopback or link-local (which are refused by default).
    pub url_preview_ip_allow: Vec<String>,
    /// More addresses (CIDR) previews must never fetch from.
    pub url_preview_ip_deny: Vec<String>,
    /// Largest page or image a preview downloads, in bytes.
    pub url_preview_max_bytes: u64,
    /// Time limit for fetching one preview (page and image), in seconds.
    pub url_preview_timeout_seconds: u64,
    /// How long a preview is served from the cache, in seconds.
    pub url_preview_cache_seconds: u64,
    /// S3 bucket (backend `s3`).
    pub s3_bucket: String,
    pub s3_region: String,
    /// Endpoint URL for S3-compatible services (MinIO, Garage...); empty means AWS.
    pub s3_endpoint: String,
    /// Credentials; empty takes them from the environment (`AWS_ACCESS_KEY_ID`...).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    /// Key prefix inside the bucket.
    pub s3_prefix: String,
    /// Allow a plain `http://` endpoint (local test servers only).
    pub s3_allow_http: bool,
    /// Media encryption at rest (AES-256-GCM): keys as 64 hex digits. The first seals new
    /// files; the others only open files sealed before a rotation. Empty: no encryption.
    pub encryption_keys: Vec<String>,
    /// The same keys read from a file instead, one per line (`#` starts a comment); set
    /// this or `encryption_keys`, not both.
    pub encryption_key_file: PathBuf,
    /// Local uploads neither downloaded nor uploaded again for this many days are
    /// deleted (avatars in use and protected media are kept); 0 keeps them forever.
    pub local_retention_days: u64,
    /// Copies of other servers' media not downloaded for this many days are deleted (they
    /// are fetched again when asked for); 0 keeps them forever.
    pub remote_retention_days: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            backend: MediaBackend::Filesystem,
            path: PathBuf::new(),
            max_upload_bytes: 100 * 1024 * 1024,
            user_quota_bytes: 0,
            allowed_content_types: Vec::new(),
            legacy_unauthenticated: false,
            max_download_wait_seconds: 60,
            unused_id_lifetime_seconds: 24 * 3600,
            max_image_pixels: 64_000_000,
            thumbnail_concurrency: 2,
            rendition_max_side: 2048,
            url_preview: true,
            url_preview_ip_allow: Vec::new(),
            url_preview_ip_deny: Vec::new(),
            url_preview_max_bytes: 4 * 1024 * 1024,
            url_preview_timeout_seconds: 10,
            url_preview_cache_seconds: 24 * 3600,
            s3_bucket: String::new(),
            s3_region: "us-east-1".into(),
            s3_endpoint: String::new(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_prefix: String::new(),
            s3_allow_http: false,
            encryption_keys: Vec::new(),
            encryption_key_file: PathBuf::new(),
            local_retention_days: 0,
            remote_retention_days: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MediaBackend {
    Filesystem,
    S3,
}

/// Parses `addr/prefix` (or a bare address, a single host) into a network.
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a.trim().parse::<std::net::IpAddr>().ok()?, Some(l.trim().parse().ok()?)),
        None => (text.trim().parse().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    (len <= max).then_some((addr, len))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    Closed,
    Open,
    /// A registration token (`m.login.registration_token`) is required.
    Token,
    /// A verified email address (`m.login.email.identity`) is required.
    Email,
}

/// `info`, without ruma's event-authorization trace (several lines at `info` for every
/// event checked, which cost a send more CPU than its signature) and without the span
/// ruma's push-rule evaluation opens at `info` for every value of an event it flattens
/// (4% of a send's CPU, once per event).
pub const DEFAULT_LOG_LEVEL: &str = "info,ruma_state_res=warn,ruma_common::push=warn";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,trellis_api=debug`. `RUST_LOG` wins if set.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: DEFAULT_LOG_LEVEL.into() }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `/metrics` on `listen`.
    pub enabled: bool,
    /// A separate listener so metrics need not be exposed with the client API.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 9108)) }
    }
}

/// One problem found in a configuration, named by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// The base URL for links this server hands out (in mails, `submit_url`, the
    /// built-in SFU's address): `email.public_base_url`, else `http://<server.listen>`.
    pub fn public_base_url(&self) -> String {
        let configured = self.email.public_base_url.trim_end_matches('/');
        if configured.is_empty() {
            format!("http://{}", self.server.listen)
        } else {
            configured.to_owned()
        }
    }

    /// Loads a config file (or defaults when `path` is `None`), then applies environment
    /// overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigIssue {
                    key: p.display().to_string(),
                    message: format!("cannot read file: {e}"),
                }])
            })?,
            None => String::new(),
        };
        Self::from_toml_str(&text, env)
    }

    /// Parses TOML text, applies environment overrides and validates the result.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let mut user: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigIssue {
                key: "(file)".into(),
                message: format!("not valid TOML: {}", e.message()),
            }])
        })?;
        let mut issues = Vec::new();
        apply_env_overrides(&mut user, env, &mut issues);

        let defaults = defaults_table();
        check_keys(&user, &defaults, "", &mut issues);
        if !issues.is_empty() {
            return Err(ConfigErrors(issues));
        }
        let config: Config =
            Value::Table(user.clone()).try_into().map_err(|e: toml::de::Error| {
                ConfigErrors(vec![ConfigIssue {
                    key: "(config)".into(),
                    message: e.message().into(),
                }])
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks that the type system cannot express.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut issues = Vec::new();
        let mut bad =
            |key: &str, message: String| issues.push(ConfigIssue { key: key.into(), message });
        for (n, pattern) in self.content_policy.patterns.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                bad(
                    &format!("content_policy.patterns[{n}]"),
                    format!("not a regular expression: {e}"),
                );
            }
        }
        let notices = &self.admin.notices_localpart;
        if notices.is_empty()
            || !notices
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b))
        {
            bad("admin.notices_localpart", "not a valid user localpart".to_owned());
        }
        if let Err(e) = <&ruma::ServerName>::try_from(self.server.server_name.as_str()) {
            bad("server.server_name", format!("not a valid Matrix server name: {e}"));
        }
        if self.http.max_connections_per_ip == 0 {
            bad("http.max_connections_per_ip", "must be at least 1".into());
        }
        for (n, net) in self.http.connection_limit_exempt.iter().enumerate() {
            if !valid_cidr(net) {
                bad(
                    &format!("http.connection_limit_exempt[{n}]"),
                    "not an address or network".into(),
                );
            }
        }
        if self.rtc.sfu && self.rtc.sfu_udp_listen.parse::<SocketAddr>().is_err() {
            bad("rtc.sfu_udp_listen", "not an address and port".into());
        }
        if !self.rtc.sfu_public_ip.is_empty()
            && self.rtc.sfu_public_ip.parse::<std::net::IpAddr>().is_err()
        {
            bad("rtc.sfu_public_ip", "not an IP address".into());
        }
        if self.http.body_read_window_seconds == 0 {
            bad("http.body_read_window_seconds", "must be at least 1".into());
        }
        if !(1..=100).contains(&self.http.shed_anonymous_percent) {
            bad("http.shed_anonymous_percent", "must be from 1 to 100".into());
        }
        let turn = &self.turn;
        if !turn.listen_tcp.is_empty() && turn.listen_tcp.parse::<SocketAddr>().is_err() {
            bad("turn.listen_tcp", "not an address and port (or empty for none)".into());
        }
        if !turn.public_ip.is_empty() && turn.public_ip.parse::<std::net::IpAddr>().is_err() {
            bad("turn.public_ip", "not an IP address".into());
        }
        if turn.relay_min_port == 0 || turn.relay_max_port < turn.relay_min_port {
            bad("turn.relay_min_port", "the relay port range is empty".into());
        }
        for (n, net) in turn.allowed_peer_ips.iter().enumerate() {
            if !valid_cidr(net) {
                bad(&format!("turn.allowed_peer_ips[{n}]"), "not an address or network".into());
            }
        }
        let rtc = &self.rtc;
        if rtc.token_lifetime_seconds < 60 {
            bad("rtc.token_lifetime_seconds", "must be at least 60".into());
        }
        if !rtc.livekit_url.is_empty()
            && (rtc.livekit_api_key.is_empty() || rtc.livekit_api_secret.is_empty())
        {
            bad("rtc.livekit_api_key", "a LiveKit URL needs its API key and secret".into());
        }
        if self.server.data_dir.as_os_str().is_empty() {
            bad("server.data_dir", "must not be empty".into());
        }
        if self.storage.block_cache_mb == 0 {
            bad("storage.block_cache_mb", "must be at least 1".into());
        }
        if self.storage.write_buffer_mb == 0 {
            bad("storage.write_buffer_mb", "must be at least 1".into());
        }
        if self.http.max_request_bytes < 1024 {
            bad("http.max_request_bytes", "must be at least 1024".into());
        }
        if !self.federation.tls_listen.is_empty() {
            if self.federation.tls_listen.parse::<std::net::SocketAddr>().is_err() {
                bad("federation.tls_listen", "must be an address like 0.0.0.0:8448".into());
            }
            if self.federation.tls_certificate.as_os_str().is_empty()
                || self.federation.tls_private_key.as_os_str().is_empty()
            {
                bad(
                    "federation.tls_listen",
                    "needs federation.tls_certificate and federation.tls_private_key".into(),
                );
            }
        }
        if self.presence.offline_timeout_seconds <= self.presence.idle_timeout_seconds {
            bad(
                "presence.offline_timeout_seconds",
                "must be longer than presence.idle_timeout_seconds".into(),
            );
        }
        if self.federation.request_timeout_seconds == 0 {
            bad("federation.request_timeout_seconds", "must be at least 1".into());
        }
        if self.federation.key_validity_hours == 0 {
            bad("federation.key_validity_hours", "must be at least 1".into());
        }
        for old in &self.federation.old_signing_keys {
            let version = old.key_id.strip_prefix("ed25519:").unwrap_or_default();
            if version.is_empty() || !version.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                bad(
                    "federation.old_signing_keys",
                    format!("key_id {:?} is not `ed25519:<version>`", old.key_id),
                );
            }
            // 32 bytes are 43 characters of unpadded base64.
            let key = old.public_key.trim_end_matches('=');
            if key.len() != 43
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
            {
                bad(
                    "federation.old_signing_keys",
                    format!("public_key of {} is not 32 bytes of base64", old.key_id),
                );
            }
        }
        if self.auth.argon2_memory_kib < 8 {
            bad("auth.argon2_memory_kib", "must be at least 8".into());
        }
        if self.auth.argon2_iterations == 0 {
            bad("auth.argon2_iterations", "must be at least 1".into());
        }
        if self.auth.access_token_lifetime_seconds == 0 {
            bad("auth.access_token_lifetime_seconds", "must be at least 1".into());
        }
        let jwt = &self.jwt;
        if !JWT_ALGORITHMS.contains(&jwt.algorithm.as_str()) {
            bad("jwt.algorithm", format!("must be one of {}", JWT_ALGORITHMS.join(", ")));
        } else if jwt.enabled && jwt.algorithm.starts_with("HS") && jwt.secret.is_empty() {
            bad("jwt.secret", format!("required for {}", jwt.algorithm));
        } else if jwt.enabled
            && !jwt.algorithm.starts_with("HS")
            && jwt.public_key_path.as_os_str().is_empty()
        {
            bad("jwt.public_key_path", format!("required for {}", jwt.algorithm));
        }
        if jwt.subject_claim.is_empty() {
            bad("jwt.subject_claim", "must not be empty".into());
        }
        if self.registration.mode == RegistrationMode::Email && !self.email.enabled {
            bad("registration.mode", "\"email\" needs email.enabled = true".into());
        }
        if self.email.enabled && self.email.smtp_host.is_empty() {
            bad("email.smtp_host", "must not be empty".into());
        }
        if self.email.code_lifetime_seconds == 0 {
            bad("email.code_lifetime_seconds", "must be at least 1".into());
        }
        let supported = ruma::RoomVersionId::try_from(self.rooms.default_room_version.as_str())
            .ok()
            .and_then(|v| v.rules())
            .is_some();
        if !supported {
            bad("rooms.default_room_version", "not a supported room version (1-12)".into());
        }
        if self.presence.idle_timeout_seconds == 0 {
            bad("presence.idle_timeout_seconds", "must be at least 1".into());
        }
        let r = &self.rate_limits;
        for (name, limit) in [
            ("register", r.register),
            ("login", r.login),
            ("default", r.default),
            ("message", r.message),
            ("join", r.join),
            ("media_upload", r.media_upload),
        ] {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) || limit.burst == 0 {
                bad(
                    &format!("rate_limits.{name}"),
                    "per_second must be positive and burst at least 1".into(),
                );
            }
        }
        let m = &self.media;
        if m.max_upload_bytes == 0 {
            bad("media.max_upload_bytes", "must be at least 1".into());
        }
        if m.thumbnail_concurrency == 0 {
            bad("media.thumbnail_concurrency", "must be at least 1".into());
        }
        if m.max_image_pixels == 0 {
            bad("media.max_image_pixels", "must be at least 1".into());
        }
        if m.rendition_max_side < 800 {
            bad("media.rendition_max_side", "must be at least 800 (the largest thumbnail)".into());
        }
        if m.url_preview_timeout_seconds == 0 {
            bad("media.url_preview_timeout_seconds", "must be at least 1".into());
        }
        for (key, list) in [
            ("url_preview_ip_allow", &m.url_preview_ip_allow),
            ("url_preview_ip_deny", &m.url_preview_ip_deny),
        ] {
            for entry in list {
                if parse_cidr(entry).is_none() {
                    bad(&format!("media.{key}"), format!("not an address or CIDR: {entry:?}"));
                }
            }
        }
        for t in &m.allowed_content_types {
            if !t.contains('/') {
                bad("media.allowed_content_types", format!("not a content type: {t:?}"));
            }
        }
        if self.backup.interval_hours > 0 && self.backup.destination.is_empty() {
            bad("backup.destination", "required for scheduled backups (interval_hours)".into());
        }
        if m.backend == MediaBackend::S3 && m.s3_bucket.is_empty() {
            bad("media.s3_bucket", "required for backend \"s3\"".into());
        }
        let r = &self.retention;
        if r.purge_interval_seconds == 0 {
            bad("retention.purge_interval_seconds", "must be at least 1".into());
        }
        if r.max_lifetime_seconds > 0 && r.min_lifetime_seconds > r.max_lifetime_seconds {
            bad("retention.min_lifetime_seconds", "must not exceed max_lifetime_seconds".into());
        }
        if !m.encryption_keys.is_empty() && !m.encryption_key_file.as_os_str().is_empty() {
            bad("media.encryption_keys", "set this or media.encryption_key_file, not both".into());
        }
        for key in &m.encryption_keys {
            let key = key.trim();
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                bad("media.encryption_keys", "each key is 64 hex digits (32 bytes)".into());
            }
        }
        let client = &self.well_known.client;
        if !(client.is_empty() || client.starts_with("https://") || client.starts_with("http://")) {
            bad("well_known.client", "must be an http(s) URL".into());
        }
        if tracing_filter_invalid(&self.logging.level) {
            bad("logging.level", format!("not a valid log filter: {:?}", self.logging.level));
        }
        let language_tag = |t: &str| {
            let primary = t.split(['-', '_']).next().unwrap_or_default();
            (2..=3).contains(&primary.len()) && primary.chars().all(|c| c.is_ascii_alphabetic())
        };
        if !language_tag(&self.search.default_language) {
            bad("search.default_language", "must be a language code such as \"en\"".into());
        }
        for tag in self.search.languages.iter().filter(|t| !language_tag(t)) {
            bad("search.languages", format!("not a language code: {tag:?}"));
        }
        if self.metrics.enabled && self.metrics.listen == self.server.listen {
            bad("metrics.listen", "must differ from server.listen".into());
        }
        if issues.is_empty() { Ok(()) } else { Err(ConfigErrors(issues)) }
    }

    /// The defaults as TOML, the basis of `config print-defaults`.
    pub fn defaults_toml() -> String {
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }

    pub fn signing_key_path(&self) -> PathBuf {
        if self.server.signing_key_path.as_os_str().is_empty() {
            self.server.data_dir.join("signing.key")
        } else {
            self.server.signing_key_path.clone()
        }
    }

    pub fn search_path(&self) -> PathBuf {
        if self.search.path.as_os_str().is_empty() {
            self.server.data_dir.join("search")
        } else {
            self.search.path.clone()
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.server.data_dir.join("db")
    }

    pub fn media_path(&self) -> PathBuf {
        if self.media.path.as_os_str().is_empty() {
            self.server.data_dir.join("media")
        } else {
            self.media.path.clone()
        }
    }
}

fn tracing_filter_invalid(level: &str) -> bool {
    // The filter syntax belongs to tracing-subscriber, which core does not depend on;
    // reject only what can never be a directive list.
    level.trim().is_empty() || level.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn defaults_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

/// Walks the user's table against the defaults: unknown keys by name, and each known leaf
/// deserialized on its own so that every bad value is reported, not just the first.
fn check_keys(user: &Table, defaults: &Table, prefix: &str, issues: &mut Vec<ConfigIssue>) {
    for (key, value) in user {
        let dotted = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let Some(default) = defaults.get(key) else {
            issues.push(ConfigIssue { key: dotted, message: "unknown key".into() });
            continue;
        };
        match (value, default) {
            (Value::Table(u), Value::Table(d)) => check_keys(u, d, &dotted, issues),
            (_, Value::Table(_)) => issues
                .push(ConfigIssue { key: dotted, message: "expected a table (section)".into() }),
            _ => {
                if let Err(message) = check_leaf(&dotted, value) {
                    issues.push(ConfigIssue { key: dotted, message });
                }
            }
        }
    }
}

/// Deserializes the defaults with only this one leaf replaced.
fn check_leaf(dotted: &str, value: &Value) -> Result<(), String> {
    let mut probe = defaults_table();
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut table = &mut probe;
    for part in parts {
        table = match table.get_mut(part) {
            Some(Value::Table(t)) => t,
            _ => return Ok(()),
        };
    }
    table.insert(last.to_string(), value.clone());
    Value::Table(probe).try_into::<Config>().map(|_| ()).map_err(|e| e.message().trim().to_string())
}

/// `TRELLIS_SERVER__SERVER_NAME=example.org` sets `server.server_name`. Values are parsed
/// as TOML when they can be (numbers, booleans, arrays) and taken as strings otherwise.
fn apply_env_overrides(
    user: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    issues: &mut Vec<ConfigIssue>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        let Some((section, key)) = rest.split_once("__") else { continue };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if section.is_empty() || key.is_empty() {
            continue;
        }
        let value = parse_env_value(&raw);
        let entry = user.entry(section.clone()).or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(t) => {
                t.insert(key, value);
            }
            _ => issues.push(ConfigIssue {
                key: format!("{section}.{key}"),
                message: format!("{name} overrides a key whose section is not a table"),
            }),
        }
    }
}

fn parse_env_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match doc.parse::<Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        Err(_) => Value::String(raw.into()),
    }
}

/// An IP address or a network in CIDR notation (`10.0.0.0/8`, `fd00::/8`).
pub fn valid_cidr(text: &str) -> bool {
    let (addr, bits) = match text.split_once('/') {
        Some((addr, bits)) => (addr, Some(bits)),
        None => (text, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else { return false };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|b| b <= max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml_str("", no_env()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.server_name, "localhost");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8008");
    }

    #[test]
    fn defaults_round_trip() {
        let text = Config::defaults_toml();
        assert_eq!(Config::from_toml_str(&text, no_env()).unwrap(), Config::default());
    }

    #[test]
    fn every_invalid_key_is_reported() {
        let text = r#"
            bogus = 1
            [server]
            listen = "not an address"
            nonsense = true
            [storage]
            block_cache_mb = "lots"
            compression = "gzip"
            [nosuch]
            x = 1
        "#;
        let err = Config::from_toml_str(text, no_env()).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|i| i.key.as_str()).collect();
        for expected in [
            "bogus",
            "server.listen",
            "server.nonsense",
            "storage.block_cache_mb",
            "storage.compression",
            "nosuch",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn semantic_errors_are_named() {
        let text = "[server]\nserver_name = \"bad name!\"\n[storage]\nblock_cache_mb = 0\n";
        let err = Config::from_toml_str(text, no_env()).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["server.server_name", "storage.block_cache_mb"]);
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![
            ("TRELLIS_SERVER__SERVER_NAME".to_string(), "example.org".to_string()),
            ("TRELLIS_STORAGE__BLOCK_CACHE_MB".to_string(), "64".to_string()),
            ("TRELLIS_STORAGE__SYNC_WRITES".to_string(), "false".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml_str("", env).unwrap();
        assert_eq!(c.server.server_name, "example.org");
        assert_eq!(c.storage.block_cache_mb, 64);
        assert!(!c.storage.sync_writes);

        let env = vec![("TRELLIS_STORAGE__NOPE".to_string(), "1".to_string())];
        let err = Config::from_toml_str("", env).unwrap_err();
        assert_eq!(err.0[0].key, "storage.nope");
    }

    #[test]
    fn bad_toml_is_an_error_not_a_panic() {
        assert!(Config::from_toml_str("[server", no_env()).is_err());
        assert!(Config::from_toml_str("server = 3", no_env()).is_err());
    }
}
