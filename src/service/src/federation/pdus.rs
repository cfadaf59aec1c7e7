//! The first checks on a PDU from another server: that it is canonical JSON of an
//! allowed size, signed by every server that must sign it (with keys valid when it was
//! sent), and that its content hash matches (else it is redacted, as the spec says).

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    signatures::{PublicKeyMap, Verified, required_server_signatures_to_verify_event},
};
use serde_json::Value;
use trellis_core::{Error, Result};

use super::Federation;
use crate::rooms::{Pdu, builder::MAX_PDU_BYTES};

impl Federation {
    /// Checks a received PDU's format, signatures and hashes for its room version; the
    /// event (redacted if its content hash did not match) and its reference hash.
    pub async fn verify_pdu(
        &self,
        rules: &RoomVersionRules,
        value: &Value,
    ) -> Result<(Pdu, String)> {
        let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_PDU_BYTES {
            return Err(Error::too_large("The event exceeds 65536 bytes"));
        }
        let mut object: CanonicalJsonObject = serde_json::from_value(value.clone())
            .map_err(|e| Error::bad_json(format!("The event is not canonical JSON: {e}")))?;
        // What the sender put in `unsigned` is not covered by its signature.
        object.remove("unsigned");
        let servers = required_server_signatures_to_verify_event(&object, &rules.signatures)
            .map_err(|e| Error::bad_json(format!("Bad event: {e}")))?;
        let ts = match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(i)) => u64::try_from(i64::from(*i)).unwrap_or(0),
            _ => return Err(Error::bad_json("The event lacks origin_server_ts")),
        };
        let Some(CanonicalJsonValue::Object(signatures)) = object.get("signatures") else {
            return Err(Error::forbidden("The event is not signed"));
        };
        let mut keys = PublicKeyMap::new();
        for server in &servers {
            let Some(CanonicalJsonValue::Object(by_key)) = signatures.get(server.as_str()) else {
                return Err(Error::forbidden(format!("The event lacks a signature of {server}")));
            };
            for key_id in by_key.keys().filter(|k| k.starts_with("ed25519:")) {
                if let Some(key) = self.verify_key(server.as_str(), key_id, ts).await?
                    && let Ok(key) = ruma::serde::Base64::parse(key)
                {
                    keys.entry(server.to_string()).or_default().insert(key_id.clone(), key);
                }
            }
        }
        match ruma::signatures::verify_event(&keys, &object, rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => {
                tracing::info!("content hash mismatch: redacting a received event");
                object = ruma::canonical_json::redact(object, &rules.redaction, None)
                    .map_err(|e| Error::bad_json(format!("Bad event: {e}")))?;
            }
            Err(e) => return Err(Error::forbidden(format!("Bad event signature: {e}"))),
        }
        let reference_hash = ruma::signatures::reference_hash(&object, rules)
            .map_err(|e| Error::bad_json(format!("Bad event: {e}")))?;
        let event_id = match rules.event_id_format {
            EventIdFormatVersion::V1 => match object.get("event_id") {
                Some(CanonicalJsonValue::String(id)) => OwnedEventId::try_from(id.as_str())
                    .map_err(|e| Error::bad_json(format!("Bad event id: {e}")))?,
                _ => return Err(Error::bad_json("The event lacks its event_id")),
            },
            _ => {
                // Later versions derive the id; a sender-supplied one means nothing.
                object.remove("event_id");
                ruma::EventId::new_v2_or_v3(&reference_hash)
                    .map_err(|e| Error::internal("event id", e))?
            }
        };
        Ok((Pdu::from_json(event_id, object)?, reference_hash))
    }

    /// [`Self::verify_pdu`] for many events; the ones that fail are logged and left out.
    pub async fn verify_pdus(
        &self,
        rules: &RoomVersionRules,
        values: Vec<Value>,
    ) -> Vec<(Pdu, String)> {
        let mut out = Vec::with_capacity(values.len());
        for value in values {
            match self.verify_pdu(rules, &value).await {
                Ok(checked) => out.push(checked),
                Err(e) => tracing::info!(error = %e, "dropping a received event"),
            }
        }
        out
    }
}

/// The events listed under `field` of another server's answer.
pub fn pdus_in(answer: &Value, field: &str) -> Vec<Value> {
    answer.get(field).and_then(Value::as_array).cloned().unwrap_or_default()
}
