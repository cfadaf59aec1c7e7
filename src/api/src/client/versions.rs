//! `GET /_matrix/client/versions`.

use std::collections::BTreeMap;

use axum::Router;
use ruma::api::client::discovery::get_supported_versions;
use trellis_core::Result;

use crate::{
    AppState,
    ruma_route::{self, Ctx},
};

/// Spec versions advertised to clients: each one whose additions exist (clients switch
/// features on by version; v1.11 tells them to use authenticated media);
/// docs/spec-coverage.md lists what each later version lacks.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11",
    "v1.12", "v1.13", "v1.14", "v1.15", "v1.16", "v1.17", "v1.18",
];

/// Unstable features (MSCs) that are really implemented: simplified sliding sync
/// (MSC4186) is how Element X syncs, and it keeps a dehydrated device (MSC3814); Element
/// Call needs delayed events (MSC4140) and finds its SFU through MSC4143.
pub const UNSTABLE_FEATURES: &[&str] = &[
    "org.matrix.simplified_msc3575",
    "org.matrix.msc3814",
    "org.matrix.msc4140",
    "org.matrix.msc4143",
];

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ruma_route::add::<get_supported_versions::Request, _, _>(router, versions)
}

/// GET /_matrix/client/versions
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
