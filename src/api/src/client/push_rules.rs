//! Push rules: `GET /pushrules/`, `/pushrules/global/`, and per rule (`GET`, `PUT`,
//! `DELETE`, `/enabled`, `/actions`) under `/pushrules/global/{kind}/{ruleId}`.

use std::marker::PhantomData;

use axum::Router;
use ruma::api::{
    IncomingRequest, Metadata,
    client::push::{
        PushRule, delete_pushrule, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
        get_pushrules_all, get_pushrules_global_scope, set_pushrule, set_pushrule_actions,
        set_pushrule_enabled,
    },
    error::DeserializationError,
};
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_service::push::rules;

use super::events::me;
use crate::{
    AppState,
    ruma_route::{self, Ctx, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ruma_route::add::<get_pushrules_all::v3::Request, _, _>(router, get_all);
    let router =
        ruma_route::add::<get_pushrules_global_scope::v3::Request, _, _>(router, get_global);
    let router = ruma_route::add::<get_pushrule::v3::Request, _, _>(router, get_rule);
    let router = ruma_route::add::<Unparsed<set_pushrule::v3::Request>, _, _>(router, set_rule);
    let router = ruma_route::add::<delete_pushrule::v3::Request, _, _>(router, delete_rule);
    let router = ruma_route::add::<get_pushrule_enabled::v3::Request, _, _>(router, get_enabled);
    let router = ruma_route::add::<set_pushrule_enabled::v3::Request, _, _>(router, set_enabled);
    let router = ruma_route::add::<get_pushrule_actions::v3::Request, _, _>(router, get_actions);
    let router = ruma_route::add::<set_pushrule_actions::v3::Request, _, _>(router, set_actions);
    // Paths under /pushrules that name no scope, kind or rule the way the spec's do (no
    // scope, an unknown one, a missing or empty rule id, a rule id with slashes): the
    // request is malformed, not aimed at an endpoint that does not exist.
    let mut router = router;
    for version in ["r0", "v3"] {
        for path in ["pushrules", "pushrules/{*rest}"] {
            let malformed = axum::routing::any(|| async {
                crate::response::ApiError(Error::invalid_param("Malformed push rule path"))
            });
            router = router.route(&format!("/_matrix/client/{version}/{path}"), malformed);
        }
    }
    router
}

/// Endpoint `R` with its path, query and body left for the handler to parse: for bodies
/// where ruma's parser is stricter than the spec (it requires `conditions` on override
/// rules) or answers with other error codes than the spec's.
pub(super) struct Unparsed<R> {
    pub path: Vec<String>,
    pub query: String,
    pub body: Vec<u8>,
    endpoint: PhantomData<fn() -> R>,
}

impl<R> Unparsed<R> {
    /// The body as JSON (`M_NOT_JSON` when it is not).
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(json_error)
    }

    /// A query parameter, if given.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

impl<R: Metadata> Metadata for Unparsed<R> {
    const METHOD: http::Method = R::METHOD;
    const RATE_LIMITED: bool = R::RATE_LIMITED;
    type Authentication = R::Authentication;
    type PathBuilder = R::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = R::PATH_BUILDER;
}

impl<R: IncomingRequest> IncomingRequest for Unparsed<R> {
    type EndpointError = R::EndpointError;
    type OutgoingResponse = R::OutgoingResponse;

    fn try_from_http_request_inner(
        request: http::Request<&[u8]>,
        path_args: &[&str],
    ) -> Result<Self, DeserializationError> {
        Ok(Self {
            path: path_args.iter().map(|a| (*a).to_owned()).collect(),
            query: request.uri().query().unwrap_or("").to_owned(),
            body: request.body().to_vec(),
            endpoint: PhantomData,
        })
    }
}

/// GET /_matrix/client/v3/pushrules/
async fn get_all(
    ctx: Ctx,
    _req: get_pushrules_all::v3::Request,
) -> Result<get_pushrules_all::v3::Response> {
    let ruleset = ctx.services.push_rules.ruleset(&me(&ctx)?)?;
    Ok(get_pushrules_all::v3::Response::new(ruleset))
}

/// GET /_matrix/client/v3/pushrules/global/
async fn get_global(
    ctx: Ctx,
    _req: get_pushrules_global_scope::v3::Request,
) -> Result<get_pushrules_global_scope::v3::Response> {
    let ruleset = ctx.services.push_rules.ruleset(&me(&ctx)?)?;
    Ok(get_pushrules_global_scope::v3::Response::new(ruleset))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn get_rule(ctx: Ctx, req: get_pushrule::v3::Request) -> Result<get_pushrule::v3::Response> {
    let rule = ctx.services.push_rules.rule(&me(&ctx)?, &req.kind, &req.rule_id)?;
    Ok(get_pushrule::v3::Response::new(PushRule::from(rule)))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn set_rule(
    ctx: Ctx,
    req: Unparsed<set_pushrule::v3::Request>,
) -> Result<set_pushrule::v3::Response> {
    let user = me(&ctx)?;
    let [kind, rule_id] = req.path.as_slice() else {
        return Err(Error::invalid_param("Expected a rule kind and id in the path"));
    };
    let rule = rules::new_rule(kind, rule_id, &req.json()?)?;
    let (before, after) = (req.query_param("before"), req.query_param("after"));
    ctx.services.push_rules.set_rule(&user, rule, before.as_deref(), after.as_deref()).await?;
    Ok(set_pushrule::v3::Response::new())
}

/// DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn delete_rule(
    ctx: Ctx,
    req: delete_pushrule::v3::Request,
) -> Result<delete_pushrule::v3::Response> {
    ctx.services.push_rules.remove_rule(&me(&ctx)?, &req.kind, &req.rule_id).await?;
    Ok(delete_pushrule::v3::Response::new())
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn get_enabled(
    ctx: Ctx,
    req: get_pushrule_enabled::v3::Request,
) -> Result<get_pushrule_enabled::v3::Response> {
    let rule = ctx.services.push_rules.rule(&me(&ctx)?, &req.kind, &req.rule_id)?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.enabled()))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn set_enabled(
    ctx: Ctx,
    req: set_pushrule_enabled::v3::Request,
) -> Result<set_pushrule_enabled::v3::Response> {
    let user = me(&ctx)?;
    ctx.services.push_rules.set_enabled(&user, &req.kind, &req.rule_id, req.enabled).await?;
    Ok(set_pushrule_enabled::v3::Response::new())
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn get_actions(
    ctx: Ctx,
    req: get_pushrule_actions::v3::Request,
) -> Result<get_pushrule_actions::v3::Response> {
    let rule = ctx.services.push_rules.rule(&me(&ctx)?, &req.kind, &req.rule_id)?;
    Ok(get_pushrule_actions::v3::Response::new(rule.actions().to_vec()))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn set_actions(
    ctx: Ctx,
    req: set_pushrule_actions::v3::Request,
) -> Result<set_pushrule_actions::v3::Response> {
    let user = me(&ctx)?;
    ctx.services.push_rules.set_actions(&user, &req.kind, &req.rule_id, req.actions).await?;
    Ok(set_pushrule_actions::v3::Response::new())
}
