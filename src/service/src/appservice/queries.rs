//! What the homeserver asks application services: whether a user or room alias of their
//! namespace exists (so that the service can create it on demand), and a ping.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_core::{Error, ErrorKind, Result, error::code};

use super::Registration;
use crate::{Services, accounts::Session};

/// How long a query may take before the answer is "no".
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the services whose namespaces hold `user_id` (a local user that does not exist)
/// about it; true when one answered that it exists now.
pub async fn query_user(services: &Services, user_id: &str) -> Result<bool> {
    let server = services.server_name();
    let asked: Vec<_> = services
        .appservices
        .all()
        .iter()
        .filter(|r| r.claims_user(user_id, server))
        .cloned()
        .collect();
    for reg in asked {
        let path = format!("/_matrix/app/v1/users/{}", encode(user_id));
        if ask(services, &reg, &path).await {
            let exists = services
                .accounts
                .local_part(user_id)
                .map(|lp| services.accounts.user(lp))
                .transpose()?
                .flatten()
                .is_some();
            return Ok(exists);
        }
    }
    Ok(false)
}

/// Asks the services whose namespaces hold `alias` (a local alias that does not exist)
/// about it; true when one answered that it exists now.
pub async fn query_alias(services: &Services, alias: &str) -> Result<bool> {
    let asked: Vec<_> =
        services.appservices.all().iter().filter(|r| r.claims_alias(alias)).cloned().collect();
    for reg in asked {
        let path = format!("/_matrix/app/v1/rooms/{}", encode(alias));
        if ask(services, &reg, &path).await {
            return Ok(services.aliases.resolve(alias)?.is_some());
        }
    }
    Ok(false)
}

/// One query: true on a 200 answer.
async fn ask(services: &Services, reg: &Registration, path: &str) -> bool {
    let Some(url) = reg.url.as_ref().filter(|_| !reg.is_webhook()) else { return false };
    let answer = services
        .appservice_delivery
        .http()
        .get(format!("{url}{path}"))
        .bearer_auth(&reg.hs_token)
        .timeout(QUERY_TIMEOUT)
        .send()
        .await;
    match answer {
        Ok(response) => response.status().is_success(),
        Err(e) => {
            tracing::warn!(appservice = %reg.id, error = %e, "application service query failed");
            false
        }
    }
}

/// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`: the service (authenticated
/// by its `as_token`) has the homeserver call its `/ping`; answers the round trip.
pub async fn ping(
    services: &Services,
    session: &Session,
    appservice_id: &str,
    transaction_id: Option<&str>,
) -> Result<Duration> {
    let reg = services
        .appservices
        .by_id(appservice_id)
        .filter(|r| session.appservice.as_deref() == Some(r.id.as_str()))
        .ok_or_else(|| Error::forbidden("Only the application service itself may ping"))?;
    let url = reg.url.as_ref().filter(|_| !reg.is_webhook()).ok_or_else(|| {
        Error::new(ErrorKind::BadRequest, code::URL_NOT_SET, "The registration has no url")
    })?;
    let mut body = json!({});
    if let Some(txn) = transaction_id {
        body["transaction_id"] = json!(txn);
    }
    let started = Instant::now();
    let answer = services
        .appservice_delivery
        .http()
        .post(format!("{url}/_matrix/app/v1/ping"))
        .bearer_auth(&reg.hs_token)
        .json(&body)
        .timeout(QUERY_TIMEOUT)
        .send()
        .await;
    let response = match answer {
        Ok(response) => response,
        Err(e) if e.is_timeout() => {
            return Err(Error::new(
                ErrorKind::Timeout,
                code::CONNECTION_TIMEOUT,
                "The application service did not answer in time",
            ));
        }
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Upstream,
                code::CONNECTION_FAILED,
                format!("Could not reach the application service: {e}"),
            ));
        }
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(Error::new(
            ErrorKind::Upstream,
            code::BAD_STATUS,
            "The application service answered with an error",
        )
        .with_field("status", status.as_u16())
        .with_field("body", text));
    }
    Ok(started.elapsed())
}

fn encode(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}
