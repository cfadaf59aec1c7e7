"""A receiver on a narrow link through Trellis's built-in SFU, with LiveKit's web client
(livekit-client) in headless Chromium: A publishes its camera with simulcast; B reaches
the SFU only through the built-in TURN relay, whose per-user bandwidth limit drops what
does not fit, and asks for A's best layer. The SFU's send-side estimate (from the
transport-wide congestion feedback B's browser sends about the packets it stamps) should
move B to a layer that fits, where it keeps decoding.

Usage: sfu_congestion.py PAGE_URL LIVEKIT_URL TOKEN_A TOKEN_B
Prints one JSON object: A's top layer width, and B's inbound video each second (frame
width, frames decoded, packets lost).
"""

import sys

from sfu_call import run

SCENARIO = r"""
const [url, tokens, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const LK = window.LivekitClient;
const sleep = ms => new Promise(r => setTimeout(r, ms));
const result = {samples: []};
async function inbound(room) {
  let out = null;
  for (const p of room.remoteParticipants.values()) {
    for (const pub of p.trackPublications.values()) {
      if (pub.kind === 'video' && pub.track && pub.track.receiver) {
        const stats = await pub.track.receiver.getStats();
        stats.forEach(s => {
          if (s.type === 'inbound-rtp') {
            out = {width: s.frameWidth || 0, decoded: s.framesDecoded || 0, lost: s.packetsLost || 0,
                   received: s.packetsReceived || 0, bytes: s.bytesReceived || 0};
          }
        });
      }
    }
  }
  return out;
}
(async () => {
  const a = new LK.Room({adaptiveStream: false, dynacast: true});
  await a.connect(url, tokens[0]);
  await a.localParticipant.setCameraEnabled(true, {resolution: LK.VideoPresets.h720.resolution});
  const b = new LK.Room({adaptiveStream: false, dynacast: true});
  b.on(LK.RoomEvent.TrackSubscribed, track => {
    const el = track.attach();
    el.muted = true;
    document.body.appendChild(el);
  });
  // Only through the relay: B's whole link is what the relay lets through.
  await b.connect(url, tokens[1], {rtcConfig: {iceTransportPolicy: 'relay'}});
  for (let i = 0; i < 100; i++) {
    const p = b.remoteParticipants.get(a.localParticipant.identity);
    const pub = p && [...p.trackPublications.values()].find(t => t.kind === 'video');
    if (pub && pub.track) { pub.setVideoQuality(LK.VideoQuality.HIGH); break; }
    await sleep(200);
  }
  const info = a.localParticipant.getTrackPublication(LK.Track.Source.Camera).trackInfo;
  result.top_width = Math.max(...(info?.layers || []).map(l => l.width));
  for (let i = 0; i < 30; i++) {
    await sleep(1000);
    result.samples.push(await inbound(b));
  }
  await b.disconnect();
  await a.disconnect();
})().then(() => done(result), e => { result.exception = String(e); done(result); });
"""


def main():
    page, url, tokens = sys.argv[1], sys.argv[2], sys.argv[3:5]
    run(SCENARIO, page, url, tokens)


if __name__ == "__main__":
    main()
