//! What a participant may change of itself (`UpdateParticipantMetadata`, allowed by its
//! token's `canUpdateOwnMetadata`): its name, its metadata and its attributes, within
//! bounds, as LiveKit's server applies such an update.

use std::collections::HashMap;

use livekit_protocol as lk;
use lk::request_response::Reason;

/// The longest name, in bytes.
const NAME_MAX: usize = 256;
/// The most metadata, and the most attributes (keys and values together), in bytes.
const METADATA_MAX: usize = 64 * 1024;
const ATTRIBUTES_MAX: usize = 64 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub metadata: String,
    pub attributes: HashMap<String, String>,
}

impl Profile {
    /// Applies `update`: a name or metadata given replaces the old one (empty: left as
    /// it is, since clients send what they do not change as empty), attributes are
    /// merged, an empty value removing its key. Answers whether anything changed, or
    /// why the update was refused (then nothing changed).
    pub fn apply(
        &mut self,
        update: &lk::UpdateParticipantMetadata,
    ) -> Result<bool, (Reason, &'static str)> {
        if update.name.len() > NAME_MAX {
            return Err((Reason::LimitExceeded, "the name is too long"));
        }
        if update.metadata.len() > METADATA_MAX {
            return Err((Reason::LimitExceeded, "the metadata is too large"));
        }
        let mut next = self.clone();
        if !update.name.is_empty() {
            next.name.clone_from(&update.name);
        }
        if !update.metadata.is_empty() {
            next.metadata.clone_from(&update.metadata);
        }
        for (key, value) in &update.attributes {
            if value.is_empty() {
                next.attributes.remove(key);
            } else {
                next.attributes.insert(key.clone(), value.clone());
            }
        }
        let size: usize = next.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > ATTRIBUTES_MAX {
            return Err((Reason::LimitExceeded, "the attributes are too large"));
        }
        let changed = next != *self;
        *self = next;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(
        name: &str,
        metadata: &str,
        attributes: &[(&str, &str)],
    ) -> lk::UpdateParticipantMetadata {
        lk::UpdateParticipantMetadata {
            name: name.into(),
            metadata: metadata.into(),
            attributes: attributes.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            request_id: 1,
        }
    }

    #[test]
    fn names_metadata_and_attributes_change_as_livekit_applies_them() {
        let mut p = Profile { name: "Alice".into(), ..Default::default() };
        assert_eq!(p.apply(&update("", "{\"hand\":true}", &[("a", "1"), ("b", "2")])), Ok(true));
        assert_eq!(p.name, "Alice", "an empty name is no change");
        assert_eq!(p.metadata, "{\"hand\":true}");
        // Attributes merge; an empty value removes its key.
        assert_eq!(p.apply(&update("Alice B.", "", &[("a", ""), ("c", "3")])), Ok(true));
        assert_eq!(p.name, "Alice B.");
        assert_eq!(p.metadata, "{\"hand\":true}", "empty metadata is no change");
        let mut keys: Vec<_> = p.attributes.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["b", "c"]);
        // The same again changes nothing (no update goes out).
        assert_eq!(p.apply(&update("Alice B.", "", &[("c", "3")])), Ok(false));
    }

    #[test]
    fn oversized_updates_are_refused_whole() {
        let mut p = Profile::default();
        let long = "x".repeat(NAME_MAX + 1);
        assert_eq!(p.apply(&update(&long, "m", &[])).map_err(|e| e.0), Err(Reason::LimitExceeded));
        let big = "x".repeat(ATTRIBUTES_MAX);
        assert_eq!(
            p.apply(&update("", "m", &[("k", &big)])).map_err(|e| e.0),
            Err(Reason::LimitExceeded)
        );
        assert_eq!(p, Profile::default(), "nothing of a refused update is kept");
    }
}
