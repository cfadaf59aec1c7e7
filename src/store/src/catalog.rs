//! The catalog of tables and the column families they live in.
//!
//! Big or hot tables have a column family of their own. The others share one of two
//! families, by access pattern, with a one-byte tag before every key: each RocksDB
//! column family carries fixed per-family state (a table cache, a blob file cache, a
//! memtable, its files), about 50 KB resident even when empty, so 69 families of mostly
//! small tables held 3.5 MB at idle. A tagged table's tag and access are part of the
//! on-disk layout: changing either needs a migration.

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
    /// The column family holding the rows.
    pub family: &'static str,
    /// In a shared family, the byte before each of this table's keys.
    pub tag: Option<u8>,
}

/// The family shared by the small `Point` tables.
pub const SHARED_POINT: &str = "shared_point";
/// The family shared by the small `Scan` tables.
pub const SHARED_SCAN: &str = "shared_scan";

const fn shared_family(access: Access) -> &'static str {
    match access {
        Access::Point => SHARED_POINT,
        Access::Scan => SHARED_SCAN,
    }
}

macro_rules! tables {
    ($($ident:ident = $name:literal, $access:ident $(@ $tag:literal)?;)*) => {
        $(pub static $ident: TableDef = tables!(@def $name, $access $(, $tag)?);)*
        /// Every table, in catalog order.
        pub static ALL: &[&TableDef] = &[$(&$ident),*];
    };
    (@def $name:literal, $access:ident) => {
        TableDef { name: $name, access: Access::$access, family: $name, tag: None }
    };
    (@def $name:literal, $access:ident, $tag:literal) => {
        TableDef {
            name: $name,
            access: Access::$access,
            family: shared_family(Access::$access),
            tag: Some($tag),
        }
    };
}

// `NAME = "name", Access;` is a table with a family of its own; `... @ tag;` shares its
// access pattern's family under that tag. Tags are never reused.
tables! {
    // Engine bookkeeping: schema version, server-wide counters.
    META = "meta", Point;
    // user localpart -> account record
    USERS = "users", Point @ 1;
    // sha256(access token) -> session (user, device)
    ACCESS_TOKENS = "access_tokens", Point @ 2;
    // (user localpart, device id) -> device record
    DEVICES = "devices", Scan @ 3;
    // UIA session id -> session record
    UIA_SESSIONS = "uia_sessions", Point @ 4;
    // sha256(refresh token) -> owner
    REFRESH_TOKENS = "refresh_tokens", Point @ 5;
    // sha256(m.login.token) -> owner and expiry
    LOGIN_TOKENS = "login_tokens", Point @ 6;
    // (user localpart, field name) -> JSON value
    PROFILES = "profiles", Scan @ 7;
    // (user localpart, room id or "", event type) -> JSON content
    ACCOUNT_DATA = "account_data", Scan @ 8;
    // registration token -> limits and usage
    REGISTRATION_TOKENS = "registration_tokens", Point @ 9;
    // validation session id -> email validation session
    THREEPID_SESSIONS = "threepid_sessions", Point @ 10;
    // (medium, address) -> user localpart
    THREEPIDS = "threepids", Point @ 11;
    // (user localpart, medium, address) -> when added and validated
    USER_THREEPIDS = "user_threepids", Scan @ 12;
    // (search word, user localpart) -> (): the user directory's prefix index
    USER_DIRECTORY = "user_directory", Scan @ 13;
    // interned ids: (kind, text) -> short id, and (kind, short id) -> text, where kind
    // is event id, room id or (event type, state key)
    SHORT_IDS = "short_ids", Point;
    SHORT_IDS_REV = "short_ids_rev", Point;
    // short room id -> room record (version, current state snapshot, extremities, depth)
    ROOMS = "rooms", Point @ 14;
    // short event id -> stored PDU with its metadata
    EVENTS = "events", Point;
    // (short room id, stream position) -> short event id: the timeline, in order
    TIMELINE = "timeline", Scan;
    // (short room id, user id) -> membership, and (user id, short room id) -> membership
    ROOM_MEMBERS = "room_members", Scan @ 15;
    USER_ROOMS = "user_rooms", Scan @ 16;
    // (user localpart, device id, transaction id) -> event id: idempotent sends
    TXN_IDS = "txn_ids", Point @ 17;
    // room alias -> (room id, creator localpart); (room id, alias) -> ()
    ALIASES = "aliases", Point @ 18;
    ROOM_ALIASES = "room_aliases", Scan @ 19;
    // state snapshot id -> one layer (changes against a parent snapshot)
    STATE_SNAPSHOTS = "state_snapshots", Point;
    // (parent short event id, rel_type, child position) -> the relating event
    RELATIONS = "relations", Scan @ 20;
    // parent short event id -> (): the event has (or had) relations; a point lookup with a
    // bloom filter answers "none" for most events without opening an iterator
    RELATED = "related", Point @ 21;
    // (target short event id, sender, key) -> reaction short event id: one per key
    ANNOTATIONS = "annotations", Point @ 22;
    // thread root short event id -> position of its latest reply
    THREAD_LATEST = "thread_latest", Point @ 23;
    // (short room id, latest reply position) -> thread root: threads by activity
    THREADS = "threads", Scan @ 24;
    // (short room id, user id, position) -> membership from that position on
    MEMBERSHIP_LOG = "membership_log", Scan @ 25;
    // (short room id, position) -> history visibility from that position on
    VISIBILITY_LOG = "visibility_log", Scan @ 26;
    // (short room id, origin_server_ts, position) -> short event id
    EVENT_TIMES = "event_times", Scan @ 27;
    // (user localpart, room id or "", event type) -> stream position of the last change
    ACCOUNT_DATA_POSITIONS = "account_data_positions", Scan @ 28;
    // (user localpart, filter id) -> filter definition
    FILTERS = "filters", Point @ 29;
    // (room id, user id, receipt type, thread id) -> receipt (event, ts, position)
    RECEIPTS = "receipts", Scan @ 30;
    // (room id, position) -> (user id, receipt type, thread id): one row per live receipt
    RECEIPT_LOG = "receipt_log", Scan @ 31;
    // room id -> (): rooms published in the room directory
    PUBLIC_ROOMS = "public_rooms", Scan @ 32;
    // (user localpart, app id, pushkey) -> pusher
    PUSHERS = "pushers", Scan @ 33;
    // (app id, pushkey, user localpart) -> (): every user holding a pushkey (for `append`)
    PUSHER_KEYS = "pusher_keys", Scan @ 34;
    // user id -> last presence state, status message and activity time
    PRESENCE = "presence", Point @ 35;
    // (user id, room id, position) -> unread notifying event (highlight, thread)
    NOTIFY_UNREAD = "notify_unread", Scan @ 36;
    // (user id, position) -> notification, for `/notifications`
    NOTIFY_HISTORY = "notify_history", Scan @ 37;
    // (room id, position) -> what a notifying event counts as for every member then
    // joined but its sender and those in `notify_excluded`
    NOTIFY_SHARED = "notify_shared", Scan @ 38;
    // (room id, position, user id) -> (): a member the event was evaluated for on their
    // own (their rows, if any, are in `notify_unread` and `notify_history`)
    NOTIFY_EXCLUDED = "notify_excluded", Point @ 39;
    // (user localpart, device id) -> the device's identity keys as uploaded
    DEVICE_KEYS = "device_keys", Scan @ 40;
    // (user localpart, device id, algorithm, key id) -> an unclaimed one-time key
    ONE_TIME_KEYS = "one_time_keys", Scan @ 41;
    // (user localpart, device id, algorithm) -> how many one-time keys are unclaimed
    ONE_TIME_KEY_COUNTS = "one_time_key_counts", Scan @ 42;
    // (user localpart, device id, algorithm) -> the fallback key and whether it was used
    FALLBACK_KEYS = "fallback_keys", Scan @ 43;
    // (user localpart, usage) -> the user's cross-signing key of that usage
    CROSS_SIGNING_KEYS = "cross_signing_keys", Scan @ 44;
    // (target user id, target key id, signer user id, signer key id) -> signature
    KEY_SIGNATURES = "key_signatures", Scan @ 45;
    // stream position -> user id whose devices or keys changed then
    KEY_CHANGES = "key_changes", Scan @ 46;
    // (stream position, short room id) -> user id whose membership changed then
    MEMBER_CHANGES = "member_changes", Scan @ 47;
    // (user localpart, device id, stream position) -> a to-device message
    TO_DEVICE = "to_device", Scan @ 48;
    // (user localpart, version) -> a key backup version
    BACKUP_VERSIONS = "backup_versions", Scan @ 49;
    // (user localpart, version, room id, session id) -> a backed-up room key
    BACKUP_KEYS = "backup_keys", Scan @ 50;
    // (server name, key id) -> another server's verify key and its validity
    REMOTE_KEYS = "remote_keys", Point @ 51;
    // server name -> its last key server response, as received (served as a notary)
    REMOTE_KEY_RESPONSES = "remote_key_responses", Point @ 52;
    // (timestamp ms, sequence) -> audit record
    AUDIT_LOG = "audit_log", Scan @ 53;
    // (server name, media id) -> media record (owner, content hash, type, name, state)
    MEDIA = "media", Point @ 54;
    // (content sha256 hex, variant such as `crop-96x96`) -> thumbnail or rendition record
    MEDIA_VARIANTS = "media_variants", Scan @ 55;
    // (blob sha256 hex, referrer) -> (): who uses a stored file; it goes when none do
    MEDIA_BLOB_REFS = "media_blob_refs", Scan @ 56;
    // user localpart -> bytes uploaded, for the quota
    MEDIA_USAGE = "media_usage", Point @ 57;
    // URL -> cached preview (OpenGraph JSON and when it was fetched)
    URL_PREVIEWS = "url_previews", Point @ 58;
    // (destination server, sequence) -> a PDU or EDU waiting to be sent there
    FEDERATION_OUTBOX = "federation_outbox", Scan @ 59;
    // (origin server, transaction id) -> the answer given, for retried transactions
    FEDERATION_TXNS = "federation_txns", Point @ 60;
    // (invited user id, room id) -> an invite to a room this server is not in
    REMOTE_INVITES = "remote_invites", Scan @ 61;
    // sha256(OpenID token) -> owner and expiry, for other services to ask who it is
    OPENID_TOKENS = "openid_tokens", Point @ 62;
    // (user localpart, device id, algorithm, upload sequence) -> key id: the unclaimed
    // one-time keys in the order they were uploaded, the order claims hand them out in
    ONE_TIME_KEY_ORDER = "one_time_key_order", Scan @ 63;
    // user localpart -> the user's dehydrated device: its id and the client's opaque data
    DEHYDRATED_DEVICES = "dehydrated_devices", Point @ 64;
    // user id -> the stream position at which the user asked to be erased
    ERASED_USERS = "erased_users", Point @ 65;
    // (application service id, stream position) -> an event waiting to be sent to it
    APPSERVICE_QUEUE = "appservice_queue", Scan @ 66;
    // application service id -> the transaction being sent to it (resent as it is)
    APPSERVICE_INFLIGHT = "appservice_inflight", Point @ 67;
    // application service id -> its registration (YAML) as added through the admin API
    // or `trellis appservice add`
    APPSERVICE_REGISTRATIONS = "appservice_registrations", Scan @ 68;
    // (third-party instance id, room id) -> (): rooms an application service published
    // in its network's room list
    NETWORK_ROOMS = "network_rooms", Scan @ 69;
    // (room id, webhook id) -> an incoming webhook of the room
    WEBHOOKS = "webhooks", Scan @ 70;
    // webhook id -> its room (the hook's URL names only the id)
    WEBHOOK_ROOMS = "webhook_rooms", Point @ 71;
    // application service id -> the stream position its presence and device list
    // changes were last sent up to (MSC2409, MSC3202)
    APPSERVICE_CURSORS = "appservice_cursors", Point @ 72;
    // (user localpart, app id, pushkey, sequence) -> a push waiting for that pusher's
    // gateway (sequence: twice the event's stream position; odd for count updates)
    PUSH_QUEUE = "push_queue", Scan @ 73;
    // (user localpart, email address) -> when the address was last mailed and up to
    // which notification, and its unsubscribe token
    EMAIL_NOTIFY_STATE = "email_notify_state", Point @ 74;
    // unsubscribe token -> (user localpart, email address)
    EMAIL_UNSUBSCRIBE = "email_unsubscribe", Point @ 75;
    // report id -> a user's report of an event, a room or a user, for the moderators
    REPORTS = "reports", Scan @ 76;
    // room id -> the admin who blocked it: no user of this server joins or is invited
    BLOCKED_ROOMS = "blocked_rooms", Point @ 77;
    // delete id -> a room deletion an admin asked for and how far it got
    ROOM_DELETIONS = "room_deletions", Scan @ 78;
    // user localpart -> (): shadow-banned accounts, read into memory (every send asks)
    SHADOW_BANS = "shadow_bans", Scan @ 79;
    // (day since the epoch, metric) -> that day's count (messages sent, received, read)
    ANALYTICS_DAILY = "analytics_daily", Scan @ 80;
    // (day since the epoch, user localpart) -> (): the user was active that day
    USER_ACTIVE_DAYS = "user_active_days", Scan @ 81;
    // (day since the epoch, room id) -> messages in the room that day
    ROOM_ACTIVITY_DAILY = "room_activity_daily", Scan @ 82;
    // delay id -> a delayed event (MSC4140): waiting to be posted, or how it finished
    DELAYED_EVENTS = "delayed_events", Scan @ 83;
    // (user id, delay id) -> (): a user's delayed events
    DELAYED_BY_USER = "delayed_by_user", Scan @ 84;
    // (room id, call id) -> a call: who rang, who answered, when it started and ended
    CALLS = "calls", Scan @ 85;
    // (user id, started ms, room id, call id) -> (): the calls a user took part in
    CALLS_BY_USER = "calls_by_user", Scan @ 86;
    // (room id, group call id) -> the key of its session running now
    CALLS_RUNNING = "calls_running", Point @ 87;
    // (server name, media id, room id, stream position) -> (): an event that refers to
    // this server's media, so that purging expired messages deletes media nothing else uses
    MEDIA_EVENT_USES = "media_event_uses", Scan @ 88;
}

/// The column families the catalog uses, each once, with the access that tunes it.
pub fn families() -> Vec<(&'static str, Access)> {
    let mut out: Vec<(&'static str, Access)> = Vec::new();
    for t in ALL {
        if !out.iter().any(|(f, _)| *f == t.family) {
            out.push((t.family, t.access));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_leave_room_for_an_end_bound() {
        let mut seen = std::collections::HashSet::new();
        for t in ALL {
            match t.tag {
                Some(tag) => {
                    assert!(seen.insert(tag), "tag {tag} used twice");
                    // A scan to the end of a tagged table stops before `tag + 1`.
                    assert!(tag < u8::MAX, "{}", t.name);
                    assert_eq!(t.family, shared_family(t.access), "{}", t.name);
                }
                None => assert_eq!(t.family, t.name),
            }
        }
    }

    #[test]
    fn own_families_do_not_collide_with_shared_ones_or_each_other() {
        let own: Vec<_> = ALL.iter().filter(|t| t.tag.is_none()).map(|t| t.name).collect();
        for name in &own {
            assert_ne!(*name, SHARED_POINT);
            assert_ne!(*name, SHARED_SCAN);
        }
        let unique: std::collections::HashSet<_> = ALL.iter().map(|t| t.name).collect();
        assert_eq!(unique.len(), ALL.len());
        assert!(families().len() < 10, "{:?}", families());
    }
}
