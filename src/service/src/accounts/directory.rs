//! The user directory: finding users by id or display name. A prefix index of the words
//! of each user's localpart and display name keeps searches off full scans.

use std::collections::{BTreeSet, HashSet};

use ruma::{OwnedUserId, UserId, events::room::member::MembershipState};

use trellis_core::Result;
use trellis_store::{Batch, Db, Direction, Json, KeyCodec, KeyRange};

use crate::{
    Services,
    tables::{PROFILES, USER_DIRECTORY, USERS},
};

const META: trellis_store::Table<String, u64> =
    trellis_store::Table::new(&trellis_store::catalog::META);

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

/// The words a user can be found by: the whole localpart, and the words of the localpart
/// and display name as search splits text (Unicode word boundaries in any script,
/// lowercased, Latin accents folded). In scripts written without spaces a name's later
/// characters start words too, so `小明` finds `王小明`.
pub fn words(localpart: &str, display_name: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.insert(localpart.to_lowercase());
    let mut analyzers = trellis_search::analysis::Analyzers::new(&[]);
    for text in [Some(localpart), display_name].into_iter().flatten() {
        for word in analyzers.words(text, None) {
            let word = word.plain;
            if trellis_search::analysis::unspaced_script(&word) {
                let chars: Vec<(usize, char)> = word.char_indices().collect();
                for &(at, _) in chars.iter().skip(1) {
                    out.insert(word[at..].to_owned());
                }
            }
            // Unicode keeps `alice.smith` one word; its parts are names too.
            for part in word.split(|c: char| !c.is_alphanumeric()).filter(|p| !p.is_empty()) {
                out.insert(part.to_owned());
            }
            out.insert(word);
        }
    }
    out
}

/// The words of a search: the same analysis as [`words`].
fn search_terms(search: &str) -> Vec<String> {
    let mut analyzers = trellis_search::analysis::Analyzers::new(&[]);
    analyzers.words(search, None).into_iter().map(|w| w.plain).collect()
}

/// Bumped when [`words`] changes: the index is rebuilt once at start-up.
const WORDS_VERSION: u64 = 2;
const WORDS_VERSION_KEY: &str = "user_directory_words";

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
    pub fn new(db: Db, search_all_users: bool) -> Result<Self> {
        let directory = Self { db, search_all_users };
        directory.rebuild_if_outdated()?;
        Ok(directory)
    }

    /// Re-indexes every user when the index was built by another version of [`words`].
    fn rebuild_if_outdated(&self) -> Result<()> {
        let key = WORDS_VERSION_KEY.to_owned();
        if META.get(&*self.db, &key)? == Some(WORDS_VERSION) {
            return Ok(());
        }
        self.rebuild().map(drop)
    }

    /// Re-indexes every user (an admin's background job, or a new version of [`words`]);
    /// returns how many users it indexed.
    pub fn rebuild(&self) -> Result<u64> {
        let key = WORDS_VERSION_KEY.to_owned();
        let mut batch = Batch::new();
        for row in USER_DIRECTORY.scan_prefix(&*self.db, &(), Direction::Forward)? {
            let (entry, ()) = row?;
            USER_DIRECTORY.delete(&mut batch, &entry);
        }
        let mut users = 0;
        for row in USERS.scan_prefix(&*self.db, &(), Direction::Forward)? {
            let (localpart, Json(record)) = row?;
            if record.deactivated {
                continue;
            }
            let display_name = PROFILES
                .get(&*self.db, &(localpart.clone(), "displayname".to_owned()))?
                .and_then(|j| j.0.as_str().map(str::to_owned));
            for w in words(&localpart, display_name.as_deref()) {
                USER_DIRECTORY.put(&mut batch, &(w, localpart.clone()), &());
            }
            users += 1;
        }
        META.put(&mut batch, &key, &WORDS_VERSION);
        self.db.write(batch)?;
        tracing::info!(users, "user directory re-indexed");
        Ok(users)
    }

    /// Users matching every term of `search` (each a prefix of one of their words) that
    /// `is_visible` allows, at most `limit`; the flag says whether more were cut off.
    pub fn search(
        &self,
        search: &str,
        limit: usize,
        is_visible: impl Fn(&str) -> Result<bool>,
    ) -> Result<(Vec<DirectoryEntry>, bool)> {
        let terms = search_terms(search);
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
            if !all_match || !is_visible(&localpart)? {
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
    // The searcher is not among the results: they are looking for someone else.
    let mut visible = HashSet::new();
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
    let me = searcher.as_str();
    let (hits, limited) = services.directory.search(term, limit, |localpart| {
        let user_id = accounts.user_id(localpart);
        Ok(user_id != me && (services.directory.search_all_users || visible.contains(&user_id)))
    })?;
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
        let w = words("wang", Some("王小明 José"));
        for expected in ["王", "小明", "明", "jose"] {
            assert!(w.contains(expected), "{expected} in {w:?}");
        }
    }
}
