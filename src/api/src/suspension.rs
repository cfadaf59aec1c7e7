//! What a suspended account may not do (spec v1.18's recommended set): join or knock,
//! invite or accept invites, create rooms, send messages and state, change its profile.
//! It keeps reading, leaving, redacting its own events through `/send`, keys, backups,
//! devices and logging out. Checked once where requests enter, like guest access.

use http::Method;

/// Whether a suspended account is refused `method` on `path` (the request's own path).
pub fn forbids(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    let has = |name: &str| segments.contains(&name);
    let last = segments.last().copied().unwrap_or_default();
    match *method {
        Method::POST => {
            matches!(last, "join" | "invite" | "createRoom")
                || (segments.len() >= 2 && matches!(segments[segments.len() - 2], "join" | "knock"))
        }
        Method::PUT => {
            let sending = segments
                .iter()
                .position(|s| *s == "send")
                .and_then(|i| segments.get(i + 1))
                .is_some_and(|kind| *kind != "m.room.redaction");
            sending || has("state") || has("profile")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_reads_and_leaving_are_not() {
        let refused = [
            (Method::POST, "/_matrix/client/v3/join/%23town:example.org"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:x/join"),
            (Method::POST, "/_matrix/client/v3/knock/!r:x"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:x/invite"),
            (Method::POST, "/_matrix/client/v3/createRoom"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:x/state/m.room.topic/"),
            (Method::PUT, "/_matrix/client/v3/profile/@a:x/displayname"),
        ];
        for (method, path) in refused {
            assert!(forbids(&method, path), "{method} {path}");
        }
        let allowed = [
            (Method::GET, "/_matrix/client/v3/sync"),
            (Method::GET, "/_matrix/client/v3/rooms/!r:x/messages"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:x/leave"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:x/send/m.room.redaction/t2"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:x/redact/$e/t3"),
            (Method::POST, "/_matrix/client/v3/keys/upload"),
            (Method::PUT, "/_matrix/client/v3/room_keys/keys"),
            (Method::POST, "/_matrix/client/v3/logout"),
            (Method::GET, "/_matrix/client/v3/profile/@a:x/displayname"),
        ];
        for (method, path) in allowed {
            assert!(!forbids(&method, path), "{method} {path}");
        }
    }
}
