//! The WebSocket sync stream: authenticated, one message per batch, woken by sends,
//! resumable with the last `next_batch`, closed after logout.

mod common;

use std::time::Duration;

use common::{OPEN, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    s: &TestServer,
    query: &str,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = format!("{}/_trellis/client/v1/sync?{query}", s.base.replacen("http", "ws", 1));
    tokio_tungstenite::connect_async(url).await.map(|(socket, _)| socket)
}

/// The next sync batch on the socket (pings and pongs skipped).
async fn next_batch(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a batch within 10 s")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn say(s: &TestServer, token: &str, room: &str, body: &str) {
    let (status, resp) = s
        .put_auth(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{body}"),
            token,
            &json!({"msgtype": "m.text", "body": body}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
}

#[tokio::test]
async fn batches_stream_over_a_websocket() {
    let s = TestServer::start(OPEN).await;
    let (_alice, at) = s.register("alice").await;
    let (status, room) = s.post_auth("/_matrix/client/v3/createRoom", &at, &json!({})).await;
    assert_eq!(status, 200);
    let room = room["room_id"].as_str().unwrap().to_owned();

    // No token, or a bad one: the upgrade is refused.
    assert!(connect(&s, "").await.is_err());
    assert!(connect(&s, "access_token=nope").await.is_err());

    let mut socket = connect(&s, &format!("access_token={at}")).await.unwrap();
    let first = next_batch(&mut socket).await;
    assert!(first["rooms"]["join"].get(&room).is_some(), "{first}");
    say(&s, &at, &room, "over the socket").await;
    let second = next_batch(&mut socket).await;
    let events = &second["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(events[0]["content"]["body"], "over the socket", "{second}");
    // Pings are answered.
    socket.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap();
    assert!(matches!(pong, Some(Ok(Message::Pong(_)))), "{pong:?}");
    // A message far larger than the stream's initial read buffer is taken (and ignored)
    // without ending the stream.
    socket.send(Message::Text("x".repeat(200_000).into())).await.unwrap();
    socket.send(Message::Ping(b"again".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap();
    assert!(matches!(&pong, Some(Ok(Message::Pong(p))) if &p[..] == b"again"), "{pong:?}");
    drop(socket);

    // Resuming from the last token delivers only what came after it.
    let since = second["next_batch"].as_str().unwrap();
    say(&s, &at, &room, "while away").await;
    let mut socket = connect(&s, &format!("access_token={at}&since={since}")).await.unwrap();
    let resumed = next_batch(&mut socket).await;
    let events = resumed["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{resumed}");
    assert_eq!(events[0]["content"]["body"], "while away");

    // Logging out ends the stream.
    let (status, _) = s.post_auth("/_matrix/client/v3/logout", &at, &json!({})).await;
    assert_eq!(status, 200);
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert_eq!(end, Ok(true));
}
