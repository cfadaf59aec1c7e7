//! Serving events to a user: what they may see (history visibility, ignored users) and
//! how each event looks to them (client format with bundled aggregations).

use ruma::{OwnedDeviceId, OwnedUserId, RoomId, serde::Raw};
use serde_json::{Value, json};
use trellis_core::{Error, Result};
use trellis_service::rooms::{Pdu, viewer, visibility::VisibilityView};

use crate::ruma_route::Ctx;

pub(super) fn me(ctx: &Ctx) -> Result<String> {
    Ok(ctx.services.accounts.user_id(&ctx.session()?.localpart))
}

/// The requesting user, as the services take it.
pub(super) fn user(ctx: &Ctx) -> Result<OwnedUserId> {
    OwnedUserId::try_from(me(ctx)?).map_err(|e| Error::internal("user id", e))
}

/// The requesting device.
pub(super) fn device(ctx: &Ctx) -> Result<OwnedDeviceId> {
    Ok(OwnedDeviceId::from(ctx.session()?.device_id.as_str()))
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
pub(super) fn require_joined(ctx: &Ctx, room_id: &RoomId) -> Result<()> {
    viewer::require_joined(&ctx.services, room_id, &user(ctx)?)
}

/// One user reading one room's history.
pub(super) struct Viewer<'a> {
    ctx: &'a Ctx,
    pub room_id: &'a str,
    pub user: String,
    device_id: String,
    viewer: viewer::Viewer,
    view: VisibilityView,
}

impl<'a> Viewer<'a> {
    /// A reader of `room_id`: someone who has been in the room, or anyone if the room is
    /// world readable.
    pub fn new(ctx: &'a Ctx, room_id: &'a str) -> Result<Self> {
        let user = me(ctx)?;
        let view = viewer::Viewer::reader_view(&ctx.services, room_id, &user)?;
        let session = ctx.session()?;
        let viewer = viewer::Viewer::load(&ctx.services, &session.localpart)?;
        let device_id = session.device_id.clone();
        Ok(Self { ctx, room_id, user, device_id, viewer, view })
    }

    /// Whether the viewer gets this event: visible to them and not from someone they
    /// ignore.
    pub fn sees(&self, position: u64, pdu: &Pdu) -> bool {
        self.viewer.sees(&self.view, position, pdu)
    }

    /// The event in client format with the aggregations the spec bundles with it.
    pub fn render(&self, pdu: &Pdu) -> Result<Value> {
        let erased = self.viewer.erased_view(&self.ctx.services, &self.view, pdu)?;
        let pdu = erased.as_deref().unwrap_or(pdu);
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
        let stored =
            self.viewer.visible_event(&self.ctx.services, &self.view, self.room_id, event_id)?;
        Ok((stored.position, (*stored.pdu).clone()))
    }
}
