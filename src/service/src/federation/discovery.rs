//! Resolving a server name to where its federation API is reached, as the spec's
//! "Resolving server names" says: IP literals and explicit ports are used as they are;
//! otherwise `/.well-known/matrix/server` may delegate, then SRV records
//! (`_matrix-fed._tcp`, then the deprecated `_matrix._tcp`), then port 8448.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{TokioResolver, proto::rr::RData};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The spec's default federation port.
pub const DEFAULT_PORT: u16 = 8448;
/// How long a well-known answer is kept when it names no lifetime, and how long a
/// failed lookup is remembered.
const WELL_KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(3600);
const WELL_KNOWN_MAX_BYTES: usize = 50 * 1024;

/// Where to send requests for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `https://<name the certificate must match>:<port>`
    pub base_url: String,
    /// The `Host` header to send.
    pub host_header: String,
}

/// A server name split into host and optional port; IPv6 literals keep their brackets.
pub fn split_server_name(name: &str) -> Option<(&str, Option<u16>)> {
    if name.is_empty() {
        return None;
    }
    if let Some(rest) = name.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &name[..end + 2];
        let after = &rest[end + 1..];
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match name.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((name, None)),
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok()
}

fn with_port(host: &str, port: u16) -> String {
    format!("https://{host}:{port}")
}

/// Looks names up for the HTTP client: names discovery mapped to an SRV target resolve
/// to the target's addresses (the URL keeps the name the certificate must match).
#[derive(Default)]
pub struct Resolver {
    targets: Mutex<HashMap<String, String>>,
    dns: Option<TokioResolver>,
    well_known: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl Resolver {
    pub fn new() -> Self {
        let dns = TokioResolver::builder_tokio().ok().map(|b| b.build());
        Self { dns, ..Default::default() }
    }

    fn target_of(&self, name: &str) -> String {
        let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.get(name).cloned().unwrap_or_else(|| name.to_owned())
    }

    /// SRV lookup: the first target by priority (then weight) as `(host, port)`.
    async fn srv(&self, record: &str) -> Option<(String, u16)> {
        let dns = self.dns.as_ref()?;
        let lookup = dns.srv_lookup(record).await.ok()?;
        let mut records: Vec<_> = lookup
            .as_lookup()
            .record_iter()
            .filter_map(|r| match r.data() {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        records.sort_by_key(|s| (s.priority(), std::cmp::Reverse(s.weight())));
        let first = records.first()?;
        let target = first.target().to_utf8();
        let target = target.trim_end_matches('.').to_owned();
        // "." means the service is decidedly not offered there.
        (!target.is_empty()).then_some((target, first.port()))
    }

    /// `m.server` of the host's well-known document, cached.
    async fn well_known(&self, client: &reqwest::Client, host: &str) -> Option<String> {
        {
            let cache = self.well_known.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((value, until)) = cache.get(host)
                && *until > Instant::now()
            {
                return value.clone();
            }
        }
        let fetched = fetch_well_known(client, host).await;
        let ttl = if fetched.is_some() { WELL_KNOWN_TTL } else { WELL_KNOWN_ERROR_TTL };
        let mut cache = self.well_known.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(host.to_owned(), (fetched.clone(), Instant::now() + ttl));
        fetched
    }

    /// Resolves `server_name` to where requests go.
    pub async fn resolve(
        &self,
        client: &reqwest::Client,
        server_name: &str,
    ) -> Option<Destination> {
        let (host, port) = split_server_name(server_name)?;
        if is_ip_literal(host) || port.is_some() {
            let port = port.unwrap_or(DEFAULT_PORT);
            return Some(Destination {
                base_url: with_port(host, port),
                host_header: server_name.to_owned(),
            });
        }
        if let Some(delegated) = self.well_known(client, host).await
            && let Some((d_host, d_port)) = split_server_name(&delegated)
        {
            if is_ip_literal(d_host) || d_port.is_some() {
                let port = d_port.unwrap_or(DEFAULT_PORT);
                return Some(Destination {
                    base_url: with_port(d_host, port),
                    host_header: delegated.clone(),
                });
            }
            return Some(self.via_srv(d_host).await);
        }
        Some(self.via_srv(host).await)
    }

    /// SRV records of `host`, else its port 8448; the certificate must match `host`.
    async fn via_srv(&self, host: &str) -> Destination {
        for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Some((target, port)) = self.srv(&format!("{prefix}.{host}.")).await {
                let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
                targets.insert(host.to_owned(), target);
                return Destination {
                    base_url: with_port(host, port),
                    host_header: host.to_owned(),
                };
            }
        }
        Destination { base_url: with_port(host, DEFAULT_PORT), host_header: host.to_owned() }
    }
}

async fn fetch_well_known(client: &reqwest::Client, host: &str) -> Option<String> {
    let url = format!("https://{host}/.well-known/matrix/server");
    let resp = client.get(url).timeout(Duration::from_secs(10)).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    if resp.content_length().is_some_and(|n| n > WELL_KNOWN_MAX_BYTES as u64) {
        return None;
    }
    let bytes = resp.bytes().await.ok()?;
    if bytes.len() > WELL_KNOWN_MAX_BYTES {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let server = value.get("m.server")?.as_str()?;
    split_server_name(server).map(|_| server.to_owned())
}

/// The HTTP client's name lookups go through discovery's SRV targets.
pub struct DnsBridge(pub Arc<Resolver>);

impl Resolve for DnsBridge {
    fn resolve(&self, name: Name) -> Resolving {
        let target = self.0.target_of(name.as_str());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.as_str(), 0))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                .collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_split_into_host_and_port() {
        assert_eq!(split_server_name("example.org"), Some(("example.org", None)));
        assert_eq!(split_server_name("example.org:8000"), Some(("example.org", Some(8000))));
        assert_eq!(split_server_name("1.2.3.4:5"), Some(("1.2.3.4", Some(5))));
        assert_eq!(split_server_name("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_server_name("[::1]:8448"), Some(("[::1]", Some(8448))));
        assert_eq!(split_server_name("example.org:port"), None);
        assert_eq!(split_server_name("[::1"), None);
        assert_eq!(split_server_name(""), None);
    }

    #[tokio::test]
    async fn ip_literals_and_explicit_ports_need_no_lookup() {
        let r = Resolver::default();
        let client = reqwest::Client::new();
        let d = r.resolve(&client, "127.0.0.2:8009").await.unwrap();
        assert_eq!(d.base_url, "https://127.0.0.2:8009");
        assert_eq!(d.host_header, "127.0.0.2:8009");
        let d = r.resolve(&client, "[::1]").await.unwrap();
        assert_eq!(d.base_url, "https://[::1]:8448");
        let d = r.resolve(&client, "matrix.example.org:443").await.unwrap();
        assert_eq!(d.base_url, "https://matrix.example.org:443");
        assert_eq!(d.host_header, "matrix.example.org:443");
    }
}
