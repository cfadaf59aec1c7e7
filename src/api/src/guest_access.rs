//! Which authenticated endpoints a guest account may use: those the spec's guest access
//! module lists, and the ones a client needs to run a guest session at all (filters,
//! push rules, receipts, typing, presence), as other servers allow them. Every other
//! endpoint that takes an access token answers a guest 403 `M_GUEST_ACCESS_FORBIDDEN`.

use http::Method;

/// Endpoints by method and path after `/_matrix/client/{version}/`.
const ALLOWED: &[(Method, &str)] = &[
    // Reading rooms.
    (Method::GET, "sync"),
    (Method::GET, "events"),
    (Method::GET, "rooms/{room_id}/state"),
    (Method::GET, "rooms/{room_id}/state/{event_type}/{state_key}"),
    (Method::GET, "rooms/{room_id}/context/{event_id}"),
    (Method::GET, "rooms/{room_id}/event/{event_id}"),
    (Method::GET, "rooms/{room_id}/messages"),
    (Method::GET, "rooms/{room_id}/members"),
    (Method::GET, "rooms/{room_id}/joined_members"),
    (Method::GET, "rooms/{room_id}/initialSync"),
    (Method::GET, "rooms/{room_id}/relations/{event_id}"),
    (Method::GET, "rooms/{room_id}/relations/{event_id}/{rel_type}"),
    (Method::GET, "rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}"),
    (Method::GET, "joined_rooms"),
    // Taking part.
    (Method::POST, "rooms/{room_id}/join"),
    (Method::POST, "join/{room_id_or_alias}"),
    (Method::POST, "rooms/{room_id}/leave"),
    (Method::PUT, "rooms/{room_id}/send/{event_type}/{txn_id}"),
    (Method::PUT, "rooms/{room_id}/state/{event_type}/{state_key}"),
    (Method::PUT, "rooms/{room_id}/typing/{user_id}"),
    (Method::POST, "rooms/{room_id}/receipt/{receipt_type}/{event_id}"),
    (Method::POST, "rooms/{room_id}/read_markers"),
    (Method::PUT, "sendToDevice/{event_type}/{txn_id}"),
    (Method::GET, "voip/turnServer"),
    // Their own account; the profile handler keeps guests to the display name.
    (Method::PUT, "profile/{user_id}/displayname"),
    (Method::DELETE, "profile/{user_id}/displayname"),
    (Method::PUT, "profile/{user_id}/{field}"),
    (Method::DELETE, "profile/{user_id}/{field}"),
    (Method::GET, "devices"),
    (Method::GET, "devices/{device_id}"),
    (Method::PUT, "devices/{device_id}"),
    (Method::GET, "account/whoami"),
    (Method::POST, "logout"),
    (Method::GET, "capabilities"),
    (Method::POST, "user/{user_id}/filter"),
    (Method::GET, "user/{user_id}/filter/{filter_id}"),
    (Method::GET, "pushrules/"),
    (Method::GET, "pushrules/global/"),
    (Method::GET, "presence/{user_id}/status"),
    (Method::PUT, "presence/{user_id}/status"),
    (Method::GET, "user/{user_id}/account_data/{event_type}"),
    (Method::PUT, "user/{user_id}/account_data/{event_type}"),
    // End-to-end encryption.
    (Method::POST, "keys/upload"),
    (Method::POST, "keys/query"),
    (Method::POST, "keys/claim"),
    (Method::GET, "keys/changes"),
];

/// Whether a guest may call `method` on client-server endpoint `path` (a route
/// template such as `/_matrix/client/v3/rooms/{room_id}/state`).
pub fn allows(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/_matrix/client/") else { return false };
    let Some((_version, endpoint)) = rest.split_once('/') else { return false };
    ALLOWED.iter().any(|(m, p)| m == method && *p == endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_version_prefix_matches_and_other_endpoints_do_not() {
        assert!(allows(&Method::GET, "/_matrix/client/v3/sync"));
        assert!(allows(&Method::GET, "/_matrix/client/r0/sync"));
        assert!(allows(
            &Method::PUT,
            "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}"
        ));
        assert!(!allows(&Method::POST, "/_matrix/client/v3/createRoom"));
        assert!(!allows(&Method::POST, "/_matrix/client/v3/rooms/{room_id}/invite"));
        assert!(!allows(&Method::POST, "/_matrix/client/v3/sync"));
        assert!(!allows(&Method::GET, "/_matrix/media/v3/config"));
    }
}
