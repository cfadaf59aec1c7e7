//! URL previews: fetching a page (or image) on a user's behalf and extracting its
//! OpenGraph data. Fetching arbitrary URLs from inside the server's network is the
//! classic SSRF hole, so every address a fetch connects to — after DNS, and again for
//! every redirect — is checked against a deny-list of private, loopback, link-local and
//! otherwise special ranges, unless an operator allowed it explicitly.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Url, dns, redirect};
use serde_json::{Map, Value};
use trellis_core::config::{MediaConfig, parse_cidr};

/// Redirects followed per fetch.
const MAX_REDIRECTS: usize = 5;
/// Longest text kept from one OpenGraph value.
const MAX_VALUE_CHARS: usize = 1000;

/// Networks never fetched from unless allowed: RFC 6890 special-purpose ranges.
const DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// Which addresses previews may connect to.
#[derive(Debug, Clone)]
pub struct IpPolicy {
    allow: Vec<(IpAddr, u8)>,
    deny: Vec<(IpAddr, u8)>,
}

impl IpPolicy {
    pub fn new(config: &MediaConfig) -> Self {
        Self::from_lists(&config.url_preview_ip_allow, &config.url_preview_ip_deny)
    }

    /// The special-purpose ranges and `deny` refused, `allow` let through (CIDR lists).
    pub fn from_lists(allow: &[String], deny: &[String]) -> Self {
        let parse = |list: &[String]| list.iter().filter_map(|s| parse_cidr(s)).collect::<Vec<_>>();
        let mut denied: Vec<_> = DENIED.iter().filter_map(|s| parse_cidr(s)).collect();
        denied.extend(parse(deny));
        Self { allow: parse(allow), deny: denied }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 address in IPv6 clothing is judged as the IPv4 address it is.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.allow.iter().any(|net| contains(*net, ip)) {
            return true;
        }
        !self.deny.iter().any(|net| contains(*net, ip))
    }
}

fn contains((net, len): (IpAddr, u8), ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The marker error of a refused address, found again in reqwest's error chain.
#[derive(Debug)]
pub(crate) struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("address not allowed for URL previews")
    }
}

impl std::error::Error for Refused {}

/// Resolves names and keeps only the addresses the policy allows, so the connection can
/// only ever go to a checked address (no second lookup an attacker's DNS could change).
pub(crate) struct CheckedResolver(pub(crate) Arc<IpPolicy>);

impl dns::Resolve for CheckedResolver {
    fn resolve(&self, name: dns::Name) -> dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed: Vec<SocketAddr> = found.filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as dns::Addrs)
        })
    }
}

/// Literal addresses in URLs skip DNS, so they are checked here.
pub(crate) fn literal_allowed(policy: &IpPolicy, url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(v4)) => policy.allows(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => policy.allows(IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => true,
        None => false,
    }
}

#[derive(Debug)]
pub enum FetchError {
    /// The address (or a redirect's) is not allowed.
    Refused,
    /// Larger than the limit.
    TooLarge,
    /// Anything else: unreachable, timed out, an error status.
    Failed(String),
}

/// A fetched resource.
pub struct Fetched {
    pub url: Url,
    pub content_type: String,
    /// At most the size limit: the start of a larger resource when `truncated`.
    pub body: Bytes,
    pub truncated: bool,
}

pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<IpPolicy>,
    max_bytes: u64,
    timeout: Duration,
}

/// An HTTP client for URLs users choose (push gateways, outgoing webhooks): it connects
/// only to addresses `policy` allows, checked after DNS, follows no redirects and uses
/// no proxy (a proxy would resolve the name itself, past the check).
pub fn guarded_client(
    policy: Arc<IpPolicy>,
    timeout: Duration,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .dns_resolver(Arc::new(CheckedResolver(policy)))
        .redirect(redirect::Policy::none())
        .no_proxy()
        .build()
}

impl Fetcher {
    pub fn new(config: &MediaConfig) -> Result<Self, String> {
        let policy = Arc::new(IpPolicy::new(config));
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver(policy.clone())))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if !matches!(attempt.url().scheme(), "http" | "https")
                    || !literal_allowed(&redirect_policy, attempt.url())
                {
                    attempt.error(Refused)
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("Trellis/", env!("CARGO_PKG_VERSION"), " (URL preview)"))
            .connect_timeout(Duration::from_secs(config.url_preview_timeout_seconds))
            .build()
            .map_err(|e| format!("URL preview client: {e}"))?;
        Ok(Self {
            client,
            policy,
            max_bytes: config.url_preview_max_bytes,
            timeout: Duration::from_secs(config.url_preview_timeout_seconds),
        })
    }

    /// GETs `url` within the time and size limits. Larger resources are cut at the limit
    /// (a page's head, where OpenGraph lives, comes first).
    pub async fn fetch(&self, url: &Url) -> Result<Fetched, FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::Failed("only http and https URLs are previewed".into()));
        }
        if !literal_allowed(&self.policy, url) {
            return Err(FetchError::Refused);
        }
        match tokio::time::timeout(self.timeout, self.fetch_inner(url)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Failed("timed out".into())),
        }
    }

    async fn fetch_inner(&self, url: &Url) -> Result<Fetched, FetchError> {
        let resp = self.client.get(url.clone()).send().await.map_err(classify)?;
        if !resp.status().is_success() {
            return Err(FetchError::Failed(format!("status {}", resp.status())));
        }
        let final_url = resp.url().clone();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let mut body = Vec::new();
        let mut truncated = false;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            let room =
                usize::try_from(self.max_bytes).unwrap_or(usize::MAX).saturating_sub(body.len());
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched { url: final_url, content_type, body: body.into(), truncated })
    }
}

fn classify(e: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if err.is::<Refused>() {
            return FetchError::Refused;
        }
        source = err.source();
    }
    FetchError::Failed(e.to_string())
}

/// The base content type, lowercased, without parameters.
pub fn base_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// OpenGraph properties of an HTML page: every `og:*` meta tag, with `<title>` and the
/// `description` meta tag as fallbacks. A small tag scanner rather than a full HTML
/// parser: previews need a handful of `<meta>` tags, not a DOM.
pub fn opengraph(html: &str, page: &Url) -> Map<String, Value> {
    let mut og = Map::new();
    let mut description = None;
    let mut title = None;
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(found) = lower[at..].find('<') {
        let start = at + found;
        let Some(len) = lower[start..].find('>') else { break };
        let tag = &html[start + 1..start + len];
        at = start + len + 1;
        let name: String =
            tag.chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>();
        match name.to_ascii_lowercase().as_str() {
            "meta" => {
                let attrs = attributes(tag);
                let key = attrs.iter().find(|(k, _)| k == "property" || k == "name").map(|a| &a.1);
                let content = attrs.iter().find(|(k, _)| k == "content").map(|a| &a.1);
                if let (Some(key), Some(content)) = (key, content) {
                    let key = key.to_ascii_lowercase();
                    if key.starts_with("og:") && !og.contains_key(&key) {
                        og.insert(key, Value::String(clip(content)));
                    } else if key == "description" && description.is_none() {
                        description = Some(clip(content));
                    }
                }
            }
            "title" if title.is_none() => {
                if let Some(end) = lower[at..].find("</title") {
                    title = Some(clip(&decode_entities(html[at..at + end].trim())));
                }
            }
            "body" => break,
            _ => {}
        }
    }
    if !og.contains_key("og:title")
        && let Some(t) = title.filter(|t| !t.is_empty())
    {
        og.insert("og:title".into(), Value::String(t));
    }
    if !og.contains_key("og:description")
        && let Some(d) = description
    {
        og.insert("og:description".into(), Value::String(d));
    }
    // Image sizes are numbers in the Matrix flavour of OpenGraph.
    for key in ["og:image:width", "og:image:height"] {
        if let Some(n) =
            og.get(key).and_then(Value::as_str).and_then(|s| s.trim().parse::<u64>().ok())
        {
            og.insert(key.into(), Value::from(n));
        } else {
            og.remove(key);
        }
    }
    if let Some(image) = og.get("og:image").and_then(Value::as_str)
        && let Ok(abs) = page.join(image)
    {
        og.insert("og:image".into(), Value::String(abs.to_string()));
    }
    og
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_VALUE_CHARS).collect()
}

/// `name="value"`, `name='value'` and `name=value` pairs of a tag, names lowercased.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = tag.as_bytes();
    let mut i = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
    while i < bytes.len() {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
            i += 1;
        }
        let name_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let name = tag[name_start..i].to_ascii_lowercase();
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            if !name.is_empty() {
                out.push((name, String::new()));
            }
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let value = if i < bytes.len() && (bytes[i] == b'"' || bytes[i] == b'\'') {
            let quote = bytes[i];
            let start = i + 1;
            let end = tag[start..].find(quote as char).map(|e| start + e).unwrap_or(tag.len());
            i = (end + 1).min(bytes.len());
            &tag[start..end]
        } else {
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            &tag[start..i]
        };
        out.push((name, decode_entities(value)));
    }
    out
}

/// The entities that turn up in titles and descriptions.
fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.bytes().take(12).position(|b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" | "#39" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            e if e.starts_with("#x") || e.starts_with("#X") => {
                u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32)
            }
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn policy(allow: &[&str]) -> IpPolicy {
        let config = MediaConfig {
            url_preview_ip_allow: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        IpPolicy::new(&config)
    }

    #[test]
    fn private_and_special_addresses_are_denied() {
        let p = policy(&[]);
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "fd00::1",
            "0.0.0.0",
            "100.64.0.1",
        ] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip} allowed");
        }
        for ip in ["93.184.216.34", "2606:4700::1"] {
            assert!(p.allows(ip.parse().unwrap()), "{ip} denied");
        }
        let p = policy(&["127.0.0.1/32"]);
        assert!(p.allows(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(!p.allows(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        assert!(!p.allows(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn opengraph_tags_and_fallbacks() {
        let page = Url::parse("http://example.org/a/b.html").unwrap();
        let html = r#"<html><head><title>Plain &amp; simple</title>
            <meta property="og:description" content='Caf&#233; &quot;menu&quot;'>
            <META name=description content="ignored">
            <meta property="og:image" content="/img.png" />
            <meta property="og:image:width" content="640"><meta property="og:image:height" content="x">
            </head><body><meta property="og:title" content="in body"></body></html>"#;
        let og = opengraph(html, &page);
        assert_eq!(og["og:title"], "Plain & simple");
        assert_eq!(og["og:description"], "Café \"menu\"");
        assert_eq!(og["og:image"], "http://example.org/img.png");
        assert_eq!(og["og:image:width"], 640);
        assert!(!og.contains_key("og:image:height"));
    }

    #[test]
    fn hostile_html_does_not_panic() {
        let page = Url::parse("http://example.org/").unwrap();
        for html in [
            "<",
            "<meta",
            "<meta content=\"",
            "&#xFFFFFFFF;",
            "<title>",
            "<meta property=og:title content=é>",
            "<<<>>>",
            "<meta =x>",
        ] {
            let _ = opengraph(html, &page);
        }
    }
}
