//! Email notifications (pushers of kind `email`, app id `m.email`): a background job
//! mails a user a digest of the notifications they left unread for `email_delay_seconds`
//! while they were not active, at most once per `email_period_seconds` per address.
//! Rooms, senders and excerpts (never the text of encrypted messages, only their
//! number), links to the web client, and a one-click unsubscribe link (RFC 8058) that
//! removes the pusher without signing in.

use std::{collections::BTreeMap, fmt::Write as _, sync::Arc, time::Duration};

use ruma::events::room::member::MembershipState;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use trellis_core::{Error, Result, now_millis};
use trellis_store::{Batch, Json, Table, catalog};

use super::{notify::Notification, pushers::PusherRecord};
use crate::Services;

/// (localpart, address) -> what was mailed
const STATE: Table<(String, String), Json<Mailed>> = Table::new(&catalog::EMAIL_NOTIFY_STATE);
/// unsubscribe token -> (localpart, address)
const UNSUBSCRIBE: Table<String, Json<(String, String)>> = Table::new(&catalog::EMAIL_UNSUBSCRIBE);

/// Notifications one digest reads at most.
const SCAN: usize = 100;
/// Messages shown per room.
const PER_ROOM: usize = 5;
/// Characters of a message shown.
const EXCERPT: usize = 200;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Mailed {
    last_mail_ms: u64,
    /// Notifications up to this stream position were mailed (or read) already.
    mailed_upto: u64,
    token: String,
}

/// Mails digests for as long as the server runs.
pub async fn run(services: Arc<Services>) {
    let config = &services.config.push;
    let shortest = config.email_delay_seconds.min(config.email_period_seconds).max(1);
    let tick = Duration::from_millis((shortest * 1000 / 4).clamp(250, 30_000));
    let mut ticker = tokio::time::interval(tick);
    loop {
        ticker.tick().await;
        let round = mail_round(&services).instrument(tracing::info_span!("email_notifications"));
        if let Err(e) = round.await {
            tracing::warn!(error = %e, "email notifications failed");
        }
    }
}

async fn mail_round(services: &Arc<Services>) -> Result<()> {
    if services.mailer.is_none() {
        return Ok(());
    }
    for (localpart, record) in services.pushers.of_kind("email") {
        if let Err(e) = maybe_mail(services, &localpart, &record).await {
            tracing::warn!(user = %localpart, error = %e, "a notification mail failed");
        }
    }
    Ok(())
}

/// One message of a digest.
struct Line {
    sender: String,
    /// `None` for an encrypted message.
    text: Option<String>,
}

async fn maybe_mail(
    services: &Arc<Services>,
    localpart: &str,
    record: &PusherRecord,
) -> Result<()> {
    let config = &services.config.push;
    let address = record.pusher.pushkey.clone();
    let key = (localpart.to_owned(), address.clone());
    let mut mailed = STATE.get(&*services.db, &key)?.map(|j| j.0).unwrap_or_default();
    let now = now_millis();
    let delay_ms = config.email_delay_seconds * 1000;
    if now.saturating_sub(mailed.last_mail_ms) < config.email_period_seconds * 1000 {
        return Ok(());
    }
    let user_id = services.accounts.user_id(localpart);
    let status = services.presence.status(&user_id)?;
    if status.last_active_ago.is_some_and(|ago| ago < delay_ms) {
        return Ok(());
    }
    let (history, _) = services.notifier.history(services, &user_id, None, SCAN, false)?;
    let mut read_upto: BTreeMap<String, u64> = BTreeMap::new();
    let mut due: Vec<(u64, Notification)> = Vec::new();
    for (position, n) in history {
        if position <= mailed.mailed_upto || n.ts < record.created_ms {
            continue;
        }
        if !read_upto.contains_key(&n.room_id) {
            let read = read_position(services, &n.room_id, &user_id)?;
            read_upto.insert(n.room_id.clone(), read);
        }
        if position > read_upto[&n.room_id] {
            due.push((position, n));
        }
    }
    // Mailed once the oldest unread notification has waited long enough.
    if due
        .iter()
        .map(|(_, n)| n.ts)
        .min()
        .is_none_or(|oldest| now.saturating_sub(oldest) < delay_ms)
    {
        return Ok(());
    }
    due.reverse();
    let joined = services.rooms.rooms_of(&user_id, &MembershipState::Join)?;
    // Rooms in the order of their oldest unread message.
    let mut rooms: Vec<(String, Vec<Line>)> = Vec::new();
    for (_, n) in &due {
        let Some(event) = services.rooms.cached_event(&n.event_id)? else { continue };
        let pdu = &event.pdu;
        // Expired under the room's retention policy: not mailed either.
        if crate::rooms::Rooms::is_expired(pdu, services.rooms.expired_before(&n.room_id)?) {
            continue;
        }
        let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
        let invite = content["membership"] == "invite" && pdu.kind.to_string() == "m.room.member";
        // An invite the user has accepted since is no news.
        if invite && joined.contains(&n.room_id) {
            continue;
        }
        let sender = services
            .rooms
            .display_names(&n.room_id, &[pdu.sender.to_string()])?
            .pop()
            .flatten()
            .unwrap_or_else(|| pdu.sender.to_string());
        let text = match pdu.kind.to_string().as_str() {
            "m.room.encrypted" => None,
            _ if invite => Some("invited you to the room".to_owned()),
            _ => Some(excerpt(content["body"].as_str().unwrap_or("sent an event"))),
        };
        let line = Line { sender, text };
        match rooms.iter_mut().find(|(room, _)| *room == n.room_id) {
            Some((_, lines)) => lines.push(line),
            None => rooms.push((n.room_id.clone(), vec![line])),
        }
    }
    if rooms.is_empty() {
        return Ok(());
    }
    if mailed.token.is_empty() {
        mailed.token = crate::random::alphanumeric(32);
    }
    let unsubscribe =
        format!("{}/_trellis/push/v1/unsubscribe/{}", services.public_base_url(), mailed.token);
    let (subject, plain, html) = compose(services, localpart, &user_id, &rooms, &unsubscribe)?;
    let Some(mailer) = &services.mailer else { return Ok(()) };
    mailer.send_with_unsubscribe(&address, &subject, plain, html, &unsubscribe).await?;
    services.metrics.notification_emails.inc();
    tracing::info!(user = %localpart, rooms = rooms.len(), "notification mail sent");
    mailed.last_mail_ms = now;
    mailed.mailed_upto = due.iter().map(|(p, _)| *p).max().unwrap_or(mailed.mailed_upto);
    let mut batch = Batch::new();
    UNSUBSCRIBE.put(&mut batch, &mailed.token, &Json(key.clone()));
    STATE.put(&mut batch, &key, &Json(mailed));
    crate::commit(&services.db, batch).await
}

/// How far the user has read in the room (their newest receipt of any kind).
fn read_position(services: &Services, room_id: &str, user_id: &str) -> Result<u64> {
    let mut read = 0;
    for (_, event_id) in services.receipts.latest(room_id, user_id)? {
        if let Some(position) = services.rooms.position_of(&event_id)? {
            read = read.max(position);
        }
    }
    Ok(read)
}

fn excerpt(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(EXCERPT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A room as the mail names it: its name, its alias, or the people in it.
fn room_title(services: &Services, room_id: &str, user_id: &str) -> Result<String> {
    for (kind, field) in [("m.room.name", "name"), ("m.room.canonical_alias", "alias")] {
        if let Some(text) = services.rooms.state_text(room_id, kind, field)? {
            return Ok(text);
        }
    }
    let others: Vec<String> = services
        .rooms
        .members(room_id, &MembershipState::Join)?
        .into_iter()
        .filter(|m| m != user_id)
        .take(3)
        .collect();
    let names = services.rooms.display_names(room_id, &others)?;
    let names: Vec<String> =
        others.into_iter().zip(names).map(|(id, name)| name.unwrap_or(id)).collect();
    Ok(if names.is_empty() { "an empty room".to_owned() } else { names.join(", ") })
}

fn room_link(services: &Services, room_id: &str) -> String {
    let web = services.config.push.web_client_url.trim_end_matches('/');
    match web.is_empty() {
        true => format!("https://matrix.to/#/{room_id}"),
        false => format!("{web}/#/room/{room_id}"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// (subject, plain text, HTML) of a digest.
fn compose(
    services: &Services,
    localpart: &str,
    user_id: &str,
    rooms: &[(String, Vec<Line>)],
    unsubscribe: &str,
) -> Result<(String, String, String)> {
    let server = services.server_name();
    let total: usize = rooms.iter().map(|(_, lines)| lines.len()).sum();
    let mut titles = Vec::new();
    let mut plain = format!("Hello {localpart},\n\nYou have unread messages on {server}:\n");
    let mut html = format!(
        "<html><body>\n<p>Hello {},</p>\n<p>You have unread messages on {}:</p>\n",
        escape(localpart),
        escape(server)
    );
    for (room_id, lines) in rooms {
        let title = room_title(services, room_id, user_id)?;
        let link = room_link(services, room_id);
        let _ = write!(plain, "\n{title} ({link})\n");
        let _ =
            writeln!(html, "<h3><a href=\"{}\">{}</a></h3>\n<ul>", escape(&link), escape(&title));
        let encrypted = lines.iter().filter(|l| l.text.is_none()).count();
        let readable: Vec<&Line> = lines.iter().filter(|l| l.text.is_some()).collect();
        for line in readable.iter().rev().take(PER_ROOM).rev() {
            let text = line.text.as_deref().unwrap_or_default();
            let _ = writeln!(plain, "  {}: {text}", line.sender);
            let _ = writeln!(html, "<li><b>{}</b>: {}</li>", escape(&line.sender), escape(text));
        }
        if readable.len() > PER_ROOM {
            let more = readable.len() - PER_ROOM;
            let _ = writeln!(plain, "  … and {more} more");
            let _ = writeln!(html, "<li>… and {more} more</li>");
        }
        if encrypted > 0 {
            let noun = if encrypted == 1 { "message" } else { "messages" };
            let _ = writeln!(plain, "  You have {encrypted} encrypted {noun}.");
            let _ = writeln!(html, "<li>You have {encrypted} encrypted {noun}.</li>");
        }
        html.push_str("</ul>\n");
        titles.push(title);
    }
    let _ = write!(plain, "\nStop these emails: {unsubscribe}\n");
    let _ = write!(
        html,
        "<p><a href=\"{}\">Stop these emails</a></p></body></html>",
        escape(unsubscribe)
    );
    let noun = if total == 1 { "message" } else { "messages" };
    let subject = format!("{total} unread {noun} in {}", titles.join(", "));
    Ok((subject, plain, html))
}

/// Whether an unsubscribe token is known (for the confirmation page).
pub fn unsubscribe_known(services: &Services, token: &str) -> Result<bool> {
    Ok(UNSUBSCRIBE.get(&*services.db, &token.to_owned())?.is_some())
}

/// `POST` to a mail's unsubscribe link: the address gets no more notification mails.
pub async fn unsubscribe(services: &Services, token: &str) -> Result<()> {
    let Some(Json((localpart, address))) = UNSUBSCRIBE.get(&*services.db, &token.to_owned())?
    else {
        return Err(Error::not_found("Unknown unsubscribe link"));
    };
    services.pushers.remove(&localpart, "m.email", &address).await?;
    let mut batch = Batch::new();
    UNSUBSCRIBE.delete(&mut batch, &token.to_owned());
    STATE.delete(&mut batch, &(localpart.clone(), address));
    crate::commit(&services.db, batch).await?;
    let client = crate::audit::Client::default();
    services
        .audit
        .log(Some(&localpart), "email_notifications_unsubscribe", &client, "ok", None)
        .await;
    Ok(())
}
