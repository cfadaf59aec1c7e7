"""Two WebRTC peers in headless Chromium that may only use the TURN relay
(iceTransportPolicy "relay") with the ICE servers given; video from a canvas.

Usage: turn_call.py PAGE_URL ICE_SERVERS_JSON
Prints one JSON object: whether the call connected, how many video frames the
receiving peer decoded, the candidate types of the pair in use and the ICE errors.
"""

import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CALL = r"""
const [iceServers, done] = [arguments[0], arguments[arguments.length - 1]];
const sleep = ms => new Promise(r => setTimeout(r, ms));
const result = {connected: false, framesDecoded: 0, errors: [], local: null, remote: null};
try {
  const config = {iceServers, iceTransportPolicy: 'relay'};
  const a = new RTCPeerConnection(config), b = new RTCPeerConnection(config);
  for (const pc of [a, b]) {
    pc.onicecandidateerror = e => result.errors.push({code: e.errorCode, text: e.errorText});
  }
  a.onicecandidate = e => { if (e.candidate) b.addIceCandidate(e.candidate); };
  b.onicecandidate = e => { if (e.candidate) a.addIceCandidate(e.candidate); };
  const canvas = document.createElement('canvas');
  canvas.width = 320; canvas.height = 240;
  const g = canvas.getContext('2d');
  let n = 0;
  setInterval(() => { g.fillStyle = `hsl(${(n += 7) % 360},80%,50%)`; g.fillRect(0, 0, 320, 240); }, 30);
  const stream = canvas.captureStream(30);
  for (const track of stream.getTracks()) a.addTrack(track, stream);
  const offer = await a.createOffer();
  await a.setLocalDescription(offer);
  await b.setRemoteDescription(offer);
  const answer = await b.createAnswer();
  await b.setLocalDescription(answer);
  await a.setRemoteDescription(answer);
  for (let i = 0; i < 60; i++) {
    await sleep(250);
    const stats = await b.getStats();
    const byId = new Map();
    stats.forEach(s => byId.set(s.id, s));
    stats.forEach(s => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') result.framesDecoded = s.framesDecoded || 0;
      if (s.type === 'candidate-pair' && s.state === 'succeeded' && s.nominated) {
        result.connected = true;
        result.local = (byId.get(s.localCandidateId) || {}).candidateType || null;
        result.remote = (byId.get(s.remoteCandidateId) || {}).candidateType || null;
      }
    });
    if (result.connected && result.framesDecoded > 10) break;
  }
  result.ice = b.iceConnectionState;
  a.close(); b.close();
} catch (e) {
  result.exception = String(e);
}
done(result);
"""


def main():
    page, ice_servers = sys.argv[1], json.loads(sys.argv[2])
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_script_timeout(40)
        # A loopback origin is a secure context, where WebRTC has everything it needs.
        driver.get(page)
        print(json.dumps(driver.execute_async_script(CALL, ice_servers)))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
