"""Element Call, unchanged (its embedded build from npm, as Element Web ships it), in
headless Chromium with fake camera and microphone, hosted as a widget by a minimal
client (element_call/host.js), joins a room's call through Trellis: MatrixRTC membership
state, the focus from /rtc/transports, a LiveKit token from the OpenID exchange, and
the built-in SFU.

Usage: element_call.py HS ROOM USER_A TOKEN_A DEVICE_A USER_B TOKEN_B DEVICE_B
With EC_PASSWORD set, the call is end-to-end encrypted with that shared key
(Element Call's `password` parameter), so media crosses the SFU as encrypted frames.
Prints one JSON object: whether each side decoded the other's camera, the call
memberships during the call and after B hung up, and whether A's Element Call saw B's
tracks as encrypted.
"""

import functools
import http.server
import json
import mimetypes
import os
import sys
import threading
import time
from urllib.parse import urlencode

from sfu_call import chromium

HERE = os.path.dirname(os.path.abspath(__file__))
EC = "../livekit/node_modules/@element-hq/element-call-embedded/dist/index.html"

# Runs in every frame before its own scripts: keeps Element Call's peer connections
# where the test can read their statistics.
RECORD_PCS = """
(() => {
  const Native = window.RTCPeerConnection;
  if (!Native) return;
  window.__pcs = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__pcs.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
  Object.setPrototypeOf(window.RTCPeerConnection, Native);
})();
"""

STATS = """
const done = arguments[arguments.length - 1];
(async () => {
  const out = {decoded: 0, sent: 0, pcs: (window.__pcs || []).length};
  for (const pc of window.__pcs || []) {
    const stats = await pc.getStats();
    stats.forEach(s => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out.decoded += s.framesDecoded || 0;
      if (s.type === 'outbound-rtp' && s.kind === 'video') out.sent += s.framesEncoded || 0;
    });
  }
  out.videos = document.querySelectorAll('video').length;
  done(out);
})().catch(e => done({error: String(e)}));
"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve():
    mimetypes.add_type("text/javascript", ".js")
    mimetypes.add_type("application/wasm", ".wasm")
    handler = functools.partial(Quiet, directory=HERE)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def browser():
    driver = chromium("--window-size=1400,900")
    driver.set_script_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PCS})
    return driver


def in_widget(driver, script, *args, asynchronous=False):
    driver.switch_to.default_content()
    frames = driver.find_elements("tag name", "iframe")
    if not frames:
        return None
    driver.switch_to.frame(frames[0])
    try:
        if asynchronous:
            return driver.execute_async_script(script, *args)
        return driver.execute_script(script, *args)
    finally:
        driver.switch_to.default_content()


def stats(driver):
    return in_widget(driver, STATS, asynchronous=True) or {}


def wait_for(cond, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(1)
    return False


def members(driver, hs, room, token):
    """Senders of the room's live call memberships (`org.matrix.msc3401.call.member`
    with content), as the homeserver has them."""
    state = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0] + '/_matrix/client/v3/rooms/' + encodeURIComponent(arguments[1]) + '/state',
              {headers: {Authorization: 'Bearer ' + arguments[2]}})
          .then(r => r.json()).then(done, e => done(String(e)));
        """,
        hs,
        room,
        token,
    )
    if not isinstance(state, list):
        return []
    return sorted(
        e["sender"] for e in state
        if e.get("type") == "org.matrix.msc3401.call.member" and e.get("content")
    )


def main():
    hs, room = sys.argv[1], sys.argv[2]
    users = [sys.argv[3:6], sys.argv[6:9]]
    server = serve()
    base = f"http://127.0.0.1:{server.server_address[1]}/element_call/host.html"
    drivers = []
    result = {}
    try:
        for user, token, device in users:
            driver = browser()
            drivers.append(driver)
            query = {"hs": hs, "token": token, "user": user, "device": device, "room": room, "ec": EC}
            if os.environ.get("EC_PASSWORD"):
                query["password"] = os.environ["EC_PASSWORD"]
            driver.get(base + "?" + urlencode(query))
        a, b = drivers
        # Each side decodes the other's camera: only a remote track is decoded.
        both = wait_for(lambda: all(stats(d).get("decoded", 0) > 60 for d in drivers), 120)
        result["both_decode"] = both
        result["stats"] = [stats(d) for d in drivers]
        result["members_in_call"] = members(a, hs, room, users[0][1])
        # Hanging up B (as Element Web's hangup button does) ends its membership.
        b.execute_script("window.widgetApi.transport.send('im.vector.hangup', {})")
        result["hangup_ends_membership"] = wait_for(
            lambda: members(a, hs, room, users[0][1]) == [users[0][0]], 60
        )
    except Exception as e:  # reported, not raised: the caller shows it with the logs
        result["exception"] = repr(e)
    finally:
        consoles = []
        for driver in drivers:
            try:
                consoles.append([e["message"] for e in driver.get_log("browser")])
            except Exception as e:
                consoles.append([f"no log: {e!r}"])
        if consoles:
            # Element Call's own account of the other side's tracks.
            result["encrypted_seen"] = any(
                "Encryption status of " + users[1][0] in line and "encrypted=true" in line
                for line in consoles[0]
            )
        if os.environ.get("EC_LOG") or not result.get("both_decode"):
            for name, driver, console in zip("ab", drivers, consoles):
                try:
                    result[f"host_log_{name}"] = driver.execute_script("return window.hostLog")
                    result[f"console_{name}"] = [
                        line[:400]
                        for line in console
                        if "PostmessageTransport" not in line and "MembershipManager" not in line
                    ][-60:]
                    result[f"text_{name}"] = in_widget(driver, "return document.body.innerText.slice(0, 600)")
                except Exception as e:
                    result[f"log_error_{name}"] = repr(e)
        for driver in drivers:
            driver.quit()
        server.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
