//! `/sync` through the real server: long-polls woken by sends, gaps and `prev_batch`,
//! membership sections, typing, receipts, unread counts, account data and filters.

mod common;

use std::time::{Duration, Instant};

use common::{OPEN, TestServer};
use serde_json::{Value, json};

async fn sync(s: &TestServer, token: &str, query: &str) -> Value {
    let (status, resp) = s.get_auth(&format!("/_matrix/client/v3/sync?{query}"), token).await;
    assert_eq!(status, 200, "{resp}");
    resp
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]["events"]
        .as_array()
        .map(|evs| {
            evs.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_is_sent() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    let first = sync(&s, &bt, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    // The whole short history fits the timeline, so `state` (what precedes it) is empty
    // and the create event opens the timeline.
    let joined = &first["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["events"][0]["type"], "m.room.create", "{joined}");
    assert_eq!(joined["timeline"]["limited"], false);

    // Nothing new: a short poll returns empty with a usable token.
    let empty = sync(&s, &bt, &format!("since={since}&timeout=200")).await;
    assert!(empty["rooms"]["join"].get(&room).is_none(), "{empty}");

    let base = s.base.clone();
    let token = bt.clone();
    let since2 = since.clone();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let resp = reqwest::Client::new()
            .get(format!("{base}/_matrix/client/v3/sync?since={since2}&timeout=20000"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (started.elapsed(), resp.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send_text(&at, &room, "wake up").await;
    let (waited, resp) = waiting.await.unwrap();
    assert_eq!(bodies(&resp["rooms"]["join"][&room]), vec!["wake up"], "{resp}");
    // Events as clients see them: no federation fields, the room is the key, and the
    // time since sending is in `unsigned.age`.
    let event = &resp["rooms"]["join"][&room]["timeline"]["events"][0];
    assert_eq!(event["sender"], alice.as_str(), "{event}");
    assert!(event["event_id"].as_str().is_some_and(|id| id.starts_with('$')), "{event}");
    assert!(event["origin_server_ts"].as_u64().is_some(), "{event}");
    assert!(event["unsigned"]["age"].as_u64().is_some_and(|age| age < 60_000), "{event}");
    for absent in ["room_id", "hashes", "signatures", "auth_events", "prev_events", "depth"] {
        assert!(event.get(absent).is_none(), "{absent} in {event}");
    }
    // Woken by the send, not by the 20 s timeout.
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    assert_ne!(resp["next_batch"].as_str().unwrap(), since);
}

/// A poll whose token is behind only on other users' activity waits from where it found
/// nothing; what it answers, and the token it answers with, lose nothing and repeat
/// nothing.
#[tokio::test]
async fn a_poll_behind_on_unrelated_activity_waits_and_loses_nothing() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let (_carol, ct) = s.register("carol").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    let elsewhere = s.create_room(&ct, json!({"preset": "private_chat"})).await;
    let first = sync(&s, &bt, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    for n in 0..3 {
        s.send_text(&ct, &elsewhere, &format!("unrelated {n}")).await;
    }

    let waiting = {
        let (base, token, since) = (s.base.clone(), bt.clone(), since.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(format!("{base}/_matrix/client/v3/sync?since={since}&timeout=20000"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            resp.json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send_text(&ct, &elsewhere, "unrelated, while waiting").await;
    s.send_text(&at, &room, "hello").await;
    let woken = waiting.await.unwrap();
    assert_eq!(bodies(&woken["rooms"]["join"][&room]), vec!["hello"], "{woken}");
    assert!(woken["rooms"]["join"].get(&elsewhere).is_none(), "{woken}");

    // Timing out answers nothing new, with a token from which the next message comes.
    let next = woken["next_batch"].as_str().unwrap();
    s.send_text(&ct, &elsewhere, "unrelated, before the timeout").await;
    let quiet = sync(&s, &bt, &format!("since={next}&timeout=300")).await;
    assert!(quiet["rooms"]["join"].get(&room).is_none(), "{quiet}");
    let after_quiet = quiet["next_batch"].as_str().unwrap();
    s.send_text(&at, &room, "after").await;
    let last = sync(&s, &bt, &format!("since={after_quiet}&timeout=0")).await;
    assert_eq!(bodies(&last["rooms"]["join"][&room]), vec!["after"], "{last}");
}

#[tokio::test]
async fn gaps_are_marked_and_prev_batch_fills_them_exactly() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let room = s.create_room(&at, json!({"name": "Gaps"})).await;
    let filter = r#"{"room":{"timeline":{"limit":5}}}"#;
    let first = sync(&s, &at, &format!("filter={}", common::urlencode(filter))).await;
    let joined = &first["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true, "{joined}");
    assert_eq!(joined["timeline"]["events"].as_array().unwrap().len(), 5);
    let since = first["next_batch"].as_str().unwrap().to_owned();

    let sent: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..12 {
            s.send_text(&at, &room, &format!("m{i}")).await;
            v.push(format!("m{i}"));
        }
        v
    };
    let next = sync(&s, &at, &format!("since={since}&filter={}", common::urlencode(filter))).await;
    let r = &next["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true);
    assert_eq!(bodies(r), sent[7..].to_vec());
    // Paginating back from prev_batch yields exactly the missing messages.
    let prev = r["timeline"]["prev_batch"].as_str().unwrap();
    let (status, older) = s
        .get_auth(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from={prev}&limit=7"),
            &at,
        )
        .await;
    assert_eq!(status, 200, "{older}");
    let mut got: Vec<String> = older["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    got.reverse();
    assert_eq!(got, sent[..7].to_vec());

    // A gap with a state change in it: the change arrives in `state`.
    let since = next["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
            &at,
            &json!({"name": "Renamed"}),
        )
        .await;
    assert_eq!(status, 200);
    for i in 0..8 {
        s.send_text(&at, &room, &format!("n{i}")).await;
    }
    let next = sync(&s, &at, &format!("since={since}&filter={}", common::urlencode(filter))).await;
    let r = &next["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true);
    let state = r["state"]["events"].as_array().unwrap();
    assert_eq!(state.len(), 1, "only the change in the gap: {state:?}");
    assert_eq!(state[0]["content"]["name"], "Renamed");
}

#[tokio::test]
async fn invites_leaves_typing_and_receipts_reach_members_only() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let (_carol, ct) = s.register("carol").await;
    let room = s.create_room(&at, json!({"name": "Club", "invite": [bob]})).await;

    let b0 = sync(&s, &bt, "").await;
    let invite = &b0["rooms"]["invite"][&room]["invite_state"]["events"];
    let kinds: Vec<&str> =
        invite.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"m.room.name") && kinds.contains(&"m.room.member"), "{kinds:?}");
    s.join_room(&bt, &room).await;
    let c0 = sync(&s, &ct, "").await;
    let a0 = sync(&s, &at, "").await;

    // Typing: Alice sees Bob typing; Carol, not in the room, sees nothing.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/typing/{bob}"),
            &bt,
            &json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/typing/{alice}"),
            &bt,
            &json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(status, 403, "no typing on behalf of others");
    let a1 =
        sync(&s, &at, &format!("since={}&timeout=5000", a0["next_batch"].as_str().unwrap())).await;
    let eph = &a1["rooms"]["join"][&room]["ephemeral"]["events"];
    let typing = eph.as_array().unwrap().iter().find(|e| e["type"] == "m.typing").unwrap();
    assert_eq!(typing["content"]["user_ids"], json!([bob]));
    let c1 =
        sync(&s, &ct, &format!("since={}&timeout=300", c0["next_batch"].as_str().unwrap())).await;
    assert!(c1["rooms"]["join"].get(&room).is_none(), "{c1}");

    // Presence reaches those sharing a room, not strangers.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/presence/{bob}/status"),
            &bt,
            &json!({"presence": "online", "status_msg": "busy"}),
        )
        .await;
    assert_eq!(status, 200);
    let a_p =
        sync(&s, &at, &format!("since={}&timeout=5000", a1["next_batch"].as_str().unwrap())).await;
    let from_bob = a_p["presence"]["events"]
        .as_array()
        .and_then(|evs| evs.iter().find(|e| e["sender"] == bob.as_str()).cloned());
    assert_eq!(from_bob.map(|e| e["content"]["status_msg"].clone()), Some(json!("busy")), "{a_p}");
    let c_p =
        sync(&s, &ct, &format!("since={}&timeout=300", c1["next_batch"].as_str().unwrap())).await;
    let strangers = c_p["presence"]["events"].as_array().cloned().unwrap_or_default();
    assert!(!strangers.iter().any(|e| e["sender"] == bob.as_str()), "{c_p}");

    // Receipts: public ones reach Alice, private ones do not.
    let msg = s.send_text(&at, &room, "read me").await;
    let since = a1["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read.private/{msg}"),
            &bt,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let a2 = sync(&s, &at, &format!("since={since}&timeout=300")).await;
    let eph = a2["rooms"]["join"][&room]["ephemeral"]["events"].clone();
    assert!(!eph.as_array().unwrap_or(&vec![]).iter().any(|e| e["type"] == "m.receipt"), "{eph}");
    let since = a2["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{msg}"),
            &bt,
            &json!({"thread_id": "main"}),
        )
        .await;
    assert_eq!(status, 200);
    let a3 = sync(&s, &at, &format!("since={since}&timeout=5000")).await;
    let eph = &a3["rooms"]["join"][&room]["ephemeral"]["events"];
    let receipt = eph.as_array().unwrap().iter().find(|e| e["type"] == "m.receipt").unwrap();
    assert_eq!(receipt["content"][&msg]["m.read"][&bob]["thread_id"], "main", "{receipt}");
    let (status, err) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/$nope:localhost"),
            &bt,
            &json!({}),
        )
        .await;
    assert_eq!(status, 404, "{err}");

    // Leaving shows up in Bob's leave section.
    let b1 = sync(&s, &bt, "").await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &bt, &json!({})).await;
    assert_eq!(status, 200);
    let b2 =
        sync(&s, &bt, &format!("since={}&timeout=5000", b1["next_batch"].as_str().unwrap())).await;
    let left = &b2["rooms"]["leave"][&room]["timeline"]["events"];
    let last = left.as_array().unwrap().last().unwrap();
    assert_eq!(last["content"]["membership"], "leave", "{b2}");
}

#[tokio::test]
async fn unread_counts_rise_with_messages_and_reset_on_a_receipt() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    s.send_text(&at, &room, "one").await;
    s.send_text(&at, &room, "two").await;
    let mention = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", common::txn_id()),
            &at,
            &json!({"msgtype": "m.text", "body": "hey bob", "m.mentions": {"user_ids": [bob]}}),
        )
        .await
        .1["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b0 = sync(&s, &bt, "").await;
    let counts = &b0["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 3, "{counts}");
    assert_eq!(counts["highlight_count"], 1);
    // Counted again on the next sync (the server extends what it counted before).
    let four = s.send_text(&at, &room, "four").await;
    let since = |b: &Value| format!("since={}&timeout=5000", b["next_batch"].as_str().unwrap());
    let b1 = sync(&s, &bt, &since(&b0)).await;
    let counts = &b1["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 4, "{counts}");
    assert_eq!(counts["highlight_count"], 1);
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{room}/read_markers"),
            &bt,
            &json!({"m.fully_read": mention, "m.read": four}),
        )
        .await;
    assert_eq!(status, 200);
    let b1 = sync(&s, &bt, &since(&b1)).await;
    let r = &b1["rooms"]["join"][&room];
    assert_eq!(r["unread_notifications"]["notification_count"], 0, "{r}");
    assert_eq!(r["unread_notifications"]["highlight_count"], 0);
    // And rise again from the receipt on.
    for (body, expected) in [("five", 1), ("six", 2)] {
        s.send_text(&at, &room, body).await;
        let next = sync(&s, &bt, &since(&b1)).await;
        let counts = &next["rooms"]["join"][&room]["unread_notifications"];
        assert_eq!(counts["notification_count"], expected, "{counts}");
        assert_eq!(counts["highlight_count"], 0);
    }
    let fully_read = r["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.fully_read")
        .unwrap();
    assert_eq!(fully_read["content"]["event_id"], mention.as_str());
}

#[tokio::test]
async fn filters_account_data_and_lazy_members() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let (carol, ct) = s.register("carol").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    s.join_room(&ct, &room).await;
    s.send_text(&bt, &room, "from bob").await;

    // Stored filters: create, read back, use by id.
    let definition =
        json!({"room": {"timeline": {"limit": 1}, "state": {"lazy_load_members": true}}});
    let (status, created) =
        s.post_auth(&format!("/_matrix/client/v3/user/{alice}/filter"), &at, &definition).await;
    assert_eq!(status, 200, "{created}");
    let id = created["filter_id"].as_str().unwrap();
    let (status, back) =
        s.get_auth(&format!("/_matrix/client/v3/user/{alice}/filter/{id}"), &at).await;
    assert_eq!((status, &back["room"]["timeline"]["limit"]), (200, &json!(1)));
    let (status, _) =
        s.get_auth(&format!("/_matrix/client/v3/user/{alice}/filter/nope"), &at).await;
    assert_eq!(status, 404);
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/user/{bob}/filter"), &at, &definition).await;
    assert_eq!(status, 403);

    let r0 = sync(&s, &at, &format!("filter={id}")).await;
    let r = &r0["rooms"]["join"][&room];
    assert_eq!(bodies(r), vec!["from bob"]);
    let members: Vec<&str> = r["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert!(members.contains(&bob.as_str()) && members.contains(&alice.as_str()), "{members:?}");
    assert!(!members.contains(&carol.as_str()), "carol sent nothing: {members:?}");

    // Account data set by the client comes through sync, globally and per room.
    let since = r0["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/user/{alice}/account_data/org.example.settings"),
            &at,
            &json!({"theme": "dark"}),
        )
        .await;
    assert_eq!(status, 200);
    let r1 = sync(&s, &at, &format!("since={since}&timeout=5000&filter={id}")).await;
    let global = r1["account_data"]["events"].as_array().unwrap();
    assert!(global.iter().any(|e| e["type"] == "org.example.settings"), "{r1}");
    let (status, err) = s.get_auth("/_matrix/client/v3/sync?since=garbage", &at).await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let _ = ct;
}

#[tokio::test]
async fn push_rules_drive_counts_threads_and_the_notification_list() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let room = s.create_room(&at, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    let root = s.send_text(&at, &room, "root").await;
    for body in ["t1", "t2"] {
        let (status, _) = s
            .put_auth(
                &format!(
                    "/_matrix/client/v3/rooms/{room}/send/m.room.message/{}",
                    common::txn_id()
                ),
                &at,
                &json!({"msgtype": "m.text", "body": body,
                    "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", common::txn_id()),
            &at,
            &json!({"msgtype": "m.text", "body": "ping", "m.mentions": {"user_ids": [bob]}}),
        )
        .await;
    assert_eq!(status, 200);

    // Thread-aware clients get thread counts apart; others get them folded in.
    let filter = common::urlencode(r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#);
    let threaded = sync(&s, &bt, &format!("filter={filter}")).await;
    let r = &threaded["rooms"]["join"][&room];
    assert_eq!(r["unread_notifications"]["notification_count"], 2, "{r}");
    assert_eq!(r["unread_notifications"]["highlight_count"], 1);
    assert_eq!(r["unread_thread_notifications"][&root]["notification_count"], 2, "{r}");
    let plain = sync(&s, &bt, "").await;
    assert_eq!(plain["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 4);

    // The notification list, all and highlights only.
    let (status, list) = s.get_auth("/_matrix/client/v3/notifications", &bt).await;
    assert_eq!(status, 200, "{list}");
    let all = list["notifications"].as_array().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0]["event"]["content"]["body"], "ping", "newest first");
    assert_eq!(all[0]["read"], false);
    let (_, high) = s.get_auth("/_matrix/client/v3/notifications?only=highlight", &bt).await;
    assert_eq!(high["notifications"].as_array().unwrap().len(), 1);
    let (_, page) = s.get_auth("/_matrix/client/v3/notifications?limit=3", &bt).await;
    let next = page["next_token"].as_str().unwrap();
    let (_, rest) = s.get_auth(&format!("/_matrix/client/v3/notifications?from={next}"), &bt).await;
    assert_eq!(rest["notifications"].as_array().unwrap().len(), 1);

    // Muting the room with a room rule: new messages no longer count.
    let (status, _) = s
        .put_auth(
            &format!("/_matrix/client/v3/pushrules/global/room/{room}"),
            &bt,
            &json!({"actions": []}),
        )
        .await;
    assert_eq!(status, 200);
    s.send_text(&at, &room, "muted").await;
    let after = sync(&s, &bt, "").await;
    assert_eq!(after["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 4);
    let (_, list) = s.get_auth("/_matrix/client/v3/notifications", &bt).await;
    assert_eq!(list["notifications"].as_array().unwrap().len(), 4, "{list}");

    // Someone joining later is notified of what comes after their join only, and what
    // notifies everyone still reaches each member once.
    let (_carol, ct) = s.register("carol").await;
    s.join_room(&ct, &room).await;
    let joined = sync(&s, &ct, "").await;
    let counts = &joined["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 0, "{counts}");
    s.send_text(&at, &room, "welcome").await;
    let later = sync(&s, &ct, "").await;
    let counts = &later["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 1, "{counts}");
    let (_, list) = s.get_auth("/_matrix/client/v3/notifications", &ct).await;
    let list = list["notifications"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["event"]["content"]["body"], "welcome");
    assert_eq!(list[0]["room_id"], room.as_str());
    // The sender is not notified of their own message; bob's room stays muted.
    let (_, list) = s.get_auth("/_matrix/client/v3/notifications", &at).await;
    assert!(
        list["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["event"]["content"]["body"] != "welcome")
    );
    let muted = sync(&s, &bt, "").await;
    assert_eq!(muted["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 4);

    // After leaving, what came while carol was in the room stays in her list and what
    // comes after does not join it.
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/leave"), &ct, &json!({})).await;
    assert_eq!(status, 200);
    s.send_text(&at, &room, "after carol left").await;
    let (_, list) = s.get_auth("/_matrix/client/v3/notifications", &ct).await;
    let bodies: Vec<&Value> = list["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["event"]["content"]["body"])
        .collect();
    assert_eq!(bodies, vec!["welcome"], "{list}");
}

#[tokio::test]
async fn only_the_sending_device_gets_its_transaction_id_back() {
    let s = TestServer::start(OPEN).await;
    let (_alice, phone) = s.register("alice").await;
    let (_bob, bt) = s.register("bob").await;
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": "alice"},
                    "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let laptop = login["access_token"].as_str().unwrap().to_owned();
    let room = s.create_room(&phone, json!({"preset": "public_chat"})).await;
    s.join_room(&bt, &room).await;
    let (status, sent) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/echo-1"),
            &phone,
            &json!({"msgtype": "m.text", "body": "local echo"}),
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap();
    let txn_of = |body: &Value| {
        let events = body["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned();
        let event = events.unwrap_or_default().into_iter().find(|e| e["event_id"] == event_id);
        event.map(|e| e["unsigned"]["transaction_id"].clone())
    };
    assert_eq!(txn_of(&sync(&s, &phone, "").await), Some(json!("echo-1")));
    assert_eq!(txn_of(&sync(&s, &laptop, "").await), Some(Value::Null));
    assert_eq!(txn_of(&sync(&s, &bt, "").await), Some(Value::Null));
    // The same holds where events are read outside sync.
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{event_id}");
    let (_, event) = s.get_auth(&path, &phone).await;
    assert_eq!(event["unsigned"]["transaction_id"], "echo-1", "{event}");
    let (_, event) = s.get_auth(&path, &bt).await;
    assert!(event["unsigned"].get("transaction_id").is_none(), "{event}");
}
