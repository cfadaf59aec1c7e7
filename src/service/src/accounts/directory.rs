//! The user directory: finding users by id or display name. A prefix index of the words
//! of each user's localpart and display name keeps searches off full scans.

use std::collections::{BTreeSet, HashSet};

use ruma::{OwnedUserId, UserId, events::room::member::MembershipState};

use trellis_core::Result;
use trellis_store::{Batch, Db, Direction, KeyCodec, KeyRange};

use crate::{
    Services,
    tables::{PROFILES, USER_DIRECTORY},
};

/// Candidates examined per search at most, whatever the directory size.
const MAX_CANDIDATES: usize = 1000;

pub struct UserDirectory {
    db: Db,
    search_all_users: bool,
}

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryEntry {
    pub localpart: String,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
}

/// The words a user can be found by: the whole localpart, its parts, and the words of
/// the display name, lowercased.
pub fn words(localpart: &str, display_name: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.insert(localpart.to_lowercase());
    for text in [Some(localpart), display_name].into_iter().flatten() {
        for w in text.split(|c: char| !c.is_alphanumeric()) {
            if !w.is_empty() {
                out.insert(w.to_lowercase());
            }
        }
    }
    out
}

/// Indexes a new account (it has no display name yet).
pub fn index_new_user(batch: &mut Batch, localpart: &str) {
    for w in words(localpart, None) {
        USER_DIRECTORY.put(batch, &(w, localpart.to_owned()), &());
    }
}

/// Re-indexes a user whose display name changes from `old` to `new`.
pub fn rename(batch: &mut Batch, localpart: &str, old: Option<&str>, new: Option<&str>) {
    let before = words(localpart, old);
    let after = words(localpart, new);
    for w in before.difference(&after) {
        USER_DIRECTORY.delete(batch, &(w.clone(), localpart.to_owned()));
    }
    for w in after.difference(&before) {
        USER_DIRECTORY.put(batch, &(w.clone(), localpart.to_owned()), &());
    }
}

/// Drops a user from the index (deactivation).
pub fn remove_user(batch: &mut Batch, localpart: &str, display_name: Option<&str>) {
    for w in words(localpart, display_name) {
        USER_DIRECTORY.delete(batch, &(w, localpart.to_owned()));
    }
}

impl UserDirectory {
    pub fn new(db: Db, search_all_users: bool) -> Self {
        Self { db, search_all_users }
    }

    /// Users matching every term of `search` (each a prefix of one of their words) that
    /// `is_visible` allows, at most `limit`; the flag says whether more were cut off.
    pub fn search(
        &self,
        search: &str,
        limit: usize,
        is_visible: impl Fn(&str) -> Result<bool>,
    ) -> Result<(Vec<DirectoryEntry>, bool)> {
        let terms: Vec<String> = search
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
            .map(str::to_lowercase)
            .collect();
        let Some(first) = terms.iter().max_by_key(|t| t.len()) else {
            return Ok((Vec::new(), false));
        };

        // Candidates: users with a word starting with the longest term. Strings that are
        // not last in a key are stored unescaped unless they contain NUL, so the raw
        // term is a byte prefix of the matching keys.
        let mut candidates = BTreeSet::new();
        let range = KeyRange::prefix(first.as_bytes().to_vec());
        for entry in
            self.db.scan(USER_DIRECTORY.def, range, Direction::Forward)?.take(MAX_CANDIDATES)
        {
            let (key, _) = entry?;
            let (_, localpart) = <(String, String)>::from_key(&key)?;
            candidates.insert(localpart);
        }

        let mut results = Vec::new();
        let mut limited = false;
        for localpart in candidates {
            let display_name = PROFILES
                .get(&*self.db, &(localpart.clone(), "displayname".to_owned()))?
                .and_then(|j| j.0.as_str().map(str::to_owned));
            let user_words = words(&localpart, display_name.as_deref());
            let all_match =
                terms.iter().all(|t| user_words.iter().any(|w| w.starts_with(t.as_str())));
            if !all_match || !(self.search_all_users || is_visible(&localpart)?) {
                continue;
            }
            if results.len() == limit {
                limited = true;
                break;
            }
            let avatar_url = PROFILES
                .get(&*self.db, &(localpart.clone(), "avatar_url".to_owned()))?
                .and_then(|j| j.0.as_str().map(str::to_owned));
            results.push(DirectoryEntry { localpart, display_name, avatar_url });
        }
        Ok((results, limited))
    }
}

/// `POST /user_directory/search`: the users `searcher` may find matching `term`, at most
/// `limit`, and whether more were cut off. Findable (unless the server lets everyone find
/// everyone): the searcher, whoever is joined to a room the searcher is joined to, and the
/// members of rooms published in the room directory.
pub fn search_users(
    services: &Services,
    searcher: &UserId,
    term: &str,
    limit: usize,
) -> Result<(Vec<(OwnedUserId, DirectoryEntry)>, bool)> {
    let mut visible = HashSet::from([searcher.to_string()]);
    if !services.directory.search_all_users {
        let mut rooms = services.rooms.rooms_of(searcher.as_str(), &MembershipState::Join)?;
        rooms.extend(services.public_rooms.published()?);
        rooms.sort();
        rooms.dedup();
        for room in rooms {
            visible.extend(services.rooms.members(&room, &MembershipState::Join)?);
        }
    }
    let accounts = &services.accounts;
    let (hits, limited) = services
        .directory
        .search(term, limit, |localpart| Ok(visible.contains(&accounts.user_id(localpart))))?;
    let hits = hits
        .into_iter()
        .filter_map(|hit| {
            Some((OwnedUserId::try_from(accounts.user_id(&hit.localpart)).ok()?, hit))
        })
        .collect();
    Ok((hits, limited))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_of_ids_and_names() {
        let w = words("alice.smith", Some("Alice Smith-Jones"));
        for expected in ["alice.smith", "alice", "smith", "jones"] {
            assert!(w.contains(expected), "{expected} in {w:?}");
        }
    }
}
