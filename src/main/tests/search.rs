//! Message search (`POST /search`) through the client API: words in several scripts,
//! stems and accents, filters, ordering, pagination, highlights, context, groupings,
//! the Trellis filter extension; history visibility, redactions, edits and ignored
//! users; the index built for an existing database, rebuilt when lost, and
//! `trellis search reindex`; user directory search in any script.

mod common;

use std::time::{Duration, Instant};

use common::{BIN, OPEN, TestServer, txn_id};
use serde_json::{Value, json};

const SEARCH: &str = "/_matrix/client/v3/search";

async fn send(s: &TestServer, token: &str, room: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{}", txn_id());
    let (status, resp) = s.put_auth(&path, token, &content).await;
    assert_eq!(status, 200, "{resp}");
    resp["event_id"].as_str().unwrap().to_owned()
}

async fn text(s: &TestServer, token: &str, room: &str, body: &str) -> String {
    send(s, token, room, json!({"msgtype": "m.text", "body": body})).await
}

async fn search(s: &TestServer, token: &str, room_events: Value) -> Value {
    search_page(s, token, room_events, None).await
}

async fn search_page(s: &TestServer, token: &str, room_events: Value, next: Option<&str>) -> Value {
    let path = match next {
        Some(token) => format!("{SEARCH}?next_batch={token}"),
        None => SEARCH.to_owned(),
    };
    let body = json!({"search_categories": {"room_events": room_events}});
    let (status, resp) = s.post_auth(&path, token, &body).await;
    assert_eq!(status, 200, "{resp}");
    resp["search_categories"]["room_events"].clone()
}

fn ids(found: &Value) -> Vec<String> {
    found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Searches until `term` finds `n` events: the index commits about twice a second.
async fn until_found(s: &TestServer, token: &str, term: &str, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = search(s, token, json!({"search_term": term})).await;
        if ids(&found).len() == n {
            return found;
        }
        assert!(Instant::now() < deadline, "{term:?} never found {n} events: {found}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn public_room(s: &TestServer, token: &str) -> String {
    s.create_room(token, json!({"preset": "public_chat"})).await
}

#[tokio::test]
async fn words_in_many_scripts_are_found_with_filters_order_pages_highlights_and_context() {
    let s = TestServer::start(OPEN).await;
    let (alice, alice_token) = s.register("alice").await;
    let (bob, bob_token) = s.register("bob").await;
    let path = format!("/_matrix/client/v3/profile/{alice}/displayname");
    let (status, _) = s.put_auth(&path, &alice_token, &json!({"displayname": "Alice A."})).await;
    assert_eq!(status, 200);
    let room = public_room(&s, &alice_token).await;
    s.join_room(&bob_token, &room).await;
    let other = public_room(&s, &alice_token).await;

    let meetings = text(&s, &alice_token, &room, "The quarterly meetings are in the Café").await;
    let beijing = text(&s, &alice_token, &room, "我们明天在北京见面").await;
    let thai = text(&s, &alice_token, &room, "ทุกสองสัปดาห์เราประชุมกัน").await;
    let japanese = text(&s, &alice_token, &room, "こんにちは世界").await;
    let russian = text(&s, &alice_token, &room, "Привет, как дела?").await;
    let file = send(
        &s,
        &bob_token,
        &room,
        json!({"msgtype": "m.file", "body": "meeting-notes.pdf", "url": "mxc://localhost/abc"}),
    )
    .await;
    let link =
        text(&s, &bob_token, &room, "the meeting agenda is at https://example.org/agenda").await;
    let elsewhere = text(&s, &alice_token, &other, "a meeting nobody else sees").await;

    let found = until_found(&s, &alice_token, "meeting", 4).await;
    assert_eq!(found["count"], 4);
    let mut all = ids(&found);
    all.sort();
    let mut expected = vec![meetings.clone(), file.clone(), link.clone(), elsewhere.clone()];
    expected.sort();
    assert_eq!(all, expected, "`meeting` finds `meetings` (stem) and `meeting-notes` too");
    let highlights: Vec<&str> =
        found["highlights"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(highlights.contains(&"meetings") && highlights.contains(&"meeting"), "{found}");
    assert!(found["results"][0]["rank"].as_f64().unwrap() > 0.0);

    // Other scripts and folded accents.
    for (term, event) in [
        ("北京", &beijing),
        ("สัปดาห์", &thai),
        ("世界", &japanese),
        ("дела", &russian),
        ("cafe", &meetings),
        ("CAFÉ", &meetings),
        ("quarter", &meetings),
    ] {
        let found = search(&s, &alice_token, json!({"search_term": term})).await;
        assert_eq!(ids(&found), std::slice::from_ref(event), "{term}: {found}");
    }
    let found = search(&s, &alice_token, json!({"search_term": "nothing like this"})).await;
    assert!(ids(&found).is_empty() && found.get("next_batch").is_none(), "{found}");

    // Bob is not in the other room: its message is not his to find.
    let found = search(&s, &bob_token, json!({"search_term": "meeting"})).await;
    assert_eq!(ids(&found).len(), 3, "{found}");

    // Filters.
    let filtered = |filter: Value| json!({"search_term": "meeting", "filter": filter});
    let found = search(&s, &alice_token, filtered(json!({"senders": [bob]}))).await;
    assert_eq!(ids(&found).len(), 2);
    let found = search(&s, &alice_token, filtered(json!({"not_senders": [bob]}))).await;
    assert_eq!(ids(&found).len(), 2);
    let found = search(&s, &alice_token, filtered(json!({"rooms": [other]}))).await;
    assert_eq!(ids(&found), std::slice::from_ref(&elsewhere));
    let found = search(&s, &alice_token, filtered(json!({"not_rooms": [other]}))).await;
    assert_eq!(ids(&found).len(), 3);
    let found = search(&s, &alice_token, filtered(json!({"contains_url": true}))).await;
    assert_eq!(ids(&found), std::slice::from_ref(&file));
    let found = search(&s, &alice_token, filtered(json!({"types": ["m.room.name"]}))).await;
    assert!(ids(&found).is_empty());
    let found = search(&s, &alice_token, filtered(json!({"types": ["m.room.*"]}))).await;
    assert_eq!(ids(&found).len(), 4);
    let found = search(
        &s,
        &alice_token,
        json!({"search_term": "meeting", "org.trellis.filter": {"has": ["file"]}}),
    )
    .await;
    assert_eq!(ids(&found), std::slice::from_ref(&file));
    let found = search(
        &s,
        &alice_token,
        json!({"search_term": "meeting", "org.trellis.filter": {"has": ["link"]}}),
    )
    .await;
    assert_eq!(ids(&found), std::slice::from_ref(&link));
    let future =
        json!({"search_term": "meeting", "org.trellis.filter": {"from_ts": 32503680000000i64}});
    assert!(ids(&search(&s, &alice_token, future).await).is_empty());
    let past =
        json!({"search_term": "meeting", "org.trellis.filter": {"to_ts": 32503680000000i64}});
    assert_eq!(ids(&search(&s, &alice_token, past).await).len(), 4);

    // Newest first, one per page, to the end.
    let mut pages = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let query = json!({"search_term": "meeting", "order_by": "recent", "filter": {"limit": 1}});
        let found = search_page(&s, &alice_token, query, next.as_deref()).await;
        pages.extend(ids(&found));
        match found["next_batch"].as_str() {
            Some(token) => next = Some(token.to_owned()),
            None => break,
        }
        assert!(pages.len() <= 4, "paging never ends: {pages:?}");
    }
    assert_eq!(pages, [elsewhere.clone(), link.clone(), file.clone(), meetings.clone()]);
    // Ranked pages too.
    let query = json!({"search_term": "meeting", "filter": {"limit": 3}});
    let first = search(&s, &alice_token, query.clone()).await;
    let token = first["next_batch"].as_str().expect("more").to_owned();
    let second = search_page(&s, &alice_token, query, Some(&token)).await;
    let mut ranked = ids(&first);
    ranked.extend(ids(&second));
    ranked.sort();
    assert_eq!(ranked, expected);

    // Context, profiles, state and groupings.
    let found = search(
        &s,
        &alice_token,
        json!({
            "search_term": "北京",
            "event_context": {"before_limit": 1, "after_limit": 2, "include_profile": true},
            "include_state": true,
            "groupings": {"group_by": [{"key": "room_id"}, {"key": "sender"}]},
        }),
    )
    .await;
    let context = &found["results"][0]["context"];
    let before: Vec<&str> = context["events_before"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    let after: Vec<&str> = context["events_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(before, [meetings.as_str()], "{context}");
    assert_eq!(after, [thai.as_str(), japanese.as_str()], "{context}");
    assert!(context["start"].is_string() && context["end"].is_string());
    assert_eq!(context["profile_info"][&alice]["displayname"], "Alice A.", "{context}");
    assert!(found["state"][&room].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    assert_eq!(found["groups"]["room_id"][&room]["results"], json!([beijing]));
    assert_eq!(found["groups"]["sender"][&alice]["order"], 0);
    assert_eq!(found["results"][0]["result"]["room_id"], room.as_str());

    // Bad requests lose nothing and say why.
    for (body, errcode) in [
        (json!({"search_categories": {"room_events": {}}}), "M_BAD_JSON"),
        (
            json!({"search_categories": {"room_events": {"search_term": "a", "order_by": "up"}}}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"search_categories": {"room_events": {"search_term": "a", "keys": ["content.x"]}}}),
            "M_INVALID_PARAM",
        ),
        (
            json!({"search_categories": {"room_events": {"search_term": "a", "groupings": {"group_by": [{"key": "x"}]}}}}),
            "M_INVALID_PARAM",
        ),
        (json!({"nothing": 1}), "M_BAD_JSON"),
    ] {
        let (status, resp) = s.post_auth(SEARCH, &alice_token, &body).await;
        assert_eq!((status, resp["errcode"].as_str()), (400, Some(errcode)), "{body}: {resp}");
    }
    let body = json!({"search_categories": {"room_events": {"search_term": "meeting"}}});
    let (status, resp) = s.post_auth(&format!("{SEARCH}?next_batch=zz"), &alice_token, &body).await;
    assert_eq!((status, resp["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{resp}");
    let (status, _) = s.post(SEARCH, &body).await;
    assert_eq!(status, 401);
    let (status, resp) = s.post_auth(SEARCH, &alice_token, &json!({"search_categories": {}})).await;
    assert_eq!((status, resp), (200, json!({"search_categories": {}})));
    assert_eq!(bob, "@bob:localhost");
}

#[tokio::test]
async fn history_visibility_redactions_edits_and_ignored_users_are_respected() {
    let s = TestServer::start(OPEN).await;
    let (alice, alice_token) = s.register("alice").await;
    let (_, carol_token) = s.register("carol").await;
    let room = s
        .create_room(
            &alice_token,
            json!({"preset": "public_chat", "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": {"history_visibility": "joined"}}]}),
        )
        .await;
    let before = text(&s, &alice_token, &room, "the plans from before carol came").await;
    until_found(&s, &alice_token, "plans", 1).await;
    s.join_room(&carol_token, &room).await;
    let after = text(&s, &alice_token, &room, "the plans after carol joined").await;
    until_found(&s, &alice_token, "plans", 2).await;
    let found = search(&s, &carol_token, json!({"search_term": "plans"})).await;
    assert_eq!(
        ids(&found),
        std::slice::from_ref(&after),
        "carol may not see what was said before she joined"
    );
    assert_ne!(before, after);

    // An edit is found by its new text, as the original event.
    let original = text(&s, &alice_token, &room, "lunch at noon").await;
    until_found(&s, &alice_token, "lunch", 1).await;
    send(
        &s,
        &alice_token,
        &room,
        json!({
            "msgtype": "m.text", "body": "* dinner at eight",
            "m.new_content": {"msgtype": "m.text", "body": "dinner at eight"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        }),
    )
    .await;
    let found = until_found(&s, &carol_token, "dinner", 1).await;
    assert_eq!(ids(&found), std::slice::from_ref(&original));
    until_found(&s, &carol_token, "lunch", 0).await;
    // Someone else's "edit" changes nothing.
    send(
        &s,
        &carol_token,
        &room,
        json!({
            "msgtype": "m.text", "body": "* hijacked",
            "m.new_content": {"msgtype": "m.text", "body": "hijacked"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        }),
    )
    .await;
    let marker = text(&s, &alice_token, &room, "marker one").await;
    until_found(&s, &carol_token, "marker", 1).await;
    assert!(ids(&search(&s, &carol_token, json!({"search_term": "hijacked"})).await).is_empty());
    assert_ne!(marker, original);

    // A redacted message is gone from results.
    let doomed = text(&s, &alice_token, &room, "regrettable words").await;
    until_found(&s, &carol_token, "regrettable", 1).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{doomed}/{}", txn_id());
    let (status, resp) = s.put_auth(&path, &alice_token, &json!({"reason": "oops"})).await;
    assert_eq!(status, 200, "{resp}");
    until_found(&s, &carol_token, "regrettable", 0).await;

    // Room names and topics are searchable, under their keys.
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/");
    let (status, _) = s.put_auth(&path, &alice_token, &json!({"topic": "gardening tips"})).await;
    assert_eq!(status, 200);
    until_found(&s, &carol_token, "gardening", 1).await;
    let found =
        search(&s, &carol_token, json!({"search_term": "gardening", "keys": ["content.body"]}))
            .await;
    assert!(ids(&found).is_empty(), "{found}");

    // Ignoring alice hides what she said.
    let path = "/_matrix/client/v3/user/@carol:localhost/account_data/m.ignored_user_list";
    let (status, _) =
        s.put_auth(path, &carol_token, &json!({"ignored_users": {alice.clone(): {}}})).await;
    assert_eq!(status, 200);
    let found = search(&s, &carol_token, json!({"search_term": "plans"})).await;
    assert!(ids(&found).is_empty(), "{found}");
}

fn set_search_enabled(s: &TestServer, enabled: bool) {
    let config = std::fs::read_to_string(&s.config_path).unwrap();
    let config =
        config.replace("[search]\nenabled = true\n", "").replace("[search]\nenabled = false\n", "");
    std::fs::write(&s.config_path, format!("[search]\nenabled = {enabled}\n{config}")).unwrap();
}

#[tokio::test]
async fn the_index_is_built_for_an_existing_database_rebuilt_when_lost_and_by_the_cli() {
    let mut s = TestServer::start(&format!("[search]\nenabled = false\n{OPEN}")).await;
    let (_, token) = s.register("alice").await;
    let room = public_room(&s, &token).await;
    for n in 0..30 {
        text(&s, &token, &room, &format!("archived note number {n}")).await;
    }
    let found = search(&s, &token, json!({"search_term": "archived"})).await;
    assert!(ids(&found).is_empty(), "search is off: {found}");
    assert_eq!(s.terminate().code(), Some(0));
    assert!(!s.data_dir().join("search").exists());

    // Switched on: the existing messages are indexed at start.
    set_search_enabled(&s, true);
    s.launch().await;
    let found = until_found(&s, &token, "archived", 10).await;
    assert_eq!(found["count"], 30);
    assert_eq!(s.terminate().code(), Some(0));

    // Lost: rebuilt.
    std::fs::remove_dir_all(s.data_dir().join("search")).unwrap();
    s.launch().await;
    until_found(&s, &token, "archived", 10).await;
    assert_eq!(s.terminate().code(), Some(0));

    // Corrupt: rebuilt.
    std::fs::write(s.data_dir().join("search").join("meta.json"), b"{ not json").unwrap();
    s.launch().await;
    until_found(&s, &token, "archived", 10).await;
    text(&s, &token, &room, "fresh message after the rebuild").await;
    until_found(&s, &token, "fresh", 1).await;
    // Killed before the index committed a message: it is caught up at start.
    text(&s, &token, &room, "unsaved words").await;
    s.kill9();
    s.launch().await;
    until_found(&s, &token, "unsaved", 1).await;
    until_found(&s, &token, "fresh", 1).await;
    assert_eq!(s.terminate().code(), Some(0));

    // The command line rebuilds it from nothing.
    let out = std::process::Command::new(BIN)
        .args(["search", "reindex", "--config"])
        .arg(&s.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("search index rebuilt"), "{said}");
    s.launch().await;
    let found = until_found(&s, &token, "archived", 10).await;
    assert_eq!(found["count"], 30);
}

#[tokio::test]
async fn the_user_directory_matches_names_in_any_script_and_not_the_searcher() {
    let s = TestServer::start(OPEN).await;
    let (wang, wang_token) = s.register("wang").await;
    let (_, bob_token) = s.register("bob").await;
    let room = public_room(&s, &wang_token).await;
    s.join_room(&bob_token, &room).await;
    let path = format!("/_matrix/client/v3/profile/{wang}/displayname");
    let (status, _) = s.put_auth(&path, &wang_token, &json!({"displayname": "王小明 José"})).await;
    assert_eq!(status, 200);
    let directory = "/_matrix/client/v3/user_directory/search";
    for term in ["小明", "王", "jose", "JOSÉ"] {
        let (status, found) =
            s.post_auth(directory, &bob_token, &json!({"search_term": term})).await;
        assert_eq!(status, 200);
        assert_eq!(found["results"][0]["user_id"], wang.as_str(), "{term}: {found}");
    }
    let (_, found) = s.post_auth(directory, &wang_token, &json!({"search_term": "小明"})).await;
    assert_eq!(found["results"], json!([]), "the searcher is not a result: {found}");
}
