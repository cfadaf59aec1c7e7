//! Building a local PDU: the fields every room version needs, the content hash and this
//! server's signature, and the event id (and, for a room version 12 create event, the
//! room id) derived as that version's rules say.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, Int, RoomVersionId, ServerName,
    room_version_rules::{
        EventIdFormatVersion, EventsReferenceFormatVersion, RoomIdFormatVersion, RoomVersionRules,
    },
};
use trellis_core::{Error, Result};

use super::Pdu;
use crate::keys::ServerKeys;

/// The largest PDU the spec allows, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;

/// A reference to an earlier event: its id, and its reference hash (needed only by
/// room versions 1 and 2, which embed it).
#[derive(Debug, Clone)]
pub struct EventRef {
    pub event_id: String,
    pub sha256: String,
}

/// What the caller decides about a new event; the builder adds the rest.
#[derive(Debug, Clone)]
pub struct PduTemplate {
    /// `None` only for the create event of a room version whose room id is derived
    /// from it (12 and later).
    pub room_id: Option<String>,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: serde_json::Value,
    /// Top-level `redacts` (room versions before 11 keep it outside the content).
    pub redacts: Option<String>,
    pub prev_events: Vec<EventRef>,
    pub auth_events: Vec<EventRef>,
    pub depth: u64,
    pub origin_server_ts: u64,
}

fn int(v: u64) -> Result<CanonicalJsonValue> {
    Int::try_from(v)
        .map(CanonicalJsonValue::Integer)
        .map_err(|_| Error::bad_json("integer out of range"))
}

fn refs(list: &[EventRef], format: EventsReferenceFormatVersion) -> CanonicalJsonValue {
    CanonicalJsonValue::Array(
        list.iter()
            .map(|r| match format {
                EventsReferenceFormatVersion::V1 => {
                    let mut hashes = CanonicalJsonObject::new();
                    hashes.insert("sha256".into(), CanonicalJsonValue::String(r.sha256.clone()));
                    CanonicalJsonValue::Array(vec![
                        CanonicalJsonValue::String(r.event_id.clone()),
                        CanonicalJsonValue::Object(hashes),
                    ])
                }
                _ => CanonicalJsonValue::String(r.event_id.clone()),
            })
            .collect(),
    )
}

/// Builds, hashes and signs a PDU. Returns the event and its reference hash (which
/// later events of room versions 1 and 2 embed).
pub fn build_pdu(
    keys: &ServerKeys,
    server_name: &ServerName,
    version: &RoomVersionId,
    template: PduTemplate,
) -> Result<(Pdu, String)> {
    let rules: RoomVersionRules = version
        .rules()
        .ok_or_else(|| Error::bad_json(format!("unsupported room version {version}")))?;
    let is_create = template.kind == "m.room.create";
    let content = CanonicalJsonValue::try_from(template.content)
        .map_err(|e| Error::bad_json(format!("content is not canonical JSON: {e}")))?;
    if !matches!(content, CanonicalJsonValue::Object(_)) {
        return Err(Error::bad_json("content must be a JSON object"));
    }

    let mut obj = CanonicalJsonObject::new();
    obj.insert("type".into(), CanonicalJsonValue::String(template.kind));
    obj.insert("sender".into(), CanonicalJsonValue::String(template.sender));
    obj.insert("content".into(), content);
    obj.insert("depth".into(), int(template.depth)?);
    obj.insert("origin_server_ts".into(), int(template.origin_server_ts)?);
    obj.insert("prev_events".into(), refs(&template.prev_events, rules.events_reference_format));
    obj.insert("auth_events".into(), refs(&template.auth_events, rules.events_reference_format));
    if let Some(key) = template.state_key {
        obj.insert("state_key".into(), CanonicalJsonValue::String(key));
    }
    if let Some(redacts) = template.redacts {
        obj.insert("redacts".into(), CanonicalJsonValue::String(redacts));
    }
    match (&template.room_id, rules.room_id_format) {
        (Some(room_id), _) => {
            obj.insert("room_id".into(), CanonicalJsonValue::String(room_id.clone()));
        }
        (None, RoomIdFormatVersion::V2) if is_create => {}
        (None, _) => return Err(Error::bad_json("this event needs a room id")),
    }
    // Room versions 1 and 2 carry a server-chosen event id inside the signed event.
    let v1_event_id = match rules.event_id_format {
        EventIdFormatVersion::V1 => {
            let id = ruma::EventId::new_v1(server_name);
            obj.insert("event_id".into(), CanonicalJsonValue::String(id.to_string()));
            Some(id)
        }
        _ => None,
    };

    ruma::signatures::hash_and_sign_event(
        server_name.as_str(),
        keys.key_pair(),
        &mut obj,
        &rules.redaction,
    )
    .map_err(sign_error)?;
    let size = serde_json::to_vec(&obj).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_PDU_BYTES {
        return Err(Error::too_large("The event exceeds 65536 bytes"));
    }
    let reference_hash = ruma::signatures::reference_hash(&obj, &rules).map_err(sign_error)?;
    let event_id = match v1_event_id {
        Some(id) => id,
        None => ruma::EventId::new_v2_or_v3(&reference_hash)
            .map_err(|e| Error::internal("event id", e))?,
    };
    Ok((Pdu::from_json(event_id, obj)?, reference_hash))
}

fn sign_error(e: ruma::signatures::JsonError) -> Error {
    match e {
        ruma::signatures::JsonError::PduTooLarge => {
            Error::too_large("The event exceeds 65536 bytes")
        }
        other => Error::internal("hashing and signing an event", other),
    }
}

/// The room id a room version 12+ create event defines: `!` and its reference hash.
pub fn room_id_from_create(create: &Pdu) -> String {
    format!("!{}", create.event_id.as_str().trim_start_matches('$'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ruma::{
        RoomVersionId, ServerName,
        events::StateEventType,
        serde::Base64,
        state_res::{Event, check_state_dependent_auth_rules, check_state_independent_auth_rules},
    };
    use serde_json::json;

    use super::*;

    fn keys() -> (tempfile::TempDir, ServerKeys) {
        let dir = tempfile::tempdir().unwrap();
        let keys = ServerKeys::load_or_generate(&dir.path().join("k"), "example.org", 24).unwrap();
        (dir, keys)
    }

    fn template(
        room_id: Option<&str>,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
    ) -> PduTemplate {
        PduTemplate {
            room_id: room_id.map(str::to_owned),
            sender: "@alice:example.org".into(),
            kind: kind.into(),
            state_key: state_key.map(str::to_owned),
            content,
            redacts: None,
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            depth: 1,
            origin_server_ts: 1_700_000_000_000,
        }
    }

    fn verify(keys: &ServerKeys, pdu: &Pdu, version: &RoomVersionId) {
        let mut server = BTreeMap::new();
        server.insert(keys.key_id().to_owned(), Base64::parse(keys.public_key_base64()).unwrap());
        let mut map = BTreeMap::new();
        map.insert("example.org".to_owned(), server);
        let verified =
            ruma::signatures::verify_event(&map, &pdu.json, &version.rules().unwrap()).unwrap();
        assert_eq!(verified, ruma::signatures::Verified::All);
    }

    #[test]
    fn event_ids_follow_each_room_version() {
        let (_d, keys) = keys();
        let server = <&ServerName>::try_from("example.org").unwrap();
        for (version, check) in [
            (RoomVersionId::V1, "v1"),
            (RoomVersionId::V3, "v3"),
            (RoomVersionId::V10, "v4+"),
            (RoomVersionId::V11, "v4+"),
        ] {
            let create = template(
                Some("!room:example.org"),
                "m.room.create",
                Some(""),
                json!({"creator": "@alice:example.org", "room_version": version.as_str()}),
            );
            let (pdu, hash) = build_pdu(&keys, server, &version, create).unwrap();
            let id = pdu.event_id.as_str();
            match check {
                "v1" => assert!(id.ends_with(":example.org"), "{id}"),
                "v3" => assert_eq!(id, format!("${hash}")),
                _ => {
                    assert_eq!(id, format!("${hash}"));
                    assert!(!id.contains('+') && !id.contains('/'), "URL-safe base64: {id}");
                }
            }
            verify(&keys, &pdu, &version);
        }
    }

    #[test]
    fn v12_create_defines_the_room_id_and_passes_auth() {
        let (_d, keys) = keys();
        let server = <&ServerName>::try_from("example.org").unwrap();
        let version = RoomVersionId::V12;
        let rules = version.rules().unwrap();
        let create = template(None, "m.room.create", Some(""), json!({"room_version": "12"}));
        let (create, _) = build_pdu(&keys, server, &version, create).unwrap();
        assert!(create.room_id().is_none());
        let room_id = room_id_from_create(&create);
        assert!(room_id.starts_with('!') && room_id.len() > 40);
        verify(&keys, &create, &version);

        let fetch = |_: &ruma::EventId| None::<Pdu>;
        check_state_independent_auth_rules(&rules.authorization, &create, fetch).unwrap();

        // The creator's join passes against the state with only the create event.
        let mut join = template(
            Some(&room_id),
            "m.room.member",
            Some("@alice:example.org"),
            json!({"membership": "join"}),
        );
        join.prev_events =
            vec![EventRef { event_id: create.event_id.to_string(), sha256: String::new() }];
        join.depth = 2;
        let (join, _) = build_pdu(&keys, server, &version, join).unwrap();
        let state = |kind: &StateEventType, key: &str| {
            (*kind == StateEventType::RoomCreate && key.is_empty()).then(|| create.clone())
        };
        check_state_dependent_auth_rules(&rules.authorization, &join, state).unwrap();

        // A stranger's message does not.
        let mut msg = template(
            Some(&room_id),
            "m.room.message",
            None,
            json!({"body": "hi", "msgtype": "m.text"}),
        );
        msg.sender = "@mallory:example.org".into();
        msg.prev_events =
            vec![EventRef { event_id: join.event_id.to_string(), sha256: String::new() }];
        let (msg, _) = build_pdu(&keys, server, &version, msg).unwrap();
        assert!(check_state_dependent_auth_rules(&rules.authorization, &msg, state).is_err());
    }

    #[test]
    fn v1_references_embed_hashes_and_parse_back() {
        let (_d, keys) = keys();
        let server = <&ServerName>::try_from("example.org").unwrap();
        let mut t =
            template(Some("!room:example.org"), "m.room.message", None, json!({"body": "x"}));
        t.prev_events =
            vec![EventRef { event_id: "$abc:example.org".into(), sha256: "aGFzaA".into() }];
        let (pdu, _) = build_pdu(&keys, server, &RoomVersionId::V1, t).unwrap();
        assert_eq!(pdu.prev_events[0].as_str(), "$abc:example.org");
        let raw = serde_json::to_value(&*pdu.json).unwrap();
        assert_eq!(raw["prev_events"][0][1]["sha256"], "aGFzaA");
    }

    #[test]
    fn oversize_and_malformed_events_are_errors() {
        let (_d, keys) = keys();
        let server = <&ServerName>::try_from("example.org").unwrap();
        let big = template(
            Some("!r:example.org"),
            "m.room.message",
            None,
            json!({"body": "x".repeat(70_000)}),
        );
        let err = build_pdu(&keys, server, &RoomVersionId::V11, big).unwrap_err();
        assert_eq!(err.errcode, "M_TOO_LARGE");
        let not_object = template(Some("!r:example.org"), "m.room.message", None, json!([1]));
        assert!(build_pdu(&keys, server, &RoomVersionId::V11, not_object).is_err());
        let float = template(Some("!r:example.org"), "m.room.message", None, json!({"x": 1.5}));
        assert!(
            build_pdu(&keys, server, &RoomVersionId::V11, float).is_err(),
            "floats are not canonical JSON"
        );
        let no_room = template(None, "m.room.message", None, json!({}));
        assert!(build_pdu(&keys, server, &RoomVersionId::V11, no_room).is_err());
    }
}
