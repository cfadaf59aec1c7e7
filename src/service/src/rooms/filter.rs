//! The spec's room event filters (`types`, `senders`, `contains_url`, ...) applied to
//! stored events; shared by `/messages`, `/context` and `/sync`.

use ruma::api::client::filter::{LazyLoadOptions, RoomEventFilter, UrlFilter};

use super::Pdu;

/// Event type patterns may end in `*`, matching any type with that prefix.
pub fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// Whether the filter asks for lazily loaded members: only the member events of the
/// senders in the answer.
pub fn lazy_members(filter: &RoomEventFilter) -> bool {
    !matches!(filter.lazy_load_options, LazyLoadOptions::Disabled)
}

/// Whether `pdu` of `room_id` passes `filter` (the `not_` lists win over the others).
pub fn passes(filter: &RoomEventFilter, room_id: &str, pdu: &Pdu) -> bool {
    if filter.not_rooms.iter().any(|r| r.as_str() == room_id)
        || filter.rooms.as_ref().is_some_and(|rs| !rs.iter().any(|r| r.as_str() == room_id))
        || filter.not_senders.contains(&pdu.sender)
        || filter.senders.as_ref().is_some_and(|ss| !ss.contains(&pdu.sender))
    {
        return false;
    }
    // The type's text is built only for a filter on types: most filters have none, and
    // this runs for every event a sync or a page reads.
    if !filter.not_types.is_empty() || filter.types.is_some() {
        let kind = pdu.kind.to_string();
        if filter.not_types.iter().any(|t| type_matches(t, &kind))
            || filter.types.as_ref().is_some_and(|ts| !ts.iter().any(|t| type_matches(t, &kind)))
        {
            return false;
        }
    }
    match &filter.url_filter {
        None => true,
        Some(wanted) => {
            let has_url = serde_json::from_str::<serde_json::Value>(pdu.content.get())
                .ok()
                .is_some_and(|c| c.get("url").is_some());
            has_url == (*wanted == UrlFilter::EventsWithUrl)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_prefixes_only_at_the_end() {
        assert!(type_matches("m.room.*", "m.room.message"));
        assert!(type_matches("*", "anything"));
        assert!(type_matches("m.room.message", "m.room.message"));
        assert!(!type_matches("m.room.message", "m.room.messages"));
        assert!(!type_matches("m.room", "m.room.message"));
    }
}
