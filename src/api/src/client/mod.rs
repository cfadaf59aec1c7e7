//! The client-server API, one module per spec area.

mod account;
mod account_data;
mod capabilities;
mod devices;
mod profile;
mod session;
mod uia;
mod versions;

use axum::Router;

use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = versions::routes(router);
    let router = account::routes(router);
    let router = session::routes(router);
    let router = devices::routes(router);
    let router = profile::routes(router);
    let router = account_data::routes(router);
    capabilities::routes(router)
}
