//! Server ACLs (`m.room.server_acl`): which servers may take part in a room over
//! federation. Checked on everything another server sends about a room and on joins.

use serde_json::Value;
use trellis_core::Result;

use crate::{Services, rooms::Rooms};

/// Whether the room's ACL lets `server` take part (no ACL: everyone).
pub fn allows(services: &Services, room_id: &str, server: &str) -> Result<bool> {
    Ok(room_acl(&services.rooms, room_id)?.is_none_or(|acl| acl_allows(&acl, server)))
}

/// The content of the room's current ACL, if it has one.
pub fn room_acl(rooms: &Rooms, room_id: &str) -> Result<Option<Value>> {
    let acl = rooms.state_of(room_id, "m.room.server_acl", "")?;
    Ok(acl.map(|acl| serde_json::from_str(acl.content.get()).unwrap_or(Value::Null)))
}

/// The spec's evaluation: IP literals first, then deny, then allow (empty allow: none).
pub fn acl_allows(content: &Value, server: &str) -> bool {
    let host = super::discovery::split_server_name(server).map_or(server, |(h, _)| h);
    let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    if is_ip && !content["allow_ip_literals"].as_bool().unwrap_or(true) {
        return false;
    }
    let list = |field: &str| -> Vec<String> {
        content[field]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    if list("deny").iter().any(|g| glob(g, host)) {
        return false;
    }
    list("allow").iter().any(|g| glob(g, host))
}

/// `*` (any run) and `?` (one character) glob matching, case-insensitive.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn deny_wins_over_allow_and_ip_literals_can_be_refused() {
        let acl = json!({"allow": ["*"], "deny": ["*.evil.example", "bad?.org"], "allow_ip_literals": false});
        assert!(acl_allows(&acl, "good.example"));
        assert!(acl_allows(&acl, "good.example:8448"));
        assert!(!acl_allows(&acl, "a.evil.example"));
        assert!(!acl_allows(&acl, "bad1.org"));
        assert!(acl_allows(&acl, "bad12.org"));
        assert!(!acl_allows(&acl, "127.0.0.1:8448"));
        assert!(!acl_allows(&acl, "[::1]:8448"));
        assert!(!acl_allows(&json!({"deny": []}), "any.example"), "empty allow allows none");
        assert!(acl_allows(&json!({"allow": ["*.Example"]}), "x.example"));
    }
}
