//! The catalog of tables: one RocksDB column family each, with its tuning.

/// How a table is used, which decides its tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mostly point reads by full key: bloom filters pay off.
    Point,
    /// Mostly ordered range scans (timelines, per-user listings).
    Scan,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TableDef {
    pub name: &'static str,
    pub access: Access,
}

macro_rules! tables {
    ($($ident:ident = $name:literal, $access:ident;)*) => {
        $(pub static $ident: TableDef = TableDef { name: $name, access: Access::$access };)*
        /// Every table, in catalog order.
        pub static ALL: &[&TableDef] = &[$(&$ident),*];
    };
}

tables! {
    // Engine bookkeeping: schema version, server-wide counters.
    META = "meta", Point;
    // user localpart -> account record
    USERS = "users", Point;
    // sha256(access token) -> session (user, device)
    ACCESS_TOKENS = "access_tokens", Point;
    // (user localpart, device id) -> device record
    DEVICES = "devices", Scan;
    // UIA session id -> session record
    UIA_SESSIONS = "uia_sessions", Point;
    // sha256(refresh token) -> owner
    REFRESH_TOKENS = "refresh_tokens", Point;
    // sha256(m.login.token) -> owner and expiry
    LOGIN_TOKENS = "login_tokens", Point;
    // (user localpart, field name) -> JSON value
    PROFILES = "profiles", Scan;
    // (user localpart, room id or "", event type) -> JSON content
    ACCOUNT_DATA = "account_data", Scan;
    // registration token -> limits and usage
    REGISTRATION_TOKENS = "registration_tokens", Point;
    // validation session id -> email validation session
    THREEPID_SESSIONS = "threepid_sessions", Point;
    // (medium, address) -> user localpart
    THREEPIDS = "threepids", Point;
    // (user localpart, medium, address) -> when added and validated
    USER_THREEPIDS = "user_threepids", Scan;
    // (search word, user localpart) -> (): the user directory's prefix index
    USER_DIRECTORY = "user_directory", Scan;
    // interned ids: (kind, text) -> short id, and (kind, short id) -> text, where kind
    // is event id, room id or (event type, state key)
    SHORT_IDS = "short_ids", Point;
    SHORT_IDS_REV = "short_ids_rev", Point;
    // short room id -> room record (version, current state snapshot, extremities, depth)
    ROOMS = "rooms", Point;
    // short event id -> stored PDU with its metadata
    EVENTS = "events", Point;
    // (short room id, stream position) -> short event id: the timeline, in order
    TIMELINE = "timeline", Scan;
    // (short room id, user id) -> membership, and (user id, short room id) -> membership
    ROOM_MEMBERS = "room_members", Scan;
    USER_ROOMS = "user_rooms", Scan;
    // (user localpart, device id, transaction id) -> event id: idempotent sends
    TXN_IDS = "txn_ids", Point;
    // room alias -> (room id, creator localpart); (room id, alias) -> ()
    ALIASES = "aliases", Point;
    ROOM_ALIASES = "room_aliases", Scan;
    // state snapshot id -> one layer (changes against a parent snapshot)
    STATE_SNAPSHOTS = "state_snapshots", Point;
    // (parent short event id, rel_type, child position) -> the relating event
    RELATIONS = "relations", Scan;
    // parent short event id -> (): the event has (or had) relations; a point lookup with a
    // bloom filter answers "none" for most events without opening an iterator
    RELATED = "related", Point;
    // (target short event id, sender, key) -> reaction short event id: one per key
    ANNOTATIONS = "annotations", Point;
    // thread root short event id -> position of its latest reply
    THREAD_LATEST = "thread_latest", Point;
    // (short room id, latest reply position) -> thread root: threads by activity
    THREADS = "threads", Scan;
    // (short room id, user id, position) -> membership from that position on
    MEMBERSHIP_LOG = "membership_log", Scan;
    // (short room id, position) -> history visibility from that position on
    VISIBILITY_LOG = "visibility_log", Scan;
    // (short room id, origin_server_ts, position) -> short event id
    EVENT_TIMES = "event_times", Scan;
    // (user localpart, room id or "", event type) -> stream position of the last change
    ACCOUNT_DATA_POSITIONS = "account_data_positions", Scan;
    // (user localpart, filter id) -> filter definition
    FILTERS = "filters", Point;
    // (room id, user id, receipt type, thread id) -> receipt (event, ts, position)
    RECEIPTS = "receipts", Scan;
    // (room id, position) -> (user id, receipt type, thread id): one row per live receipt
    RECEIPT_LOG = "receipt_log", Scan;
    // room id -> (): rooms published in the room directory
    PUBLIC_ROOMS = "public_rooms", Scan;
    // (user localpart, app id, pushkey) -> pusher
    PUSHERS = "pushers", Scan;
    // (app id, pushkey, user localpart) -> (): every user holding a pushkey (for `append`)
    PUSHER_KEYS = "pusher_keys", Scan;
    // user id -> last presence state, status message and activity time
    PRESENCE = "presence", Point;
    // (user id, room id, position) -> unread notifying event (highlight, thread)
    NOTIFY_UNREAD = "notify_unread", Scan;
    // (user id, position) -> notification, for `/notifications`
    NOTIFY_HISTORY = "notify_history", Scan;
    // (room id, position) -> what a notifying event counts as for every member then
    // joined but its sender and those in `notify_excluded`
    NOTIFY_SHARED = "notify_shared", Scan;
    // (room id, position, user id) -> (): a member the event was evaluated for on their
    // own (their rows, if any, are in `notify_unread` and `notify_history`)
    NOTIFY_EXCLUDED = "notify_excluded", Point;
    // (user localpart, device id) -> the device's identity keys as uploaded
    DEVICE_KEYS = "device_keys", Scan;
    // (user localpart, device id, algorithm, key id) -> an unclaimed one-time key
    ONE_TIME_KEYS = "one_time_keys", Scan;
    // (user localpart, device id, algorithm) -> how many one-time keys are unclaimed
    ONE_TIME_KEY_COUNTS = "one_time_key_counts", Scan;
    // (user localpart, device id, algorithm) -> the fallback key and whether it was used
    FALLBACK_KEYS = "fallback_keys", Scan;
    // (user localpart, usage) -> the user's cross-signing key of that usage
    CROSS_SIGNING_KEYS = "cross_signing_keys", Scan;
    // (target user id, target key id, signer user id, signer key id) -> signature
    KEY_SIGNATURES = "key_signatures", Scan;
    // stream position -> user id whose devices or keys changed then
    KEY_CHANGES = "key_changes", Scan;
    // (short room id, stream position) -> user id whose membership changed then
    MEMBER_CHANGES = "member_changes", Scan;
    // (user localpart, device id, stream position) -> a to-device message
    TO_DEVICE = "to_device", Scan;
    // (user localpart, version) -> a key backup version
    BACKUP_VERSIONS = "backup_versions", Scan;
    // (user localpart, version, room id, session id) -> a backed-up room key
    BACKUP_KEYS = "backup_keys", Scan;
    // (server name, key id) -> another server's verify key and its validity
    REMOTE_KEYS = "remote_keys", Point;
    // server name -> its last key server response, as received (served as a notary)
    REMOTE_KEY_RESPONSES = "remote_key_responses", Point;
    // (timestamp ms, sequence) -> audit record
    AUDIT_LOG = "audit_log", Scan;
    // (server name, media id) -> media record (owner, content hash, type, name, state)
    MEDIA = "media", Point;
    // (content sha256 hex, variant such as `crop-96x96`) -> thumbnail or rendition record
    MEDIA_VARIANTS = "media_variants", Scan;
    // (blob sha256 hex, referrer) -> (): who uses a stored file; it goes when none do
    MEDIA_BLOB_REFS = "media_blob_refs", Scan;
    // user localpart -> bytes uploaded, for the quota
    MEDIA_USAGE = "media_usage", Point;
    // URL -> cached preview (OpenGraph JSON and when it was fetched)
    URL_PREVIEWS = "url_previews", Point;
    // (destination server, sequence) -> a PDU or EDU waiting to be sent there
    FEDERATION_OUTBOX = "federation_outbox", Scan;
    // (origin server, transaction id) -> the answer given, for retried transactions
    FEDERATION_TXNS = "federation_txns", Point;
    // (invited user id, room id) -> an invite to a room this server is not in
    REMOTE_INVITES = "remote_invites", Scan;
    // sha256(OpenID token) -> owner and expiry, for other services to ask who it is
    OPENID_TOKENS = "openid_tokens", Point;
}

pub fn by_name(name: &str) -> Option<&'static TableDef> {
    ALL.iter().copied().find(|t| t.name == name)
}
