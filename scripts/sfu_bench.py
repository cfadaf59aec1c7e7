"""Load generator and report for scripts/bench-sfu: LiveKit's Python SDK (`livekit`,
`from livekit import rtc`, which wraps LiveKit's Rust client core and libwebrtc) against
Trellis's built-in SFU.

  sfu_bench.py run --scenario stream|meeting --base-url URL --metrics-url URL \
      --server-pid PID [--subscribers N] [--participants P] [--duration S] ...
      Registers users (m.login.dummy on an open-registration server), makes a room, gets a
      LiveKit URL and token per user from /_trellis/livekit/sfu/get, connects the clients
      (all in this one process), lets media settle, then measures a window of --duration
      seconds. Prints one JSON object on stdout.
  sfu_bench.py table FILE
      FILE holds such JSON objects, one a line: prints a table and a final JSON line.

Scenarios:
  stream   one publisher (video + audio), N subscribers that only receive
  meeting  P participants, each publishing video + audio and receiving every other

Media: synthetic I420 video (a panning noise picture with a band of fresh noise each
frame, so the encoder has real work and a steady bitrate) at --fps, encoded once per
publisher by libwebrtc (VP8, one layer unless --simulcast; max bitrate --video-kbps), and
a 48 kHz mono sine (Opus, 20 ms packets). Frames are precomputed: the publishing loops do
no per-pixel or per-sample work in Python.

Counting what is received (--count):
  stats   (default) no VideoStream/AudioStream is made. At the window's start and end each
          client's libwebrtc stats are read (one get_rtc_stats per client): per received
          video track the frames received (complete frames assembled from RTP: what the
          SFU delivered) and decoded, per audio track the packets received, and RTP packets
          lost. libwebrtc decodes every received video frame even without a sink
          (frames_decoded keeps rising), so the decoding cost stays; what is saved is the
          SDK's per-frame conversion and the per-frame event into Python, whose dispatch
          costs O(open streams) per event in the SDK.
  stream  a VideoStream/AudioStream per received track, as an app would receive them,
          counting video frames in Python (the "decoded" figure) and nothing else.
Published rates come from the publishers' outbound-rtp stats (video frames and audio
packets sent), so frames the encoder skipped are not counted as lost by the SFU. When the
decoded share falls below the received share, the receiving clients (not the SFU) are out
of CPU. Reconnections of the clients in the window are counted and flagged.

Server figures over the window: CPU seconds (utime+stime of /proc/PID/stat over clk_tck),
RSS (VmRSS, VmHWM), and deltas of its Prometheus metrics: trellis_sfu_forwarded_bytes_total
(RTP payload bytes, one copy per receiver) as Mbit/s, packets, and the forward-time
histogram trellis_sfu_forward_seconds (from the forwarder's read of a packet to its write
to the last receiver; time queued before that read is not in it), whose p50/p99 are
interpolated linearly inside the bucket they fall in (buckets 10 µs .. 25 ms).
  cpu_ms_per_mbit = server CPU milliseconds / forwarded megabits (10^6 bits of payload)
  cpu_us_per_pkt  = server CPU microseconds / forwarded packets
Also reported: this process's CPU (the clients: encoding, decoding, the SDK's threads) and
the whole machine's busy share, since clients and server share the cores.
"""

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RATE, CHUNK = 48000, 480  # 10 ms of 48 kHz mono audio per capture
CLK_TCK = os.sysconf("SC_CLK_TCK")

result = {}
stage = ["start"]


def log(msg):
    print(f"[sfu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Matrix setup (urllib only)


def http(base, method, path, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None


def livekit_tokens(base, users):
    """Registers `users`, has the first make a public room the others join, and returns
    (livekit_url, [jwt per user]), the creator's first."""
    accounts = []
    for name in users:
        r = http(base, "POST", "/_matrix/client/v3/register",
                 {"username": name, "password": "password123", "auth": {"type": "m.login.dummy"}})
        accounts.append((r["user_id"], r["access_token"]))
    room = http(base, "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat"},
                accounts[0][1])["room_id"]
    for _, token in accounts[1:]:
        http(base, "POST", f"/_matrix/client/v3/join/{urllib.parse.quote(room)}", {}, token)
    url, jwts = None, []
    for user_id, token in accounts:
        openid = http(base, "POST",
                      f"/_matrix/client/v3/user/{urllib.parse.quote(user_id)}/openid/request_token",
                      {}, token)
        got = http(base, "POST", "/_trellis/livekit/sfu/get",
                   {"room": room, "openid_token": openid, "device_id": "BENCH"})
        url = got["url"]
        jwts.append(got["jwt"])
    return url, jwts


# ---------------------------------------------------------------------------------------
# Process and server figures


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_mb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def machine_ticks():
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]), idle


def scrape(metrics_url):
    """The SFU's metrics: {name: value} for plain samples, {'hist': {le: count}} etc."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out = {"buckets": {}}
    for line in text.splitlines():
        if not line.startswith("trellis_sfu_"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if name.startswith("trellis_sfu_forward_seconds_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            out["buckets"][math.inf if le == "+Inf" else float(le)] = v
        else:
            out[name] = v
    return out


def quantile(buckets, q):
    """The q-quantile of a cumulative histogram {le: count}, interpolated inside its
    bucket; None without samples. Past the last finite bound: that bound (a lower bound)."""
    les = sorted(buckets)
    total = buckets.get(math.inf, buckets[les[-1]] if les else 0)
    if not les or total <= 0:
        return None
    target = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= target:
            if le == math.inf:
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (target - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


# ---------------------------------------------------------------------------------------
# Media


def make_video_frames(width, height, count, seed):
    """`count` I420 frames: a noise picture of moderate contrast panning right 2 px a
    frame, with a band (1/16 of the height) of fresh low-contrast noise moving down; flat
    chroma with a slow tint change. A camera-like load for VP8: steady bitrate at the cap
    without the encoder scaling the picture down."""
    import random
    rnd = random.Random(seed)
    ysize, csize = width * height, (width // 2) * (height // 2)
    mid = bytes(96 + (b & 63) for b in range(256))  # 96..159
    low = bytes(120 + (b & 15) for b in range(256))  # 120..135
    base = rnd.randbytes(ysize + 2 * count).translate(mid)
    band = max(2, height // 16)
    frames = []
    for n in range(count):
        luma = bytearray(base[2 * n: 2 * n + ysize])
        y0 = (n * band // 2) % (height - band)
        luma[y0 * width:(y0 + band) * width] = rnd.randbytes(band * width).translate(low)
        u = bytes([(96 + n) % 256]) * csize
        v = bytes([(160 - n) % 256]) * csize
        frames.append(bytes(luma) + u + v)
    return frames


def make_audio_frames(rtc, pitch):
    """One second of a sine as 100 frames of 10 ms."""
    frames = []
    for k in range(RATE // CHUNK):
        f = rtc.AudioFrame.create(RATE, 1, CHUNK)
        s = f.data
        for i in range(CHUNK):
            s[i] = int(6000 * math.sin(2 * math.pi * pitch * (k * CHUNK + i) / RATE))
        frames.append(f)
    return frames


def inbound_entry(r):
    return {
        "frames": r.inbound.frames_decoded, "frames_received": r.inbound.frames_received,
        "packets": r.received.packets_received, "lost": r.received.packets_lost,
        "bytes": r.inbound.bytes_received, "width": r.inbound.frame_width,
        "height": r.inbound.frame_height, "nack": r.inbound.nack_count,
        "pli": r.inbound.pli_count, "freezes": r.inbound.freeze_count,
    }


def outbound(entries):
    """Sums over the outbound-rtp entries of one kind (simulcast layers); frames: the
    largest layer's."""
    out = None
    for r in entries:
        o = {"frames": r.outbound.frames_sent, "encoded": r.outbound.frames_encoded,
             "packets": r.sent.packets_sent, "bytes": r.sent.bytes_sent,
             "width": r.outbound.frame_width, "height": r.outbound.frame_height,
             "limit": r.outbound.quality_limitation_reason,
             "layers": {r.outbound.rid or str(r.stream.ssrc): r.outbound.frames_sent}}
        if out is None:
            out = o
        else:
            out["layers"].update(o["layers"])
            out["packets"] += o["packets"]
            out["bytes"] += o["bytes"]
            if o["width"] > out["width"]:
                for k in ("frames", "encoded", "width", "height", "limit"):
                    out[k] = o[k]
    return out


class Client:
    def __init__(self, rtc, args, index, publishes):
        self.rtc = rtc
        self.args = args
        self.index = index
        self.publishes = publishes
        self.room = rtc.Room()
        self.tasks = []
        self.remote = {}  # (publisher identity, kind) -> RemoteTrack
        self.counts = {}  # (publisher identity, kind) -> frames counted by a stream
        self.local = {}  # kind -> LocalTrack
        self.captured = 0
        self.events = {"reconnecting": 0, "reconnected": 0, "disconnected": 0}
        self.room.on("track_subscribed", self._on_track)
        for name in self.events:
            self.room.on(name, self._counter(name))

    def _counter(self, name):
        def bump(*_):
            self.events[name] += 1
        return bump

    @property
    def identity(self):
        return self.room.local_participant.identity

    def _on_track(self, track, publication, participant):
        rtc = self.rtc
        kind = "video" if track.kind == rtc.TrackKind.KIND_VIDEO else "audio"
        key = (participant.identity, kind)
        self.remote[key] = track
        if self.args.count == "stream":
            if kind == "video":
                stream = rtc.VideoStream(track)
            else:
                stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
            self.tasks.append(asyncio.ensure_future(self._count(stream, key)))

    async def _count(self, stream, key):
        self.counts.setdefault(key, 0)
        try:
            async for _ in stream:
                self.counts[key] += 1
        finally:
            await stream.aclose()

    async def connect(self, url, token):
        # The two-connection protocol straight away (the SDK's default tries the
        # single-connection path first, gets 404 and falls back).
        opts = self.rtc.RoomOptions(auto_subscribe=True, single_peer_connection=False)
        await self.room.connect(url, token, opts)

    async def publish(self, video_frames, audio_frames):
        rtc, a = self.rtc, self.args
        video = rtc.VideoSource(a.width, a.height)
        vtrack = rtc.LocalVideoTrack.create_video_track(f"v{self.index}", video)
        vopts = rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_CAMERA, simulcast=a.simulcast,
            video_codec=rtc.VideoCodec.VP8,
            video_encoding=rtc.VideoEncoding(max_bitrate=a.video_kbps * 1000, max_framerate=a.fps))
        await self.room.local_participant.publish_track(vtrack, vopts)
        self.local["video"] = vtrack
        self.tasks.append(asyncio.ensure_future(self._video_loop(video, video_frames)))

        audio = rtc.AudioSource(RATE, 1, queue_size_ms=200)
        atrack = rtc.LocalAudioTrack.create_audio_track(f"a{self.index}", audio)
        aopts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(atrack, aopts)
        self.local["audio"] = atrack
        self.tasks.append(asyncio.ensure_future(self._audio_loop(audio, audio_frames)))

    async def _video_loop(self, source, frames):
        rtc, a = self.rtc, self.args
        n = 0
        start = time.monotonic()
        while True:
            data = frames[(n + self.index * 7) % len(frames)]
            source.capture_frame(rtc.VideoFrame(a.width, a.height, rtc.VideoBufferType.I420, data))
            n += 1
            self.captured = n
            delay = start + n / a.fps - time.monotonic()
            if delay < -1.0:  # fell behind by a second (a starved loop): skip, do not burst
                start = time.monotonic() - n / a.fps
            await asyncio.sleep(max(0.0, delay))

    async def _audio_loop(self, source, frames):
        n = 0
        while True:
            await source.capture_frame(frames[n % len(frames)])
            n += 1

    async def snapshot(self):
        """libwebrtc stats of every received and published track: one request for the
        client's two peer connections (per-track requests are many more FFI round trips,
        and time out on a loaded machine)."""
        recv, sent = {}, {}
        try:
            st = await asyncio.wait_for(self.room.get_rtc_stats(), 20)
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - counted as missing
            log(f"client {self.index}: stats failed: {type(e).__name__} {e}")
            return recv, sent, time.monotonic()
        taken = time.monotonic()
        by_sid = {t.sid: k for k, t in self.remote.items()}
        for s in st.subscriber_stats:
            if s.WhichOneof("stats") != "inbound_rtp":
                continue
            k = by_sid.get(s.inbound_rtp.inbound.track_identifier)
            if k is not None:
                recv[k] = inbound_entry(s.inbound_rtp)
                if self.args.count == "stream":
                    recv[k]["counted"] = self.counts.get(k, 0)
        out = {}
        bwe = 0.0
        for s in st.publisher_stats:
            which = s.WhichOneof("stats")
            if which == "outbound_rtp":
                out.setdefault(s.outbound_rtp.stream.kind, []).append(s.outbound_rtp)
            elif which == "candidate_pair":
                bwe = max(bwe, s.candidate_pair.candidate_pair.available_outgoing_bitrate)
        for kind, entries in out.items():
            if kind in self.local:
                sent[kind] = outbound(entries)
        if "video" in sent and sent["video"] is not None:
            # The publisher's bandwidth estimate (from the SFU's transport-cc feedback).
            sent["video"]["bwe"] = bwe
        return recv, sent, taken

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.room.disconnect()


async def snapshot_all(args, clients):
    """The server's and the machine's figures at "t"; each client's stats with the time
    they came (collecting them takes a while on a busy machine)."""
    t_tot, t_idle = machine_ticks()
    snap = {
        "t": time.monotonic(),
        "server_cpu": proc_cpu_seconds(args.server_pid),
        "client_cpu": proc_cpu_seconds(os.getpid()),
        "machine": (t_tot, t_idle),
        "metrics": scrape(args.metrics_url),
        "events": sum(sum(c.events.values()) for c in clients),
    }
    c0 = time.monotonic()
    snap["clients"] = await asyncio.gather(*(c.snapshot() for c in clients))
    snap["collect_s"] = time.monotonic() - c0
    return snap


def rate_summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return round(min(values), 2), round(sum(values) / len(values), 2)


def analyse(args, clients, s0, s1):
    window = s1["t"] - s0["t"]

    def cwindow(ci):  # between client ci's two stats readings
        return max(1e-3, s1["clients"][ci][2] - s0["clients"][ci][2])
    resets = 0  # tracks whose counters went backwards (a reconnection made new ones)

    def counted(new, old, key):
        nonlocal resets
        if new is None or old is None:
            return None
        if new[key] < old[key]:
            resets += 1
            return None
        return new[key] - old[key]
    m0, m1 = s0["metrics"], s1["metrics"]

    def delta(name):
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    fwd_bytes = delta("trellis_sfu_forwarded_bytes_total")
    fwd_pkts = delta("trellis_sfu_forwarded_packets_total")
    buckets = {le: c - m0["buckets"].get(le, 0.0) for le, c in m1["buckets"].items()}
    server_cpu = s1["server_cpu"] - s0["server_cpu"]
    client_cpu = s1["client_cpu"] - s0["client_cpu"]
    tot = s1["machine"][0] - s0["machine"][0]
    idle = s1["machine"][1] - s0["machine"][1]
    mbit = fwd_bytes * 8 / 1e6
    mem = proc_mem_mb(args.server_pid)

    # Published rates per publisher identity and kind.
    pub_rate = {}
    pub_info = {}
    for ci, (c, r0, r1) in enumerate(zip(clients, s0["clients"], s1["clients"])):
        for kind, o1 in r1[1].items():
            o0 = r0[1].get(kind)
            n = counted(o1, o0, "frames" if kind == "video" else "packets")
            if n is None:
                continue
            if kind == "video" and len(o1["layers"]) > 1:
                # Simulcast: the SFU forwards one layer (which is not known here); the
                # busiest layer's frame rate is the reference.
                n = max(f - o0["layers"].get(rid, f) for rid, f in o1["layers"].items())
            pub_rate[(c.identity, kind)] = n / cwindow(ci)
            if kind == "video":
                pub_info[c.identity] = o1
    # Received rates per (receiver, publisher, kind); a missing track counts as 0.
    expected = [(c, p.identity) for c in clients for p in clients
                if p.publishes and p is not c]
    # video: frames received (complete frames assembled from packets: what the SFU
    # delivered) and decoded (needs the receiving client's CPU; in "stream" mode the frames
    # counted in Python); audio: packets received.
    rates = {"video": [], "decoded": [], "audio": []}
    ratio = {"video": [], "decoded": [], "audio": []}
    lost = {"video": 0, "audio": 0}
    got_pkts = {"video": 0, "audio": 0}
    feedback = {"nack": 0, "pli": 0, "freezes": 0}
    sizes = set()
    for c, pub in expected:
        ci = clients.index(c)
        for kind in ("video", "audio"):
            i0 = s0["clients"][ci][0].get((pub, kind))
            i1 = s1["clients"][ci][0].get((pub, kind))
            if kind == "video":
                units = {"video": "frames_received",
                         "decoded": "counted" if args.count == "stream" else "frames"}
            else:
                units = {"audio": "packets"}
            for name, unit in units.items():
                n = counted(i1, i0, unit)
                rate = 0.0 if n is None else n / cwindow(ci)
                rates[name].append(rate)
                p = pub_rate.get((pub, kind))
                if p:
                    ratio[name].append(rate / p)
            if i0 is not None and i1 is not None and i1["packets"] >= i0["packets"]:
                lost[kind] += max(0, i1["lost"] - i0["lost"])
                got_pkts[kind] += i1["packets"] - i0["packets"]
                if kind == "video":
                    sizes.add(f"{i1['width']}x{i1['height']}")
                    for k in feedback:
                        feedback[k] += max(0, i1[k] - i0[k])

    v_min, v_avg = rate_summary(rates["video"])
    d_min, d_avg = rate_summary(rates["decoded"])
    a_min, a_avg = rate_summary(rates["audio"])
    vr_min, vr_avg = rate_summary([r * 100 for r in ratio["video"]])
    dr_min, dr_avg = rate_summary([r * 100 for r in ratio["decoded"]])
    ar_min, ar_avg = rate_summary([r * 100 for r in ratio["audio"]])
    pubs = [pub_rate[k] for k in pub_rate if k[1] == "video"]
    apubs = [pub_rate[k] for k in pub_rate if k[1] == "audio"]
    p50 = quantile(buckets, 0.5)
    p99 = quantile(buckets, 0.99)
    limits = {0: "none", 1: "cpu", 2: "bandwidth", 3: "other"}

    def pct_lost(kind):
        total = got_pkts[kind] + lost[kind]
        return round(100 * lost[kind] / total, 3) if total else None

    return {
        "scenario": args.scenario,
        "publishers": sum(1 for c in clients if c.publishes),
        "receivers": sum(1 for c in clients if any(p.publishes and p is not c for p in clients)),
        "streams": len(expected),  # (receiver, publisher) pairs, each audio + video
        "count_mode": args.count,
        "window_s": round(window, 2),
        "stats_collect_s": round(max(s0["collect_s"], s1["collect_s"]), 2),
        # Reconnecting, reconnected and disconnected events of the clients in the window,
        # and tracks whose counters restarted: either makes the receive figures suspect.
        "client_reconnects": s1["events"] - s0["events"],
        "counter_resets": resets,
        "video": f"{args.width}x{args.height}@{args.fps}",
        "video_kbps_cap": args.video_kbps,
        # What the publishers' encoders sent at the window's end, and why not more.
        "sent_sizes": sorted({f"{o['width']}x{o['height']}" for o in pub_info.values()}),
        "quality_limits": sorted({limits.get(o["limit"], str(o["limit"])) for o in pub_info.values()}),
        "pub_bwe_kbps_min": round(min(o.get("bwe", 0) for o in pub_info.values()) / 1000)
        if pub_info else None,
        "recv_sizes": sorted(sizes),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_pct": round(100 * server_cpu / window, 1),
        "fwd_mbps": round(mbit / window, 2),
        "fwd_pps": round(fwd_pkts / window),
        "cpu_ms_per_mbit": round(1000 * server_cpu / mbit, 2) if mbit else None,
        "cpu_us_per_pkt": round(1e6 * server_cpu / fwd_pkts, 2) if fwd_pkts else None,
        "fwd_p50_us": round(p50 * 1e6, 1) if p50 is not None else None,
        "fwd_p99_us": round(p99 * 1e6, 1) if p99 is not None else None,
        "fwd_over_25ms": int(buckets.get(math.inf, 0) - buckets.get(0.025, 0)),
        "pub_fps": round(sum(pubs) / len(pubs), 2) if pubs else None,
        "recv_fps_min": v_min, "recv_fps_avg": v_avg,
        "video_delivered_pct_min": vr_min, "video_delivered_pct_avg": vr_avg,
        "decoded_fps_min": d_min, "decoded_fps_avg": d_avg,
        "video_decoded_pct_min": dr_min, "video_decoded_pct_avg": dr_avg,
        # Sums over the receivers in the window: NACKs and PLIs they sent, freezes seen.
        "video_nacks": feedback["nack"], "video_plis": feedback["pli"],
        "video_freezes": feedback["freezes"],
        "pub_audio_pps": round(sum(apubs) / len(apubs), 2) if apubs else None,
        "recv_audio_min": a_min, "recv_audio_avg": a_avg,
        "audio_delivered_pct_min": ar_min, "audio_delivered_pct_avg": ar_avg,
        "rtp_lost_pct_video": pct_lost("video"), "rtp_lost_pct_audio": pct_lost("audio"),
        "server_rss_mb": round(mem.get("VmRSS", 0), 1),
        "server_hwm_mb": round(mem.get("VmHWM", 0), 1),
        "client_cpu_pct": round(100 * client_cpu / window, 1),
        "machine_busy_pct": round(100 * (tot - idle) / tot, 1) if tot else None,
        "cores": os.cpu_count(),
        "sfu_calls": m1.get("trellis_sfu_calls"),
        "sfu_participants": m1.get("trellis_sfu_participants"),
    }


async def connect_all(args, clients, url, tokens, group):
    sem = asyncio.Semaphore(group)

    async def one(c, tok):
        async with sem:
            await asyncio.wait_for(c.connect(url, tok), 30)

    await asyncio.gather(*(one(c, t) for c, t in zip(clients, tokens)))


async def wait_for(cond, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.2)
    return cond()


async def scenario(args, clients, rtc):
    started = time.monotonic()
    stage[0] = "setting up users and tokens"
    n = len(clients)
    url, tokens = await asyncio.get_running_loop().run_in_executor(
        None, livekit_tokens, args.base_url, [f"bench{i}" for i in range(n)])
    result["setup_s"] = round(time.monotonic() - started, 2)

    stage[0] = "making media"
    video_frames = make_video_frames(args.width, args.height, max(30, args.fps * 2), 1)
    audio_frames = make_audio_frames(rtc, 440)

    publishers = [c for c in clients if c.publishes]
    # The publishers first (the room creator's token first), then the rest.
    stage[0] = "publishers connect"
    await connect_all(args, publishers, url, tokens[:len(publishers)], 1)
    stage[0] = "publishers publish"
    for c in publishers:
        await asyncio.wait_for(c.publish(video_frames, audio_frames), 15)
    stage[0] = "receivers connect"
    await connect_all(args, clients[len(publishers):], url, tokens[len(publishers):], 4)
    result["connect_s"] = round(time.monotonic() - started, 2)

    expected = sum(2 for c in clients for p in publishers if p is not c)
    stage[0] = "subscriptions"
    ok = await wait_for(lambda: sum(len(c.remote) for c in clients) >= expected, 60)
    if not ok:
        log(f"only {sum(len(c.remote) for c in clients)} of {expected} tracks subscribed")
    result["subscribed_s"] = round(time.monotonic() - started, 2)

    stage[0] = "warm-up"
    await asyncio.sleep(args.warmup)
    stage[0] = "measuring"
    s0 = await snapshot_all(args, clients)
    await asyncio.sleep(args.duration)
    s1 = await snapshot_all(args, clients)
    result.update(analyse(args, clients, s0, s1))
    result["tracks_subscribed"] = sum(len(c.remote) for c in clients)
    result["tracks_expected"] = expected


async def run(args):
    from livekit import rtc

    if args.scenario == "stream":
        clients = [Client(rtc, args, 0, True)] + [
            Client(rtc, args, i, False) for i in range(1, args.subscribers + 1)]
    else:
        clients = [Client(rtc, args, i, True) for i in range(args.participants)]
    try:
        await scenario(args, clients, rtc)
    except BaseException as e:  # noqa: BLE001 - reported, not raised
        result["exception"] = f"{type(e).__name__} while {stage[0]}: {e}"
    finally:
        stage[0] = "closing"
        await asyncio.gather(*(asyncio.wait_for(c.close(), 5) for c in clients),
                             return_exceptions=True)
        await asyncio.sleep(0.5)  # the SDK's batched logs


def on_term(*_):
    # The SDK SIGTERMs its own process on a panic of its native core.
    result.setdefault("exception", f"terminated while {stage[0]} (FFI panic? see stderr)")
    print(json.dumps(result), flush=True)
    os._exit(1)


# ---------------------------------------------------------------------------------------
# Report

COLUMNS = [
    ("scenario", "scenario", "{}"),
    ("pub/recv", None, None),
    ("srv cpu%", "server_cpu_pct", "{:.1f}"),
    ("fwd Mb/s", "fwd_mbps", "{:.2f}"),
    ("fwd pkt/s", "fwd_pps", "{:d}"),
    ("ms/Mbit", "cpu_ms_per_mbit", "{:.2f}"),
    ("us/pkt", "cpu_us_per_pkt", "{:.1f}"),
    ("p50 us", "fwd_p50_us", "{:.0f}"),
    ("p99 us", "fwd_p99_us", "{:.0f}"),
    ("pub fps", "pub_fps", "{:.1f}"),
    ("recv fps min/avg", None, None),
    ("video % min/avg", None, None),
    ("decoded % min/avg", None, None),
    ("audio % min/avg", None, None),
    ("rss MB", "server_rss_mb", "{:.0f}"),
    ("cli cpu%", "client_cpu_pct", "{:.0f}"),
    ("busy%", "machine_busy_pct", "{:.0f}"),
    ("reconn", "client_reconnects", "{:d}"),
]


def fmt(v, f):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    cells = []
    for r in rows:
        row = []
        for title, key, f in COLUMNS:
            if title == "pub/recv":
                row.append(f"{r.get('publishers', '-')}/{r.get('receivers', '-')}")
            elif title == "recv fps min/avg":
                row.append(f"{fmt(r.get('recv_fps_min'), '{:.1f}')}/{fmt(r.get('recv_fps_avg'), '{:.1f}')}")
            elif title == "video % min/avg":
                row.append(f"{fmt(r.get('video_delivered_pct_min'), '{:.0f}')}/"
                           f"{fmt(r.get('video_delivered_pct_avg'), '{:.0f}')}")
            elif title == "decoded % min/avg":
                row.append(f"{fmt(r.get('video_decoded_pct_min'), '{:.0f}')}/"
                           f"{fmt(r.get('video_decoded_pct_avg'), '{:.0f}')}")
            elif title == "audio % min/avg":
                row.append(f"{fmt(r.get('audio_delivered_pct_min'), '{:.0f}')}/"
                           f"{fmt(r.get('audio_delivered_pct_avg'), '{:.0f}')}")
            else:
                row.append(fmt(r.get(key), f))
        cells.append(row)
    widths = [max(len(t), *(len(c[i]) for c in cells)) if cells else len(t)
              for i, (t, _, _) in enumerate(COLUMNS)]
    print("  ".join(t.rjust(w) for (t, _, _), w in zip(COLUMNS, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for r in rows:
        extra = [f"{r.get('scenario')}: window {r.get('window_s')} s, video {r.get('video')} "
                 f"(sent {','.join(r.get('sent_sizes') or []) or '-'}, received "
                 f"{','.join(r.get('recv_sizes') or []) or '-'}, encoder limited by "
                 f"{','.join(r.get('quality_limits') or []) or '-'}, publisher bandwidth estimate "
                 f"{r.get('pub_bwe_kbps_min')} kbit/s), rtp lost video/audio "
                 f"{r.get('rtp_lost_pct_video')}/{r.get('rtp_lost_pct_audio')} %, "
                 f"receivers sent {r.get('video_nacks')} NACKs {r.get('video_plis')} PLIs, "
                 f"{r.get('video_freezes')} freezes, forwards >25 ms {r.get('fwd_over_25ms')}, tracks "
                 f"{r.get('tracks_subscribed')}/{r.get('tracks_expected')}, count {r.get('count_mode')}"]
        if r.get("client_reconnects") or r.get("counter_resets"):
            extra.append(f"  WARNING: {r.get('client_reconnects')} client reconnection events and "
                         f"{r.get('counter_resets')} restarted track counters in the window "
                         "(missing tracks count as 0 fps): clients or server overloaded?")
        if r.get("exception"):
            extra.append(f"  EXCEPTION: {r['exception']}")
        print("\n".join(extra))
    print(json.dumps({"sfu_bench": rows}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scenario", choices=["stream", "meeting"], required=True)
    r.add_argument("--base-url", required=True)
    r.add_argument("--metrics-url", required=True)
    r.add_argument("--server-pid", type=int, required=True)
    r.add_argument("--subscribers", type=int, default=10)
    r.add_argument("--participants", type=int, default=4)
    r.add_argument("--duration", type=float, default=30)
    r.add_argument("--warmup", type=float, default=5)
    r.add_argument("--width", type=int, default=640)
    r.add_argument("--height", type=int, default=360)
    r.add_argument("--fps", type=int, default=30)
    r.add_argument("--video-kbps", type=int, default=600)
    r.add_argument("--simulcast", action="store_true")
    r.add_argument("--count", choices=["stats", "stream"], default="stats")
    r.add_argument("--clk-tck", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("file")
    args = ap.parse_args()
    if args.cmd == "table":
        table(args.file)
        return
    global CLK_TCK
    if args.clk_tck:
        CLK_TCK = args.clk_tck
    args.metrics_url = args.metrics_url.rstrip("/")
    if not args.metrics_url.endswith("/metrics"):
        args.metrics_url += "/metrics"
    # The SDK's own logs (reconnections, warnings), timestamped, on stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    asyncio.run(run(args))
    result["elapsed_s"] = round(time.monotonic() - t0, 2)
    print(json.dumps(result), flush=True)
    # The SDK's native threads can hold the interpreter's exit up.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
