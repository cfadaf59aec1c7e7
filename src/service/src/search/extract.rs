//! What of an event is searchable: the text of messages (body, formatted body as text,
//! file name), room names and topics, and what a message carries (a file, an image, a
//! link). Reply fallbacks are left out: they quote the message replied to, which would
//! otherwise be found twice.

use ruma::events::TimelineEventType;
use serde_json::Value;
use trellis_search::{Entry, Has, Key, Language};

use crate::rooms::Pdu;

/// What indexing an event means.
pub enum Action {
    /// Index (or re-index) one document.
    Put(Entry),
    /// An edit: the original event's document gets the new text (`m.new_content`).
    Edit {
        original: String,
        sender: String,
        new_content: Value,
    },
    /// A redaction: the redacted event's document goes.
    Remove(String),
    /// The room's language changed (`m.room.language`, MSC4334).
    Language(Option<Language>),
    Nothing,
}

pub const MESSAGE: &str = "m.room.message";
pub const LANGUAGE_TYPES: [&str; 2] = ["m.room.language", "org.matrix.msc4334.room.language"];

/// Whether an event of type `kind` can matter to the index (checked before anything is
/// queued for the indexer).
pub fn relevant(kind: &TimelineEventType) -> bool {
    use TimelineEventType::{RoomMessage, RoomName, RoomRedaction, RoomTopic};
    // Matched on the enum: no string is built for the common types (this runs for every
    // event sent).
    match kind {
        RoomMessage | RoomName | RoomTopic | RoomRedaction => true,
        other => LANGUAGE_TYPES.contains(&other.to_string().as_str()),
    }
}

/// What `pdu`, at stream position `position`, means for the index; `language` is its
/// room's.
pub fn action(pdu: &Pdu, position: u64, language: Language) -> Action {
    if pdu.rejected {
        return Action::Nothing;
    }
    let kind = pdu.kind.to_string();
    let Ok(content) = serde_json::from_str::<Value>(pdu.content.get()) else {
        return Action::Nothing;
    };
    let state_key_empty = pdu.state_key.as_deref() == Some("");
    match kind.as_str() {
        "m.room.redaction" => {
            let target = pdu
                .redacts
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| content["redacts"].as_str().map(str::to_owned));
            target.map_or(Action::Nothing, Action::Remove)
        }
        MESSAGE => {
            let relation = &content["m.relates_to"];
            if relation["rel_type"] == "m.replace" {
                return match (relation["event_id"].as_str(), content.get("m.new_content")) {
                    (Some(original), Some(new)) if new.is_object() => Action::Edit {
                        original: original.to_owned(),
                        sender: pdu.sender.to_string(),
                        new_content: new.clone(),
                    },
                    _ => Action::Nothing,
                };
            }
            message(pdu, position, &content, language).map_or(Action::Nothing, Action::Put)
        }
        "m.room.name" | "m.room.topic" if state_key_empty => {
            let (key, field) =
                if kind == "m.room.name" { (Key::Name, "name") } else { (Key::Topic, "topic") };
            match content[field].as_str().filter(|t| !t.trim().is_empty()) {
                Some(text) => Action::Put(entry(pdu, position, key, text.to_owned(), language)),
                // Emptied: what was searchable goes.
                None => Action::Remove(pdu.event_id.to_string()),
            }
        }
        k if LANGUAGE_TYPES.contains(&k) && state_key_empty => {
            Action::Language(content["language"].as_str().and_then(Language::from_tag))
        }
        _ => Action::Nothing,
    }
}

/// The document of an `m.room.message` at `position` whose content is `content` (its
/// own, or an edit's new content).
pub fn message(pdu: &Pdu, position: u64, content: &Value, language: Language) -> Option<Entry> {
    let body = content["body"].as_str().unwrap_or_default();
    let replying = content["m.relates_to"]["m.in_reply_to"].is_object();
    let mut text = if replying { without_reply_fallback(body) } else { body.to_owned() };
    if content["format"] == "org.matrix.custom.html"
        && let Some(html) = content["formatted_body"].as_str()
    {
        let html_text = html_to_text(html);
        if html_text.trim() != text.trim() {
            text.push('\n');
            text.push_str(&html_text);
        }
    }
    if let Some(name) = content["filename"].as_str().filter(|n| *n != body) {
        text.push('\n');
        text.push_str(name);
    }
    if text.trim().is_empty() {
        return None;
    }
    let mut has = Vec::new();
    if content["url"].is_string() || content["file"]["url"].is_string() {
        has.push(Has::Url);
    }
    match content["msgtype"].as_str() {
        Some("m.image") => has.extend([Has::File, Has::Image]),
        Some("m.file" | "m.audio" | "m.video") => has.push(Has::File),
        _ => {}
    }
    if text.contains("https://") || text.contains("http://") {
        has.push(Has::Link);
    }
    let mut entry = entry(pdu, position, Key::Body, text, language);
    entry.has = has;
    Some(entry)
}

fn entry(pdu: &Pdu, position: u64, key: Key, text: String, language: Language) -> Entry {
    Entry {
        event_id: pdu.event_id.to_string(),
        room_id: pdu.room_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        sender: pdu.sender.to_string(),
        key,
        text,
        origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.0)).unwrap_or(i64::MAX),
        position,
        has: Vec::new(),
        language,
    }
}

/// A reply's body without the quoted lines (`> ...`) and the blank line after them that
/// older clients put first.
fn without_reply_fallback(body: &str) -> String {
    if !body.starts_with("> ") {
        return body.to_owned();
    }
    let mut lines = body.lines().skip_while(|l| l.starts_with('>'));
    let rest: Vec<&str> = lines.by_ref().collect();
    rest.join("\n").trim_start().to_owned()
}

/// The text of a message's HTML: tags out (the reply fallback `<mx-reply>` with its
/// content), the common entities decoded.
fn html_to_text(html: &str) -> String {
    let html = match (html.find("<mx-reply>"), html.find("</mx-reply>")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &html[..start], &html[end + "</mx-reply>".len()..])
        }
        _ => html.to_owned(),
    };
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                // Tags separate words (`<p>a</p><p>b</p>`).
                out.push(' ');
            }
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fallbacks_are_not_indexed() {
        assert_eq!(
            without_reply_fallback("> <@a:x> the question\n> more\n\nthe answer"),
            "the answer"
        );
        assert_eq!(without_reply_fallback("plain"), "plain");
        let html = "<mx-reply><blockquote>quoted</blockquote></mx-reply><p>new&amp;<b>bold</b></p>";
        assert_eq!(html_to_text(html).split_whitespace().collect::<Vec<_>>(), ["new&", "bold"]);
    }
}
