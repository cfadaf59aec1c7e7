//! Third-party networks (the spec's Third-party Networks module): the protocols that
//! application services bridge, and lookups of their users and locations, asked of the
//! services that declare the protocol (`protocols` in their registration).

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use trellis_core::Result;

use super::Registration;
use crate::Services;

/// How long a service may take to answer a lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The instance id clients use for a service's network (`third_party_instance_id`).
pub fn instance_id(appservice: &str, network: &str) -> String {
    format!("{appservice}|{network}")
}

async fn ask(services: &Services, reg: &Registration, path: &str) -> Option<Value> {
    if reg.is_webhook() {
        return None;
    }
    let url = reg.url.as_ref()?;
    let answer = services
        .appservice_delivery
        .http()
        .get(format!("{url}/_matrix/app/v1/thirdparty/{path}"))
        .bearer_auth(&reg.hs_token)
        .timeout(LOOKUP_TIMEOUT)
        .send()
        .await;
    match answer {
        Ok(response) if response.status().is_success() => response.json().await.ok(),
        Ok(response) => {
            tracing::debug!(appservice = %reg.id, status = %response.status(), path, "third-party lookup refused");
            None
        }
        Err(e) => {
            tracing::warn!(appservice = %reg.id, error = %e, "third-party lookup failed");
            None
        }
    }
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Every protocol a service declares, as the first service declaring it describes it,
/// with the instances of all of them (each given its `instance_id`).
pub async fn protocols(services: &Services) -> Result<BTreeMap<String, Value>> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for reg in services.appservices.all().iter() {
        for protocol in &reg.protocols {
            let Some(mut meta) =
                ask(services, reg, &format!("protocol/{}", encode(protocol))).await
            else {
                continue;
            };
            let mut instances = meta["instances"].as_array().cloned().unwrap_or_default();
            for instance in &mut instances {
                let network = instance["network_id"].as_str().unwrap_or_default().to_owned();
                instance["instance_id"] = instance_id(&reg.id, &network).into();
            }
            match out.get_mut(protocol) {
                Some(known) => {
                    if let Some(list) = known["instances"].as_array_mut() {
                        list.extend(instances);
                    }
                }
                None => {
                    meta["instances"] = instances.into();
                    out.insert(protocol.clone(), meta);
                }
            }
        }
    }
    Ok(out)
}

/// `kind` (`location` or `user`) lookups: by protocol and fields, asked of the services
/// declaring the protocol; without a protocol (the reverse lookups by alias or user id),
/// asked of every service. The answers are concatenated.
pub async fn lookup(
    services: &Services,
    kind: &str,
    protocol: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Result<Vec<Value>> {
    let query: String =
        url::form_urlencoded::Serializer::new(String::new()).extend_pairs(query.iter()).finish();
    let mut out = Vec::new();
    for reg in services.appservices.all().iter() {
        let path = match protocol {
            Some(p) if reg.protocols.iter().any(|d| d == p) => {
                format!("{kind}/{}?{query}", encode(p))
            }
            Some(_) => continue,
            None => format!("{kind}?{query}"),
        };
        if let Some(Value::Array(found)) = ask(services, reg, &path).await {
            out.extend(found);
        }
    }
    Ok(out)
}
