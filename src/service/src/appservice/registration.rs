//! Application service registrations: the standard registration file (YAML, as every
//! bridge writes one), checked field by field so that a mistake is named, and compiled
//! into the namespaces requests and events are matched against.

use std::path::Path;

use regex::Regex;
use serde::Deserialize;

/// A registration file as written (the spec's fields, and the unstable ones bridges use).
#[derive(Debug, Clone, Deserialize)]
pub struct RegistrationFile {
    pub id: Option<String>,
    /// `null` for a service that only uses the client API and receives nothing.
    #[serde(default)]
    pub url: Option<String>,
    pub as_token: Option<String>,
    pub hs_token: Option<String>,
    pub sender_localpart: Option<String>,
    #[serde(default)]
    pub namespaces: NamespacesFile,
    #[serde(default)]
    pub rate_limited: Option<bool>,
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// MSC2409's name before `receive_ephemeral`.
    #[serde(default, rename = "de.sorunome.msc2409.push_ephemeral")]
    pub push_ephemeral: bool,
    /// MSC3202 (device lists and one-time key counts for encrypted bridges).
    #[serde(default, rename = "org.matrix.msc3202")]
    pub msc3202: bool,
    /// An outgoing webhook (a Trellis extension): the room it watches. Its URL was chosen
    /// by a room member, so it is only ever reached through the SSRF guard.
    #[serde(default, rename = "org.trellis.outgoing_webhook_room")]
    pub outgoing_webhook_room: Option<String>,
    /// The room member who created the outgoing webhook: it carries the room's events only
    /// while they are joined.
    #[serde(default, rename = "org.trellis.outgoing_webhook_creator")]
    pub outgoing_webhook_creator: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamespacesFile {
    #[serde(default)]
    pub users: Vec<NamespaceFile>,
    #[serde(default)]
    pub aliases: Vec<NamespaceFile>,
    #[serde(default)]
    pub rooms: Vec<NamespaceFile>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceFile {
    #[serde(default)]
    pub exclusive: bool,
    pub regex: Option<String>,
}

/// One namespace, compiled; matched against the whole id.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub exclusive: bool,
    /// As written in the registration.
    pub pattern: String,
    pub regex: Regex,
}

/// A checked registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    pub users: Vec<Namespace>,
    pub aliases: Vec<Namespace>,
    pub rooms: Vec<Namespace>,
    /// Masqueraded users are rate-limited unless this says otherwise.
    pub rate_limited: bool,
    pub protocols: Vec<String>,
    pub receive_ephemeral: bool,
    pub msc3202: bool,
    /// Set for an outgoing webhook: the room it watches (see the file's field).
    pub outgoing_webhook_room: Option<String>,
    pub outgoing_webhook_creator: Option<String>,
}

impl Registration {
    /// Checks a registration read from `source` (a file name, for messages).
    pub fn check(file: RegistrationFile, source: &str) -> Result<Self, String> {
        let missing = |field: &str| format!("{source}: `{field}` is required");
        let non_empty = |value: Option<String>, field: &str| -> Result<String, String> {
            match value {
                Some(v) if !v.trim().is_empty() => Ok(v),
                _ => Err(missing(field)),
            }
        };
        let id = non_empty(file.id, "id")?;
        let as_token = non_empty(file.as_token, "as_token")?;
        let hs_token = non_empty(file.hs_token, "hs_token")?;
        let sender_localpart = non_empty(file.sender_localpart, "sender_localpart")?;
        if let Some(url) = &file.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("{source}: `url` must be an http(s) URL or null, not {url:?}"));
        }
        let compile = |list: Vec<NamespaceFile>, kind: &str| -> Result<Vec<Namespace>, String> {
            list.into_iter()
                .enumerate()
                .map(|(i, ns)| {
                    let field = format!("namespaces.{kind}[{i}].regex");
                    let pattern = ns.regex.ok_or_else(|| missing(&field))?;
                    // Anchored: the spec matches the regex against the whole id.
                    let regex = Regex::new(&format!("^(?:{pattern})$"))
                        .map_err(|e| format!("{source}: `{field}` is not a valid regex: {e}"))?;
                    Ok(Namespace { exclusive: ns.exclusive, pattern, regex })
                })
                .collect()
        };
        Ok(Self {
            users: compile(file.namespaces.users, "users")?,
            aliases: compile(file.namespaces.aliases, "aliases")?,
            rooms: compile(file.namespaces.rooms, "rooms")?,
            id,
            url: file.url.map(|u| u.trim_end_matches('/').to_owned()),
            as_token,
            hs_token,
            sender_localpart,
            rate_limited: file.rate_limited.unwrap_or(true),
            protocols: file.protocols.unwrap_or_default(),
            receive_ephemeral: file.receive_ephemeral || file.push_ephemeral,
            msc3202: file.msc3202,
            outgoing_webhook_room: file.outgoing_webhook_room,
            outgoing_webhook_creator: file.outgoing_webhook_creator,
        })
    }

    /// Reads and checks a registration file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let source = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{source}: cannot read: {e}"))?;
        Self::from_yaml(&text, &source)
    }

    pub fn from_yaml(text: &str, source: &str) -> Result<Self, String> {
        let file: RegistrationFile =
            serde_norway::from_str(text).map_err(|e| format!("{source}: {e}"))?;
        Self::check(file, source)
    }

    /// An outgoing webhook: a URL a room member chose, reached only to deliver its
    /// room's events (through the SSRF guard), never asked anything.
    pub fn is_webhook(&self) -> bool {
        self.outgoing_webhook_room.is_some()
    }

    /// Whether `user_id` is the service's own user (no allocation: asked per member).
    fn is_sender(&self, user_id: &str, server_name: &str) -> bool {
        user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(lp, server)| lp == self.sender_localpart && server == server_name)
    }

    /// Whether a user id is in the service's user namespaces (or is its sender).
    pub fn claims_user(&self, user_id: &str, server_name: &str) -> bool {
        self.is_sender(user_id, server_name)
            || self.users.iter().any(|ns| ns.regex.is_match(user_id))
    }

    pub fn claims_user_exclusively(&self, user_id: &str, server_name: &str) -> bool {
        self.is_sender(user_id, server_name)
            || self.users.iter().any(|ns| ns.exclusive && ns.regex.is_match(user_id))
    }

    pub fn claims_alias(&self, alias: &str) -> bool {
        self.aliases.iter().any(|ns| ns.regex.is_match(alias))
    }

    pub fn claims_alias_exclusively(&self, alias: &str) -> bool {
        self.aliases.iter().any(|ns| ns.exclusive && ns.regex.is_match(alias))
    }

    pub fn claims_room(&self, room_id: &str) -> bool {
        self.rooms.iter().any(|ns| ns.regex.is_match(room_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r##"
id: irc
url: "http://127.0.0.1:9000/"
as_token: at
hs_token: ht
sender_localpart: _irc_bot
namespaces:
  users:
    - exclusive: true
      regex: "@_irc_.*:example.org"
  aliases:
    - exclusive: false
      regex: "#_irc_.*"
rate_limited: false
"##;

    #[test]
    fn a_registration_is_read_and_its_namespaces_match_whole_ids() {
        let reg = Registration::from_yaml(GOOD, "irc.yaml").unwrap();
        assert_eq!(reg.url.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(!reg.rate_limited);
        assert!(reg.claims_user_exclusively("@_irc_bob:example.org", "example.org"));
        assert!(reg.claims_user("@_irc_bot:example.org", "example.org"));
        assert!(!reg.claims_user("@x_irc_bob:example.org.evil", "example.org"));
        assert!(reg.claims_alias("#_irc_chat:example.org"));
        assert!(!reg.claims_alias_exclusively("#_irc_chat:example.org"));
    }

    #[test]
    fn mistakes_are_named() {
        let no_token = GOOD.replace("as_token: at\n", "");
        let err = Registration::from_yaml(&no_token, "irc.yaml").unwrap_err();
        assert!(err.contains("`as_token` is required"), "{err}");
        let bad_regex = GOOD.replace("\"#_irc_.*\"", "\"#_irc_(\"");
        let err = Registration::from_yaml(&bad_regex, "irc.yaml").unwrap_err();
        assert!(err.contains("namespaces.aliases[0].regex"), "{err}");
        let bad_url = GOOD.replace("http://127.0.0.1:9000/", "ftp://x");
        let err = Registration::from_yaml(&bad_url, "irc.yaml").unwrap_err();
        assert!(err.contains("`url`"), "{err}");
    }
}
