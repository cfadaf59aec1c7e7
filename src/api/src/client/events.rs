//! Serving events to a user: what they may see (history visibility, ignored users) and
//! how each event looks to them (client format with bundled aggregations).

use std::collections::HashSet;

use ruma::serde::Raw;
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::rooms::{Pdu, visibility::VisibilityView};

use crate::ruma_route::Ctx;

pub(super) fn me(ctx: &Ctx) -> Result<String> {
    Ok(ctx.services.accounts.user_id(&ctx.session()?.localpart))
}

pub(super) fn raw_value<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

pub(super) fn to_raw<T>(value: &Value) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value)
        .map(Raw::from_json)
        .map_err(|e| Error::internal("event json", e))
}

/// An event as clients see it, without aggregations.
pub(super) fn client_event(pdu: &Pdu, room_id: &str) -> Value {
    let mut event = trellis_service::realtime::sync::sync_event(pdu);
    event["room_id"] = json!(room_id);
    event
}

/// Reading a room's current state needs a current membership of `join`.
pub(super) fn require_joined(ctx: &Ctx, room_id: &str) -> Result<String> {
    let user = me(ctx)?;
    match ctx.services.rooms.membership(room_id, &user)?.as_deref() {
        Some("join") => Ok(user),
        _ => Err(Error::forbidden("You are not a member of this room")),
    }
}

/// One user reading one room's history.
pub(super) struct Viewer<'a> {
    ctx: &'a Ctx,
    pub room_id: &'a str,
    pub user: String,
    device_id: String,
    ignored: HashSet<String>,
    view: VisibilityView,
}

impl<'a> Viewer<'a> {
    /// A reader of `room_id`: someone who has been in the room, or anyone if the room is
    /// world readable.
    pub fn new(ctx: &'a Ctx, room_id: &'a str) -> Result<Self> {
        let user = me(ctx)?;
        let view = ctx.services.rooms.visibility_view(room_id, &user)?;
        if !view.may_read() {
            return Err(Error::forbidden("You are not allowed to read this room"));
        }
        let localpart = &ctx.session()?.localpart;
        let device_id = ctx.session()?.device_id.clone();
        let ignored = ctx
            .services
            .account_data
            .get(localpart, None, "m.ignored_user_list")?
            .and_then(|v| v.get("ignored_users").and_then(Value::as_object).cloned())
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default();
        Ok(Self { ctx, room_id, user, device_id, ignored, view })
    }

    /// Whether the viewer gets this event: visible to them and not from someone they
    /// ignore.
    pub fn sees(&self, position: u64, pdu: &Pdu) -> Result<bool> {
        if self.ignored.contains(pdu.sender.as_str()) {
            return Ok(false);
        }
        Ok(self.view.may_see(position, pdu))
    }

    /// The event in client format with the aggregations the spec bundles with it.
    pub fn render(&self, pdu: &Pdu) -> Result<Value> {
        let mut event =
            trellis_service::realtime::sync::reader_event(pdu, &self.user, &self.device_id);
        event["room_id"] = json!(self.room_id);
        let room_id = self.room_id;
        trellis_service::realtime::sync::attach_bundle(
            &self.ctx.services,
            pdu,
            &self.user,
            &mut event,
            |p| client_event(p, room_id),
        )?;
        Ok(event)
    }

    pub fn render_raw<T>(&self, pdu: &Pdu) -> Result<Raw<T>> {
        to_raw(&self.render(pdu)?)
    }

    /// A stored event of this room the viewer may see, else 404 (not 403: whether an
    /// event exists is not revealed).
    pub fn event(&self, event_id: &str) -> Result<(u64, Pdu)> {
        let not_found = || Error::not_found("Event not found");
        let stored = self.ctx.services.rooms.cached_event(event_id)?.ok_or_else(not_found)?;
        let pdu = &stored.pdu;
        if pdu.room_id.as_ref().is_some_and(|r| r.as_str() != self.room_id)
            || stored.rejected
            || !self.sees(stored.position, pdu)?
        {
            return Err(not_found());
        }
        Ok((stored.position, (**pdu).clone()))
    }
}
