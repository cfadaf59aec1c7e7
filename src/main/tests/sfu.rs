//! The built-in SFU with LiveKit's own clients: tokens come from the server's token
//! service as Element Call gets them; livekit-client (from npm) in headless Chromium
//! publishes camera and microphone with simulcast, receives the others and the layer it
//! asks for, sends data, mutes, joins late, loses its signalling connection and resumes,
//! unpublishes and republishes, and leaves; LiveKit's Python SDK (its Rust client core)
//! does much the same with synthetic media, connecting as it does by default, and sees
//! active speakers, unsubscribes and subscribes again, and unpublishes, sees connection
//! quality, has its sending paused while nobody watches (dynacast) and restricts who may
//! receive its tracks; a call limited to one publisher refuses a second. Element Call
//! itself, hosted as a widget, holds an end-to-end encrypted call through it. A receiver
//! behind a narrow relay is moved to a simulcast layer that fits its link. A member's
//! delayed leave handed over to the server is posted when its participant leaves.

mod common;

use common::{OPEN, TestServer, urlencode};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// The built-in SFU on an ephemeral port of every interface (the browser reaches it at
/// the machine's address, as a client elsewhere would).
const SFU: &str = "[rtc]\nsfu_udp_listen = \"0.0.0.0:0\"\n";

/// A LiveKit URL and token for `user` in `room`, through the lk-jwt-service exchange.
async fn livekit_token(s: &TestServer, user: &str, token: &str, room: &str) -> (String, String) {
    let (status, openid) = s
        .post_auth(
            &format!("/_matrix/client/v3/user/{}/openid/request_token", urlencode(user)),
            token,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{openid}");
    let (status, got) = s
        .post(
            "/_trellis/livekit/sfu/get",
            &json!({"room": room, "openid_token": openid, "device_id": "DEVICE"}),
        )
        .await;
    assert_eq!(status, 200, "{got}");
    (got["url"].as_str().unwrap().to_owned(), got["jwt"].as_str().unwrap().to_owned())
}

/// Calls with real media run one at a time: browsers and SDK clients encoding video
/// side by side on a 2-core machine starve each other's encoders, and a test would then
/// measure the machine rather than the SFU.
static MEDIA: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Runs `tests/interop/<script>` with `args` (and `env`), and returns the one JSON object
/// it prints, which must name no exception.
async fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let _turn = MEDIA.acquire().await.expect("the semaphore is never closed");
    let path = format!("{}/tests/interop/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("python3")
        .arg(path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.get("exception").is_none(), "{r}");
    r
}

/// A metric's value in the server's exposition (0 when absent).
fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livekit_clients_call_through_the_built_in_sfu() {
    let s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    // The SFU is advertised as the call transport.
    let (_, transports) = s.get("/_matrix/client/v1/rtc/transports").await;
    assert_eq!(
        transports["rtc_transports"][0]["livekit_service_url"],
        format!("{}/_trellis/livekit", s.base),
        "{transports}"
    );

    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let (carol_id, carol) = s.register("carol").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    s.join_room(&carol, &room).await;
    let (url, token_a) = livekit_token(&s, &alice_id, &alice, &room).await;
    assert_eq!(url, format!("{}/_trellis/sfu", s.base.replacen("http://", "ws://", 1)));
    let (_, token_b) = livekit_token(&s, &bob_id, &bob, &room).await;
    let (_, token_c) = livekit_token(&s, &carol_id, &carol, &room).await;

    // A token is checked before any WebSocket: the validate probe says so.
    let validate = format!("{}/_trellis/sfu/rtc/validate", s.base);
    let ok = s.client.get(format!("{validate}?access_token={token_a}")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let bad = s.client.get(format!("{validate}?access_token=x.y.z")).send().await.unwrap();
    assert_eq!(bad.status(), 401);

    let page = s.url("/_matrix/client/versions");
    let r = run_script("sfu_call.py", &[&page, &url, &token_a, &token_b, &token_c], &[]).await;
    assert_eq!(r["both_decode"], true, "each decodes the other's video: {r}");
    assert_eq!(r["low_seen"], true, "the lowest layer asked for is decoded: {r}");
    assert_eq!(r["high_seen"], true, "then the highest: {r}");
    assert!(r["high_width"].as_u64() > r["low_width"].as_u64(), "{r}");
    assert_eq!(r["high_paused"], true, "dynacast pauses the layer nobody receives: {r}");
    assert_eq!(r["high_resumed"], true, "and resumes it when asked for: {r}");
    assert_eq!(r["srtp_ciphers"], json!(["SRTP_AES128_CM_HMAC_SHA1_80"]), "{r}");
    assert_eq!(r["data"][0]["text"], "hello from a", "{r}");
    assert_eq!(r["data"][0]["from"], r["sender_a"], "data names its sender: {r}");
    assert_eq!(r["mute_seen"], true, "{r}");
    assert_eq!(r["unmute_seen"], true, "{r}");
    assert_eq!(r["late_decodes"], true, "a late joiner receives both: {r}");
    assert_eq!(r["resumed"], true, "a dropped signalling connection resumes: {r}");
    assert_eq!(r["media_after_resume"], true, "{r}");
    assert_eq!(r["unpublish_seen"], true, "{r}");
    assert_eq!(r["republished_decodes"], true, "a republished camera reaches everyone: {r}");
    assert_eq!(r["leave_seen"], true, "{r}");

    let metrics = s.metrics().await;
    assert!(metric(&metrics, "trellis_sfu_forwarded_packets_total") > 100.0, "{metrics}");
    assert!(metric(&metrics, "trellis_sfu_forwarded_bytes_total") > 10_000.0, "{metrics}");
}

/// Element Call itself (its embedded build, as Element Web hosts it) in two headless
/// Chromiums: each joins the room's call through MatrixRTC state, the advertised focus
/// and the token exchange, and decodes the other's camera through the built-in SFU with
/// the call end-to-end encrypted by a shared key (so the SFU forwards encrypted
/// frames); one hanging up ends its call membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_call_calls_through_the_built_in_sfu() {
    let s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    let (alice_id, alice, bob_id, bob, room) = call_room(&s).await;
    let device = |token: String| {
        let s = &s;
        async move {
            let (status, me) = s.get_auth("/_matrix/client/v3/account/whoami", &token).await;
            assert_eq!(status, 200, "{me}");
            me["device_id"].as_str().unwrap().to_owned()
        }
    };
    let (alice_device, bob_device) = (device(alice.clone()).await, device(bob.clone()).await);

    let args = [&s.base, &room, &alice_id, &alice, &alice_device, &bob_id, &bob, &bob_device];
    let password = [("EC_PASSWORD", "correct horse battery staple")];
    let r = run_script("element_call.py", &args.map(String::as_str), &password).await;
    assert_eq!(r["both_decode"], true, "each decodes the other's camera: {r}");
    assert_eq!(r["encrypted_seen"], true, "the media is end-to-end encrypted: {r}");
    let mut both = vec![alice_id.clone(), bob_id.clone()];
    both.sort();
    assert_eq!(r["members_in_call"], json!(both), "{r}");
    assert_eq!(r["hangup_ends_membership"], true, "{r}");

    // Both were in the SFU's call, which carried their media, and each handed its
    // delayed leave over to the server, seeing it offered.
    let metrics = s.metrics().await;
    assert!(metric(&metrics, "trellis_sfu_forwarded_packets_total") > 100.0, "{metrics}");
    assert!(metric(&metrics, "trellis_sfu_leaves_handed_over_total") >= 2.0, "{metrics}");
}

/// Alice's room for calls, which Bob joined: (alice's id, her token, bob's id, his
/// token, room). Members may post their call membership, as Element Web sets up rooms
/// for calls.
async fn call_room(s: &TestServer) -> (String, String, String, String, String) {
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let levels = json!({"events": {"org.matrix.msc3401.call.member": 0}});
    let room = s
        .create_room(
            &alice,
            json!({"preset": "public_chat", "name": "Standup", "power_level_content_override": levels}),
        )
        .await;
    s.join_room(&bob, &room).await;
    (alice_id, alice, bob_id, bob, room)
}

/// The built-in TURN relay on every interface, dropping what a user relays beyond
/// 600 kbit/s: a receiver limited to it has a narrow link.
const NARROW_TURN: &str = "[turn]\nlisten_udp = \"0.0.0.0:0\"\nlisten_tcp = \"0.0.0.0:0\"\n\
                           user_bandwidth_kbps = 600\ndeny_private_peers = false\n\
                           allowed_peer_ips = [\"127.0.0.0/8\"]\n";

/// A receiver on a narrow link asks for the best layer of a 720p simulcast camera, more
/// than its link carries: the SFU's send-side estimate (from the transport-wide
/// congestion feedback the browser sends about what arrives) moves it to a layer that
/// fits, where it decodes steadily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_on_a_narrow_link_gets_a_layer_that_fits() {
    let s = TestServer::start(&format!("{OPEN}{SFU}{NARROW_TURN}")).await;
    let (url, _, _, _, token_a, token_b) = two_in_a_call(&s).await;
    let page = s.url("/_matrix/client/versions");
    let r = run_script("sfu_congestion.py", &[&page, &url, &token_a, &token_b], &[]).await;
    let samples = r["samples"].as_array().expect("samples");
    assert!(samples.len() >= 20, "{r}");
    let field = |i: usize, k: &str| samples[i][k].as_i64().unwrap_or(0);
    let last = samples.len() - 1;
    let top = r["top_width"].as_i64().unwrap_or(0);
    assert!(top >= 1280, "{r}");
    // The relay dropped what did not fit at first, so the top layer was too much.
    let metrics = s.metrics().await;
    assert!(
        !metrics.contains("trellis_turn_refusals_total{reason=\"bandwidth\"} 0\n"),
        "{metrics}"
    );
    // The estimate was the SFU's own: the browser, getting stamped packets, sends
    // transport-wide feedback instead of REMB.
    assert!(
        metrics.contains("trellis_sfu_bandwidth_estimates_total{source=\"receiver\"} 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("trellis_sfu_bandwidth_estimates_total{source=\"send_side\"} 0\n"),
        "{metrics}"
    );
    // From the first move down to the end: a lower layer most of the time (the estimate
    // tries the top one again now and then, ever more rarely), frames decoded throughout
    // (at least 5 a second, on a machine other tests share), and under 10 % of the
    // packets lost.
    let down = (0..=last)
        .find(|&i| field(i, "width") > 0 && field(i, "width") < top)
        .unwrap_or_else(|| panic!("never moved below the top layer: {r}"));
    assert!(last - down >= 10, "moved down only at {down}: {r}");
    let lower = (down..=last).filter(|&i| field(i, "width") > 0 && field(i, "width") < top);
    assert!(lower.count() * 10 >= (last - down + 1) * 7, "{r}");
    let seconds = i64::try_from(last - down).unwrap_or(i64::MAX);
    assert!(field(last, "decoded") - field(down, "decoded") >= 5 * seconds, "{r}");
    let received = field(last, "received") - field(down, "received");
    let lost = (field(last, "lost") - field(down, "lost")).max(0);
    assert!(received > 0 && lost * 10 < received, "{r}");
}

/// A client that resumes on a new signalling connection while its old one is still open
/// (it gave up on it before the server noticed) keeps its place: the old one's end does
/// not count as losing it, so the others never hear it rated lost or gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_over_a_still_open_connection_keeps_the_participant() {
    let s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    let (url, _, _, _, token_a, token_b) = two_in_a_call(&s).await;
    let r = run_script("sfu_resume.py", &[&url, &token_a, &token_b], &[]).await;
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(r["a_left"], false, "{r}");
    let qualities = r["qualities_of_a"].as_array().expect("qualities");
    assert!(!qualities.is_empty(), "B hears A's rating (on joining, at least): {r}");
    assert!(qualities.iter().all(|q| q != "LOST"), "{r}");
}

/// Alice and Bob in a room of their own, with LiveKit tokens for its call:
/// (url, alice's id, alice's access token, room, token A, token B).
async fn two_in_a_call(s: &TestServer) -> (String, String, String, String, String, String) {
    let (alice_id, alice) = s.register("alice").await;
    let (bob_id, bob) = s.register("bob").await;
    let room = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    s.join_room(&bob, &room).await;
    let (url, token_a) = livekit_token(s, &alice_id, &alice, &room).await;
    let (_, token_b) = livekit_token(s, &bob_id, &bob, &room).await;
    (url, alice_id, alice, room, token_a, token_b)
}

/// Runs `sfu_python.py` (its `scenario`, or the default one) and returns its report.
async fn python_call(url: &str, token_a: &str, token_b: &str, scenario: &str) -> Value {
    let _turn = MEDIA.acquire().await.expect("the semaphore is never closed");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/sfu_python.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args([url, token_a, token_b])
        .env("SFU_PYTHON_SCENARIO", scenario)
        .output()
        .await
        .expect("python3 runs");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert!(r.get("exception").is_none(), "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_livekit_python_sdk_calls_through_the_built_in_sfu() {
    let s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    let (url, alice_id, alice, room, token_a, token_b) = two_in_a_call(&s).await;
    // Element Call's member state starts the group call the SFU's figures are added to.
    let key = urlencode(&format!("_{alice_id}_DEVICE_m.call"));
    let (status, resp) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/state/org.matrix.msc3401.call.member/{key}"),
            &alice,
            &json!({"application": "m.call", "call_id": "", "scope": "m.room",
                    "device_id": "DEVICE", "focus_active": {"type": "livekit"}}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");

    let r = python_call(&url, &token_a, &token_b, "call").await;
    for key in
        ["a_frames_from_b", "b_frames_from_a", "a_audio_frames_from_b", "b_audio_frames_from_a"]
    {
        assert!(r[key].as_u64().unwrap_or(0) > 10, "{key}: {r}");
    }
    assert_eq!(r["data"][0]["text"], "hello from a", "{r}");
    assert_eq!(r["data"][0]["from"], alice_id.clone() + ":DEVICE", "{r}");
    // A changed its attributes (one set, then removed), metadata and name; B sees them.
    let a_seen = json!({"attributes": {"hand": "raised"}, "metadata": "{\"status\": \"presenting\"}",
                        "name": "Alice, presenting"});
    assert_eq!(r["a_as_b_sees_it"], a_seen, "{r}");
    assert_eq!(r["mute_seen"], true, "{r}");
    assert_eq!(r["speakers_seen"], true, "both are active speakers: {r}");
    assert_eq!(r["unsubscribe_seen"], true, "{r}");
    assert_eq!(r["frames_after_resubscribe"], true, "{r}");
    assert_eq!(r["unpublish_seen"], true, "{r}");
    assert_eq!(r["audio_after_unpublish"], true, "the rest goes on: {r}");

    // Both left, so the SFU's call ended: its figures are in the group call's history.
    let mut media = Value::Null;
    for _ in 0..50 {
        let (_, calls) = s.get_auth("/_trellis/client/v1/calls", &alice).await;
        media = calls["calls"][0]["media"].clone();
        if !media.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(media["peak_participants"], 2, "{media}");
    assert!(media["forwarded_bytes"].as_u64().unwrap_or(0) > 20_000, "{media}");
    assert!(media["seconds"].as_u64().unwrap_or(0) >= 2, "{media}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_pause_unwatched_video_and_choose_who_receives_it() {
    let s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    let (url, _, _, _, token_a, token_b) = two_in_a_call(&s).await;
    let r = python_call(&url, &token_a, &token_b, "controls").await;
    assert_eq!(r["media_flowing"], true, "{r}");
    // On loopback everyone's connection is excellent, and everyone hears of everyone's.
    for who in ["a_sees_quality", "b_sees_quality"] {
        let seen = r[who].as_object().unwrap();
        assert_eq!(seen.len(), 2, "{who}: {r}");
        assert!(seen.values().all(|q| q == "QUALITY_EXCELLENT"), "{who}: {r}");
    }
    assert_eq!(r["a_sends_while_watched"], true, "{r}");
    assert_eq!(r["a_paused_when_unwatched"], true, "dynacast pauses unwatched video: {r}");
    assert_eq!(r["frames_after_resume"], true, "{r}");
    assert_eq!(r["a_sends_when_watched_again"], true, "{r}");
    assert_eq!(r["video_while_denied"], 0, "a allowed nobody: {r}");
    assert_eq!(r["audio_while_denied"], 0, "a allowed nobody: {r}");
    assert_eq!(r["b_receives_when_allowed"], true, "allowed by identity: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_keep_to_the_calls_bitrate_cap() {
    // The same noise, sent under a cap of 150 kbit/s and under the default (8 Mbit/s).
    let mut kbps = Vec::new();
    for cap in ["sfu_max_publish_kbps = 150\n", ""] {
        let s = TestServer::start(&format!("{OPEN}{SFU}{cap}")).await;
        let (url, _, _, _, token_a, token_b) = two_in_a_call(&s).await;
        let r = python_call(&url, &token_a, &token_b, "cap").await;
        assert_eq!(r["media_flowing"], true, "{r}");
        kbps.push(r["a_video_kbps"].as_u64().unwrap());
    }
    let (capped, free) = (kbps[0], kbps[1]);
    // The ceiling is a rate the publisher's encoder aims at, not a hard limit: noise's
    // large keyframes overshoot it for a moment, more so on a loaded machine.
    assert!(capped <= 150 * 3 / 2, "under a 150 kbit/s cap the publisher sent {capped}");
    assert!(free > 2 * capped, "uncapped it sends more: {free} against {capped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_takes_no_more_publishers_than_configured() {
    let s = TestServer::start(&format!("{OPEN}{SFU}sfu_max_publishers = 1\n")).await;
    let (url, _, _, _, token_a, token_b) = two_in_a_call(&s).await;
    let r = python_call(&url, &token_a, &token_b, "limit").await;
    assert!(r["b_refused"].is_string(), "the second publisher is refused: {r}");
    assert_eq!(r["b_receives"], true, "and still receives the first: {r}");
}

/// A member's call membership and its leave, scheduled an hour out as a client that
/// hands it over schedules it; then its token, with the leave handed over, and its
/// participant in the SFU's call (its signalling socket, which the caller keeps open).
/// Answers (membership state path, delay id, socket).
async fn member_with_handed_over_leave(
    s: &TestServer,
    user: &str,
    token: &str,
    room: &str,
    via: HandOver,
) -> (String, String, SignalSocket) {
    let (_, me) = s.get_auth("/_matrix/client/v3/account/whoami", token).await;
    let device = me["device_id"].as_str().unwrap().to_owned();
    let state = format!(
        "/_matrix/client/v3/rooms/{room}/state/org.matrix.msc3401.call.member/{}",
        urlencode(&format!("_{user}_{device}_m.call"))
    );
    let membership = json!({"application": "m.call", "call_id": "", "scope": "m.room",
                            "device_id": device});
    let (status, resp) = s.put_auth(&state, token, &membership).await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) =
        s.put_auth(&format!("{state}?org.matrix.msc4140.delay=3600000"), token, &json!({})).await;
    assert_eq!(status, 200, "{resp}");
    let delay_id = resp["delay_id"].as_str().unwrap().to_owned();

    let openid_path = format!("/_matrix/client/v3/user/{}/openid/request_token", urlencode(user));
    let (_, openid) = s.post_auth(&openid_path, token, &json!({})).await;
    let member_id = format!("member-{device}");
    let mut request = json!({"room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid,
                             "member": {"id": member_id, "claimed_user_id": user,
                                        "claimed_device_id": device}});
    let got = match via {
        HandOver::WithToken => {
            // A delay id that is not one of the caller's waiting ones is refused as
            // lk-jwt-service refuses it, so that clients ask again without handing over.
            let delay = json!({"delay_timeout": 3600000, "delay_cs_api_url": s.base});
            request.as_object_mut().unwrap().extend(delay.as_object().unwrap().clone());
            request["delay_id"] = json!("syd_nope");
            let (status, refused) = s.post("/_trellis/livekit/get_token", &request).await;
            assert_eq!(
                (status, refused["errcode"].as_str()),
                (400, Some("M_BAD_JSON")),
                "{refused}"
            );
            request["delay_id"] = json!(delay_id);
            let (status, got) = s.post("/_trellis/livekit/get_token", &request).await;
            assert_eq!(status, 200, "{got}");
            got
        }
        HandOver::Homeserver => {
            let (status, got) = s.post("/_trellis/livekit/get_token", &request).await;
            assert_eq!(status, 200, "{got}");
            let hand_over = json!({"url": got["url"], "room_id": room, "slot_id": "m.call#ROOM",
                                   "member_id": member_id, "delay_id": delay_id});
            let (status, resp) = s.post_auth(HS_HAND_OVER, token, &hand_over).await;
            assert_eq!((status, resp), (200, json!({})));
            got
        }
    };

    let url = format!(
        "{}/rtc?access_token={}",
        got["url"].as_str().unwrap(),
        got["jwt"].as_str().unwrap()
    );
    let (mut socket, _) =
        tokio_tungstenite::connect_async(url).await.expect("the SFU takes the socket");
    // The join response: the participant is in the call.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "{first:?}");
    (state, delay_id, socket)
}

/// How a member hands its leave over: with its token request (what Element Call does),
/// or at the homeserver's endpoint with its access token.
enum HandOver {
    WithToken,
    Homeserver,
}

const HS_HAND_OVER: &str =
    "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave";

type SignalSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Polls `state` until its content is the (empty) leave, for up to `seconds`.
async fn leave_posted(s: &TestServer, token: &str, state: &str, seconds: u64) -> bool {
    for _ in 0..seconds * 5 {
        let (status, content) = s.get_auth(state, token).await;
        if status == 200 && content == json!({}) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// Members hand their call's delayed leave over to the server (MSC4195's delegation, as
/// Element Call does when a server offers it, scheduling the leave an hour out): while a
/// member's participant is in the SFU's call the leave waits; once the participant is
/// gone from the call (its connection dropped, past the resume window) the leave is
/// posted, the hour notwithstanding; and a restart of the server, which ends every call,
/// gives the participant a while to come back, after which its leave is posted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_leave_is_posted_when_the_participant_leaves_the_call() {
    let mut s = TestServer::start(&format!("{OPEN}{SFU}")).await;
    let (alice_id, alice, bob_id, bob, room) = call_room(&s).await;

    // Clients probe both forms of the hand-over with an empty request: anything but a 404
    // says it is offered.
    let (status, _) = s.post("/_trellis/livekit/delegate_delayed_leave", &Value::Null).await;
    assert_eq!(status, 400);
    let (status, _) = s.post(HS_HAND_OVER, &Value::Null).await;
    assert_eq!(status, 401);

    let (alice_state, alice_delay, alice_socket) =
        member_with_handed_over_leave(&s, &alice_id, &alice, &room, HandOver::WithToken).await;
    let (bob_state, bob_delay, _bob_socket) =
        member_with_handed_over_leave(&s, &bob_id, &bob, &room, HandOver::Homeserver).await;
    // Nobody takes over another's leave.
    let sfu = format!("{}/_trellis/sfu", s.base.replacen("http://", "ws://", 1));
    let theirs = json!({"url": sfu, "room_id": room, "slot_id": "m.call#ROOM",
                        "member_id": "member-x", "delay_id": alice_delay});
    let (status, resp) = s.post_auth(HS_HAND_OVER, &bob, &theirs).await;
    assert_eq!((status, resp["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{resp}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for (state, token) in [(&alice_state, &alice), (&bob_state, &bob)] {
        let (_, content) = s.get_auth(state, token).await;
        assert_eq!(content["application"], "m.call", "in the call, the membership stays");
    }

    // Alice's client dies: its socket drops without a leave. Once the SFU has given up on
    // it her leave is posted; Bob, still in the call, keeps his membership.
    drop(alice_socket);
    assert!(leave_posted(&s, &alice, &alice_state, 60).await, "alice's leave was posted");
    let (_, content) = s.get_auth(&bob_state, &bob).await;
    assert_eq!(content["application"], "m.call", "{content}");
    let metrics = s.metrics().await;
    assert_eq!(metric(&metrics, "trellis_sfu_leaves_handed_over_total"), 2.0, "{metrics}");
    assert_eq!(metric(&metrics, "trellis_sfu_leaves_posted_total"), 1.0, "{metrics}");
    let (_, list) =
        s.get_auth("/_matrix/client/unstable/org.matrix.msc4140/delayed_events", &bob).await;
    assert!(
        list["delayed_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["delay_id"] == bob_delay.as_str()),
        "{list}"
    );

    // The server restarts: every call ends, and Bob never comes back. His leave is posted
    // once he has had a while to.
    s.kill9();
    s.launch().await;
    assert!(leave_posted(&s, &bob, &bob_state, 120).await, "bob's leave was posted");
    let metrics = s.metrics().await;
    assert_eq!(metric(&metrics, "trellis_sfu_leaves_posted_total"), 1.0, "{metrics}");
}
