//! `PUT /sendToDevice/{eventType}/{txnId}`.

use std::collections::BTreeMap;

use axum::Router;
use ruma::api::client::to_device::send_event_to_device;
use trellis_core::{Error, Result};
use trellis_service::e2ee::to_device::{self, Send};

use crate::{
    AppState,
    convert::raw_value,
    ruma_route::{self, Ctx},
};

/// Recipients (users × devices) of one request; bigger fan-outs are refused.
const MAX_RECIPIENTS: usize = 10_000;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<send_event_to_device::v3::Request, _, _>(router, send)
}

/// PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}
async fn send(
    ctx: Ctx,
    req: send_event_to_device::v3::Request,
) -> Result<send_event_to_device::v3::Response> {
    let session = ctx.session()?;
    let total: usize = req.messages.values().map(BTreeMap::len).sum();
    if total > MAX_RECIPIENTS {
        return Err(Error::too_large("Too many recipients in one request"));
    }
    let mut messages = BTreeMap::new();
    for (user, devices) in &req.messages {
        let mut per_device = BTreeMap::new();
        for (device, content) in devices {
            let content = raw_value(content)?;
            if !content.is_object() {
                return Err(Error::bad_json("Message content must be a JSON object"));
            }
            per_device.insert(device.to_string(), content);
        }
        messages.insert(user.to_string(), per_device);
    }
    let event_type = req.event_type.to_string();
    let sender = ctx.services.accounts.user_id(&session.localpart);
    let send = Send {
        sender: &sender,
        sender_localpart: &session.localpart,
        sender_device: &session.device_id,
        txn_id: req.txn_id.as_str(),
        event_type: &event_type,
        messages,
    };
    to_device::send(&ctx.services, send).await?;
    Ok(send_event_to_device::v3::Response::new())
}
