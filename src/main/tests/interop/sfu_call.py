"""A group call through Trellis's built-in SFU with LiveKit's own web client
(livekit-client, from npm) in headless Chromium, with Chromium's fake camera and
microphone.

Usage: sfu_call.py PAGE_URL LIVEKIT_URL TOKEN_A TOKEN_B TOKEN_C
Prints one JSON object: video frames each participant decoded of the others, the frame
widths decoded after asking for the lowest and then the highest simulcast layer (with the
top layer paused meanwhile by dynacast, and resumed), the data
message received, whether mute and unmute were seen, what the late joiner decoded,
whether a dropped signalling connection was resumed with media flowing on, whether an
unpublished camera was seen to go and its republished successor decoded, and whether a
departure was seen.
"""

import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

HERE = os.path.dirname(os.path.abspath(__file__))
UMD = os.path.join(HERE, "livekit", "node_modules", "livekit-client", "dist", "livekit-client.umd.js")

SCENARIO = r"""
const [url, tokens, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const LK = window.LivekitClient;
const sleep = ms => new Promise(r => setTimeout(r, ms));
const result = {};
async function framesOf(room) {
  const out = {};
  for (const p of room.remoteParticipants.values()) {
    for (const pub of p.trackPublications.values()) {
      if (pub.kind === 'video' && pub.track && pub.track.receiver) {
        const stats = await pub.track.receiver.getStats();
        stats.forEach(s => { if (s.type === 'inbound-rtp') out[p.identity] = s.framesDecoded || 0; });
      }
    }
  }
  return out;
}
async function widthOf(room, other) {
  let width = 0;
  for (const p of room.remoteParticipants.values()) {
    if (p.identity !== other.localParticipant.identity) continue;
    for (const pub of p.trackPublications.values()) {
      if (pub.kind === 'video' && pub.track && pub.track.receiver) {
        const stats = await pub.track.receiver.getStats();
        stats.forEach(s => { if (s.type === 'inbound-rtp') width = s.frameWidth || 0; });
      }
    }
  }
  return width;
}
function remoteVideo(room, other) {
  const p = room.remoteParticipants.get(other.localParticipant.identity);
  return p && [...p.trackPublications.values()].find(t => t.kind === 'video');
}
async function waitFor(cond, ms) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return true;
    await sleep(200);
  }
  return false;
}
async function join(token) {
  // Dynacast on, as Element Call has it: publishers pause layers nobody receives.
  const room = new LK.Room({adaptiveStream: false, dynacast: true});
  room.on(LK.RoomEvent.TrackSubscribed, track => {
    const el = track.attach();
    el.muted = true;
    document.body.appendChild(el);
  });
  await room.connect(url, token);
  return room;
}
const id = room => room.localParticipant.identity;
const sees = async (room, others) => {
  const f = await framesOf(room);
  return others.every(o => (f[id(o)] || 0) > 10);
};
try {
  const a = await join(tokens[0]);
  await a.localParticipant.enableCameraAndMicrophone();
  const b = await join(tokens[1]);
  await b.localParticipant.enableCameraAndMicrophone();
  result.both_decode = await waitFor(async () => await sees(a, [b]) && await sees(b, [a]), 30000);
  result.frames_a = await framesOf(a);
  result.frames_b = await framesOf(b);

  // Both publish 720p with simulcast (livekit-client's defaults): b asks for a's lowest
  // layer, then its highest, and decodes what it asked for.
  result.layers_a = (a.localParticipant.getTrackPublication(LK.Track.Source.Camera).trackInfo || {}).layers?.length;
  remoteVideo(b, a).setVideoQuality(LK.VideoQuality.LOW);
  result.low_seen = await waitFor(async () => { const w = await widthOf(b, a); return w > 0 && w <= 480; }, 20000);
  result.low_width = await widthOf(b, a);
  // Nobody receives a's top layer now: a is told so and stops sending it.
  const encodings = () =>
    a.localParticipant.getTrackPublication(LK.Track.Source.Camera).track.sender.getParameters().encodings || [];
  result.high_paused = await waitFor(async () => encodings().some(e => e.rid === 'f' && e.active === false), 15000);
  remoteVideo(b, a).setVideoQuality(LK.VideoQuality.HIGH);
  result.high_seen = await waitFor(async () => (await widthOf(b, a)) >= 2 * result.low_width, 20000);
  result.high_width = await widthOf(b, a);
  result.high_resumed = encodings().some(e => e.rid === 'f' && e.active !== false);
  // The media is protected with the SRTP profile the SFU insists on.
  const report = await remoteVideo(b, a).track.getRTCStatsReport();
  result.srtp_ciphers = report ? [...report.values()].filter(s => s.type === 'transport').map(s => s.srtpCipher) : [];

  const got = [];
  b.on(LK.RoomEvent.DataReceived, (payload, participant) =>
    got.push({from: participant ? participant.identity : null, text: new TextDecoder().decode(payload)}));
  await a.localParticipant.publishData(new TextEncoder().encode('hello from a'), {reliable: true});
  await waitFor(async () => got.length > 0, 10000);
  result.data = got;
  result.sender_a = id(a);

  let muted = false, unmuted = false;
  b.on(LK.RoomEvent.TrackMuted, (pub, p) => { if (p.identity === id(a) && pub.kind === 'audio') muted = true; });
  b.on(LK.RoomEvent.TrackUnmuted, (pub, p) => { if (p.identity === id(a) && pub.kind === 'audio') unmuted = true; });
  await a.localParticipant.setMicrophoneEnabled(false);
  result.mute_seen = await waitFor(async () => muted, 10000);
  await a.localParticipant.setMicrophoneEnabled(true);
  result.unmute_seen = await waitFor(async () => unmuted, 10000);

  const c = await join(tokens[2]);
  result.late_decodes = await waitFor(async () => await sees(c, [a, b]), 30000);
  result.frames_c = await framesOf(c);

  let resumed = false;
  b.on(LK.RoomEvent.Reconnected, () => { resumed = true; });
  b.on(LK.RoomEvent.SignalReconnecting, () => { result.signal_reconnecting = true; });
  await b.simulateScenario('signal-reconnect');
  await waitFor(async () => resumed, 20000);
  result.resumed = resumed;
  const before = (await framesOf(b))[id(a)] || 0;
  result.media_after_resume = await waitFor(async () => ((await framesOf(b))[id(a)] || 0) > before + 10, 20000);

  // a takes its camera away, then publishes a new one.
  let unpublished = false;
  b.on(LK.RoomEvent.TrackUnpublished, (pub, p) => { if (p.identity === id(a) && pub.kind === 'video') unpublished = true; });
  const camera = a.localParticipant.getTrackPublication(LK.Track.Source.Camera);
  await a.localParticipant.unpublishTrack(camera.track);
  result.unpublish_seen = await waitFor(async () => unpublished, 10000);
  await a.localParticipant.setCameraEnabled(true);
  result.republished_decodes = await waitFor(async () => await sees(b, [a]) && await sees(c, [a]), 30000);

  let left = false;
  a.on(LK.RoomEvent.ParticipantDisconnected, p => { if (p.identity === id(c)) left = true; });
  await c.disconnect();
  result.leave_seen = await waitFor(async () => left, 10000);
  await a.disconnect();
  await b.disconnect();
} catch (e) {
  result.exception = String(e && e.stack ? e.stack : e);
}
done(result);
"""


def chromium(*extra_flags):
    """Headless Chromium (through chromedriver) with fake camera and microphone."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        # Host candidates as addresses, not mDNS names the SFU would have to resolve.
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        *extra_flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def run(scenario, page, *args):
    """Runs `scenario` (an async script ending in `done(result)`) in headless Chromium on
    `page`, with livekit-client loaded and `args` passed; prints its result as JSON."""
    driver = chromium()
    try:
        driver.set_script_timeout(240)
        # The scenario is one long script: the HTTP call to the driver waits as long.
        driver.command_executor.client_config.timeout = 300
        # A loopback origin is a secure context, where media devices and WebRTC work.
        driver.get(page)
        with open(UMD, encoding="utf-8") as f:
            driver.execute_script(f.read())
        result = driver.execute_async_script(scenario, *args)
        if os.environ.get("SFU_CALL_LOG"):
            result["console"] = [e["message"] for e in driver.get_log("browser")][-80:]
        print(json.dumps(result))
    finally:
        driver.quit()


def main():
    page, url, tokens = sys.argv[1], sys.argv[2], sys.argv[3:6]
    run(SCENARIO, page, url, tokens)


if __name__ == "__main__":
    main()
