//! `trellis bench turn`: media through the server's TURN relay. `calls` users each get
//! credentials from `/voip/turnServer`, allocate a relay over UDP and stream datagrams
//! of `packet-bytes` at `kbps` for `seconds` to an echo peer this scenario runs on
//! loopback (the server must allow loopback peers: see `scripts/bench-turn`); every
//! datagram crosses the relay twice. Reports datagrams and bytes relayed, loss, the
//! round trip through the relay and (with `--server-pid`) server CPU per relayed Mbit.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use super::{Api, Common, ServerProbe, round2, summary};

#[derive(Args)]
pub struct TurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Relay allocations streaming at once, one user each.
    #[arg(long, default_value_t = 20)]
    pub calls: usize,
    /// Send rate of each, in kilobits per second (2,000: a video call).
    #[arg(long, default_value_t = 2000)]
    pub kbps: u64,
    /// Size of each datagram (an RTP packet is about 1,200 bytes).
    #[arg(long, default_value_t = 1200)]
    pub packet_bytes: usize,
    /// Length of the streaming phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

/// The UDP `turn:` URI's address.
fn udp_server(creds: &Value) -> Result<SocketAddr, String> {
    let uris = creds["uris"].as_array().ok_or("no TURN server offered")?;
    let uri = uris
        .iter()
        .filter_map(Value::as_str)
        .find(|u| !u.contains("transport=tcp"))
        .ok_or("no UDP TURN URI")?;
    let host_port = uri.trim_start_matches("turn:").split('?').next().unwrap_or_default();
    std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .map_err(|e| format!("{uri}: {e}"))?
        .next()
        .ok_or_else(|| format!("{uri}: no address"))
}

/// One relay allocation streaming to the echo peer; returns (sent, round trips).
async fn stream(
    creds: Value,
    peer: SocketAddr,
    args: (u64, usize, Duration),
    start: Instant,
) -> Result<(usize, Vec<Duration>), String> {
    let (kbps, size, length) = args;
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?);
    let client = Client::new(ClientConfig {
        stun_serv_addr: String::new(),
        turn_serv_addr: udp_server(&creds)?.to_string(),
        username: creds["username"].as_str().unwrap_or_default().to_owned(),
        password: creds["password"].as_str().unwrap_or_default().to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    client.listen().await.map_err(|e| e.to_string())?;
    let relay = Arc::new(client.allocate().await.map_err(|e| format!("allocate: {e}"))?);
    // The first datagram creates the permission; wait for its echo before measuring.
    relay.send_to(&[0; 8], peer).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
        .await
        .map_err(|_| "no echo through the relay (are loopback peers allowed?)")?
        .map_err(|e| e.to_string())?;

    let receiver = {
        let relay = relay.clone();
        tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut buf = vec![0u8; 2048];
            loop {
                match tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf)).await
                {
                    Ok(Ok((n, _))) if n >= 8 => {
                        let mut sent = [0u8; 8];
                        sent.copy_from_slice(&buf[..8]);
                        let sent_us = u64::from_be_bytes(sent);
                        let now = start.elapsed().as_micros() as u64;
                        rtts.push(Duration::from_micros(now.saturating_sub(sent_us)));
                    }
                    Ok(Ok(_)) => {}
                    _ => return rtts,
                }
            }
        })
    };
    let interval = Duration::from_secs_f64((size * 8) as f64 / (kbps.max(1) * 1000) as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut packet = vec![0u8; size.max(8)];
    let (begun, mut sent) = (Instant::now(), 0);
    while begun.elapsed() < length {
        ticker.tick().await;
        let now = start.elapsed().as_micros() as u64;
        packet[..8].copy_from_slice(&now.to_be_bytes());
        if relay.send_to(&packet, peer).await.is_ok() {
            sent += 1;
        }
    }
    let rtts = receiver.await.map_err(|e| e.to_string())?;
    let _ = client.close().await;
    Ok((sent, rtts))
}

pub async fn turn(args: TurnArgs) -> Result<Value, String> {
    let api = Api::new(&args.common, 8)?;
    let prefix = format!("bench_turn_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.calls).await?;
    let mut credentials = Vec::new();
    for token in &tokens {
        credentials
            .push(api.call(Method::GET, "/_matrix/client/v3/voip/turnServer", token, None).await?);
    }
    // The other side of every call: echoes each datagram back to where it came from.
    let peer = UdpSocket::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let peer_addr = peer.local_addr().map_err(|e| e.to_string())?;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = peer.recv_from(&mut buf).await {
            let _ = peer.send_to(&buf[..n], from).await;
        }
    });

    let probe = ServerProbe::start(args.common.server_pid);
    let start = Instant::now();
    let shape = (args.kbps, args.packet_bytes, Duration::from_secs(args.seconds));
    let calls = credentials.into_iter().map(|creds| stream(creds, peer_addr, shape, start));
    let results = futures_util::future::join_all(calls).await;
    let elapsed = start.elapsed();
    let cpu = probe.report();
    echo.abort();

    let (mut sent, mut rtts, mut failed) = (0usize, Vec::new(), Vec::new());
    for result in results {
        match result {
            Ok((n, mut r)) => {
                sent += n;
                rtts.append(&mut r);
            }
            Err(e) => failed.push(e),
        }
    }
    let returned = rtts.len();
    // Each echoed datagram crossed the relay twice.
    let relayed_megabits = (returned * 2 * args.packet_bytes * 8) as f64 / 1e6;
    let cpu_ms_per_mbit =
        probe.cpu().map(|c| round2(c.as_secs_f64() * 1000.0 / relayed_megabits.max(1e-9)));
    Ok(json!({
        "scenario": "turn",
        "calls": args.calls,
        "kbps_each": args.kbps,
        "packet_bytes": args.packet_bytes,
        "seconds": round2(elapsed.as_secs_f64()),
        "failed_calls": failed,
        "datagrams_sent": sent,
        "datagrams_returned": returned,
        "loss_percent": if sent == 0 { 0.0 } else { round2((sent - returned.min(sent)) as f64 * 100.0 / sent as f64) },
        "relayed_mbit_per_s": round2(relayed_megabits / elapsed.as_secs_f64().max(1e-9)),
        "round_trip_ms": summary(&mut rtts),
        "server_cpu_ms_per_relayed_mbit": cpu_ms_per_mbit,
        "server": cpu,
    }))
}
