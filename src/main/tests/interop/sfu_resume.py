"""A resume that replaces a signalling connection which is still open, spoken in LiveKit's
own protocol (protobuf messages from the `livekit-protocol` package over a WebSocket), as
a client does when it decides its connection is dead before the server notices.

Usage: sfu_resume.py LIVEKIT_URL TOKEN_A TOKEN_B
A and B join; A opens a second connection with `reconnect=1` while its first is open,
then closes the first; B listens for 6 s. Prints one JSON object: whether A's resume was
answered, the connection qualities B heard for A after it, and whether B was told A left.
"""

import asyncio
import json
import sys

import aiohttp
from livekit.protocol import models, rtc

PARAMS = "auto_subscribe=1&sdk=python&protocol=16"


async def next_response(ws, seconds=10):
    while True:
        msg = await asyncio.wait_for(ws.receive(), seconds)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise RuntimeError(f"signalling ended: {msg.type}")
        response = rtc.SignalResponse()
        response.ParseFromString(msg.data)
        return response


async def main():
    url, token_a, token_b = sys.argv[1], sys.argv[2], sys.argv[3]
    result = {}
    async with aiohttp.ClientSession() as http:
        a1 = await http.ws_connect(f"{url}/rtc?access_token={token_a}&{PARAMS}")
        join_a = await next_response(a1)
        sid_a = join_a.join.participant.sid
        b = await http.ws_connect(f"{url}/rtc?access_token={token_b}&{PARAMS}")
        await next_response(b)
        # A resumes on a second connection while the first is still open.
        a2 = await http.ws_connect(f"{url}/rtc?access_token={token_a}&{PARAMS}&reconnect=1&sid={sid_a}")
        first = await next_response(a2)
        result["resumed"] = first.WhichOneof("message") == "reconnect"
        await a1.close()

        qualities, left = [], False
        loop = asyncio.get_running_loop()
        end = loop.time() + 6
        while loop.time() < end:
            try:
                response = await next_response(b, max(0.1, end - loop.time()))
            except asyncio.TimeoutError:
                break
            kind = response.WhichOneof("message")
            if kind == "connection_quality":
                for info in response.connection_quality.updates:
                    if info.participant_sid == sid_a:
                        qualities.append(models.ConnectionQuality.Name(info.quality))
            elif kind == "update":
                for p in response.update.participants:
                    if p.sid == sid_a and p.state == models.ParticipantInfo.DISCONNECTED:
                        left = True
        result["qualities_of_a"] = qualities
        result["a_left"] = left
        for ws in (a2, b):
            await ws.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
