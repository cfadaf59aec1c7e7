//! The client-server API, one module per spec area.

mod account;
mod account_data;
mod account_moderation;
mod aliases;
mod appservice;
mod backup;
mod calls;
mod capabilities;
mod dehydrated;
pub(crate) mod delayed_events;
mod devices;
mod directory;
mod events;
mod export;
mod history;
mod initial_sync;
mod keys;
mod membership;
mod notifications;
mod openid;
mod presence;
mod profile;
mod push_rules;
mod pushers;
mod relations;
mod reports;
pub(crate) mod room_directory;
mod rooms;
mod rtc;
mod search;
mod session;
mod sliding;
pub(crate) mod spaces;
mod sync;
mod sync_ws;
mod tags;
mod threepid;
mod to_device;
mod uia;
mod versions;
mod voip;
mod webhooks;

use axum::Router;

pub(crate) use aliases::local_alias;

use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = versions::routes(router);
    let router = account::routes(router);
    let router = session::routes(router);
    let router = devices::routes(router);
    let router = profile::routes(router);
    let router = account_data::routes(router);
    let router = push_rules::routes(router);
    let router = pushers::routes(router);
    let router = tags::routes(router);
    let router = presence::routes(router);
    let router = threepid::routes(router);
    let router = directory::routes(router);
    let router = search::routes(router);
    let router = rooms::routes(router);
    let router = sync::routes(router);
    let router = notifications::routes(router);
    let router = openid::routes(router);
    let router = sliding::routes(router);
    let router = sync_ws::routes(router);
    let router = history::routes(router);
    let router = initial_sync::routes(router);
    let router = membership::routes(router);
    let router = relations::routes(router);
    let router = aliases::routes(router);
    let router = room_directory::routes(router);
    let router = spaces::routes(router);
    let router = keys::routes(router);
    let router = backup::routes(router);
    let router = appservice::routes(router);
    let router = dehydrated::routes(router);
    let router = to_device::routes(router);
    let router = webhooks::routes(router);
    let router = voip::routes(router);
    let router = delayed_events::routes(router);
    let router = rtc::routes(router);
    let router = calls::routes(router);
    let router = export::routes(router);
    let router = reports::routes(router);
    let router = account_moderation::routes(router);
    capabilities::routes(router)
}
