"""A call through Trellis's built-in SFU with LiveKit's Python SDK (`livekit` on PyPI,
which wraps LiveKit's Rust client core, liblivekit_ffi.so).

Usage: sfu_python.py LIVEKIT_URL TOKEN_A TOKEN_B
Two participants each publish a synthetic video track (320x240, changing colour, 20 fps)
and a synthetic audio track (48 kHz mono sine). Prints one JSON object: the video and
audio frames each received of the other's tracks, who B saw as active speakers, whether
B could unsubscribe from A's video and subscribe again (frames flowing again), the data
message B received from A, A's attributes, metadata and name as B sees them after A
changed them, whether B saw A mute its microphone and unpublish its video,
and `exception` only on failure.
With SFU_PYTHON_SCENARIO=limit (a server allowing one publisher a call): A publishes, B's
publish is refused (`b_refused` names the error) and B still receives A's video.
With SFU_PYTHON_SCENARIO=controls: both publish (A with dynacast on) and see each
other's connection quality; B unsubscribing from A's video pauses A's sending of it
(dynacast) until B subscribes again; A allowing nobody to receive its tracks takes them
from B, and allowing B by identity gives them back.
With SFU_PYTHON_SCENARIO=cap: A publishes noise at 640x360 and `a_video_kbps` is the
video bitrate A sends, all layers together, once its encoder has settled; `a_layers` and
`b_inbound` are A's encoder's and B's decoder's statistics for that video.
Set SFU_PYTHON_LOG=DEBUG (or INFO) for the SDK's logs on stderr; RUST_LOG is also honoured
by the native core.
"""

import asyncio
import json
import logging
import math
import os
import signal
import sys
import time

from livekit import rtc

WIDTH, HEIGHT, FPS = 320, 240, 20
# Noise, which no encoder squeezes: the bitrate is what the encoder is allowed.
NOISE_WIDTH, NOISE_HEIGHT, NOISE_FPS = 640, 360, 15
RATE, CHUNK = 48000, 480  # 10 ms of 48 kHz mono
TOTAL_SECONDS = 75

result = {}
stage = ["start"]  # the step under way, reported with an exception


def room_options(dynacast=False):
    """The SDK's defaults, as an unchanged app connects: it tries the single-connection
    path first, gets 404 and falls back to the two-connection protocol. With
    SFU_PYTHON_TWO_PC=1 it asks for the two-connection protocol directly."""
    if os.environ.get("SFU_PYTHON_TWO_PC") == "1":
        try:
            return rtc.RoomOptions(
                auto_subscribe=True, dynacast=dynacast, single_peer_connection=False)
        except TypeError:
            pass
    return rtc.RoomOptions(auto_subscribe=True, dynacast=dynacast)


async def wait_for(cond, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        await asyncio.sleep(0.1)
    return cond()


class Participant:
    def __init__(self, name):
        self.name = name
        self.room = rtc.Room()
        self.tasks = []
        self.video_frames = {}  # remote identity -> frames received
        self.audio_frames = {}
        self.data = []
        self.muted = []  # (identity, kind) of remote tracks seen muted
        self.audio_track = None
        self.video_track = None
        self.speakers = set()  # identities ever reported speaking
        self.unsubscribed = []  # (identity, kind) of remote tracks unsubscribed
        self.unpublished = []  # (identity, kind) of remote tracks unpublished
        self.dynacast = False
        self.noise = False
        self.qualities = {}  # identity -> the connection quality last reported
        self.room.on("connection_quality_changed", self._on_quality)
        self.room.on("track_subscribed", self._on_track)
        self.room.on("active_speakers_changed",
                     lambda speakers: self.speakers.update(p.identity for p in speakers))
        self.room.on("track_unsubscribed",
                     lambda track, pub, p: self.unsubscribed.append((p.identity, pub.kind)))
        self.room.on("track_unpublished",
                     lambda pub, p: self.unpublished.append((p.identity, pub.kind)))
        self.room.on("data_received", self._on_data)
        self.room.on("track_muted", self._on_muted)

    @property
    def identity(self):
        return self.room.local_participant.identity

    def spawn(self, coro):
        self.tasks.append(asyncio.ensure_future(coro))

    def _on_track(self, track, publication, participant):
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            self.spawn(self._count(rtc.VideoStream(track), self.video_frames, participant.identity))
        elif track.kind == rtc.TrackKind.KIND_AUDIO:
            stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
            self.spawn(self._count(stream, self.audio_frames, participant.identity))

    async def _count(self, stream, counts, identity):
        counts.setdefault(identity, 0)
        try:
            async for _ in stream:
                counts[identity] += 1
        finally:
            await stream.aclose()

    def _on_data(self, packet):
        sender = packet.participant.identity if packet.participant else None
        self.data.append({"from": sender, "text": packet.data.decode("utf-8", "replace")})

    def _on_quality(self, participant, quality):
        if participant is not None:
            self.qualities[participant.identity] = quality.name

    def _on_muted(self, participant, publication):
        self.muted.append((participant.identity, publication.kind))

    async def connect(self, url, token):
        await self.room.connect(url, token, room_options(self.dynacast))

    async def publish(self):
        width, height = (NOISE_WIDTH, NOISE_HEIGHT) if self.noise else (WIDTH, HEIGHT)
        video = rtc.VideoSource(width, height)
        vtrack = rtc.LocalVideoTrack.create_video_track(f"{self.name}-video", video)
        vopts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
        self.video_track = await self.room.local_participant.publish_track(vtrack, vopts)
        self.local_video = vtrack
        self.spawn(self._noise_loop(video) if self.noise else self._video_loop(video))

        audio = rtc.AudioSource(RATE, 1)
        self.audio_track = rtc.LocalAudioTrack.create_audio_track(f"{self.name}-audio", audio)
        aopts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(self.audio_track, aopts)
        self.spawn(self._audio_loop(audio))

    async def _video_loop(self, source):
        n = 0
        start = time.monotonic()
        while True:
            hue = n % 90
            colour = bytes((hue * 2 + 40, (255 - hue * 2) % 256, (n * 7) % 256, 255))
            frame = rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGBA, colour * (WIDTH * HEIGHT))
            source.capture_frame(frame)
            n += 1
            await asyncio.sleep(max(0.0, start + n / FPS - time.monotonic()))

    async def _noise_loop(self, source):
        n = 0
        start = time.monotonic()
        while True:
            data = os.urandom(NOISE_WIDTH * NOISE_HEIGHT * 4)
            frame = rtc.VideoFrame(NOISE_WIDTH, NOISE_HEIGHT, rtc.VideoBufferType.RGBA, data)
            source.capture_frame(frame)
            n += 1
            await asyncio.sleep(max(0.0, start + n / NOISE_FPS - time.monotonic()))

    async def _audio_loop(self, source):
        pitch = 440 if self.name == "a" else 660
        phase = 0
        frame = rtc.AudioFrame.create(RATE, 1, CHUNK)
        samples = frame.data  # int16 memoryview
        while True:
            for i in range(CHUNK):
                samples[i] = int(8000 * math.sin(2 * math.pi * pitch * (phase + i) / RATE))
            phase = (phase + CHUNK) % RATE
            # Paced by the source's queue: returns once the frame is queued.
            await source.capture_frame(frame)

    def mute_audio(self):
        # LocalTrackPublication has no mute() in this SDK; the local track has.
        pub = next(
            (p for p in self.room.local_participant.track_publications.values()
             if p.kind == rtc.TrackKind.KIND_AUDIO),
            None,
        )
        if pub is not None and hasattr(pub, "mute"):
            pub.mute()
        else:
            self.audio_track.mute()

    def remote_video(self, identity):
        p = next((p for p in self.room.remote_participants.values() if p.identity == identity), None)
        if p is None:
            return None
        return next((pub for pub in p.track_publications.values()
                     if pub.kind == rtc.TrackKind.KIND_VIDEO), None)

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.room.disconnect()


def counts(a, b):
    result["a_frames_from_b"] = a.video_frames.get(b.identity, 0)
    result["b_frames_from_a"] = b.video_frames.get(a.identity, 0)
    result["a_audio_frames_from_b"] = a.audio_frames.get(b.identity, 0)
    result["b_audio_frames_from_a"] = b.audio_frames.get(a.identity, 0)


async def join(p, url, token):
    """Connects `p` and publishes its tracks, the steps named in `stage`."""
    stage[0] = f"{p.name} connects"
    await asyncio.wait_for(p.connect(url, token), 15)
    stage[0] = f"{p.name} publishes"
    await asyncio.wait_for(p.publish(), 10)


async def scenario(url, token_a, token_b, a, b):
    started = time.monotonic()
    await join(a, url, token_a)
    await join(b, url, token_b)
    result["connected_s"] = round(time.monotonic() - started, 2)

    def flowing():
        counts(a, b)
        return all(result[k] > 10 for k in (
            "a_frames_from_b", "b_frames_from_a", "a_audio_frames_from_b", "b_audio_frames_from_a"))

    stage[0] = "media"
    result["media_flowing"] = await wait_for(flowing, 20)
    result["media_s"] = round(time.monotonic() - started, 2)

    stage[0] = "speakers"
    # Both send a steady tone: each is an active speaker, the local one included.
    result["speakers_seen"] = await wait_for(lambda: {a.identity, b.identity} <= b.speakers, 10)
    result["speakers"] = sorted(b.speakers)

    stage[0] = "unsubscribe"
    a_video = b.remote_video(a.identity)
    a_video.set_subscribed(False)
    result["unsubscribe_seen"] = await wait_for(
        lambda: (a.identity, rtc.TrackKind.KIND_VIDEO) in b.unsubscribed, 10)
    stage[0] = "subscribe again"
    before = b.video_frames.get(a.identity, 0)
    b.video_frames[a.identity] = 0
    a_video.set_subscribed(True)
    result["frames_after_resubscribe"] = await wait_for(
        lambda: b.video_frames.get(a.identity, 0) > 10, 15)
    b.video_frames[a.identity] = before + b.video_frames.get(a.identity, 0)

    stage[0] = "data"
    await a.room.local_participant.publish_data("hello from a", reliable=True)
    await wait_for(lambda: len(b.data) > 0, 5)
    result["data"] = b.data
    result["sender_a"] = a.identity

    stage[0] = "metadata"
    mine = a.room.local_participant
    await asyncio.wait_for(mine.set_attributes({"hand": "raised", "role": "host"}), 10)
    await asyncio.wait_for(mine.set_attributes({"role": ""}), 10)
    await asyncio.wait_for(mine.set_metadata('{"status": "presenting"}'), 10)
    await asyncio.wait_for(mine.set_name("Alice, presenting"), 10)

    def a_as_b_sees_it():
        p = next((p for p in b.room.remote_participants.values() if p.identity == a.identity), None)
        return p and {"attributes": dict(p.attributes), "metadata": p.metadata, "name": p.name}

    await wait_for(lambda: (a_as_b_sees_it() or {}).get("name") == "Alice, presenting", 5)
    result["a_as_b_sees_it"] = a_as_b_sees_it()

    stage[0] = "mute"
    a.mute_audio()
    result["mute_seen"] = await wait_for(
        lambda: (a.identity, rtc.TrackKind.KIND_AUDIO) in b.muted, 5)
    counts(a, b)

    stage[0] = "unpublish"
    await a.room.local_participant.unpublish_track(a.video_track.sid)
    result["unpublish_seen"] = await wait_for(
        lambda: (a.identity, rtc.TrackKind.KIND_VIDEO) in b.unpublished, 10)
    # The audio goes on.
    heard = b.audio_frames.get(a.identity, 0)
    result["audio_after_unpublish"] = await wait_for(
        lambda: b.audio_frames.get(a.identity, 0) > heard + 10, 10)


async def video_sent(p, what):
    """`p`'s video sent so far, all layers together: `bytes` or `frames`."""
    stats = [s.outbound_rtp for s in await p.local_video.get_stats() if s.HasField("outbound_rtp")]
    if what == "bytes":
        return sum(s.sent.bytes_sent for s in stats)
    return sum(s.outbound.frames_sent for s in stats)


async def cap_scenario(url, token_a, token_b, a, b):
    a.noise = True
    await join(a, url, token_a)
    await join(b, url, token_b)
    stage[0] = "media"
    # Noise under 150 kbit/s comes out at about one frame a second (A's encoder drops
    # the rest), fewer on a loaded machine: a few frames show that video flows.
    result["media_flowing"] = await wait_for(
        lambda: b.video_frames.get(a.identity, 0) >= 3, 30)
    stage[0] = "bitrate"
    # The encoder ramps up, and down to what it is told, over a few seconds.
    await asyncio.sleep(8)
    before, t0 = await video_sent(a, "bytes"), time.monotonic()
    # Long enough to average out the bursts of keyframes, which noise makes large.
    await asyncio.sleep(10)
    sent = await video_sent(a, "bytes") - before
    result["a_video_kbps"] = round(sent * 8 / 1000 / (time.monotonic() - t0))
    counts(a, b)
    await video_stats(a, b)


async def video_stats(a, b):
    """What A's encoder sent per layer and what B's decoder made of it, to explain a
    failure."""
    layers = []
    for s in await a.local_video.get_stats():
        if s.HasField("outbound_rtp"):
            o = s.outbound_rtp
            layers.append({
                "rid": o.outbound.rid, "width": o.outbound.frame_width,
                "frames": o.outbound.frames_encoded, "keyframes": o.outbound.key_frames_encoded,
                "pli": o.outbound.pli_count, "nack": o.outbound.nack_count,
                "limited": o.outbound.quality_limitation_reason, "packets": o.sent.packets_sent})
    result["a_layers"] = layers
    publication = b.remote_video(a.identity)
    track = publication.track if publication else None
    for s in await track.get_stats() if track else []:
        if s.HasField("inbound_rtp"):
            i = s.inbound_rtp
            result["b_inbound"] = {
                "packets": i.received.packets_received, "lost": i.received.packets_lost,
                "frames": i.inbound.frames_received, "decoded": i.inbound.frames_decoded,
                "keyframes": i.inbound.key_frames_decoded, "dropped": i.inbound.frames_dropped,
                "width": i.inbound.frame_width, "pli": i.inbound.pli_count,
                "nack": i.inbound.nack_count, "freezes": i.inbound.freeze_count}


async def sending(p, seconds=2.0):
    """Whether `p` sends video over `seconds`."""
    before = await video_sent(p, "frames")
    await asyncio.sleep(seconds)
    return await video_sent(p, "frames") > before


async def controls_scenario(url, token_a, token_b, a, b):
    a.dynacast = True
    await join(a, url, token_a)
    await join(b, url, token_b)

    def flowing():
        counts(a, b)
        return result["b_frames_from_a"] > 10 and result["a_frames_from_b"] > 10

    stage[0] = "media"
    result["media_flowing"] = await wait_for(flowing, 20)

    stage[0] = "connection quality"
    both = (a.identity, b.identity)
    await wait_for(lambda: all(i in a.qualities and i in b.qualities for i in both), 10)
    result["a_sees_quality"] = {i: a.qualities.get(i) for i in both}
    result["b_sees_quality"] = {i: b.qualities.get(i) for i in both}

    stage[0] = "dynacast"
    result["a_sends_while_watched"] = await sending(a)
    a_video = b.remote_video(a.identity)
    a_video.set_subscribed(False)
    await wait_for(lambda: (a.identity, rtc.TrackKind.KIND_VIDEO) in b.unsubscribed, 10)
    # The SFU waits 3 s before telling a publisher to pause.
    paused = False
    end = time.monotonic() + 12
    while not paused and time.monotonic() < end:
        paused = not await sending(a, 1.5)
    result["a_paused_when_unwatched"] = paused
    b.video_frames[a.identity] = 0
    a_video.set_subscribed(True)
    result["frames_after_resume"] = await wait_for(
        lambda: b.video_frames.get(a.identity, 0) > 10, 15)
    result["a_sends_when_watched_again"] = await sending(a)

    stage[0] = "permissions"
    b.unsubscribed.clear()
    a.room.local_participant.set_track_subscription_permissions(allow_all_participants=False)
    # The SFU takes A's tracks from B's connection: nothing more of A arrives.
    await asyncio.sleep(1.5)
    b.video_frames[a.identity] = 0
    b.audio_frames[a.identity] = 0
    await asyncio.sleep(2)
    result["video_while_denied"] = b.video_frames.get(a.identity, 0)
    result["audio_while_denied"] = b.audio_frames.get(a.identity, 0)
    a.room.local_participant.set_track_subscription_permissions(
        allow_all_participants=False,
        participant_permissions=[
            rtc.ParticipantTrackPermission(participant_identity=b.identity, allow_all=True)],
    )
    result["b_receives_when_allowed"] = await wait_for(
        lambda: b.video_frames.get(a.identity, 0) > 10, 15)
    counts(a, b)


async def limit_scenario(url, token_a, token_b, a, b):
    await join(a, url, token_a)
    stage[0] = "b connects"
    await asyncio.wait_for(b.connect(url, token_b), 15)
    stage[0] = "b publishes"
    try:
        await asyncio.wait_for(b.publish(), 30)
        result["b_refused"] = None
    except Exception as e:  # noqa: BLE001 - the refusal is the point
        result["b_refused"] = type(e).__name__
    stage[0] = "b receives"
    result["b_receives"] = await wait_for(lambda: b.video_frames.get(a.identity, 0) > 10, 15)
    counts(a, b)


async def main():
    url, token_a, token_b = sys.argv[1:4]
    a, b = Participant("a"), Participant("b")
    chosen = {"limit": limit_scenario, "controls": controls_scenario, "cap": cap_scenario}.get(
        os.environ.get("SFU_PYTHON_SCENARIO"), scenario)
    try:
        await asyncio.wait_for(chosen(url, token_a, token_b, a, b), TOTAL_SECONDS - 5)
    except BaseException as e:  # noqa: BLE001 - reported, not raised
        result["exception"] = f"{type(e).__name__} while {stage[0]}: {e}"
        try:
            counts(a, b)
        except Exception:
            pass
    finally:
        for p in (a, b):
            try:
                await asyncio.wait_for(p.close(), 3)
            except BaseException:
                pass


def on_term(*_):
    # The SDK SIGTERMs its own process on a panic of the native core (after printing
    # "FFI Panic: ..." to stderr): still report what was seen.
    result.setdefault("exception", f"terminated while {stage[0]} (FFI panic? see stderr)")
    print(json.dumps(result), flush=True)
    os._exit(1)


if __name__ == "__main__":
    level = os.environ.get("SFU_PYTHON_LOG")
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()) if level else logging.WARNING)
    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    asyncio.run(main())
    result["elapsed_s"] = round(time.monotonic() - t0, 2)
    print(json.dumps(result), flush=True)
