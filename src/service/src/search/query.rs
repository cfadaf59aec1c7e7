//! `POST /search`'s `room_events`: the index finds candidates in the rooms the user is
//! in, then the same visibility decision as every read path keeps only what the user
//! may see of each room's history (and nothing from users they ignore).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ops::Bound::{Excluded, Unbounded},
    sync::Arc,
};

use ruma::{UserId, events::room::member::MembershipState};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_search::{Has, Key, Language, OrderBy, Query};

use crate::{
    Services,
    rooms::{Pdu, viewer::Viewer},
};

/// Most results one page returns, whatever the client asks.
pub const MAX_LIMIT: usize = 100;
/// Most events of context on either side.
const MAX_CONTEXT: usize = 20;
/// Index hits read per round while filling a page (some may be hidden from the user).
const ROUND: usize = 50;
/// Index hits looked at per page at most: a user who may see few of the hits gets a
/// short page and a `next_batch` rather than a long scan.
const MAX_EXAMINED: usize = 2000;

/// A search as `/search` asks it.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub term: String,
    pub keys: Vec<Key>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub senders: Vec<String>,
    pub not_senders: Vec<String>,
    pub types: Vec<String>,
    pub not_types: Vec<String>,
    pub contains_url: Option<bool>,
    pub limit: usize,
    pub order_by: OrderBy,
    /// `event_context`: events before and after, and whether to add profiles.
    pub context: Option<(usize, usize, bool)>,
    pub include_state: bool,
    /// Trellis extension (`org.trellis.filter`): `origin_server_ts` range and `has`.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub has: Vec<Has>,
    pub next_batch: Option<String>,
}

/// Events around a result.
pub struct Around {
    pub before: Vec<Arc<Pdu>>,
    pub after: Vec<Arc<Pdu>>,
    pub start: u64,
    pub end: u64,
    /// Display name and avatar of each sender of the result and its context, as the
    /// room's member events have them.
    pub profiles: Vec<(String, Option<String>, Option<String>)>,
}

pub struct Found {
    pub room_id: String,
    pub position: u64,
    pub pdu: Arc<Pdu>,
    pub rank: f32,
    pub context: Option<Around>,
}

pub struct SearchResults {
    pub results: Vec<Found>,
    /// About how many events match in all (before visibility is applied).
    pub count: usize,
    pub highlights: Vec<String>,
    pub next_batch: Option<String>,
    /// Current state of each room with a result, when `include_state`.
    pub state: Vec<(String, Vec<Pdu>)>,
}

/// Where the next page starts: an offset into ranked hits, or below a stream position
/// for the most recent first.
fn parse_batch(token: &str, order: OrderBy) -> Result<u64> {
    let bad = || Error::invalid_param("Unknown next_batch token");
    let (prefix, number) = token.split_at_checked(1).ok_or_else(bad)?;
    let expected = if order == OrderBy::Rank { "r" } else { "p" };
    if prefix != expected {
        return Err(bad());
    }
    number.parse().map_err(|_| bad())
}

/// The keys left to search once the `types` and `not_types` filters (wildcards allowed)
/// are applied: each key is the text of one event type.
fn keys_of_types(keys: &[Key], types: &[String], not_types: &[String]) -> Vec<Key> {
    let matches = |patterns: &[String], key: &Key| {
        patterns.iter().any(|p| crate::rooms::filter::type_matches(p, key.event_type()))
    };
    keys.iter()
        .filter(|k| types.is_empty() || matches(types, k))
        .filter(|k| !matches(not_types, k))
        .copied()
        .collect()
}

/// Runs `request` for `user_id`.
pub fn search(
    services: &Services,
    user_id: &UserId,
    request: &SearchRequest,
) -> Result<SearchResults> {
    let empty = SearchResults {
        results: Vec::new(),
        count: 0,
        highlights: Vec::new(),
        next_batch: None,
        state: Vec::new(),
    };
    let Some(index) = services.search.index() else { return Ok(empty) };
    let user = user_id.as_str();
    let mut rooms = services.rooms.rooms_of(user, &MembershipState::Join)?;
    if let Some(wanted) = &request.rooms {
        rooms.retain(|r| wanted.contains(r));
    }
    rooms.retain(|r| !request.not_rooms.contains(r));
    let keys = keys_of_types(&request.keys, &request.types, &request.not_types);
    if rooms.is_empty() || keys.is_empty() {
        return Ok(empty);
    }
    let searched: HashSet<String> = rooms.iter().cloned().collect();
    let mut query = Query {
        terms: request.term.clone(),
        keys,
        rooms,
        senders: request.senders.clone(),
        not_senders: request.not_senders.clone(),
        contains_url: request.contains_url,
        has: request.has.clone(),
        since: request.since,
        until: request.until,
        order_by: request.order_by,
        before_position: None,
        offset: 0,
        limit: ROUND,
    };
    match (request.order_by, request.next_batch.as_deref()) {
        (OrderBy::Rank, Some(token)) => {
            query.offset = usize::try_from(parse_batch(token, OrderBy::Rank)?).unwrap_or(usize::MAX)
        }
        (OrderBy::Recent, Some(token)) => {
            query.before_position = Some(parse_batch(token, OrderBy::Recent)?)
        }
        _ => {}
    }

    let localpart = services.accounts.local_part(user).unwrap_or_default();
    let viewer = Viewer::load(services, localpart)?;
    let mut room_views = HashMap::new();
    let limit = request.limit.clamp(1, MAX_LIMIT);
    let mut found: Vec<Found> = Vec::new();
    let mut count = 0;
    let mut examined = 0;
    let mut exhausted = false;
    let mut resume = None;
    'pages: while found.len() < limit && examined < MAX_EXAMINED {
        let page = index.search(&query)?;
        count = count.max(page.count);
        if page.hits.is_empty() {
            exhausted = true;
            break;
        }
        let got = page.hits.len();
        for hit in page.hits {
            examined += 1;
            query.offset += 1;
            query.before_position = Some(hit.position);
            resume = Some(match request.order_by {
                OrderBy::Rank => format!("r{}", query.offset),
                OrderBy::Recent => format!("p{}", hit.position),
            });
            if !searched.contains(&hit.room_id) {
                continue;
            }
            let Some(stored) = services.rooms.cached_event(&hit.event_id)? else { continue };
            if stored.rejected {
                continue;
            }
            let room_view = match room_views.entry(hit.room_id.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(viewer.room(services, &hit.room_id, user)?)
                }
            };
            if !room_view.sees(stored.position, &stored.pdu) {
                continue;
            }
            let pdu = room_view.shown(services, &stored.pdu)?;
            // An erased sender's message is shown redacted to this user: its words
            // must not find it either.
            if !Arc::ptr_eq(&pdu, &stored.pdu) {
                continue;
            }
            found.push(Found {
                room_id: hit.room_id,
                position: stored.position,
                pdu,
                rank: hit.score,
                context: None,
            });
            if found.len() == limit {
                break 'pages;
            }
        }
        if got < ROUND {
            exhausted = true;
            break;
        }
    }
    let next_batch = if exhausted && found.len() < limit { None } else { resume };

    if let Some((before, after, profiles)) = request.context {
        for result in &mut found {
            // Every result's room was looked at while filling the page.
            let Some(room_view) = room_views.get(&result.room_id) else { continue };
            let sees = |pos: u64, pdu: &Pdu| Ok(room_view.sees(pos, pdu));
            result.context = Some(around(
                services,
                result,
                before.min(MAX_CONTEXT),
                after.min(MAX_CONTEXT),
                profiles,
                sees,
            )?);
        }
    }

    let mut highlights: Vec<String> = Vec::new();
    let mut languages: HashMap<String, Language> = HashMap::new();
    for result in &found {
        let language = *languages.entry(result.room_id.clone()).or_insert_with(|| {
            super::room_language(
                &services.rooms,
                &result.room_id,
                services.search.default_language(),
            )
        });
        for text in searchable_texts(&result.pdu) {
            for word in index.highlights(&request.term, &text, language) {
                if !highlights.contains(&word) {
                    highlights.push(word);
                }
            }
        }
    }

    let mut state = Vec::new();
    if request.include_state {
        let rooms: BTreeSet<&str> = found.iter().map(|f| f.room_id.as_str()).collect();
        for room in rooms {
            state.push((room.to_owned(), services.rooms.current_state(room)?));
        }
    }
    Ok(SearchResults { results: found, count, highlights, next_batch, state })
}

/// The texts of an event that search looks in.
fn searchable_texts(pdu: &Pdu) -> Vec<String> {
    let Ok(content) = serde_json::from_str::<Value>(pdu.content.get()) else { return Vec::new() };
    let content = content.get("m.new_content").cloned().unwrap_or(content);
    ["body", "formatted_body", "filename", "name", "topic"]
        .iter()
        .filter_map(|k| content[k].as_str().map(str::to_owned))
        .collect()
}

fn around(
    services: &Services,
    result: &Found,
    before: usize,
    after: usize,
    with_profiles: bool,
    mut sees: impl FnMut(u64, &Pdu) -> Result<bool>,
) -> Result<Around> {
    let rooms = &services.rooms;
    let earlier = rooms.scan_timeline(
        &result.room_id,
        Unbounded,
        Excluded(result.position),
        false,
        before,
        &mut sees,
    )?;
    let later = rooms.scan_timeline(
        &result.room_id,
        Excluded(result.position),
        Unbounded,
        true,
        after,
        &mut sees,
    )?;
    let mut profiles = Vec::new();
    if with_profiles {
        let mut senders: BTreeSet<&str> = BTreeSet::from([result.pdu.sender.as_str()]);
        senders.extend(earlier.events.iter().chain(&later.events).map(|(_, p)| p.sender.as_str()));
        let state = rooms.state_after_event(&result.pdu)?;
        for sender in senders {
            let member =
                rooms.state_event(&state, &ruma::events::StateEventType::RoomMember, sender);
            let content = member
                .and_then(|p| serde_json::from_str::<Value>(p.content.get()).ok())
                .unwrap_or(Value::Null);
            let text = |k: &str| content[k].as_str().map(str::to_owned);
            profiles.push((sender.to_owned(), text("displayname"), text("avatar_url")));
        }
    }
    Ok(Around {
        start: earlier.last.unwrap_or(result.position),
        end: later.last.unwrap_or(result.position) + 1,
        before: earlier.events.into_iter().map(|(_, p)| p).collect(),
        after: later.events.into_iter().map(|(_, p)| p).collect(),
        profiles,
    })
}
