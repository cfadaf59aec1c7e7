//! The client-server API, one module per spec area.

mod account;
mod versions;

use axum::Router;

use crate::AppState;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = versions::routes(router);
    account::routes(router)
}
