//! Push rules, pushers, room tags and presence through the HTTP API.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

const RULES: &str = "/_matrix/client/v3/pushrules/global";

fn rule_ids(ruleset: &Value, kind: &str) -> Vec<String> {
    ruleset[kind]
        .as_array()
        .map(|rules| rules.iter().filter_map(|r| r["rule_id"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn errcode(body: &Value) -> Option<&str> {
    body["errcode"].as_str()
}

#[tokio::test]
async fn default_push_rules() {
    let s = TestServer::start(OPEN).await;
    let (user, token) = s.register("alice").await;

    let (status, body) = s.get_auth("/_matrix/client/v3/pushrules/", &token).await;
    assert_eq!(status, 200, "{body}");
    let global = &body["global"];
    let overrides = rule_ids(global, "override");
    assert_eq!(overrides.first().map(String::as_str), Some(".m.rule.master"), "{overrides:?}");
    for id in [".m.rule.suppress_notices", ".m.rule.invite_for_me", ".m.rule.is_user_mention"] {
        assert!(overrides.iter().any(|r| r == id), "{id} missing from {overrides:?}");
    }
    let underrides = rule_ids(global, "underride");
    for id in [".m.rule.call", ".m.rule.room_one_to_one", ".m.rule.message", ".m.rule.encrypted"] {
        assert!(underrides.iter().any(|r| r == id), "{id} missing from {underrides:?}");
    }
    // The master rule is disabled and every predefined rule is marked default.
    let master = &global["override"][0];
    assert_eq!(
        (master["enabled"].as_bool(), master["default"].as_bool()),
        (Some(false), Some(true))
    );
    // Rules mentioning the user name them.
    let (status, invite) =
        s.get_auth(&format!("{RULES}/override/.m.rule.invite_for_me"), &token).await;
    assert_eq!(status, 200, "{invite}");
    assert!(invite.to_string().contains(&user), "{invite}");

    // The `global` scope alone is the ruleset itself.
    let (status, scope) = s.get_auth(&format!("{RULES}/"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(&scope, global);

    let (status, body) =
        s.get_auth(&format!("{RULES}/override/.m.rule.master/enabled"), &token).await;
    assert_eq!((status, body["enabled"].as_bool()), (200, Some(false)));
    let (status, body) =
        s.get_auth(&format!("{RULES}/underride/.m.rule.message/actions"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(body["actions"][0], "notify", "{body}");

    let (status, _) = s.get("/_matrix/client/v3/pushrules/").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn user_push_rules() {
    let s = TestServer::start(OPEN).await;
    let (_, token) = s.register("bob").await;
    let put = |path: String, body: Value| {
        let token = token.clone();
        let s = &s;
        async move { s.put_auth(&path, &token, &body).await }
    };

    // Content rules: the first goes first; `before` and `after` place later ones.
    let cake = json!({"pattern": "cake*lie", "actions": ["notify"]});
    let (status, body) = put(format!("{RULES}/content/nocake"), cake.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = put(format!("{RULES}/content/first?before=nocake"), cake.clone()).await;
    assert_eq!(status, 200);
    let (status, _) = put(format!("{RULES}/content/last?after=nocake"), cake.clone()).await;
    assert_eq!(status, 200);
    let (status, _) = put(format!("{RULES}/content/newest"), cake.clone()).await;
    assert_eq!(status, 200);
    let (_, all) = s.get_auth(&format!("{RULES}/"), &token).await;
    assert_eq!(rule_ids(&all, "content"), ["newest", "first", "nocake", "last"]);
    let (status, rule) = s.get_auth(&format!("{RULES}/content/nocake"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(
        rule,
        json!({"rule_id": "nocake", "pattern": "cake*lie", "actions": ["notify"],
               "enabled": true, "default": false})
    );

    // Override rules without conditions are allowed (they always match) and go right
    // after the master rule.
    let (status, body) = put(format!("{RULES}/override/quiet"), json!({"actions": []})).await;
    assert_eq!(status, 200, "{body}");
    let (_, all) = s.get_auth(&format!("{RULES}/"), &token).await;
    assert_eq!(rule_ids(&all, "override")[..2], [".m.rule.master", "quiet"]);
    // Room and sender rules are named by their room and user.
    let (status, _) = put(format!("{RULES}/room/!abc:localhost"), json!({"actions": []})).await;
    assert_eq!(status, 200);
    let (status, _) = put(format!("{RULES}/sender/@eve:localhost"), json!({"actions": []})).await;
    assert_eq!(status, 200);
    let (status, body) = put(format!("{RULES}/room/not-a-room"), json!({"actions": []})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")));

    // Enabling, disabling and actions, on user and server-default rules alike.
    let (status, _) =
        put(format!("{RULES}/content/nocake/enabled"), json!({"enabled": false})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&format!("{RULES}/content/nocake/enabled"), &token).await;
    assert_eq!(body["enabled"], false);
    // Replacing a rule keeps its enabled flag.
    let (status, _) = put(format!("{RULES}/content/nocake"), cake.clone()).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&format!("{RULES}/content/nocake/enabled"), &token).await;
    assert_eq!(body["enabled"], false);
    let (status, _) =
        put(format!("{RULES}/override/.m.rule.master/enabled"), json!({"enabled": true})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&format!("{RULES}/override/.m.rule.master/enabled"), &token).await;
    assert_eq!(body["enabled"], true);
    let actions = json!({"actions": ["notify", {"set_tweak": "sound", "value": "bing"}]});
    let (status, _) =
        put(format!("{RULES}/underride/.m.rule.message/actions"), actions.clone()).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&format!("{RULES}/underride/.m.rule.message/actions"), &token).await;
    assert_eq!(body, actions);

    // Deleting.
    let (status, _) = s.delete_auth(&format!("{RULES}/content/first"), &token, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(&format!("{RULES}/content/first"), &token).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")));
    let (_, all) = s.get_auth(&format!("{RULES}/"), &token).await;
    assert_eq!(rule_ids(&all, "content"), ["newest", "nocake", "last"]);

    // Errors.
    let (status, body) = s.get_auth(&format!("{RULES}/sideways/x"), &token).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = put(format!("{RULES}/sideways/x"), json!({"actions": []})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) =
        s.delete_auth(&format!("{RULES}/override/.m.rule.master"), &token, &json!({})).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");
    let (status, body) = s.get_auth(&format!("{RULES}/override/.m.rule.master"), &token).await;
    assert_eq!(status, 200, "a server-default rule survives a delete: {body}");
    let (status, body) = put(format!("{RULES}/override/.mine"), json!({"actions": []})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = put(format!("{RULES}/content/a%5Cb"), cake.clone()).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, _) = put(format!("{RULES}/content/x?before=nosuchrule"), cake.clone()).await;
    assert_eq!(status, 400);
    let (status, body) =
        put(format!("{RULES}/content/x?after=.m.rule.contains_user_name"), cake.clone()).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = put(format!("{RULES}/content/x"), json!({"actions": []})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_MISSING_PARAM")), "{body}");
    let (status, body) = put(format!("{RULES}/content/x"), json!({"pattern": "x"})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_MISSING_PARAM")), "{body}");
    let (status, _) = s.get_auth(&format!("{RULES}/content/x"), &token).await;
    assert_eq!(status, 404, "a refused rule must not have been stored");
    for path in ["nosuch", "nosuch/enabled", "nosuch/actions"] {
        let (status, body) = s.get_auth(&format!("{RULES}/override/{path}"), &token).await;
        assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{path}");
    }
    let (status, _) =
        put(format!("{RULES}/override/nosuch/enabled"), json!({"enabled": true})).await;
    assert_eq!(status, 404);
    let (status, _) = put(format!("{RULES}/override/nosuch/actions"), json!({"actions": []})).await;
    assert_eq!(status, 404);
    let (status, _) = s.delete_auth(&format!("{RULES}/override/nosuch"), &token, &json!({})).await;
    assert_eq!(status, 404);

    // The ruleset is the m.push_rules account data event, which clients cannot write
    // directly but can read.
    let (status, body) = s
        .get_auth("/_matrix/client/v3/user/@bob:localhost/account_data/m.push_rules", &token)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rule_ids(&body["global"], "content"), ["newest", "nocake", "last"]);
}

const PUSHERS: &str = "/_matrix/client/v3/pushers";

fn http_pusher(app_id: &str, pushkey: &str) -> Value {
    json!({"kind": "http", "app_id": app_id, "pushkey": pushkey,
           "app_display_name": "Trellis Test", "device_display_name": "Phone",
           "profile_tag": "tag", "lang": "en",
           "data": {"url": "https://push.example.org/_matrix/push/v1/notify",
                    "format": "event_id_only"}})
}

#[tokio::test]
async fn pushers() {
    let s = TestServer::start(OPEN).await;
    let (_, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let set = |token: &str, body: Value| {
        let token = token.to_owned();
        let s = &s;
        async move { s.post_auth(&format!("{PUSHERS}/set"), &token, &body).await }
    };

    let (status, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!((status, body), (200, json!({"pushers": []})));
    let (status, body) = set(&alice, http_pusher("org.example.app", "key1")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!(status, 200);
    assert_eq!(body["pushers"], json!([http_pusher("org.example.app", "key1")]));

    // Updating in place: same app id and pushkey.
    let mut changed = http_pusher("org.example.app", "key1");
    changed["device_display_name"] = json!("Tablet");
    let (status, _) = set(&alice, changed).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!(body["pushers"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["pushers"][0]["device_display_name"], "Tablet");

    // Another user registering the same pushkey takes it over, unless appending.
    let mut appended = http_pusher("org.example.app", "key1");
    appended["append"] = json!(true);
    let (status, _) = set(&bob, appended).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!(body["pushers"].as_array().map(Vec::len), Some(1), "append keeps alice's");
    let (status, _) = set(&bob, http_pusher("org.example.app", "key1")).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!(body["pushers"], json!([]), "without append bob takes the pushkey over");
    let (_, body) = s.get_auth(PUSHERS, &bob).await;
    assert_eq!(body["pushers"].as_array().map(Vec::len), Some(1));

    // kind null deletes.
    let (status, _) =
        set(&bob, json!({"kind": null, "app_id": "org.example.app", "pushkey": "key1"})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &bob).await;
    assert_eq!(body["pushers"], json!([]));

    // Errors.
    let mut no_url = http_pusher("org.example.app", "key2");
    no_url["data"] = json!({"format": "event_id_only"});
    let (status, body) = set(&alice, no_url).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let mut wrong_path = http_pusher("org.example.app", "key2");
    wrong_path["data"]["url"] = json!("https://push.example.org/notify");
    let (status, body) = set(&alice, wrong_path).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let mut no_lang = http_pusher("org.example.app", "key2");
    no_lang.as_object_mut().map(|o| o.remove("lang"));
    let (status, body) = set(&alice, no_lang).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_MISSING_PARAM")), "{body}");
    let (status, body) = set(&alice, json!({"kind": "http", "pushkey": "k"})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_MISSING_PARAM")), "{body}");
    let mut unknown_kind = http_pusher("org.example.app", "key2");
    unknown_kind["kind"] = json!("pigeon");
    let (status, body) = set(&alice, unknown_kind).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = set(&alice, http_pusher(&"x".repeat(65), "key2")).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, body) = set(&alice, http_pusher("org.example.app", &"k".repeat(513))).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    // Email pushers only to the user's own addresses.
    let mut email = http_pusher("m.email", "someone@example.org");
    email["kind"] = json!("email");
    email["data"] = json!({});
    let (status, body) = set(&alice, email).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, _) = s
        .client
        .post(s.url(&format!("{PUSHERS}/set")))
        .bearer_auth(&alice)
        .body("{not json")
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 400);
    let (_, body) = s.get_auth(PUSHERS, &alice).await;
    assert_eq!(body["pushers"], json!([]), "nothing refused was stored");
}

async fn create_room(s: &TestServer, token: &str) -> String {
    let (status, body) = s
        .post_auth("/_matrix/client/v3/createRoom", token, &json!({"preset": "public_chat"}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["room_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn room_tags() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = create_room(&s, &alice).await;
    let tags = format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags");

    let (status, body) = s.get_auth(&tags, &alice).await;
    assert_eq!((status, body), (200, json!({"tags": {}})));
    let (status, _) =
        s.put_auth(&format!("{tags}/m.favourite"), &alice, &json!({"order": 0.25})).await;
    assert_eq!(status, 200);
    let (status, _) = s.put_auth(&format!("{tags}/u.work"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&tags, &alice).await;
    assert_eq!(body, json!({"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}));
    // Re-tagging replaces the order.
    let (status, _) =
        s.put_auth(&format!("{tags}/m.favourite"), &alice, &json!({"order": 1})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&tags, &alice).await;
    assert_eq!(body["tags"]["m.favourite"]["order"], 1.0);
    // Tags are the room's m.tag account data.
    let (status, body) = s
        .get_auth(
            &format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/account_data/m.tag"),
            &alice,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["tags"]["u.work"], json!({}));

    let (status, _) = s.delete_auth(&format!("{tags}/u.work"), &alice, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s.delete_auth(&format!("{tags}/u.never"), &alice, &json!({})).await;
    assert_eq!(status, 200, "deleting an absent tag is fine");
    let (_, body) = s.get_auth(&tags, &alice).await;
    assert_eq!(body, json!({"tags": {"m.favourite": {"order": 1.0}}}));

    // Errors: bad order, long names, other users.
    for order in [json!(1.5), json!(-0.1)] {
        let (status, body) =
            s.put_auth(&format!("{tags}/u.bad"), &alice, &json!({"order": order})).await;
        assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{order}");
    }
    let (status, _) = s.put_auth(&format!("{tags}/u.bad"), &alice, &json!({"order": "high"})).await;
    assert_eq!(status, 400);
    let (status, _) = s.put_auth(&format!("{tags}/{}", "t".repeat(256)), &alice, &json!({})).await;
    assert_eq!(status, 400);
    let (status, body) = s.get_auth(&tags, &bob).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")));
    let (status, body) = s.put_auth(&format!("{tags}/u.x"), &bob, &json!({})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")));
    let (status, body) = s.delete_auth(&format!("{tags}/m.favourite"), &bob, &json!({})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")));
    let (_, body) = s.get_auth(&tags, &alice).await;
    assert_eq!(body, json!({"tags": {"m.favourite": {"order": 1.0}}}));
}

fn presence_path(user: &str) -> String {
    format!("/_matrix/client/v3/presence/{user}/status")
}

#[tokio::test]
async fn presence_visibility_and_restart() {
    let mut s = TestServer::start(OPEN).await;
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (carol_id, carol) = s.register("carol").await;

    let (status, body) = s
        .put_auth(
            &presence_path(&alice_id),
            &alice,
            &json!({"presence": "online", "status_msg": "at work"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.get_auth(&presence_path(&alice_id), &alice).await;
    assert_eq!(status, 200);
    assert_eq!(body["presence"], "online");
    assert_eq!(body["status_msg"], "at work");
    assert_eq!(body["currently_active"], true);
    assert!(body["last_active_ago"].as_u64().is_some_and(|ago| ago < 60_000), "{body}");

    // Strangers may not look; room co-members may.
    let (status, body) = s.get_auth(&presence_path(&alice_id), &bob).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")), "{body}");
    let room = create_room(&s, &alice).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bob, &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(&presence_path(&alice_id), &bob).await;
    assert_eq!((status, body["presence"].as_str()), (200, Some("online")), "{body}");
    let (status, _) = s.get_auth(&presence_path(&alice_id), &carol).await;
    assert_eq!(status, 403);
    let (status, body) = s.get_auth(&presence_path("@nobody:localhost"), &alice).await;
    assert_eq!((status, errcode(&body)), (404, Some("M_NOT_FOUND")), "{body}");

    // Only for oneself; only the three states.
    let (status, body) =
        s.put_auth(&presence_path(&alice_id), &bob, &json!({"presence": "offline"})).await;
    assert_eq!((status, errcode(&body)), (403, Some("M_FORBIDDEN")));
    let (status, body) =
        s.put_auth(&presence_path(&bob_id), &bob, &json!({"presence": "busy"})).await;
    assert_eq!((status, errcode(&body)), (400, Some("M_INVALID_PARAM")), "{body}");
    let (status, _) = s.put_auth(&presence_path(&bob_id), &bob, &json!({})).await;
    assert_eq!(status, 400);
    let (status, _) =
        s.put_auth(&presence_path(&carol_id), &carol, &json!({"presence": "offline"})).await;
    assert_eq!(status, 200);

    // Unavailable with a message survives a restart.
    let (status, _) = s
        .put_auth(
            &presence_path(&alice_id),
            &alice,
            &json!({"presence": "unavailable", "status_msg": "lunch"}),
        )
        .await;
    assert_eq!(status, 200);
    let exit = s.terminate();
    assert!(exit.success(), "{exit}");
    s.launch().await;
    let (status, body) = s.get_auth(&presence_path(&alice_id), &bob).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["presence"], "unavailable");
    assert_eq!(body["status_msg"], "lunch");
    assert!(body["last_active_ago"].as_u64().is_some(), "{body}");
    assert!(body.get("currently_active").is_none(), "{body}");
    // Leaving the message out clears it.
    let (status, _) =
        s.put_auth(&presence_path(&alice_id), &alice, &json!({"presence": "online"})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(&presence_path(&alice_id), &bob).await;
    assert_eq!(body["presence"], "online");
    assert!(body.get("status_msg").is_none(), "{body}");
}

#[tokio::test]
async fn presence_idle_timeout_and_disabled() {
    let s = TestServer::start(&format!("{OPEN}[presence]\nidle_timeout_seconds = 1\n")).await;
    let (alice_id, alice) = s.register("alice").await;
    let (_, bob) = s.register("bob").await;
    let room = create_room(&s, &alice).await;
    let (status, _) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), &bob, &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) =
        s.put_auth(&presence_path(&alice_id), &alice, &json!({"presence": "online"})).await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // Looked at by bob: alice's own requests would count as activity.
    let (_, body) = s.get_auth(&presence_path(&alice_id), &bob).await;
    assert_eq!(body["presence"], "unavailable", "online lapses after the idle timeout: {body}");
    assert!(body["last_active_ago"].as_u64().is_some_and(|ago| ago >= 1000), "{body}");

    let off = TestServer::start(&format!("{OPEN}[presence]\nenabled = false\n")).await;
    let (bob_id, bob) = off.register("bob").await;
    let (status, _) = off
        .put_auth(&presence_path(&bob_id), &bob, &json!({"presence": "online", "status_msg": "hi"}))
        .await;
    assert_eq!(status, 200, "accepted while disabled");
    let (status, body) = off.get_auth(&presence_path(&bob_id), &bob).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"presence": "offline"}));
}

#[tokio::test]
async fn logging_out_removes_the_devices_pushers() {
    let s = TestServer::start(OPEN).await;
    let (alice_id, first) = s.register("alice").await;
    let (status, login) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": alice_id}, "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let second = login["access_token"].as_str().unwrap().to_owned();
    let (status, _) = s
        .post_auth(&format!("{PUSHERS}/set"), &second, &http_pusher("org.example.app", "phone"))
        .await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &first).await;
    assert_eq!(body["pushers"].as_array().map(Vec::len), Some(1));
    let (status, _) = s.post_auth("/_matrix/client/v3/logout", &second, &json!({})).await;
    assert_eq!(status, 200);
    let (_, body) = s.get_auth(PUSHERS, &first).await;
    assert_eq!(body["pushers"], json!([]), "the phone's pusher went with its session");
}
