"""End-to-end encryption between real crypto clients (matrix-nio with libolm) through a
Trellis server: two users exchange Megolm-encrypted messages and each decrypts the
other's; then a newly logged-in device of the receiver gets the room key forwarded by
its other (verified) device and decrypts the history too.

Usage: e2ee_nio.py <homeserver base URL> [<Bob's homeserver base URL>]. With a second
server Bob and his second device live there and everything crosses federation. Exits
non-zero with a message on failure.
"""

import asyncio
import sys
import tempfile

from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    LoginResponse,
    MegolmEvent,
    RoomMessagesResponse,
    RoomMessageText,
    SyncResponse,
)
from nio.event_builders import EnableEncryptionBuilder

PASSWORD = "password123"
STEPS = 40


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


async def new_client(base, user, register):
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False)
    client = AsyncClient(base, user, store_path=tempfile.mkdtemp(), config=config)
    if register:
        resp = await client.register(user, PASSWORD)
        if not getattr(resp, "access_token", None):
            fail(f"register {user}: {resp}")
    resp = await client.login(PASSWORD, device_name=f"{user} interop")
    if not isinstance(resp, LoginResponse):
        fail(f"login {user}: {resp}")
    return client


async def step(client, timeout=0):
    """One sync plus the key housekeeping nio's sync_forever would do."""
    resp = await client.sync(timeout=timeout)
    if not isinstance(resp, SyncResponse):
        fail(f"sync of {client.user_id}: {resp}")
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    if client.should_claim_keys:
        await client.keys_claim(client.get_users_for_key_claiming())
    await client.send_to_device_messages()
    return resp


def texts(resp, room_id):
    """Decrypted message bodies in a sync response's timeline of `room_id`."""
    room = resp.rooms.join.get(room_id)
    if room is None:
        return [], []
    plain = [e.body for e in room.timeline.events if isinstance(e, RoomMessageText)]
    undecrypted = [e for e in room.timeline.events if isinstance(e, MegolmEvent)]
    return plain, undecrypted


async def until_text(client, room_id, body, others=()):
    """Syncs `client` (and keeps `others` syncing) until it has decrypted `body`."""
    pending = []
    for _ in range(STEPS):
        resp = await step(client, timeout=200)
        for other in others:
            await step(other)
        plain, undecrypted = texts(resp, room_id)
        if body in plain:
            return
        pending.extend(undecrypted)
        # A room key may arrive after the message it unlocks.
        for event in list(pending):
            try:
                decrypted = client.decrypt_event(event)
            except Exception:  # noqa: BLE001 - still missing the key
                continue
            pending.remove(event)
            if isinstance(decrypted, RoomMessageText) and decrypted.body == body:
                return
    fail(f"{client.user_id} never decrypted {body!r}")


async def main(base, bob_base):
    alice = await new_client(base, "alice", register=True)
    bob = await new_client(bob_base, "bob", register=True)
    for client in (alice, bob):
        await step(client)

    created = await alice.room_create(
        name="secret", invite=[bob.user_id], initial_state=[EnableEncryptionBuilder().as_dict()]
    )
    room_id = getattr(created, "room_id", None) or fail(f"room_create: {created}")
    for _ in range(STEPS):
        resp = await step(bob, timeout=200)
        if room_id in resp.rooms.invite:
            break
    else:
        fail("bob never saw the invite")
    joined = await bob.join(room_id)
    if getattr(joined, "room_id", None) != room_id:
        fail(f"join: {joined}")
    for client in (alice, bob, alice):
        await step(client)
    if not alice.rooms[room_id].encrypted:
        fail("the room is not encrypted for alice")

    sent = await alice.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "hello bob"},
        ignore_unverified_devices=True,
    )
    if not getattr(sent, "event_id", None):
        fail(f"alice's send: {sent}")
    await until_text(bob, room_id, "hello bob", others=(alice,))
    print("bob decrypted alice's message")

    sent = await bob.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice"},
        ignore_unverified_devices=True,
    )
    if not getattr(sent, "event_id", None):
        fail(f"bob's send: {sent}")
    await until_text(alice, room_id, "hi alice", others=(bob,))
    print("alice decrypted bob's message")

    # A new device of Bob's: it learns of his first device and they trust each other.
    bob2 = await new_client(bob_base, "bob", register=False)
    for _ in range(3):
        for client in (bob2, bob, bob2):
            await step(client)
    first = bob.device_store[bob.user_id].get(bob2.device_id) or fail("bob never saw bob2")
    bob.verify_device(first)
    second = bob2.device_store[bob.user_id].get(bob.device_id) or fail("bob2 never saw bob")
    bob2.verify_device(second)

    # Bob2 reads the history, cannot decrypt it, and asks Bob's devices for the key.
    history = await bob2.room_messages(room_id, limit=50)
    if not isinstance(history, RoomMessagesResponse):
        fail(f"room_messages: {history}")
    locked = [e for e in history.chunk if isinstance(e, MegolmEvent)]
    if not locked:
        fail("bob2 sees no encrypted history")
    for session_id in {e.session_id: None for e in locked}:
        await bob2.request_room_key(next(e for e in locked if e.session_id == session_id))
    for _ in range(STEPS):
        await step(bob)
        # nio turns key requests into key shares only when it handles a sync batch with
        # a new token; a request parked while an Olm session was set up would wait for
        # the next unrelated event. Run that same collection step now.
        await bob._collect_key_requests()
        await bob.send_to_device_messages()
        await step(bob2, timeout=200)
        opened = []
        for event in locked:
            try:
                opened.append(bob2.decrypt_event(event))
            except Exception:  # noqa: BLE001 - key not forwarded yet
                pass
        bodies = {e.body for e in opened if isinstance(e, RoomMessageText)}
        if "hello bob" in bodies:
            print("bob's new device decrypted the history with a forwarded key")
            break
    else:
        fail("bob2 never got the room key forwarded")

    for client in (alice, bob, bob2):
        await client.close()
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]))
