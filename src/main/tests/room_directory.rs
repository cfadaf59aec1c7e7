//! Room discovery through the client API: the published room directory (visibility,
//! `/publicRooms` with search, room types and pagination), the space hierarchy and room
//! summaries.

mod common;

use common::{OPEN, TestServer};
use serde_json::{Value, json};

const LIST: &str = "/_matrix/client/v3/publicRooms";

async fn create(s: &TestServer, token: &str, body: Value) -> String {
    let (status, resp) = s.post_auth("/_matrix/client/v3/createRoom", token, &body).await;
    assert_eq!(status, 200, "{resp}");
    resp["room_id"].as_str().unwrap().to_owned()
}

async fn join(s: &TestServer, token: &str, room: &str) {
    let (status, body) =
        s.post_auth(&format!("/_matrix/client/v3/rooms/{room}/join"), token, &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

fn visibility_path(room: &str) -> String {
    format!("/_matrix/client/v3/directory/list/room/{room}")
}

async fn set_visibility(s: &TestServer, token: &str, room: &str, visibility: &str) -> (u16, Value) {
    s.put_auth(&visibility_path(room), token, &json!({"visibility": visibility})).await
}

/// Room ids of a `/publicRooms` or `/hierarchy` page, in order.
fn ids(page: &Value, field: &str) -> Vec<String> {
    page[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {page}"))
        .iter()
        .map(|r| r["room_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn publishing_searching_and_paging_the_directory() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("alice").await;
    let (_, bt) = s.register("bob").await;
    let (_, ct) = s.register("carol").await;
    let cheese = create(
        &s,
        &at,
        json!({"preset": "public_chat", "name": "Cheese Lovers", "topic": "All about cheese",
               "room_alias_name": "cheese"}),
    )
    .await;

    // Visibility is readable without a token; rooms start unpublished.
    let (status, body) = s.get(&visibility_path(&cheese)).await;
    assert_eq!((status, body["visibility"].as_str()), (200, Some("private")), "{body}");
    let (status, body) = s.get(&visibility_path("!unknown:localhost")).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    // Bob is a member without power over the canonical alias: he may not publish.
    join(&s, &bt, &cheese).await;
    let (status, body) = set_visibility(&s, &bt, &cheese, "public").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let (status, body) = set_visibility(&s, &at, "!unknown:localhost", "public").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let resp = s
        .client
        .put(s.url(&visibility_path(&cheese)))
        .json(&json!({"visibility": "public"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "publishing needs a token");

    let (status, body) = set_visibility(&s, &at, &cheese, "public").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = s.get(&visibility_path(&cheese)).await;
    assert_eq!(body["visibility"], "public");

    // Listed without a token, with what the room's state says.
    let (status, page) = s.get(LIST).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "chunk"), [cheese.as_str()]);
    let room = &page["chunk"][0];
    assert_eq!(room["name"], "Cheese Lovers");
    assert_eq!(room["topic"], "All about cheese");
    assert_eq!(room["canonical_alias"], "#cheese:localhost");
    assert_eq!(room["num_joined_members"], 2);
    assert_eq!(room["world_readable"], false);
    assert_eq!(room["guest_can_join"], false);
    assert!(room["join_rule"].is_null() || room["join_rule"] == "public", "{room}");
    assert_eq!(page["total_room_count_estimate"], 1);
    assert!(page.get("next_batch").is_none() && page.get("prev_batch").is_none(), "{page}");

    // Two more rooms: wine with three members, bread with one; and a space.
    let wine = create(&s, &at, json!({"preset": "public_chat", "name": "Wine Tasting"})).await;
    join(&s, &bt, &wine).await;
    join(&s, &ct, &wine).await;
    let bread = create(&s, &ct, json!({"preset": "public_chat", "name": "Bread"})).await;
    let space = create(
        &s,
        &at,
        json!({"preset": "public_chat", "name": "Food space",
               "creation_content": {"type": "m.space"}}),
    )
    .await;
    for (room, token) in [(&wine, &at), (&bread, &ct), (&space, &at)] {
        let (status, body) = set_visibility(&s, token, room, "public").await;
        assert_eq!(status, 200, "{body}");
    }

    // Most members first, then by room id.
    let (_, page) = s.get(LIST).await;
    let mut ones = vec![bread.clone(), space.clone()];
    ones.sort();
    let order = [vec![wine.clone(), cheese.clone()], ones.clone()].concat();
    assert_eq!(ids(&page, "chunk"), order);
    assert_eq!(page["total_room_count_estimate"], 4);
    let space_chunk = page["chunk"].as_array().unwrap().iter().find(|r| r["room_id"] == space);
    assert_eq!(space_chunk.unwrap()["room_type"], "m.space");

    // Pages of two, forwards and back, without a token.
    let (_, first) = s.get(&format!("{LIST}?limit=2")).await;
    assert_eq!(ids(&first, "chunk"), order[..2]);
    assert!(first.get("prev_batch").is_none(), "{first}");
    let next = first["next_batch"].as_str().unwrap().to_owned();
    let (status, second) = s.get(&format!("{LIST}?limit=2&since={next}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second, "chunk"), order[2..]);
    assert!(second.get("next_batch").is_none(), "{second}");
    let prev = second["prev_batch"].as_str().unwrap().to_owned();
    let (_, back) = s.get(&format!("{LIST}?limit=2&since={prev}")).await;
    assert_eq!(ids(&back, "chunk"), order[..2]);
    let (status, body) = s.get(&format!("{LIST}?since=garbage")).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));

    // The filtered POST form needs a token; it pages the same way.
    let (status, _) = s.post(LIST, &json!({})).await;
    assert_eq!(status, 401);
    let (_, first) = s.post_auth(LIST, &bt, &json!({"limit": 3})).await;
    assert_eq!(ids(&first, "chunk"), order[..3]);
    let next = first["next_batch"].as_str().unwrap();
    let (_, second) = s.post_auth(LIST, &bt, &json!({"limit": 3, "since": next})).await;
    assert_eq!(ids(&second, "chunk"), order[3..]);

    // Search: name, topic and alias, case-insensitively.
    for term in ["CHEESE lov", "about", "#cheese:LOCALHOST"] {
        let (status, page) =
            s.post_auth(LIST, &bt, &json!({"filter": {"generic_search_term": term}})).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page, "chunk"), [cheese.as_str()], "{term}");
        assert_eq!(page["total_room_count_estimate"], 1);
    }
    let (_, page) =
        s.post_auth(LIST, &bt, &json!({"filter": {"generic_search_term": "sushi"}})).await;
    assert_eq!(ids(&page, "chunk"), Vec::<String>::new());

    // Room types: `null` is the plain rooms.
    let (_, page) = s.post_auth(LIST, &bt, &json!({"filter": {"room_types": ["m.space"]}})).await;
    assert_eq!(ids(&page, "chunk"), [space.as_str()]);
    let (_, page) = s.post_auth(LIST, &bt, &json!({"filter": {"room_types": [null]}})).await;
    assert_eq!(ids(&page, "chunk"), [wine.clone(), cheese.clone(), bread.clone()]);
    let (_, page) =
        s.post_auth(LIST, &bt, &json!({"filter": {"room_types": [null, "m.space"]}})).await;
    assert_eq!(page["chunk"].as_array().unwrap().len(), 4);

    // Our own server name is the local directory; other servers are asked over
    // federation (an unreachable one is a 502).
    let (status, page) = s.get(&format!("{LIST}?server=localhost")).await;
    assert_eq!((status, page["chunk"].as_array().unwrap().len()), (200, 4));
    let (status, body) = s.get(&format!("{LIST}?server=127.0.0.1:1")).await;
    assert_eq!((status, body["errcode"].as_str()), (502, Some("M_UNKNOWN")), "{body}");
    let (status, _) = s.post_auth(&format!("{LIST}?server=127.0.0.1:1"), &bt, &json!({})).await;
    assert_eq!(status, 502);
    // No bridged networks: a third-party network has no rooms.
    let (_, page) = s.post_auth(LIST, &bt, &json!({"third_party_instance_id": "irc"})).await;
    assert_eq!(page["chunk"], json!([]));

    // Unpublishing removes the room again.
    let (status, _) = set_visibility(&s, &ct, &bread, "private").await;
    assert_eq!(status, 200);
    let (_, body) = s.get(&visibility_path(&bread)).await;
    assert_eq!(body["visibility"], "private");
    let (_, page) = s.get(LIST).await;
    assert!(!ids(&page, "chunk").contains(&bread));
    assert_eq!(page["total_room_count_estimate"], 3);
}

#[tokio::test]
async fn admins_only_publishing_and_authenticated_listing() {
    let config = format!("{OPEN}[rooms]\npublish = \"admins\"\npublic_rooms_require_auth = true\n");
    let mut s = TestServer::start(&config).await;
    s.terminate();
    let pwfile = s.dir.path().join("pw");
    std::fs::write(&pwfile, "admin password\n").unwrap();
    let out = common::run_cli(
        &[
            "user",
            "--config",
            s.config_path.to_str().unwrap(),
            "create",
            "boss",
            "--admin",
            "--password-file",
            pwfile.to_str().unwrap(),
        ],
        s.dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.launch().await;
    let (status, body) = s
        .post(
            "/_matrix/client/v3/login",
            &json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "boss"},
                    "password": "admin password"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let admin = body["access_token"].as_str().unwrap().to_owned();
    let (_, dt) = s.register("dora").await;
    let room = create(&s, &dt, json!({"preset": "public_chat", "name": "Dora's"})).await;

    // The room's own admin may not publish; a server admin may, without being a member.
    let (status, body) = set_visibility(&s, &dt, &room, "public").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let (status, body) = set_visibility(&s, &admin, &room, "public").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = s.get(LIST).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (status, page) = s.get_auth(LIST, &dt).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "chunk"), [room]);
}

/// Needs `createRoom` to publish rooms created with `visibility: public`.
#[tokio::test]
async fn rooms_created_public_are_published() {
    let s = TestServer::start(OPEN).await;
    let (_, et) = s.register("erin").await;
    let public = create(&s, &et, json!({"visibility": "public", "name": "Town square"})).await;
    let private = create(&s, &et, json!({"visibility": "private"})).await;
    let (_, body) = s.get(&visibility_path(&public)).await;
    assert_eq!(body["visibility"], "public", "{body}");
    let (_, body) = s.get(&visibility_path(&private)).await;
    assert_eq!(body["visibility"], "private");
    let (_, page) = s.get(LIST).await;
    assert_eq!(ids(&page, "chunk"), [public]);
    assert_eq!(page["chunk"][0]["name"], "Town square");
}

async fn add_child(s: &TestServer, token: &str, space: &str, child: &str, content: Value) {
    let (status, body) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{space}/state/m.space.child/{child}"),
            token,
            &content,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn space_hierarchy() {
    let s = TestServer::start(OPEN).await;
    let (alice, at) = s.register("alice").await;
    let (_, bt) = s.register("bob").await;
    let space_body = |name: &str| json!({"preset": "public_chat", "name": name, "creation_content": {"type": "m.space"}});
    // space -> [general (suggested), sub (a space) -> [deep]], plus a private room.
    let space = create(&s, &at, space_body("Club")).await;
    let general = create(&s, &at, json!({"preset": "public_chat", "name": "General"})).await;
    let sub = create(&s, &at, space_body("Sub-club")).await;
    let deep = create(&s, &at, json!({"preset": "public_chat", "name": "Deep"})).await;
    let hidden = create(&s, &at, json!({"preset": "private_chat", "name": "Hidden"})).await;
    add_child(
        &s,
        &at,
        &space,
        &general,
        json!({"via": ["localhost"], "suggested": true, "order": "a"}),
    )
    .await;
    add_child(&s, &at, &space, &sub, json!({"via": ["localhost"], "order": "b"})).await;
    add_child(&s, &at, &space, &hidden, json!({"via": ["localhost"], "order": "c"})).await;
    add_child(&s, &at, &sub, &deep, json!({"via": ["localhost"]})).await;
    // An event without `via` is no link; a loop back to the top is cut.
    add_child(&s, &at, &sub, &general, json!({})).await;
    add_child(&s, &at, &sub, &space, json!({"via": ["localhost"]})).await;
    join(&s, &bt, &general).await;

    let path = |query: &str| format!("/_matrix/client/v1/rooms/{space}/hierarchy{query}");

    // Depth-first in the children's order; Bob may not see the private room.
    let (status, page) = s.get_auth(&path(""), &bt).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        ids(&page, "rooms"),
        [space.as_str(), general.as_str(), sub.as_str(), deep.as_str()]
    );
    assert!(page.get("next_batch").is_none());
    let root = &page["rooms"][0];
    assert_eq!(
        (root["name"].as_str(), root["room_type"].as_str()),
        (Some("Club"), Some("m.space"))
    );
    assert_eq!(root["num_joined_members"], 1);
    assert_eq!(root["join_rule"].as_str().unwrap_or("public"), "public");
    let children = root["children_state"].as_array().unwrap();
    let keys: Vec<&str> = children.iter().map(|c| c["state_key"].as_str().unwrap()).collect();
    assert_eq!(keys, [&general, &sub, &hidden]);
    assert_eq!(children[0]["type"], "m.space.child");
    assert_eq!(children[0]["sender"], alice.as_str());
    assert_eq!(children[0]["content"]["suggested"], true);
    assert!(children[0]["origin_server_ts"].as_u64().unwrap() > 0);
    assert_eq!(page["rooms"][1]["num_joined_members"], 2);
    assert_eq!(page["rooms"][1]["children_state"], json!([]), "not a space");
    // Alice, a member of the private room, sees it too.
    let (_, page) = s.get_auth(&path(""), &at).await;
    assert_eq!(
        ids(&page, "rooms"),
        [space.as_str(), general.as_str(), sub.as_str(), deep.as_str(), hidden.as_str()]
    );

    // max_depth: children of the root only (the sub-space still lists its children).
    let (_, page) = s.get_auth(&path("?max_depth=1"), &bt).await;
    assert_eq!(ids(&page, "rooms"), [space.as_str(), general.as_str(), sub.as_str()]);
    let sub_children = page["rooms"][2]["children_state"].as_array().unwrap().len();
    assert_eq!(sub_children, 2, "{page}");
    let (_, page) = s.get_auth(&path("?max_depth=0"), &bt).await;
    assert_eq!(ids(&page, "rooms"), [space.as_str()]);

    // suggested_only: only suggested children are followed and listed.
    let (_, page) = s.get_auth(&path("?suggested_only=true"), &bt).await;
    assert_eq!(ids(&page, "rooms"), [space.as_str(), general.as_str()]);
    assert_eq!(page["rooms"][0]["children_state"].as_array().unwrap().len(), 1);

    // Pages of two.
    let (_, first) = s.get_auth(&path("?limit=2"), &bt).await;
    assert_eq!(ids(&first, "rooms"), [space.as_str(), general.as_str()]);
    let from = first["next_batch"].as_str().unwrap().to_owned();
    let (status, second) = s.get_auth(&path(&format!("?limit=2&from={from}")), &bt).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second, "rooms"), [sub.as_str(), deep.as_str()]);
    assert!(second.get("next_batch").is_none(), "{second}");
    // The walk's parameters cannot change between pages; tokens must be ours.
    let (status, body) = s.get_auth(&path(&format!("?limit=2&from={from}&max_depth=1")), &bt).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = s.get_auth(&path(&format!("?from={from}&suggested_only=true")), &bt).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, _) = s.get_auth(&path("?from=nonsense"), &bt).await;
    assert_eq!(status, 400);
    let (status, _) = s.get_auth(&path("?limit=0"), &bt).await;
    assert_eq!(status, 400);

    // The sub-space as the root; a root the user cannot see or that does not exist: 403.
    let (_, page) = s.get_auth(&format!("/_matrix/client/v1/rooms/{sub}/hierarchy"), &bt).await;
    assert_eq!(
        ids(&page, "rooms"),
        [sub.as_str(), deep.as_str(), space.as_str(), general.as_str()]
    );
    for room in [hidden.as_str(), "!unknown:localhost"] {
        let (status, body) =
            s.get_auth(&format!("/_matrix/client/v1/rooms/{room}/hierarchy"), &bt).await;
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    }
    let (status, _) = s.get(&path("")).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn room_summaries() {
    let s = TestServer::start(OPEN).await;
    let (_, at) = s.register("alice").await;
    let (bob, bt) = s.register("bob").await;
    let open = create(
        &s,
        &at,
        json!({"preset": "public_chat", "name": "Open", "topic": "Come in",
               "room_alias_name": "open"}),
    )
    .await;
    let private = create(
        &s,
        &at,
        json!({"preset": "private_chat", "name": "Secret",
               "initial_state": [{"type": "m.room.encryption", "state_key": "",
                                  "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}),
    )
    .await;
    let summary = |room: &str| format!("/_matrix/client/v1/room_summary/{room}");

    // A public room, seen by a non-member, by alias and without a token.
    let (status, body) = s.get_auth(&summary(&open), &bt).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["room_id"], open.as_str());
    assert_eq!(body["name"], "Open");
    assert_eq!(body["topic"], "Come in");
    assert_eq!(body["canonical_alias"], "#open:localhost");
    assert_eq!(body["num_joined_members"], 1);
    assert_eq!(body["room_version"], "11");
    assert_eq!(body["membership"], "leave");
    assert_eq!(body["join_rule"].as_str().unwrap_or("public"), "public");
    let (status, body) = s.get_auth(&summary("%23open:localhost"), &bt).await;
    assert_eq!((status, body["room_id"].as_str()), (200, Some(open.as_str())));
    let (status, body) = s.get(&summary(&open)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("membership").is_none(), "{body}");
    let (status, body) =
        s.get(&format!("/_matrix/client/unstable/im.nheko.summary/rooms/{open}/summary")).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Open")));

    // A private room is not found by outsiders, exactly like unknown rooms and aliases.
    for room in [private.as_str(), "!unknown:localhost", "%23nope:localhost"] {
        let (status, body) = s.get_auth(&summary(room), &bt).await;
        assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{room}");
    }
    let (status, _) = s.get(&summary(&private)).await;
    assert_eq!(status, 404);

    // Invited, Bob sees it with his membership; members see theirs.
    let (status, _) = s
        .post_auth(
            &format!("/_matrix/client/v3/rooms/{private}/invite"),
            &at,
            &json!({"user_id": bob}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = s.get_auth(&summary(&private), &bt).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["membership"], "invite");
    assert_eq!(body["join_rule"], "invite");
    assert_eq!(body["name"], "Secret");
    assert_eq!(body["encryption"], "m.megolm.v1.aes-sha2");
    let (_, body) = s.get_auth(&summary(&private), &at).await;
    assert_eq!(body["membership"], "join");
}
