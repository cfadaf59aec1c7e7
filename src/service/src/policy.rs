//! The server's content policy (`[content_policy]`): words, patterns and link domains
//! that messages in public rooms and the names of new accounts may not contain. Caught
//! items are refused or, with `action = "flag"`, let through and reported to the admins
//! (the reports queue, as if a user had reported them).

use ruma::{EventId, RoomId};
use serde_json::Value;
use trellis_core::{
    Error, ErrorKind, Result,
    config::{ContentPolicyConfig, PolicyAction},
    error::code,
};

use crate::{Services, rooms::public::room_info};

pub struct ContentPolicy {
    words: Vec<String>,
    patterns: Vec<regex::Regex>,
    domains: Vec<String>,
    action: PolicyAction,
    check_names: bool,
    links: Option<regex::Regex>,
}

impl ContentPolicy {
    pub fn from_config(config: &ContentPolicyConfig) -> Result<Self, String> {
        let patterns = config
            .patterns
            .iter()
            .map(|p| regex::Regex::new(p).map_err(|e| format!("content_policy.patterns: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let links = match config.link_domains.is_empty() {
            true => None,
            false => Some(
                regex::Regex::new(r"(?i)\b(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})\b")
                    .map_err(|e| format!("link pattern: {e}"))?,
            ),
        };
        Ok(Self {
            // As a message's words are compared: lower case, one space between words.
            words: config
                .words
                .iter()
                .map(|w| {
                    let lower = w.to_lowercase();
                    let parts: Vec<&str> = lower
                        .split(|c: char| !c.is_alphanumeric())
                        .filter(|p| !p.is_empty())
                        .collect();
                    parts.join(" ")
                })
                .filter(|w| !w.is_empty())
                .collect(),
            patterns,
            domains: config
                .link_domains
                .iter()
                .map(|d| d.trim_matches('.').to_lowercase())
                .collect(),
            action: config.action,
            check_names: config.check_names,
            links,
        })
    }

    /// Whether there is anything to check (an empty policy costs sends nothing).
    pub fn active(&self) -> bool {
        !self.words.is_empty() || !self.patterns.is_empty() || !self.domains.is_empty()
    }

    /// What in `text` breaks the policy, if anything: a word (as a whole word), a
    /// pattern or a linked domain.
    pub fn violation(&self, text: &str) -> Option<String> {
        let lower = text.to_lowercase();
        if !self.words.is_empty() {
            // Words and phrases match whole words: compare on the text's words joined
            // by single spaces, with spaces around so that edges count.
            let words: Vec<&str> =
                lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
            let joined = format!(" {} ", words.join(" "));
            let found = self.words.iter().find(|banned| joined.contains(&format!(" {banned} ")));
            if let Some(word) = found {
                return Some(format!("the word \"{word}\""));
            }
        }
        if let Some(p) = self.patterns.iter().find(|p| p.is_match(text)) {
            return Some(format!("the pattern {}", p.as_str()));
        }
        let links = self.links.as_ref()?;
        links.captures_iter(&lower).find_map(|c| {
            let host = c.get(1)?.as_str();
            self.domains
                .iter()
                .find(|d| host == d.as_str() || host.ends_with(&format!(".{d}")))
                .map(|d| format!("a link to {d}"))
        })
    }

    /// What in a new account's name breaks the policy: banned words anywhere in it.
    fn name_violation(&self, name: &str) -> Option<String> {
        let lower = name.to_lowercase();
        if let Some(word) = self.words.iter().find(|w| lower.contains(&w.replace(' ', ""))) {
            return Some(format!("the word \"{word}\""));
        }
        self.patterns
            .iter()
            .find(|p| p.is_match(name))
            .map(|p| format!("the pattern {}", p.as_str()))
    }
}

/// The texts of a message, and of the new content an edit (`m.new_content`) shows.
fn message_text(content: &Value) -> String {
    let mut text = String::new();
    for part in [content, &content["m.new_content"]] {
        for field in ["body", "formatted_body"] {
            if let Some(t) = part[field].as_str() {
                text.push_str(t);
                text.push('\n');
            }
        }
    }
    text
}

/// Checks a message about to be sent to a public room (joinable by anyone, or in the
/// directory): refused with 403 under `reject`; under `flag`, what to report once it
/// is sent.
pub fn check_message(
    services: &Services,
    room_id: &RoomId,
    content: &Value,
) -> Result<Option<String>> {
    let policy = &services.policy;
    if !policy.active() {
        return Ok(None);
    }
    let Some(found) = policy.violation(&message_text(content)) else { return Ok(None) };
    let public = services.public_rooms.is_published(room_id.as_str())?
        || room_info(&services.rooms, room_id.as_str())?.is_some_and(|i| i.join_rule == "public");
    if !public {
        return Ok(None);
    }
    match policy.action {
        PolicyAction::Reject => Err(Error::forbidden(format!(
            "This message breaks the server's content policy ({found})"
        ))),
        PolicyAction::Flag => Ok(Some(found)),
    }
}

/// Checks the name of an account being registered; under `flag`, what to report once
/// it exists.
pub fn check_name(services: &Services, localpart: &str) -> Result<Option<String>> {
    let policy = &services.policy;
    if !policy.check_names || !policy.active() {
        return Ok(None);
    }
    let Some(found) = policy.name_violation(localpart) else { return Ok(None) };
    match policy.action {
        PolicyAction::Reject => Err(Error::new(
            ErrorKind::BadRequest,
            code::INVALID_USERNAME,
            "This username is not allowed on this server",
        )),
        PolicyAction::Flag => Ok(Some(found)),
    }
}

/// Reports a flagged message for the admins.
pub async fn flag_event(services: &Services, room_id: &RoomId, event_id: &EventId, found: &str) {
    let reason = format!("Content policy: {found}");
    let result = crate::reports::flag(
        services,
        Some(room_id.as_str()),
        Some(event_id.as_str()),
        None,
        reason,
    )
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "reporting a flagged message");
    }
}

/// Reports a flagged account name for the admins.
pub async fn flag_user(services: &Services, user_id: &str, found: &str) {
    let reason = format!("Content policy: the account name contains {found}");
    if let Err(e) = crate::reports::flag(services, None, None, Some(user_id), reason).await {
        tracing::error!(error = %e, "reporting a flagged account name");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(words: &[&str], patterns: &[&str], domains: &[&str]) -> ContentPolicy {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        ContentPolicy::from_config(&ContentPolicyConfig {
            words: owned(words),
            patterns: owned(patterns),
            link_domains: owned(domains),
            action: PolicyAction::Reject,
            check_names: true,
        })
        .unwrap()
    }

    #[test]
    fn words_match_whole_words_in_any_case() {
        let p = policy(&["scam"], &[], &[]);
        assert!(p.violation("this is a SCAM!").is_some());
        assert!(p.violation("scampi for dinner").is_none());
        assert!(p.name_violation("bigscammer").is_some());
        assert!(p.violation("").is_none());
        let phrase = policy(&["free  Money"], &[], &[]);
        assert!(phrase.violation("Get FREE money now").is_some());
        assert!(phrase.violation("free moneyball").is_none());
    }

    #[test]
    fn links_match_their_domain_and_its_subdomains_only() {
        let p = policy(&[], &[], &["bad.example"]);
        assert!(p.violation("see https://bad.example/x").is_some());
        assert!(p.violation("see http://www.BAD.example").is_some());
        assert!(p.violation("or just bad.example").is_some());
        assert!(p.violation("https://notbad.example/").is_none());
        assert!(p.violation("https://bad.example.org/").is_none());
        assert!(!policy(&[], &[], &[]).active());
    }

    #[test]
    fn patterns_match_anywhere() {
        let p = policy(&[], &[r"\d{4}-\d{4}-\d{4}-\d{4}"], &[]);
        assert!(p.violation("card 1234-5678-9012-3456 please").is_some());
        assert!(p.violation("1234-5678").is_none());
    }
}
