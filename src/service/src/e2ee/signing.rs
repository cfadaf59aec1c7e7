//! Checking the ed25519 signatures clients put on their keys: a signature covers the
//! canonical JSON of the object without `signatures` and `unsigned`.

use base64::{
    Engine as _,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, SigningKeyAlgorithm};
use serde_json::Value;

/// Keys and signatures are unpadded base64, but some clients pad them.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    LENIENT.decode(text).ok()
}

/// The signature `signer` made with `key_id` (`ed25519:...`) on `object`, if any.
pub fn signature<'a>(object: &'a Value, signer: &str, key_id: &str) -> Option<&'a str> {
    object.get("signatures")?.get(signer)?.get(key_id)?.as_str()
}

/// Whether `object` carries a valid signature by `signer` with `key_id`, made with the
/// ed25519 public key `public_key` (base64).
pub fn verify(object: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(sig) = signature(object, signer, key_id) else { return false };
    verify_signature(object, sig, public_key)
}

/// Whether `sig` (base64) is a valid ed25519 signature of `object` by `public_key`.
pub fn verify_signature(object: &Value, sig: &str, public_key: &str) -> bool {
    let (Some(sig), Some(key)) = (decode_base64(sig), decode_base64(public_key)) else {
        return false;
    };
    let Ok(CanonicalJsonValue::Object(canonical)) = CanonicalJsonValue::try_from(object.clone())
    else {
        return false;
    };
    let Ok(bytes) = signed_bytes(&canonical) else { return false };
    ruma::signatures::verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        &key,
        &sig,
        bytes.as_bytes(),
    )
    .is_ok()
}

fn signed_bytes(object: &CanonicalJsonObject) -> Result<String, ruma::signatures::JsonError> {
    ruma::signatures::to_canonical_json_string_for_signing(object)
}

/// The single ed25519 key of a cross-signing key object: `(key id, public key)`.
pub fn cross_signing_key(object: &Value) -> Option<(String, String)> {
    let keys = object.get("keys")?.as_object()?;
    if keys.len() != 1 {
        return None;
    }
    let (id, key) = keys.iter().next()?;
    let public = id.strip_prefix("ed25519:")?;
    let key = key.as_str()?;
    (public == key).then(|| (id.clone(), key.to_owned()))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::json;

    use super::*;

    fn sign(key: &SigningKey, object: &Value) -> String {
        let CanonicalJsonValue::Object(canonical) =
            CanonicalJsonValue::try_from(object.clone()).unwrap()
        else {
            panic!("not an object")
        };
        let bytes = signed_bytes(&canonical).unwrap();
        base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(key.sign(bytes.as_bytes()).to_bytes())
    }

    #[test]
    fn signatures_cover_everything_but_signatures_and_unsigned() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.verifying_key().to_bytes());
        let mut object = json!({"user_id": "@a:x", "keys": {"ed25519:D": public}});
        let sig = sign(&key, &object);
        object["signatures"] = json!({"@a:x": {"ed25519:D": sig}});
        object["unsigned"] = json!({"device_display_name": "phone"});
        assert!(verify(&object, "@a:x", "ed25519:D", &public));
        // Tampering with a signed field breaks it; a missing signature is not valid.
        object["user_id"] = json!("@b:x");
        assert!(!verify(&object, "@a:x", "ed25519:D", &public));
        assert!(!verify(&object, "@b:x", "ed25519:D", &public));
        // Garbage keys and signatures are just invalid.
        assert!(!verify_signature(&object, "!!", &public));
        assert!(!verify_signature(&object, &sig, "short"));
    }

    #[test]
    fn a_cross_signing_key_has_exactly_one_self_named_key() {
        assert_eq!(
            cross_signing_key(&json!({"keys": {"ed25519:abc": "abc"}})),
            Some(("ed25519:abc".into(), "abc".into()))
        );
        assert_eq!(cross_signing_key(&json!({"keys": {"ed25519:abc": "xyz"}})), None);
        assert_eq!(cross_signing_key(&json!({"keys": {"ed25519:a": "a", "ed25519:b": "b"}})), None);
        assert_eq!(cross_signing_key(&json!({"keys": {}})), None);
    }
}
