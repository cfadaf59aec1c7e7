//! Push rules: each user's ruleset lives in the `m.push_rules` global account data event
//! (content `{"global": <ruleset>}`), so a change reaches the user's other clients through
//! sync like any other account data. A user who never changed a rule has nothing stored
//! and gets the server-default ruleset.

use std::sync::Arc;

use ruma::{
    OwnedRoomId, OwnedUserId, UserId,
    push::{
        Action, AnyPushRule, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule,
        NewPushRule, NewSimplePushRule, PushCondition, RemovePushRuleError, RuleKind, Ruleset,
    },
};
use serde_json::{Value, json};
use trellis_core::{Error, ErrorKind, Result, error::code};
use trellis_store::Db;

use crate::{AccountData, rooms::stream::StreamPositions};

/// The account data type holding the ruleset.
pub const EVENT_TYPE: &str = "m.push_rules";

/// The rule kinds of the `global` scope, in the order they are evaluated.
pub const KINDS: &[&str] = &["override", "content", "room", "sender", "underride"];

pub struct PushRules {
    /// A handle on the same account data store and stream as `Services::account_data`
    /// (the type keeps no state of its own), so rulesets are written at stream positions.
    account_data: AccountData,
    /// Changes are read-modify-write cycles on the whole ruleset: without this, two
    /// concurrent changes would both start from the same ruleset and the later write
    /// would drop the earlier change.
    write_lock: tokio::sync::Mutex<()>,
    /// Parsed rulesets: every event is evaluated against every member's ruleset, which
    /// must not mean parsing each from JSON per event. Only `store` changes a ruleset.
    /// The counter bumps on every change, so a ruleset read before a change is not kept
    /// after it.
    cache: std::sync::Mutex<(std::collections::HashMap<String, CachedRuleset>, u64)>,
}

/// A user's ruleset as evaluation wants it.
#[derive(Clone)]
pub struct CachedRuleset {
    pub ruleset: Arc<Ruleset>,
    /// The user never changed a rule: theirs is exactly the server default, so an event
    /// that does not single them out gets what it gets for any such user.
    pub is_default: bool,
}

/// Rulesets kept parsed, at most.
const CACHED_RULESETS: usize = 10_000;

impl PushRules {
    pub fn new(db: Db, stream: Arc<StreamPositions>) -> Self {
        Self {
            account_data: AccountData::new(db, stream),
            write_lock: tokio::sync::Mutex::new(()),
            cache: std::sync::Mutex::default(),
        }
    }

    /// [`Self::ruleset`], parsed once and shared.
    pub fn cached_ruleset(&self, user_id: &str) -> Result<CachedRuleset> {
        let generation = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = cache.0.get(user_id) {
                return Ok(r.clone());
            }
            cache.1
        };
        let (ruleset, is_default) = self.ruleset_and_origin(user_id)?;
        let cached = CachedRuleset { ruleset: Arc::new(ruleset), is_default };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.1 == generation {
            if cache.0.len() >= CACHED_RULESETS {
                cache.0.clear();
            }
            cache.0.insert(user_id.to_owned(), cached.clone());
        }
        Ok(cached)
    }

    /// The user's ruleset: the stored one, brought up to date with the current
    /// server-default rules, or the server defaults when the user changed nothing. This is
    /// what notification counting and pushers evaluate events against.
    pub fn ruleset(&self, user_id: &str) -> Result<Ruleset> {
        Ok(self.ruleset_and_origin(user_id)?.0)
    }

    /// The ruleset, and whether it is the server default (the user changed nothing).
    fn ruleset_and_origin(&self, user_id: &str) -> Result<(Ruleset, bool)> {
        let user = parse_user(user_id)?;
        let defaults = server_default(&user);
        let Some(content) = self.account_data.get(user.localpart(), None, EVENT_TYPE)? else {
            return Ok((defaults, true));
        };
        let global = content.get("global").cloned().unwrap_or(Value::Null);
        let mut ruleset: Ruleset = serde_json::from_value(global)
            .map_err(|e| Error::internal("stored push rules do not parse", e))?;
        // Server-default rules added or changed since the ruleset was stored take effect,
        // keeping the user's `enabled` and `actions` of the ones they already had.
        ruleset.update_with_server_default(defaults);
        Ok((ruleset, false))
    }

    /// One rule, or 404 `M_NOT_FOUND`.
    pub fn rule(&self, user_id: &str, kind: &RuleKind, rule_id: &str) -> Result<AnyPushRule> {
        check_kind(kind)?;
        let ruleset = self.ruleset(user_id)?;
        let rule = ruleset.get(kind.clone(), rule_id).ok_or_else(rule_not_found)?;
        Ok(rule.to_owned())
    }

    /// Creates or replaces a user-defined rule, placed by `before`/`after` (ids of the
    /// user's own rules of the same kind) or, when new and unplaced, first among the
    /// user's rules of its kind. A replaced rule keeps its `enabled` flag.
    pub async fn set_rule(
        &self,
        user_id: &str,
        rule: NewPushRule,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<()> {
        let _guard = self.write_lock.lock().await;
        let mut ruleset = self.ruleset(user_id)?;
        ruleset.insert(rule, after, before).map_err(insert_error)?;
        self.store(user_id, &ruleset).await
    }

    /// Deletes a user-defined rule. Server-default rules cannot be deleted (only
    /// disabled): the spec's only error for this endpoint is 404 `M_NOT_FOUND`.
    pub async fn remove_rule(&self, user_id: &str, kind: &RuleKind, rule_id: &str) -> Result<()> {
        check_kind(kind)?;
        let _guard = self.write_lock.lock().await;
        let mut ruleset = self.ruleset(user_id)?;
        ruleset.remove(kind.clone(), rule_id).map_err(|e| match e {
            RemovePushRuleError::ServerDefault => Error::not_found(
                "Server-default push rules cannot be deleted; disable them instead",
            ),
            _ => rule_not_found(),
        })?;
        self.store(user_id, &ruleset).await
    }

    pub async fn set_enabled(
        &self,
        user_id: &str,
        kind: &RuleKind,
        rule_id: &str,
        enabled: bool,
    ) -> Result<()> {
        check_kind(kind)?;
        let _guard = self.write_lock.lock().await;
        let mut ruleset = self.ruleset(user_id)?;
        ruleset.set_enabled(kind.clone(), rule_id, enabled).map_err(|_| rule_not_found())?;
        self.store(user_id, &ruleset).await
    }

    /// Replaces a rule's actions; server-default rules included.
    pub async fn set_actions(
        &self,
        user_id: &str,
        kind: &RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<()> {
        check_kind(kind)?;
        let _guard = self.write_lock.lock().await;
        let mut ruleset = self.ruleset(user_id)?;
        ruleset.set_actions(kind.clone(), rule_id, actions).map_err(|_| rule_not_found())?;
        self.store(user_id, &ruleset).await
    }

    async fn store(&self, user_id: &str, ruleset: &Ruleset) -> Result<()> {
        let user = parse_user(user_id)?;
        let global = serde_json::to_value(ruleset)
            .map_err(|e| Error::internal("serializing push rules", e))?;
        tracing::debug!(user = user_id, "push rules changed");
        let result = self
            .account_data
            .put(user.localpart(), None, EVENT_TYPE, json!({ "global": global }))
            .await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.1 += 1;
        cache.0.remove(user_id);
        result
    }
}

/// The spec's default rules, and one for MatrixRTC calls (MSC4075): a call's
/// `m.rtc.notification` (or its unstable `org.matrix.msc4075.rtc.notification`) of type
/// `ring` rings like a 1:1 call invite, right after `.m.rule.call`.
pub fn server_default(user: &ruma::UserId) -> Ruleset {
    let mut ruleset = Ruleset::server_default(user);
    let rtc = serde_json::json!({
        "rule_id": ".org.matrix.msc4075.rtc_notification", "default": true, "enabled": true,
        "conditions": [
            {"kind": "event_match", "key": "type", "pattern": "*rtc.notification"},
            {"kind": "event_match", "key": "content.notification_type", "pattern": "ring"}],
        "actions": ["notify", {"set_tweak": "sound", "value": "ring"}]});
    if let Ok(rule) = serde_json::from_value(rtc) {
        let mut underride: Vec<_> = std::mem::take(&mut ruleset.underride).into_iter().collect();
        let after_call =
            underride.iter().position(|r| r.rule_id == ".m.rule.call").map_or(0, |i| i + 1);
        underride.insert(after_call, rule);
        ruleset.underride = underride.into_iter().collect();
    }
    ruleset
}

/// Builds the rule a client sent to `PUT /pushrules/global/{kind}/{ruleId}` from the
/// path's kind and id and the JSON body: `actions` always, `pattern` for content rules,
/// `conditions` (optional, none = always matches) for override and underride rules. Room
/// and sender rules are named by the room or user they apply to.
pub fn new_rule(kind: &str, rule_id: &str, body: &Value) -> Result<NewPushRule> {
    if !KINDS.contains(&kind) {
        return Err(unknown_kind(kind));
    }
    if rule_id.is_empty() {
        return Err(Error::invalid_param("The rule id must not be empty"));
    }
    let body = body.as_object().ok_or_else(|| Error::bad_json("The body must be a JSON object"))?;
    let actions: Vec<Action> = match body.get("actions") {
        Some(a) => serde_json::from_value(a.clone())
            .map_err(|e| Error::bad_json(format!("Invalid actions: {e}")))?,
        None => return Err(missing_param("actions")),
    };
    let conditions = || -> Result<Vec<PushCondition>> {
        match body.get("conditions") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(c) => serde_json::from_value(c.clone())
                .map_err(|e| Error::bad_json(format!("Invalid conditions: {e}"))),
        }
    };
    let id = rule_id.to_owned();
    Ok(match kind {
        "override" => {
            NewPushRule::Override(NewConditionalPushRule::new(id, conditions()?, actions))
        }
        "underride" => {
            NewPushRule::Underride(NewConditionalPushRule::new(id, conditions()?, actions))
        }
        "content" => {
            let pattern = match body.get("pattern") {
                Some(Value::String(p)) => p.clone(),
                Some(_) => return Err(Error::bad_json("pattern must be a string")),
                None => return Err(missing_param("pattern")),
            };
            NewPushRule::Content(NewPatternedPushRule::new(id, pattern, actions))
        }
        "room" => {
            let room = OwnedRoomId::try_from(id)
                .map_err(|_| Error::invalid_param("The id of a room rule must be the room's id"))?;
            NewPushRule::Room(NewSimplePushRule::new(room, actions))
        }
        _ => {
            let user = OwnedUserId::try_from(id).map_err(|_| {
                Error::invalid_param("The id of a sender rule must be the sender's user id")
            })?;
            NewPushRule::Sender(NewSimplePushRule::new(user, actions))
        }
    })
}

/// The path's kind must be one the spec defines (ruma parses any string).
pub fn check_kind(kind: &RuleKind) -> Result<()> {
    if KINDS.contains(&kind.as_str()) { Ok(()) } else { Err(unknown_kind(kind.as_str())) }
}

fn unknown_kind(kind: &str) -> Error {
    Error::invalid_param(format!(
        "Unknown push rule kind {kind:?}: expected override, content, room, sender or underride"
    ))
}

fn missing_param(name: &str) -> Error {
    Error::new(ErrorKind::BadRequest, code::MISSING_PARAM, format!("Missing parameter: {name}"))
}

fn rule_not_found() -> Error {
    Error::not_found("The push rule was not found")
}

fn insert_error(e: InsertPushRuleError) -> Error {
    match e {
        InsertPushRuleError::ServerDefaultRuleId => {
            Error::invalid_param("Rule ids starting with '.' are reserved for server-default rules")
        }
        InsertPushRuleError::InvalidRuleId => {
            Error::invalid_param("Rule ids must not contain '/' or '\\'")
        }
        InsertPushRuleError::RelativeToServerDefaultRule => {
            Error::invalid_param("Rules cannot be placed relative to server-default rules")
        }
        // The spec answers a `before`/`after` naming no rule with 400 (its example uses
        // M_UNKNOWN); 404 is reserved for the rule itself.
        InsertPushRuleError::UnknownRuleId => Error::new(
            ErrorKind::BadRequest,
            code::UNKNOWN,
            "before/after rule not found among the user's rules of this kind",
        ),
        InsertPushRuleError::BeforeHigherThanAfter => {
            Error::invalid_param("The before rule comes ahead of the after rule")
        }
        other => Error::invalid_param(other.to_string()),
    }
}

fn parse_user(user_id: &str) -> Result<ruma::OwnedUserId> {
    UserId::parse(user_id).map_err(|e| Error::internal("push rules of an invalid user id", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_by_kind() {
        let actions = json!({"actions": ["notify"]});
        assert!(matches!(new_rule("override", "a", &actions), Ok(NewPushRule::Override(_))));
        assert!(matches!(new_rule("underride", "a", &actions), Ok(NewPushRule::Underride(_))));
        let err = new_rule("content", "a", &actions).err().map(|e| e.errcode);
        assert_eq!(err, Some(code::MISSING_PARAM));
        let content = json!({"actions": [], "pattern": "cake*"});
        assert!(matches!(new_rule("content", "a", &content), Ok(NewPushRule::Content(_))));
        let err = new_rule("room", "not-a-room", &actions).err().map(|e| e.errcode);
        assert_eq!(err, Some(code::INVALID_PARAM));
        assert!(matches!(new_rule("room", "!r:x", &actions), Ok(NewPushRule::Room(_))));
        assert!(matches!(new_rule("sender", "@u:x", &actions), Ok(NewPushRule::Sender(_))));
        let err = new_rule("nonsense", "a", &actions).err().map(|e| e.errcode);
        assert_eq!(err, Some(code::INVALID_PARAM));
        let err = new_rule("override", "a", &json!({})).err().map(|e| e.errcode);
        assert_eq!(err, Some(code::MISSING_PARAM));
    }
}
