//! Call history, read from the signalling that passes through rooms (a pipeline step):
//! a 1:1 call from its `m.call.invite`, `m.call.answer` and `m.call.hangup` or
//! `m.call.reject`; a MatrixRTC group call (Element Call) from its members' call-member
//! state, a session lasting from the first member joining to the last one leaving.
//! Users read their own calls (`/_trellis/client/v1/calls`), admins all of them.
//!
//! Group calls on the built-in SFU add what the SFU saw of their media (`media`): the
//! token service notes which Matrix room each SFU room belongs to, and when the SFU room
//! closes its figures go to that room's group call (the running one, else the latest).
//!
//! Signalling sent encrypted (1:1 calls in encrypted rooms) is invisible to the server
//! and so are those calls; call-member state is never encrypted. A member whose client
//! vanished without its "left" state (and without a delayed one) stays in the call
//! until its state changes: `expires` is not read.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Direction, Json, Table, catalog};

use crate::pipeline::{Appended, Consumer};

/// (room id, call key) -> the call
const CALLS: Table<(String, String), Json<Call>> = Table::new(&catalog::CALLS);
/// (user id, started ms, room id, call key) -> (): the calls a local user took part in
const CALLS_BY_USER: Table<(String, u64, String, String), ()> = Table::new(&catalog::CALLS_BY_USER);
/// (room id, group call id) -> the key of the group call session running now
const CALLS_RUNNING: Table<(String, String), String> = Table::new(&catalog::CALLS_RUNNING);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    /// A 1:1 call (`m.call.*`).
    Direct,
    /// A MatrixRTC group call.
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    pub kind: CallKind,
    pub room_id: String,
    pub call_id: String,
    /// Who rang (1:1) or joined first (group).
    pub caller: String,
    pub started_ts: u64,
    pub answered_ts: Option<u64>,
    pub ended_ts: Option<u64>,
    /// Everyone who answered or joined, in order.
    pub participants: Vec<String>,
    /// Whether video was offered (1:1: an `m=video` line in the offer; group: the
    /// intent members gave).
    pub video: bool,
    /// `hangup`, `reject`, `invite_timeout`, ... as the signalling said.
    pub end_reason: Option<String>,
    /// Group calls: the member state keys in the call now.
    #[serde(default)]
    pub members_now: BTreeSet<String>,
    /// Group calls on the built-in SFU: what it saw of the media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<SfuMedia>,
}

/// A group call's media on the built-in SFU, over all its SFU sessions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SfuMedia {
    /// The most participants connected at once.
    pub peak_participants: usize,
    /// RTP payload bytes forwarded (one copy per receiver).
    pub forwarded_bytes: u64,
    /// How long media sessions ran, in seconds.
    pub seconds: u64,
}

impl Call {
    pub fn duration_ms(&self) -> Option<u64> {
        let from = self.answered_ts.or(match self.kind {
            CallKind::Group => Some(self.started_ts),
            CallKind::Direct => None,
        })?;
        Some(self.ended_ts?.saturating_sub(from))
    }
}

pub struct CallHistory {
    db: Db,
    server_name: String,
    /// Calls are read, changed and written back: one change at a time.
    writing: Mutex<()>,
    /// SFU room name -> Matrix room id, as the token service issued them (since start).
    sfu_rooms: std::sync::Mutex<HashMap<String, String>>,
}

/// SFU rooms remembered at most; the oldest are forgotten beyond (a room whose call
/// outlived that many others loses only its media figures).
const SFU_ROOMS_KEPT: usize = 10_000;

const GROUP_TYPES: [&str; 3] = ["org.matrix.msc3401.call.member", "m.call.member", "m.rtc.member"];

impl CallHistory {
    pub fn new(db: Db, server_name: &str) -> Self {
        Self {
            db,
            server_name: server_name.to_owned(),
            writing: Mutex::new(()),
            sfu_rooms: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn is_local(&self, user: &str) -> bool {
        user.split_once(':').is_some_and(|(_, server)| server == self.server_name)
    }

    fn index(&self, batch: &mut Batch, call: &Call, key: &str, user: &str) {
        if self.is_local(user) {
            let row = (user.to_owned(), call.started_ts, call.room_id.clone(), key.to_owned());
            CALLS_BY_USER.put(batch, &row, &());
        }
    }

    /// A 1:1 call's signalling; `members` are the room's joined members, the ones an
    /// invite rings.
    async fn direct(
        &self,
        event: &Appended<'_>,
        kind: &str,
        ts: u64,
        content: &Value,
    ) -> Result<Option<u64>> {
        let (room, sender) = (event.room_id.as_str(), event.pdu.sender.as_str());
        let Some(call_id) = content["call_id"].as_str().filter(|id| !id.is_empty()) else {
            return Ok(None);
        };
        let key = format!("direct:{call_id}");
        let row = (room.to_owned(), key.clone());
        let _turn = self.writing.lock().await;
        let existing = CALLS.get(&*self.db, &row)?.map(|Json(c)| c);
        let mut batch = Batch::new();
        let call = match (kind, existing) {
            ("m.call.invite", None) => {
                let sdp = content["offer"]["sdp"].as_str().unwrap_or_default();
                let call = Call {
                    kind: CallKind::Direct,
                    room_id: room.to_owned(),
                    call_id: call_id.to_owned(),
                    caller: sender.to_owned(),
                    started_ts: ts,
                    answered_ts: None,
                    ended_ts: None,
                    participants: vec![sender.to_owned()],
                    video: sdp.contains("m=video"),
                    end_reason: None,
                    members_now: BTreeSet::new(),
                    media: None,
                };
                // The ones rung have it in their history, answered or missed: the
                // `invitee` a call names, else the other member of a two-person room.
                // (In a bigger room without an invitee, only who answers.)
                let members = event.members.map(|m| m.as_slice()).unwrap_or_default();
                let rung: Vec<&str> = match content["invitee"].as_str() {
                    Some(invitee) => vec![invitee],
                    None if members.len() <= 2 => members.iter().map(String::as_str).collect(),
                    None => Vec::new(),
                };
                for member in rung.into_iter().chain([sender]) {
                    self.index(&mut batch, &call, &key, member);
                }
                call
            }
            ("m.call.answer", Some(mut call)) if call.answered_ts.is_none() => {
                call.answered_ts = Some(ts);
                if !call.participants.iter().any(|p| p == sender) {
                    call.participants.push(sender.to_owned());
                }
                self.index(&mut batch, &call, &key, sender);
                call
            }
            ("m.call.hangup" | "m.call.reject", Some(mut call)) if call.ended_ts.is_none() => {
                call.ended_ts = Some(ts);
                call.end_reason = Some(match (kind, content["reason"].as_str()) {
                    ("m.call.reject", _) => "reject".to_owned(),
                    (_, Some(reason)) => reason.to_owned(),
                    _ => "hangup".to_owned(),
                });
                self.index(&mut batch, &call, &key, sender);
                call
            }
            _ => return Ok(None),
        };
        CALLS.put(&mut batch, &row, &Json(call));
        Ok(Some(self.db.write_unsynced(batch)?))
    }

    /// A group call member's state: non-empty content joins, empty content leaves. The
    /// older MSC3401 form lists the device's calls in `memberships`, left when empty.
    async fn group(
        &self,
        room: &str,
        sender: &str,
        state_key: &str,
        ts: u64,
        content: &Value,
    ) -> Result<Option<u64>> {
        let (call_id, joined) = match content.get("memberships") {
            Some(list) => {
                let first = list.as_array().and_then(|l| l.first());
                let call_id = first.and_then(|m| m["call_id"].as_str()).unwrap_or_default();
                (call_id.to_owned(), first.is_some())
            }
            None => (
                content["call_id"].as_str().unwrap_or_default().to_owned(),
                content.as_object().is_some_and(|c| !c.is_empty()),
            ),
        };
        let _turn = self.writing.lock().await;
        let running_row = (room.to_owned(), call_id.clone());
        let running = CALLS_RUNNING.get(&*self.db, &running_row)?;
        let mut batch = Batch::new();
        let (key, call) = match running {
            Some(key) => {
                let row = (room.to_owned(), key.clone());
                let Some(Json(mut call)) = CALLS.get(&*self.db, &row)? else {
                    CALLS_RUNNING.delete(&mut batch, &running_row);
                    return Ok(Some(self.db.write_unsynced(batch)?));
                };
                if joined {
                    call.members_now.insert(state_key.to_owned());
                    if !call.participants.iter().any(|p| p == sender) {
                        call.participants.push(sender.to_owned());
                    }
                    call.video |= content["m.call.intent"].as_str() == Some("video");
                } else if call.members_now.remove(state_key) && call.members_now.is_empty() {
                    call.ended_ts = Some(ts);
                    call.end_reason = Some("everyone_left".to_owned());
                    CALLS_RUNNING.delete(&mut batch, &running_row);
                }
                (key, call)
            }
            None if joined => {
                let key = format!("group:{call_id}:{ts}");
                let call = Call {
                    kind: CallKind::Group,
                    room_id: room.to_owned(),
                    call_id: call_id.clone(),
                    caller: sender.to_owned(),
                    started_ts: ts,
                    answered_ts: None,
                    ended_ts: None,
                    participants: vec![sender.to_owned()],
                    video: content["m.call.intent"].as_str() == Some("video"),
                    end_reason: None,
                    members_now: BTreeSet::from([state_key.to_owned()]),
                    media: None,
                };
                CALLS_RUNNING.put(&mut batch, &running_row, &key);
                (key, call)
            }
            None => return Ok(None),
        };
        self.index(&mut batch, &call, &key, sender);
        CALLS.put(&mut batch, &(room.to_owned(), key), &Json(call));
        Ok(Some(self.db.write_unsynced(batch)?))
    }

    /// A user's calls, newest first: at most `limit` from `from` (a position
    /// [`Page::next`] gave).
    pub fn of_user(&self, user: &str, from: Option<&str>, limit: usize) -> Result<Page> {
        let skip: usize = from
            .map(|f| f.parse().map_err(|_| Error::invalid_param("Bad `from`")))
            .transpose()?
            .unwrap_or(0);
        let mut calls = Vec::new();
        let rows = CALLS_BY_USER.scan_prefix(&*self.db, &user.to_owned(), Direction::Backward)?;
        let mut seen = 0;
        for row in rows {
            let ((_, _, room, key), ()) = row?;
            seen += 1;
            if seen <= skip {
                continue;
            }
            if calls.len() == limit {
                return Ok(Page { calls, next: Some((skip + limit).to_string()) });
            }
            if let Some(Json(call)) = CALLS.get(&*self.db, &(room, key))? {
                calls.push(call);
            }
        }
        Ok(Page { calls, next: None })
    }

    /// Every call on the server, newest first, optionally of one room.
    pub fn all(&self, room: Option<&str>, from: usize, limit: usize) -> Result<(Vec<Call>, usize)> {
        let mut calls = Vec::new();
        let rows: Box<dyn Iterator<Item = _>> = match room {
            Some(room) => {
                Box::new(CALLS.scan_prefix(&*self.db, &room.to_owned(), Direction::Forward)?)
            }
            None => Box::new(CALLS.scan_prefix(&*self.db, &(), Direction::Forward)?),
        };
        for row in rows {
            let (_, Json(call)) = row?;
            calls.push(call);
        }
        calls.sort_by_key(|c| std::cmp::Reverse(c.started_ts));
        let total = calls.len();
        Ok((calls.into_iter().skip(from).take(limit).collect(), total))
    }
}

impl CallHistory {
    /// The token service issued a token for the SFU room `sfu_room` of `room_id`'s call.
    pub fn note_sfu_room(&self, sfu_room: &str, room_id: &str) {
        let mut rooms = self.sfu_rooms.lock().unwrap_or_else(|p| p.into_inner());
        if rooms.len() >= SFU_ROOMS_KEPT && !rooms.contains_key(sfu_room) {
            rooms.clear();
        }
        rooms.insert(sfu_room.to_owned(), room_id.to_owned());
    }

    /// A call on the built-in SFU ended: its figures go to its Matrix room's group call
    /// (the one running, else the latest). `false` when there is none to add them to.
    pub async fn sfu_call_ended(&self, sfu_room: &str, session: SfuMedia) -> Result<bool> {
        let room = self.sfu_rooms.lock().unwrap_or_else(|p| p.into_inner()).get(sfu_room).cloned();
        let Some(room) = room else { return Ok(false) };
        let _turn = self.writing.lock().await;
        let mut latest: Option<(String, Call)> = None;
        for row in CALLS.scan_prefix(&*self.db, &room, Direction::Forward)? {
            let ((_, key), Json(call)) = row?;
            if call.kind != CallKind::Group {
                continue;
            }
            let better = match &latest {
                None => true,
                Some((_, best)) => {
                    (call.ended_ts.is_none(), call.started_ts)
                        > (best.ended_ts.is_none(), best.started_ts)
                }
            };
            if better {
                latest = Some((key, call));
            }
        }
        let Some((key, mut call)) = latest else { return Ok(false) };
        let media = call.media.get_or_insert_with(SfuMedia::default);
        media.peak_participants = media.peak_participants.max(session.peak_participants);
        media.forwarded_bytes += session.forwarded_bytes;
        media.seconds += session.seconds;
        let mut batch = Batch::new();
        CALLS.put(&mut batch, &(room, key), &Json(call));
        self.db.write_unsynced(batch)?;
        Ok(true)
    }

    /// Group calls going on now.
    pub fn running(&self) -> Result<usize> {
        let mut n = 0;
        for row in CALLS_RUNNING.scan_prefix(&*self.db, &(), Direction::Forward)? {
            row?;
            n += 1;
        }
        Ok(n)
    }
}

/// A call as users and admins read it.
pub fn describe(call: &Call) -> Value {
    serde_json::json!({
        "type": call.kind,
        "room_id": call.room_id,
        "call_id": call.call_id,
        "caller": call.caller,
        "started_ts": call.started_ts,
        "answered_ts": call.answered_ts,
        "ended_ts": call.ended_ts,
        "duration_ms": call.duration_ms(),
        "participants": call.participants,
        "video": call.video,
        "end_reason": call.end_reason,
        "state": match (call.kind, call.answered_ts, call.ended_ts) {
            (_, _, None) if call.kind == CallKind::Group => "ongoing",
            (CallKind::Direct, None, None) => "ringing",
            (CallKind::Direct, Some(_), None) => "ongoing",
            (CallKind::Direct, None, Some(_)) => "missed",
            _ => "ended",
        },
        "members_now": call.members_now.len(),
        "media": call.media,
    })
}

/// One page of a user's calls.
pub struct Page {
    pub calls: Vec<Call>,
    pub next: Option<String>,
}

#[async_trait::async_trait]
impl Consumer for CallHistory {
    fn name(&self) -> &'static str {
        "call_history"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        use ruma::events::TimelineEventType as Kind;
        let pdu = event.pdu;
        // Matched on the parsed type: every message passes here, and most are no call.
        let direct = match pdu.kind {
            Kind::CallInvite => Some("m.call.invite"),
            Kind::CallAnswer => Some("m.call.answer"),
            Kind::CallHangup => Some("m.call.hangup"),
            Kind::CallReject => Some("m.call.reject"),
            _ => None,
        };
        let ts: u64 = pdu.origin_server_ts.get().into();
        let content = || serde_json::from_str::<Value>(pdu.content.get()).unwrap_or(Value::Null);
        match (direct, &pdu.state_key) {
            (Some(kind), None) => self.direct(event, kind, ts, &content()).await,
            (None, Some(key)) if GROUP_TYPES.contains(&pdu.kind.to_string().as_str()) => {
                let (room, sender) = (event.room_id.as_str(), pdu.sender.as_str());
                self.group(room, sender, key, ts, &content()).await
            }
            _ => Ok(None),
        }
    }
}
