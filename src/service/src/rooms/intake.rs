//! Events from other servers. A PDU whose signatures and hashes the federation layer has
//! checked goes through the checks on receipt: authorization against its own auth
//! events, against the state before it (resolved from its `prev_events` when the DAG
//! forks), and soft failure against the room's current state. Events are stored as
//! accepted, rejected or soft-failed; forks are merged by state resolution. Outliers
//! (auth chains and state fetched to fill gaps or to join) are stored without a place
//! in the timeline.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    EventId, OwnedEventId, RoomVersionId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    state_res::{StateMap, check_state_dependent_auth_rules, check_state_independent_auth_rules},
};
use serde_json::Value;
use trellis_core::{Error, ErrorKind, Result};
use trellis_store::{Batch, Direction, Json};

use super::{
    Pdu, Rooms,
    append::{Placement, Timeline},
    reads::{EVENTS, StoredEvent, TIMELINE},
    resolve::{resolve_states, soft_fail},
    short::{Kind, state_key_text},
    state::StateSet,
};
use crate::commit;

/// Events an auth chain walk visits at most (see `resolve::MAX_AUTH_CHAIN_EVENTS`).
const MAX_CHAIN: usize = 100_000;

/// An accepted event not yet durable nor visible: hand it to [`Timeline::finish_all`].
#[must_use]
pub struct Deferred(super::append::Pending);

/// What became of a received event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    Accepted,
    /// Kept in the DAG, hidden from clients (it fails against the current state).
    SoftFailed,
    Rejected(String),
    /// Already stored.
    Known,
}

impl Timeline {
    /// The auth events of `pdu` as a state map, looked up in the store and in `extra`;
    /// `None` when one is missing.
    fn auth_state(
        &self,
        rules: &RoomVersionRules,
        pdu: &Pdu,
        extra: &HashMap<OwnedEventId, Pdu>,
    ) -> Option<HashMap<(StateEventType, String), Pdu>> {
        let mut state = HashMap::new();
        // From room version 12 the create event is not listed: the room id names it.
        let create = create_event_id(rules, pdu);
        for id in pdu.auth_events.iter().chain(create.iter()) {
            let event = extra.get(id).cloned().or_else(|| self.rooms.stored_pdu(id))?;
            if event.rejected {
                continue;
            }
            let key = event.state_key.clone().unwrap_or_default();
            state.insert((StateEventType::from(event.kind.to_string()), key), event);
        }
        Some(state)
    }

    /// The first two checks on receipt: the room version's state-independent rules and
    /// the rules against the event's own auth events.
    fn check_auth_events(
        &self,
        rules: &RoomVersionRules,
        pdu: &Pdu,
        extra: &HashMap<OwnedEventId, Pdu>,
    ) -> std::result::Result<(), String> {
        let fetch = |id: &EventId| extra.get(id).cloned().or_else(|| self.rooms.stored_pdu(id));
        check_state_independent_auth_rules(&rules.authorization, pdu, fetch)?;
        if pdu.kind == TimelineEventType::RoomCreate {
            return Ok(());
        }
        let state = self.auth_state(rules, pdu, extra).ok_or("missing auth events")?;
        check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |t: &StateEventType, k: &str| state.get(&(t.clone(), k.to_owned())).cloned(),
        )
    }

    /// Stored events as a snapshot state (events this server lacks are left out).
    fn state_set<'a>(
        &self,
        batch: &mut Batch,
        ids: impl IntoIterator<Item = &'a EventId>,
    ) -> Result<StateSet> {
        let mut set = StateSet::new();
        for id in ids {
            let Some(short) = self.rooms.short.get(Kind::Event, id.as_str())? else { continue };
            let Some(event) = self.rooms.cached(short)? else { continue };
            let Some(key) = &event.pdu.state_key else { continue };
            if event.rejected {
                continue;
            }
            let text = state_key_text(&event.pdu.kind.to_string(), key);
            set.insert(self.rooms.short.get_or_create(batch, Kind::StateKey, &text)?, short);
        }
        Ok(set)
    }

    /// The state after a stored timeline event; `None` for outliers, whose state this
    /// server does not know.
    fn state_after(&self, short: u64) -> Result<Option<StateSet>> {
        let Some(Json(stored)) = EVENTS.get(&*self.rooms.db, &short)? else { return Ok(None) };
        if stored.state_before == 0 {
            return Ok(None);
        }
        let mut state = (*self.rooms.state_at(stored.state_before)?).clone();
        if !stored.rejected
            && let Some(key) = stored.json.get("state_key").and_then(Value::as_str)
            && let Some(kind) = stored.json.get("type").and_then(Value::as_str)
            && let Some(sk) = self.rooms.short.get(Kind::StateKey, &state_key_text(kind, key))?
        {
            state.insert(sk, short);
        }
        Ok(Some(state))
    }

    /// Resolves several states into one, as the room version says.
    fn resolve(&self, rules: &RoomVersionRules, states: Vec<StateSet>) -> Result<StateSet> {
        let mut distinct: Vec<StateSet> = Vec::new();
        for state in states {
            if !distinct.contains(&state) {
                distinct.push(state);
            }
        }
        if distinct.len() <= 1 {
            return Ok(distinct.pop().unwrap_or_default());
        }
        let maps = distinct.iter().map(|s| self.rooms.state_map(s)).collect::<Result<Vec<_>>>()?;
        let resolved = resolve_states(rules, &maps, |id| self.rooms.stored_pdu(id))?;
        let mut batch = Batch::new();
        // State keys of resolved events all exist already (they came from stored
        // states), so nothing is written.
        self.state_set(&mut batch, resolved.values().map(|id| &**id))
    }

    /// Saves a resolved current state of a room against its previous one, and brings
    /// the membership indexes in line with it.
    pub(super) fn save_resolved_state(
        &self,
        batch: &mut Batch,
        room_short: u64,
        current: &StateSet,
    ) -> Result<u64> {
        let room = self.rooms.room_by_short(room_short)?;
        let previous = match &room {
            Some(r) => Some((r.state, self.rooms.state_at(r.state)?)),
            None => None,
        };
        let id = self.rooms.snapshots.save(
            batch,
            previous.as_ref().map(|(i, s)| (*i, &**s)),
            current,
        )?;
        self.rooms.states.insert(id, Arc::new(current.clone()));
        let old = previous.map(|(_, s)| s).unwrap_or_default();
        for (sk, ev) in current {
            if old.get(sk) == Some(ev) {
                continue;
            }
            let Some(event) = self.rooms.cached(*ev)? else { continue };
            if event.pdu.kind != TimelineEventType::RoomMember {
                continue;
            }
            let Some(user) = &event.pdu.state_key else { continue };
            let content: Value = serde_json::from_str(event.pdu.content.get()).unwrap_or_default();
            let membership = content["membership"].as_str().unwrap_or("leave").to_owned();
            self.rooms.index_membership(batch, room_short, user, &membership);
        }
        Ok(id)
    }

    /// Stores an event that takes no place in the timeline: rejected, soft-failed, or an
    /// outlier (`state_before` 0).
    fn store_hidden(
        &self,
        batch: &mut Batch,
        room_short: u64,
        pdu: &Pdu,
        reference_hash: &str,
        rejected: bool,
        soft_failed: bool,
    ) -> Result<()> {
        let short = self.rooms.short.get_or_create(batch, Kind::Event, pdu.event_id.as_str())?;
        let json =
            serde_json::to_value(&*pdu.json).map_err(|e| Error::internal("event json", e))?;
        EVENTS.put(
            batch,
            &short,
            &Json(StoredEvent {
                event_id: pdu.event_id.to_string(),
                room: room_short,
                json,
                reference_hash: reference_hash.to_owned(),
                position: 0,
                state_before: 0,
                rejected,
                soft_failed,
                transaction: None,
            }),
        );
        Ok(())
    }

    /// Stores events fetched to fill in a room (auth chains, state) as outliers, each
    /// checked against its own auth events, auth events first. Events whose auth events
    /// are nowhere to be found are left out. Returns how many were stored as accepted.
    pub async fn store_outliers(
        &self,
        room_id: &str,
        version: &RoomVersionId,
        events: Vec<(Pdu, String)>,
    ) -> Result<usize> {
        let rules = version.rules().ok_or_else(|| Error::bad_json("unsupported room version"))?;
        let mut batch = Batch::new();
        let room_short = self.rooms.short.get_or_create(&mut batch, Kind::Room, room_id)?;
        let mut remaining = Vec::new();
        for (pdu, hash) in events {
            if !self.rooms.is_known(pdu.event_id.as_str())? {
                remaining.push((pdu, hash));
            }
        }
        // Auth events come before the events they authorize (lower depth, the create
        // event first), so one pass usually stores everything.
        remaining.sort_by_key(|(pdu, _)| (pdu.kind != TimelineEventType::RoomCreate, pdu.depth));
        let mut done: HashMap<OwnedEventId, Pdu> = HashMap::new();
        let mut accepted = 0;
        // Each pass stores the events whose auth events are all known; a chain of n
        // events needs at most n passes.
        loop {
            let before = remaining.len();
            let mut next = Vec::new();
            for (mut pdu, hash) in remaining {
                let implied = create_event_id(&rules, &pdu);
                let ready = pdu.auth_events.iter().chain(implied.iter()).all(|id| {
                    done.contains_key(id) || self.rooms.is_known(id.as_str()).unwrap_or(false)
                });
                if !ready {
                    next.push((pdu, hash));
                    continue;
                }
                let verdict = self.check_auth_events(&rules, &pdu, &done);
                if let Err(reason) = &verdict {
                    tracing::info!(event_id = %pdu.event_id, %reason, "rejecting outlier");
                } else {
                    accepted += 1;
                }
                pdu.rejected = verdict.is_err();
                self.store_hidden(&mut batch, room_short, &pdu, &hash, pdu.rejected, false)?;
                done.insert(pdu.event_id.clone(), pdu);
            }
            remaining = next;
            if remaining.is_empty() || remaining.len() == before {
                break;
            }
        }
        if !remaining.is_empty() {
            tracing::info!(room_id, left_out = remaining.len(), "outliers without auth events");
        }
        commit(&self.rooms.db, batch).await?;
        Ok(accepted)
    }

    /// The checks on receipt of a PDU into a room this server is in, then storage.
    /// `state_before`, when given, is the state before the event as another server
    /// reported it (used when its `prev_events` could not be fetched).
    pub async fn accept_remote(
        &self,
        room_id: &str,
        pdu: Pdu,
        reference_hash: String,
        state_before: Option<Vec<OwnedEventId>>,
    ) -> Result<Intake> {
        let (intake, pending) =
            self.accept_remote_deferred(room_id, pdu, reference_hash, state_before).await?;
        if let Some(pending) = pending {
            self.finish(pending.0).await?;
        }
        Ok(intake)
    }

    /// [`Self::accept_remote`], leaving an accepted event's durability to the caller
    /// ([`Self::finish_all`]): the events of one transaction then share one sync.
    pub async fn accept_remote_deferred(
        &self,
        room_id: &str,
        mut pdu: Pdu,
        reference_hash: String,
        state_before: Option<Vec<OwnedEventId>>,
    ) -> Result<(Intake, Option<Deferred>)> {
        let lock = self.room_lock(room_id);
        let guard = lock.lock().await;
        if self.rooms.is_known(pdu.event_id.as_str())? {
            return Ok((Intake::Known, None));
        }
        let (room_short, room) =
            self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let (version, rules) = room.rules()?;
        let mut batch = Batch::new();
        let reject = |batch: &mut Batch, pdu: &mut Pdu, reason: String| -> Result<Intake> {
            tracing::info!(event_id = %pdu.event_id, %reason, "rejecting event");
            pdu.rejected = true;
            self.store_hidden(batch, room_short, pdu, &reference_hash, true, false)?;
            Ok(Intake::Rejected(reason))
        };
        if let Err(reason) = self.check_auth_events(&rules, &pdu, &HashMap::new()) {
            let outcome = reject(&mut batch, &mut pdu, reason)?;
            commit(&self.rooms.db, batch).await?;
            return Ok((outcome, None));
        }

        let before = match state_before {
            Some(ids) => self.state_set(&mut batch, ids.iter().map(|id| &**id))?,
            None => {
                let mut states = Vec::new();
                for prev in &pdu.prev_events {
                    if let Some(short) = self.rooms.short.get(Kind::Event, prev.as_str())?
                        && let Some(state) = self.state_after(short)?
                    {
                        states.push(state);
                    }
                }
                if states.is_empty() {
                    return Err(Error::not_found("None of the event's prev_events are known"));
                }
                self.resolve(&rules, states)?
            }
        };
        let state_fn = |t: &StateEventType, k: &str| self.rooms.state_event(&before, t, k);
        if let Err(reason) = check_state_dependent_auth_rules(&rules.authorization, &pdu, state_fn)
        {
            let outcome = reject(&mut batch, &mut pdu, reason)?;
            commit(&self.rooms.db, batch).await?;
            return Ok((outcome, None));
        }
        let current = self.rooms.state_at(room.state)?;
        if soft_fail(&rules, &pdu, |t, k| {
            self.rooms.state_event(&current, t, k).map(|p| (*p).clone())
        }) {
            self.store_hidden(&mut batch, room_short, &pdu, &reference_hash, false, true)?;
            commit(&self.rooms.db, batch).await?;
            return Ok((Intake::SoftFailed, None));
        }

        let event_short =
            self.rooms.short.get_or_create(&mut batch, Kind::Event, pdu.event_id.as_str())?;
        let mut prevs = HashSet::new();
        for prev in &pdu.prev_events {
            if let Some(short) = self.rooms.short.get(Kind::Event, prev.as_str())? {
                prevs.insert(short);
            }
        }
        let mut extremities: Vec<u64> =
            room.extremities.iter().copied().filter(|e| !prevs.contains(e)).collect();
        // The room's state follows the event alone when it extends every extremity;
        // otherwise the branches are resolved together.
        let resolved_current = if extremities.is_empty() {
            None
        } else {
            let mut states = Vec::new();
            for ext in &extremities {
                if let Some(state) = self.state_after(*ext)? {
                    states.push(state);
                }
            }
            let mut after = before.clone();
            if let Some(key) = &pdu.state_key {
                let text = state_key_text(&pdu.kind.to_string(), key);
                after.insert(
                    self.rooms.short.get_or_create(&mut batch, Kind::StateKey, &text)?,
                    event_short,
                );
            }
            states.push(after);
            // The new event's own state key may have just been allocated; it resolves to
            // itself only if it wins, which `resolve` reads back from the event cache.
            Some(self.resolve_with(&rules, states, &pdu)?)
        };
        extremities.push(event_short);

        let before_id = if before == *current {
            room.state
        } else {
            let id =
                self.rooms.snapshots.save(&mut batch, Some((room.state, &current)), &before)?;
            self.rooms.states.insert(id, Arc::new(before.clone()));
            id
        };
        let mut redacted = None;
        if let Some(target) = pdu.redacts.clone().or_else(|| redacts_in_content(&pdu)) {
            match self.redact_into(&mut batch, room_short, target.as_str(), &pdu, &rules, &before) {
                Ok(short) => redacted = Some(short),
                Err(e) => tracing::debug!(error = %e, "remote redaction not applied"),
            }
        }
        let mut pending = self.store(
            &mut batch,
            room_short,
            room_id,
            &version,
            &pdu,
            reference_hash,
            before_id,
            Some((before_id, &before)),
            room.max_depth,
            Placement::Remote { extremities, current: resolved_current },
        )?;
        // After the write, so that no reader caches the unredacted copy again.
        if let Some(short) = redacted {
            self.rooms.cache.invalidate(&short);
        }
        drop(guard);
        self.run_pipeline(room_id, &mut pending).await;
        Ok((Intake::Accepted, Some(Deferred(pending))))
    }

    /// Makes deferred events durable (one sync for all) and visible.
    pub async fn finish_all(&self, deferred: Vec<Deferred>) -> Result<()> {
        let mut result = Ok(());
        for d in deferred {
            // Every one must be retired, whatever happens to the others.
            if let Err(e) = self.finish(d.0).await {
                result = Err(e);
            }
        }
        result
    }

    /// [`Self::resolve`], where `pdu` (not stored yet) may be one of the states' events.
    fn resolve_with(
        &self,
        rules: &RoomVersionRules,
        states: Vec<StateSet>,
        pdu: &Pdu,
    ) -> Result<StateSet> {
        let maps =
            states.iter().map(|s| self.state_map_with(s, pdu)).collect::<Result<Vec<_>>>()?;
        let resolved = resolve_states(rules, &maps, |id| {
            if *id == *pdu.event_id { Some(pdu.clone()) } else { self.rooms.stored_pdu(id) }
        })?;
        let mut set = StateSet::new();
        for ((kind, key), id) in resolved {
            let text = state_key_text(&kind.to_string(), &key);
            let (Some(sk), Some(ev)) = (
                self.rooms.short.get(Kind::StateKey, &text)?,
                self.rooms.short.get(Kind::Event, id.as_str())?,
            ) else {
                continue;
            };
            set.insert(sk, ev);
        }
        Ok(set)
    }

    fn state_map_with(&self, set: &StateSet, pdu: &Pdu) -> Result<StateMap<OwnedEventId>> {
        let mut map = self.rooms.state_map(set)?;
        let own = self.rooms.short.get(Kind::Event, pdu.event_id.as_str())?;
        if let Some(key) = &pdu.state_key
            && own.is_some_and(|own| set.values().any(|v| *v == own))
        {
            map.insert(
                (StateEventType::from(pdu.kind.to_string()), key.clone()),
                pdu.event_id.clone(),
            );
        }
        Ok(map)
    }

    /// Creates this server's copy of a room joined through another server: `state` (the
    /// state before the join, already stored as outliers) becomes the room's state and
    /// the join event its first timeline event. A room this server already has takes the
    /// join as any other received event.
    pub async fn import_room(
        &self,
        room_id: &str,
        version: &RoomVersionId,
        state: Vec<OwnedEventId>,
        join: Pdu,
        reference_hash: String,
    ) -> Result<Intake> {
        if self.rooms.room(room_id)?.is_some() {
            return self.accept_remote(room_id, join, reference_hash, Some(state)).await;
        }
        let rules = version.rules().ok_or_else(|| Error::bad_json("unsupported room version"))?;
        let lock = self.room_lock(room_id);
        let guard = lock.lock().await;
        let mut batch = Batch::new();
        let room_short = self.rooms.short.get_or_create(&mut batch, Kind::Room, room_id)?;
        let set = self.state_set(&mut batch, state.iter().map(|id| &**id))?;
        if set.is_empty() {
            return Err(Error::bad_json("The room's state is empty"));
        }
        let state_fn = |t: &StateEventType, k: &str| self.rooms.state_event(&set, t, k);
        check_state_dependent_auth_rules(&rules.authorization, &join, state_fn)
            .map_err(|e| Error::forbidden(format!("The join event fails authorization: {e}")))?;
        // The state must be stored before the join can be layered on it.
        let before_id = self.rooms.snapshots.save(&mut batch, None, &set)?;
        self.rooms.states.insert(before_id, Arc::new(set.clone()));
        if let Some(event) =
            self.rooms.state_event(&set, &StateEventType::RoomHistoryVisibility, "")
        {
            let content: Value = serde_json::from_str(event.content.get()).unwrap_or_default();
            let visibility = content["history_visibility"].as_str().unwrap_or("shared");
            self.rooms.log_imported_visibility(&mut batch, room_short, visibility);
        }
        for ev in set.values() {
            if let Some(event) = self.rooms.cached(*ev)?
                && event.pdu.kind == TimelineEventType::RoomMember
                && let Some(user) = &event.pdu.state_key
            {
                let content: Value =
                    serde_json::from_str(event.pdu.content.get()).unwrap_or_default();
                let membership = content["membership"].as_str().unwrap_or("leave");
                self.rooms.index_membership(&mut batch, room_short, user, membership);
            }
        }
        let written = commit(&self.rooms.db, batch).await;
        self.rooms.memberships_written();
        written?;
        let mut batch = Batch::new();
        let pending = self.store(
            &mut batch,
            room_short,
            room_id,
            version,
            &join,
            reference_hash,
            before_id,
            Some((before_id, &set)),
            join.depth.saturating_sub(1),
            Placement::Head,
        )?;
        drop(guard);
        self.publish(room_id, pending).await?;
        Ok(Intake::Accepted)
    }

    /// Gives events fetched from another server's history (already stored as outliers
    /// by [`Self::store_outliers`]) places in the timeline before `below`, newest first,
    /// so that paginating backwards reaches them. Returns how many were placed.
    pub async fn place_backfilled(
        &self,
        room_id: &str,
        newest_first: &[OwnedEventId],
        below: u64,
    ) -> Result<usize> {
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        let Some(room_short) = self.rooms.short.get(Kind::Room, room_id)? else { return Ok(0) };
        let mut batch = Batch::new();
        let mut position = below;
        let mut placed = Vec::new();
        for id in newest_first {
            let Some(short) = self.rooms.short.get(Kind::Event, id.as_str())? else { continue };
            let Some(Json(mut stored)) = EVENTS.get(&*self.rooms.db, &short)? else { continue };
            if stored.rejected || stored.position != 0 || stored.room != room_short || position <= 1
            {
                continue;
            }
            position -= 1;
            stored.position = position;
            let Some(pdu) = self.rooms.pdu_by_short(short)? else { continue };
            let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or_default();
            self.rooms.log_event(&mut batch, room_short, short, position, &pdu, &content);
            TIMELINE.put(&mut batch, &(room_short, position), &short);
            EVENTS.put(&mut batch, &short, &Json(stored));
            placed.push(short);
        }
        let written = commit(&self.rooms.db, batch).await;
        // Backfilled members and visibility changes went into the logs.
        self.rooms.memberships_written();
        written?;
        for short in &placed {
            self.rooms.cache.invalidate(short);
        }
        Ok(placed.len())
    }
}

/// What federation reads of a room's DAG.
impl Rooms {
    /// Whether an event is stored (accepted, rejected, soft-failed or outlier).
    pub fn is_known(&self, event_id: &str) -> Result<bool> {
        let Some(short) = self.short.get(Kind::Event, event_id)? else { return Ok(false) };
        Ok(self.cached(short)?.is_some())
    }

    /// A stored event with its rejection flag, for authorization and resolution.
    pub(super) fn stored_pdu(&self, id: &EventId) -> Option<Pdu> {
        let short = self.short.get(Kind::Event, id.as_str()).ok()??;
        self.cached(short).ok()?.map(|e| (*e.pdu).clone())
    }

    /// The `prev_events` of `pdu` this server does not have in the timeline.
    pub fn missing_prev_events(&self, pdu: &Pdu) -> Result<Vec<OwnedEventId>> {
        let mut missing = Vec::new();
        for prev in &pdu.prev_events {
            let placed = match self.short.get(Kind::Event, prev.as_str())? {
                Some(short) => self.cached(short)?.is_some_and(|e| e.position > 0),
                None => false,
            };
            if !placed {
                missing.push(prev.clone());
            }
        }
        Ok(missing)
    }

    /// A snapshot's state as `(type, state_key) -> event id`.
    pub(super) fn state_map(&self, set: &StateSet) -> Result<StateMap<OwnedEventId>> {
        let mut map = StateMap::new();
        for &ev in set.values() {
            let Some(event) = self.cached(ev)? else { continue };
            let Some(key) = &event.pdu.state_key else { continue };
            map.insert(
                (StateEventType::from(event.pdu.kind.to_string()), key.clone()),
                event.pdu.event_id.clone(),
            );
        }
        Ok(map)
    }

    /// The oldest event of a room's timeline here, with its position.
    pub fn oldest_event(&self, room_id: &str) -> Result<Option<(u64, Pdu)>> {
        let Some(room) = self.short.get(Kind::Room, room_id)? else { return Ok(None) };
        let first =
            TIMELINE.scan_prefix(&*self.db, &room, Direction::Forward)?.next().transpose()?;
        let Some(((_, position), short)) = first else { return Ok(None) };
        Ok(self.pdu_by_short(short)?.map(|pdu| (position, pdu)))
    }

    /// The state before a stored timeline event, as event ids.
    pub fn state_ids_before(&self, event_id: &str) -> Result<Option<Vec<OwnedEventId>>> {
        let Some(short) = self.short.get(Kind::Event, event_id)? else { return Ok(None) };
        let Some(Json(stored)) = EVENTS.get(&*self.db, &short)? else { return Ok(None) };
        if stored.state_before == 0 {
            return Ok(None);
        }
        let state = self.state_at(stored.state_before)?;
        let mut ids = Vec::with_capacity(state.len());
        for ev in state.values() {
            if let Some(event) = self.cached(*ev)? {
                ids.push(event.pdu.event_id.clone());
            }
        }
        Ok(Some(ids))
    }

    /// The full auth chain of `roots` (not including the roots), as stored events.
    pub fn auth_chain(&self, roots: &[OwnedEventId]) -> Result<Vec<Pdu>> {
        let mut seen: HashSet<OwnedEventId> = roots.iter().cloned().collect();
        let mut stack: Vec<OwnedEventId> = Vec::new();
        for root in roots {
            if let Some(pdu) = self.stored_pdu(root) {
                stack.extend(pdu.auth_events.iter().cloned());
            }
        }
        let mut chain = Vec::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if chain.len() >= MAX_CHAIN {
                return Err(Error::internal("auth chain", "too long"));
            }
            let Some(pdu) = self.stored_pdu(&id) else { continue };
            stack.extend(pdu.auth_events.iter().cloned());
            chain.push(pdu);
        }
        Ok(chain)
    }

    /// A stored event of `room_id` (accepted, outlier or soft-failed; not rejected), for
    /// other servers.
    pub fn pdu_for_federation(&self, room_id: &str, event_id: &str) -> Result<Option<Pdu>> {
        let Some(short) = self.short.get(Kind::Event, event_id)? else { return Ok(None) };
        let Some(event) = self.cached(short)? else { return Ok(None) };
        let in_room = event.pdu.room_id.as_ref().is_some_and(|r| r.as_str() == room_id)
            || self.short.get(Kind::Room, room_id)? == Some(event.room);
        if !in_room || event.rejected {
            return Ok(None);
        }
        // Between expiry and the purge, an expired message leaves as the purge will
        // leave it: redacted, still a valid link of the DAG.
        if Self::is_expired(&event.pdu, self.expired_before(room_id)?)
            && let Some((_, record)) = self.room(room_id)?
        {
            let (_, rules) = record.rules()?;
            return Ok(Some(
                (*super::erasure::redacted_copy(&event.pdu, &rules.redaction)?).clone(),
            ));
        }
        Ok(Some((*event.pdu).clone()))
    }

    /// The forward extremities of a room, as event ids.
    pub fn extremities(&self, room_id: &str) -> Result<Vec<OwnedEventId>> {
        let Some((_, room)) = self.room(room_id)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for short in &room.extremities {
            if let Some(event) = self.cached(*short)? {
                out.push(event.pdu.event_id.clone());
            }
        }
        Ok(out)
    }
}

/// The create event a room version 12+ event implies (its room id is the create
/// event's id); `None` for earlier versions and for the create event itself.
fn create_event_id(rules: &RoomVersionRules, pdu: &Pdu) -> Option<OwnedEventId> {
    if !rules.authorization.room_create_event_id_as_room_id
        || pdu.kind == TimelineEventType::RoomCreate
    {
        return None;
    }
    let room_id = pdu.room_id.as_ref()?;
    OwnedEventId::try_from(format!("${}", room_id.as_str().trim_start_matches('!'))).ok()
}

/// `content.redacts` of a room version 11+ redaction.
fn redacts_in_content(pdu: &Pdu) -> Option<OwnedEventId> {
    if pdu.kind != TimelineEventType::RoomRedaction {
        return None;
    }
    let content: Value = serde_json::from_str(pdu.content.get()).ok()?;
    OwnedEventId::try_from(content["redacts"].as_str()?).ok()
}

impl Timeline {
    /// The unsigned membership event another server asks for (`make_join`,
    /// `make_leave`, `make_knock`) so its user can sign it: built on the current state
    /// and checked against it first. For a restricted room a local member able to invite
    /// vouches for the join (`join_authorised_via_users_server`).
    pub fn member_template(
        &self,
        room_id: &str,
        user_id: &str,
        membership: &str,
    ) -> Result<(RoomVersionId, Value)> {
        let (_, room) =
            self.rooms.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let (version, rules) = room.rules()?;
        let state = self.rooms.state_at(room.state)?;
        let mut content = serde_json::json!({ "membership": membership });
        if membership == "join"
            && let Some(authoriser) = self.join_authoriser(room_id, &state, &rules, user_id)?
        {
            content["join_authorised_via_users_server"] = Value::String(authoriser);
        }
        let event = super::append::NewEvent {
            kind: "m.room.member".into(),
            sender: user_id.to_owned(),
            state_key: Some(user_id.to_owned()),
            content,
            txn: None,
            redacts: None,
            origin_server_ts: None,
        };
        let template = self.template(room_id, &room, &rules, &state, event)?;
        let (pdu, _) = super::build_pdu(&self.keys, &self.rooms.server_name, &version, template)?;
        let state_fn = |t: &StateEventType, k: &str| self.rooms.state_event(&state, t, k);
        check_state_dependent_auth_rules(&rules.authorization, &pdu, state_fn)
            .map_err(Error::forbidden)?;
        let mut json = (*pdu.json).clone();
        json.remove("signatures");
        json.remove("hashes");
        let value = serde_json::to_value(json).map_err(|e| Error::internal("template", e))?;
        Ok((version, value))
    }

    /// For a join to a restricted room by someone neither joined nor invited: a local
    /// member who may invite, if the user is in one of the rooms the join rule allows.
    fn join_authoriser(
        &self,
        room_id: &str,
        state: &StateSet,
        rules: &RoomVersionRules,
        user_id: &str,
    ) -> Result<Option<String>> {
        let Some(rule) = self.rooms.state_event(state, &StateEventType::RoomJoinRules, "") else {
            return Ok(None);
        };
        let content: Value = serde_json::from_str(rule.content.get()).unwrap_or_default();
        let restricted =
            matches!(content["join_rule"].as_str(), Some("restricted" | "knock_restricted"));
        if !restricted
            || matches!(
                self.rooms.membership(room_id, user_id)?.as_ref().map(MembershipState::as_str),
                Some("join" | "invite")
            )
        {
            return Ok(None);
        }
        let allowed = content["allow"].as_array().into_iter().flatten().any(|a| {
            a["type"] == "m.room_membership"
                && a["room_id"].as_str().is_some_and(|r| {
                    self.rooms.membership(r, user_id).ok().flatten() == Some(MembershipState::Join)
                })
        });
        if !allowed {
            return Err(Error::new(
                ErrorKind::BadRequest,
                trellis_core::error::code::UNABLE_TO_AUTHORISE_JOIN,
                "The user is in none of the rooms the join rule allows",
            ));
        }
        let suffix = format!(":{}", self.rooms.server_name);
        for member in self.rooms.members(room_id, &MembershipState::Join)? {
            if !member.ends_with(&suffix) {
                continue;
            }
            let power = self.rooms.power_in(state, rules, &member);
            if power.level >= power.levels["invite"].as_i64().unwrap_or(0) {
                return Ok(Some(member));
            }
        }
        Err(Error::new(
            ErrorKind::BadRequest,
            trellis_core::error::code::UNABLE_TO_GRANT_JOIN,
            "No member of this server may let the user in",
        ))
    }
}
