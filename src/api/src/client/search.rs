//! `POST /search`: server-side search of the rooms' messages (the `room_events`
//! category), with the Trellis extension `org.trellis.filter` (date range, `has`).

use std::collections::{BTreeMap, HashMap};

use axum::{
    Router,
    body::Bytes,
    extract::RawQuery,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use trellis_core::{Error, Result};
use trellis_search::{Has, Key, OrderBy};
use trellis_service::{
    rooms::history,
    search::query::{self, Found, SearchRequest, SearchResults},
};

use super::events::{Viewer, client_event, user};
use crate::{
    AppState,
    response::{ApiError, json_response},
    ruma_route::{Authenticated, Ctx, json_error},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    ["/_matrix/client/v3/search", "/_matrix/client/r0/search"]
        .into_iter()
        .fold(router, |router, path| router.route(path, post(search)))
}

#[derive(Deserialize)]
struct Body {
    search_categories: Categories,
}

#[derive(Deserialize)]
struct Categories {
    room_events: Option<RoomEvents>,
}

#[derive(Deserialize)]
struct RoomEvents {
    search_term: String,
    keys: Option<Vec<String>>,
    #[serde(default)]
    filter: Filter,
    order_by: Option<String>,
    event_context: Option<EventContext>,
    #[serde(default)]
    include_state: bool,
    groupings: Option<Groupings>,
    #[serde(rename = "org.trellis.filter", default)]
    trellis: TrellisFilter,
}

#[derive(Deserialize, Default)]
struct Filter {
    rooms: Option<Vec<String>>,
    #[serde(default)]
    not_rooms: Vec<String>,
    senders: Option<Vec<String>>,
    #[serde(default)]
    not_senders: Vec<String>,
    types: Option<Vec<String>>,
    #[serde(default)]
    not_types: Vec<String>,
    contains_url: Option<bool>,
    limit: Option<u64>,
}

#[derive(Deserialize)]
struct EventContext {
    before_limit: Option<u64>,
    after_limit: Option<u64>,
    #[serde(default)]
    include_profile: bool,
}

#[derive(Deserialize)]
struct Groupings {
    #[serde(default)]
    group_by: Vec<Group>,
}

#[derive(Deserialize)]
struct Group {
    key: String,
}

/// `org.trellis.filter`: `origin_server_ts` from (inclusive) and to (exclusive), in
/// milliseconds, and what the messages must carry.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TrellisFilter {
    from_ts: Option<i64>,
    to_ts: Option<i64>,
    #[serde(default)]
    has: Vec<String>,
}

/// POST /_matrix/client/v3/search
async fn search(
    Authenticated(ctx): Authenticated,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let answer = async {
        let body: Body = serde_json::from_slice(&body).map_err(json_error)?;
        let Some(room_events) = body.search_categories.room_events else {
            return Ok(json!({ "search_categories": {} }));
        };
        let next_batch = next_batch(query.as_deref());
        let (request, groups) = parse(room_events, next_batch)?;
        let user = user(&ctx)?;
        let services = ctx.services.clone();
        let found = tokio::task::spawn_blocking(move || query::search(&services, &user, &request))
            .await
            .map_err(|e| Error::internal("search task", e))??;
        Ok(json!({ "search_categories": { "room_events": render(&ctx, found, &groups)? } }))
    };
    match answer.await {
        Ok(body) => json_response(StatusCode::OK, body.to_string().into_bytes()),
        Err(e) => ApiError(e).into_response(),
    }
}

fn next_batch(query: Option<&str>) -> Option<String> {
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "next_batch")
        .map(|(_, v)| v.into_owned())
}

/// The groupings asked for: by room, by sender.
struct GroupBy {
    room: bool,
    sender: bool,
}

fn parse(body: RoomEvents, next_batch: Option<String>) -> Result<(SearchRequest, GroupBy)> {
    let keys = match body.keys {
        None => Key::ALL.to_vec(),
        Some(keys) => keys
            .iter()
            .map(|k| {
                Key::parse(k)
                    .ok_or_else(|| Error::invalid_param(format!("Unknown search key {k:?}")))
            })
            .collect::<Result<_>>()?,
    };
    let order_by = match body.order_by.as_deref() {
        None | Some("rank") => OrderBy::Rank,
        Some("recent") => OrderBy::Recent,
        Some(other) => return Err(Error::invalid_param(format!("Unknown order_by {other:?}"))),
    };
    let has = body
        .trellis
        .has
        .iter()
        .map(|h| match h.as_str() {
            "file" => Ok(Has::File),
            "image" => Ok(Has::Image),
            "link" => Ok(Has::Link),
            other => Err(Error::invalid_param(format!("Unknown org.trellis.filter.has {other:?}"))),
        })
        .collect::<Result<_>>()?;
    let mut groups = GroupBy { room: false, sender: false };
    for group in body.groupings.map(|g| g.group_by).unwrap_or_default() {
        match group.key.as_str() {
            "room_id" => groups.room = true,
            "sender" => groups.sender = true,
            other => return Err(Error::invalid_param(format!("Unknown group_by key {other:?}"))),
        }
    }
    let context_limit = |n: Option<u64>| usize::try_from(n.unwrap_or(5)).unwrap_or(usize::MAX);
    let filter = body.filter;
    let request = SearchRequest {
        term: body.search_term,
        keys,
        rooms: filter.rooms,
        not_rooms: filter.not_rooms,
        senders: filter.senders.unwrap_or_default(),
        not_senders: filter.not_senders,
        types: filter.types.unwrap_or_default(),
        not_types: filter.not_types,
        contains_url: filter.contains_url,
        limit: filter.limit.map_or(10, |l| usize::try_from(l).unwrap_or(query::MAX_LIMIT)),
        order_by,
        context: body.event_context.map(|c| {
            (context_limit(c.before_limit), context_limit(c.after_limit), c.include_profile)
        }),
        include_state: body.include_state,
        since: body.trellis.from_ts,
        until: body.trellis.to_ts,
        has,
        next_batch,
    };
    Ok((request, groups))
}

fn render(ctx: &Ctx, found: SearchResults, groups: &GroupBy) -> Result<Value> {
    let mut viewers: HashMap<String, Viewer<'_>> = HashMap::new();
    let mut results = Vec::with_capacity(found.results.len());
    for result in &found.results {
        if !viewers.contains_key(&result.room_id) {
            viewers.insert(result.room_id.clone(), Viewer::new(ctx, &result.room_id)?);
        }
        let viewer = &viewers[&result.room_id];
        results.push(render_one(viewer, result)?);
    }
    let mut out = Map::new();
    out.insert("count".into(), json!(found.count));
    out.insert("highlights".into(), json!(found.highlights));
    out.insert("results".into(), Value::Array(results));
    if let Some(next) = &found.next_batch {
        out.insert("next_batch".into(), json!(next));
    }
    if !found.state.is_empty() {
        let state: Map<String, Value> = found
            .state
            .iter()
            .map(|(room, events)| {
                (
                    room.clone(),
                    events.iter().map(|p| client_event(p, room)).collect::<Vec<_>>().into(),
                )
            })
            .collect();
        out.insert("state".into(), Value::Object(state));
    }
    let mut grouped = Map::new();
    for (wanted, name, key) in [
        (groups.room, "room_id", (|f: &Found| f.room_id.clone()) as fn(&Found) -> String),
        (groups.sender, "sender", |f: &Found| f.pdu.sender.to_string()),
    ] {
        if wanted {
            grouped.insert(name.into(), group(&found.results, key));
        }
    }
    if !grouped.is_empty() {
        out.insert("groups".into(), Value::Object(grouped));
    }
    Ok(Value::Object(out))
}

/// Results grouped by `key`, groups in the order of their first result.
fn group(results: &[Found], key: fn(&Found) -> String) -> Value {
    let mut groups: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for result in results {
        let next = groups.len();
        let entry = groups.entry(key(result)).or_insert((next, Vec::new()));
        entry.1.push(result.pdu.event_id.to_string());
    }
    groups
        .into_iter()
        .map(|(k, (order, ids))| (k, json!({ "order": order, "results": ids })))
        .collect::<Map<_, _>>()
        .into()
}

fn render_one(viewer: &Viewer<'_>, result: &Found) -> Result<Value> {
    let mut out = json!({ "rank": result.rank, "result": viewer.render(&result.pdu)? });
    if let Some(around) = &result.context {
        let render =
            |events: &[std::sync::Arc<trellis_service::rooms::Pdu>]| -> Result<Vec<Value>> {
                events.iter().map(|p| viewer.render(p)).collect()
            };
        let profiles: Map<String, Value> = around
            .profiles
            .iter()
            .map(|(user, name, avatar)| {
                let mut profile = Map::new();
                if let Some(name) = name {
                    profile.insert("displayname".into(), json!(name));
                }
                if let Some(avatar) = avatar {
                    profile.insert("avatar_url".into(), json!(avatar));
                }
                (user.clone(), Value::Object(profile))
            })
            .collect();
        let mut context = json!({
            "events_before": render(&around.before)?,
            "events_after": render(&around.after)?,
            "start": history::token(around.start),
            "end": history::token(around.end),
        });
        if !profiles.is_empty() {
            context["profile_info"] = Value::Object(profiles);
        }
        out["context"] = context;
    }
    Ok(out)
}
