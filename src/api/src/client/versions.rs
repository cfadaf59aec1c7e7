//! `GET /_matrix/client/versions`.

use std::collections::BTreeMap;

use axum::Router;
use ruma::api::client::discovery::get_supported_versions;
use trellis_core::Result;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// Spec versions advertised to clients. A version goes here only once every endpoint
/// it requires is implemented (see docs/spec-coverage.md); advertising one early would
/// make clients call endpoints that do not exist yet.
pub const SUPPORTED_VERSIONS: &[&str] = &[];

/// Unstable features (MSCs) that are really implemented.
pub const UNSTABLE_FEATURES: &[&str] = &[];

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_supported_versions::Request, _, _>(router, versions)
}

async fn versions(
    _: Ctx,
    _: get_supported_versions::Request,
) -> Result<get_supported_versions::Response> {
    let mut resp = get_supported_versions::Response::new(
        SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
    );
    resp.unstable_features =
        UNSTABLE_FEATURES.iter().map(|f| (f.to_string(), true)).collect::<BTreeMap<_, _>>();
    Ok(resp)
}
