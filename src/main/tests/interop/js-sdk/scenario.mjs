// Interop scenario: the real matrix-js-sdk (with its Rust crypto,
// @matrix-org/matrix-sdk-crypto-wasm) against a Trellis server.
//
//   node scenario.mjs http://127.0.0.1:8008
//
// Run from this directory after `npm ci` (`.ci/install-deps` does it); driven by
// src/main/tests/js_sdk_interop.rs. Prints one line per passed step and `OK` at the
// end; exits non-zero with a message on the first failure.

import { createClient, ClientEvent, Direction, EventType, MsgType, RoomEvent } from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";
import { format } from "node:util";

const TOTAL_TIMEOUT_MS = 240_000;
const STEP_TIMEOUT_MS = 60_000;

const base = process.argv[2];
if (!base) {
    console.error("usage: node scenario.mjs <server base url>");
    process.exit(2);
}

const nodeMajor = Number(process.versions.node.split(".")[0]);
if (nodeMajor < 20) {
    console.error(`FAIL: matrix-js-sdk 37 needs Node.js >= 20, this is ${process.version}`);
    process.exit(1);
}

// Keep stdout for the step lines: the SDK's logger and the Rust crypto's tracing (which
// the SDK turns on at debug level) write through console.*, so send those to stderr and
// drop debug output unless JS_SDK_LOG=debug (or trace) asks for it.
const sdkLogLevel = process.env.JS_SDK_LOG ?? "warn";
logger.setLevel(sdkLogLevel);
const toStderr = (...args) => process.stderr.write(format(...args) + "\n");
console.log = console.info = toStderr;
console.debug = console.trace = ["debug", "trace"].includes(sdkLogLevel) ? toStderr : () => {};

const globalTimer = setTimeout(() => {
    fail(`global timeout: scenario did not finish within ${TOTAL_TIMEOUT_MS / 1000} s`);
}, TOTAL_TIMEOUT_MS);

const clients = [];

function fail(msg) {
    console.error(`FAIL: ${msg}`);
    for (const c of clients) {
        try {
            c.stopClient();
        } catch {}
    }
    process.exit(1);
}

function step(msg) {
    process.stdout.write(msg + "\n");
}

function assert(cond, msg) {
    if (!cond) throw new Error(msg);
}

/** Polls `fn` until it returns a truthy value (which is returned). */
async function waitFor(what, fn, timeoutMs = STEP_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    let lastErr;
    for (;;) {
        try {
            const v = await fn();
            if (v) return v;
        } catch (e) {
            lastErr = e;
        }
        if (Date.now() > deadline) {
            throw new Error(`timed out waiting for ${what}${lastErr ? ` (last error: ${lastErr})` : ""}`);
        }
        await new Promise((r) => setTimeout(r, 100));
    }
}

const suffix = Math.random().toString(36).slice(2, 8);
const password = "interop-password-" + suffix;

/** Registers through the SDK with the m.login.dummy user-interactive flow. */
async function register(localpart) {
    const anon = createClient({ baseUrl: base });
    let res;
    try {
        // First request without auth: the server answers 401 with the flows and a session.
        res = await anon.registerRequest({ username: localpart, password, initial_device_display_name: "js-sdk" });
    } catch (e) {
        if (e.httpStatus !== 401 || !e.data?.flows) throw e;
        const flows = e.data.flows;
        assert(
            flows.some((f) => f.stages.length === 1 && f.stages[0] === "m.login.dummy"),
            `no m.login.dummy flow offered: ${JSON.stringify(flows)}`,
        );
        res = await anon.registerRequest({
            username: localpart,
            password,
            initial_device_display_name: "js-sdk",
            auth: { type: "m.login.dummy", session: e.data.session },
        });
    }
    assert(res.access_token && res.user_id && res.device_id, `register response lacks fields: ${JSON.stringify(res)}`);
    return res;
}

/** Logs in with the password (a second device) through the SDK. */
async function login(userId) {
    const anon = createClient({ baseUrl: base });
    const res = await anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: userId },
        password,
        initial_device_display_name: "js-sdk login",
    });
    assert(res.access_token && res.device_id, `login response lacks fields: ${JSON.stringify(res)}`);
    return res;
}

async function startClient(creds, { crypto = true, initialSyncLimit = 20 } = {}) {
    const client = createClient({
        baseUrl: base,
        userId: creds.user_id,
        accessToken: creds.access_token,
        deviceId: creds.device_id,
    });
    clients.push(client);
    client.on(ClientEvent.SyncUnexpectedError, (e) => console.error(`${creds.user_id}: sync error: ${e}`));
    // No IndexedDB in Node: keep the Rust crypto store in memory.
    if (crypto) await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve, reject) => {
        const onSync = (state, _prev, data) => {
            if (state === "PREPARED" || state === "SYNCING") {
                client.off(ClientEvent.Sync, onSync);
                resolve();
            } else if (state === "ERROR") {
                client.off(ClientEvent.Sync, onSync);
                reject(new Error(`${creds.user_id}: initial sync failed: ${data?.error ?? state}`));
            }
        };
        client.on(ClientEvent.Sync, onSync);
    });
    await client.startClient({ initialSyncLimit });
    await prepared;
    return client;
}

function timelineEvent(client, roomId, eventId) {
    return client
        .getRoom(roomId)
        ?.getLiveTimeline()
        .getEvents()
        .find((e) => e.getId() === eventId);
}

/** Waits until `client` has the (decrypted, if it was encrypted) event in its live timeline. */
async function waitForClearEvent(client, roomId, eventId, who) {
    return waitFor(`${who} to receive and decrypt ${eventId}`, async () => {
        const ev = timelineEvent(client, roomId, eventId);
        if (!ev) return null;
        if (ev.isEncrypted()) {
            await client.decryptEventIfNeeded(ev);
            if (ev.isBeingDecrypted() || ev.isDecryptionFailure() || ev.getType() !== EventType.RoomMessage) {
                return null;
            }
        }
        return ev;
    });
}

async function main() {
    const versions = await (await fetch(`${base}/_matrix/client/versions`)).json();
    assert(Array.isArray(versions.versions), `bad /versions: ${JSON.stringify(versions)}`);

    const aliceReg = await register(`alice-${suffix}`);
    const bobReg = await register(`bob-${suffix}`);
    step(`registered ${aliceReg.user_id} and ${bobReg.user_id}`);

    // Alice uses the device she registered with; Bob logs in with a second device.
    const bobLogin = await login(bobReg.user_id);
    const bobCreds = { user_id: bobReg.user_id, access_token: bobLogin.access_token, device_id: bobLogin.device_id };
    step(`bob logged in as device ${bobLogin.device_id}`);

    const alice = await startClient(aliceReg);
    const bob = await startClient(bobCreds);
    step("clients started with rust crypto");

    // Both devices published keys through the crypto machine.
    await waitFor("alice to see bob's device keys", async () => {
        const devices = await alice.getCrypto().getUserDeviceInfo([bob.getUserId()], true);
        return devices.get(bob.getUserId())?.has(bob.getDeviceId());
    });
    step("alice sees bob's device keys");

    // --- plain room -----------------------------------------------------------------
    const { room_id: roomId } = await alice.createRoom({ name: "js-sdk interop", invite: [bob.getUserId()] });
    await waitFor("bob to be invited", () => bob.getRoom(roomId)?.getMyMembership() === "invite");
    await bob.joinRoom(roomId);
    await waitFor(
        "alice to see bob joined",
        () => alice.getRoom(roomId)?.getMember(bob.getUserId())?.membership === "join",
    );
    step("bob joined alice's room");

    // Remember, for each live event bob receives, the next_batch of the sync that
    // delivered it (the SDK stores it before processing the response).
    const received = new Map();
    bob.on(RoomEvent.Timeline, (ev, room, toStartOfTimeline) => {
        if (room?.roomId === roomId && !toStartOfTimeline) received.set(ev.getId(), bob.store.getSyncToken());
    });
    const first = await alice.sendTextMessage(roomId, "hello bob 1");
    const { event_id: textEventId } = await alice.sendTextMessage(roomId, "hello bob 2");
    const textEv = await waitFor("bob to receive alice's message through sync", () => {
        const ev = timelineEvent(bob, roomId, textEventId);
        return ev && received.has(textEventId) ? ev : null;
    });
    assert(textEv.getContent().body === "hello bob 2", `unexpected body ${JSON.stringify(textEv.getContent())}`);
    assert(textEv.getSender() === alice.getUserId(), `unexpected sender ${textEv.getSender()}`);
    step("bob received alice's message through sync");

    // --- /messages backwards from the sync token --------------------------------------
    // The next_batch of the very sync response whose timeline carried the newest message:
    // paginating backwards from it must return that message first.
    const syncToken = received.get(textEventId);
    assert(syncToken, "bob has no sync token for the sync that delivered the message");
    const page = await bob.createMessagesRequest(roomId, syncToken, 10, Direction.Backward);
    assert(Array.isArray(page.chunk) && page.chunk.length > 0, `empty /messages chunk: ${JSON.stringify(page)}`);
    assert(
        page.chunk[0].event_id === textEventId,
        `/messages?dir=b&from=<sync next_batch> must start with the newest event ${textEventId}, ` +
            `got ${page.chunk.map((e) => `${e.event_id} ${e.type}`).join(", ")}`,
    );
    assert(
        page.chunk[1]?.event_id === first.event_id,
        `second event of the chunk should be ${first.event_id}, got ${page.chunk[1]?.event_id}`,
    );
    // A one-event page, and the page after it (from its `end`), are the same two events.
    const one = await bob.createMessagesRequest(roomId, syncToken, 1, Direction.Backward);
    assert(
        one.chunk?.length === 1 && one.chunk[0].event_id === textEventId && one.end,
        `/messages limit=1 from the sync token: ${JSON.stringify(one)}`,
    );
    const next = await bob.createMessagesRequest(roomId, one.end, 1, Direction.Backward);
    assert(
        next.chunk?.[0]?.event_id === first.event_id,
        `/messages from the previous page's end should give ${first.event_id}: ${JSON.stringify(next)}`,
    );
    step("/messages from the sync token starts with the newest message");

    // The SDK's own back-pagination: a new session of bob's (no crypto needed) whose
    // initial sync has a short, limited timeline scrolls back from its prev_batch to the
    // room's creation, and sees the whole history in order.
    const bob2Login = await login(bob.getUserId());
    const bob2 = await startClient(
        { user_id: bob.getUserId(), access_token: bob2Login.access_token, device_id: bob2Login.device_id },
        { crypto: false, initialSyncLimit: 2 },
    );
    const bob2Room = await waitFor("bob's new session to see the room", () => bob2.getRoom(roomId));
    const types = () => bob2Room.getLiveTimeline().getEvents().map((e) => e.getType());
    assert(!types().includes(EventType.RoomCreate), `initial sync timeline was not limited: ${types()}`);
    for (let i = 0; !types().includes(EventType.RoomCreate); i++) {
        assert(i < 20, `scrollback never reached m.room.create: ${types()}`);
        await bob2.scrollback(bob2Room, 3);
    }
    const ids = bob2Room.getLiveTimeline().getEvents().map((e) => e.getId());
    assert(
        ids.indexOf(first.event_id) >= 0 && ids.indexOf(first.event_id) + 1 === ids.indexOf(textEventId),
        `paginated timeline lost or reordered the messages: ${types()}`,
    );
    assert(new Set(ids).size === ids.length, `paginated timeline has duplicates: ${ids}`);
    bob2.stopClient();
    step("bob's new session paginated back to the room's creation");

    // --- media --------------------------------------------------------------------------
    const bytes = new Uint8Array(4096);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 13) & 0xff;
    const upload = await alice.uploadContent(bytes, { name: "pattern.png", type: "image/png" });
    const mxc = upload.content_uri;
    assert(typeof mxc === "string" && mxc.startsWith("mxc://"), `bad upload response ${JSON.stringify(upload)}`);
    const { event_id: imageEventId } = await alice.sendMessage(roomId, {
        msgtype: MsgType.Image,
        body: "pattern.png",
        url: mxc,
        info: { mimetype: "image/png", size: bytes.length },
    });
    const imageEv = await waitForClearEvent(bob, roomId, imageEventId, "bob");
    assert(imageEv.getContent().url === mxc, `image event lost its url: ${JSON.stringify(imageEv.getContent())}`);
    const [serverName, mediaId] = mxc.slice("mxc://".length).split("/");
    // The SDK's own helper builds the authenticated-media URL.
    const sdkUrl = bob.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
    assert(
        sdkUrl?.startsWith(`${base}/_matrix/client/v1/media/download/${serverName}/${mediaId}`),
        `mxcUrlToHttp gave ${sdkUrl}`,
    );
    const dl = await fetch(sdkUrl, { headers: { Authorization: `Bearer ${bob.getAccessToken()}` } });
    if (!dl.ok) throw new Error(`download ${sdkUrl} failed: ${dl.status} ${await dl.text()}`);
    const got = new Uint8Array(await dl.arrayBuffer());
    assert(
        got.length === bytes.length && got.every((b, i) => b === bytes[i]),
        `downloaded ${got.length} bytes differ from the ${bytes.length} uploaded`,
    );
    step("bob downloaded alice's image with authenticated media, bytes match");

    // --- delayed events (MSC4140), as Element Call uses them -------------------------------
    const { delay_id: laterId } = await alice._unstable_sendDelayedEvent(
        roomId, { delay: 1500 }, null, EventType.RoomMessage, { msgtype: MsgType.Text, body: "posted later" },
    );
    const memberKey = `_${alice.getUserId()}_${alice.getDeviceId()}_m.call`;
    const { delay_id: leaveId } = await alice._unstable_sendDelayedStateEvent(
        roomId, { delay: 60000 }, "org.matrix.msc3401.call.member", {}, memberKey,
    );
    const waiting = await alice._unstable_getDelayedEvents();
    const delayIds = (waiting.delayed_events ?? []).map((d) => d.delay_id);
    assert(delayIds.includes(laterId) && delayIds.includes(leaveId), `delayed events listed: ${JSON.stringify(waiting)}`);
    await alice._unstable_updateDelayedEvent(leaveId, "restart");
    await alice._unstable_updateDelayedEvent(leaveId, "cancel");
    await waitFor("bob to receive the delayed message", () =>
        bob.getRoom(roomId)?.getLiveTimeline().getEvents().some((e) => e.getContent().body === "posted later"),
    );
    const after = await alice._unstable_getDelayedEvents();
    assert((after.delayed_events ?? []).length === 0, `still waiting: ${JSON.stringify(after)}`);
    step("delayed events sent, listed, restarted, cancelled and posted");

    // --- encrypted room -----------------------------------------------------------------
    const { room_id: encRoomId } = await alice.createRoom({ name: "js-sdk e2ee", invite: [bob.getUserId()] });
    await waitFor(
        "bob to be invited to the encrypted room",
        () => bob.getRoom(encRoomId)?.getMyMembership() === "invite",
    );
    await bob.joinRoom(encRoomId);
    await waitFor(
        "alice to see bob joined the encrypted room",
        () => alice.getRoom(encRoomId)?.getMember(bob.getUserId())?.membership === "join",
    );
    await alice.sendStateEvent(encRoomId, EventType.RoomEncryption, { algorithm: "m.megolm.v1.aes-sha2" }, "");
    await waitFor("both clients to see the room as encrypted", async () => {
        return (
            (await alice.getCrypto().isEncryptionEnabledInRoom(encRoomId)) &&
            (await bob.getCrypto().isEncryptionEnabledInRoom(encRoomId))
        );
    });
    step("encryption enabled in a room with bob");

    // Unverified devices must get the keys (this is the default; set it explicitly).
    alice.getCrypto().globalBlacklistUnverifiedDevices = false;
    bob.getCrypto().globalBlacklistUnverifiedDevices = false;

    const { event_id: secretId } = await alice.sendTextMessage(encRoomId, "secret for bob");
    const sentEv = timelineEvent(alice, encRoomId, secretId);
    assert(sentEv?.isEncrypted(), "alice's message was not sent encrypted");
    const bobSees = await waitForClearEvent(bob, encRoomId, secretId, "bob");
    assert(bobSees.isEncrypted(), "bob's copy of the message was not encrypted on the wire");
    assert(bobSees.getContent().body === "secret for bob", `bob decrypted ${JSON.stringify(bobSees.getContent())}`);
    step("bob decrypted alice's message");

    const { event_id: replyId } = await bob.sendTextMessage(encRoomId, "secret for alice");
    const aliceSees = await waitForClearEvent(alice, encRoomId, replyId, "alice");
    assert(aliceSees.isEncrypted(), "bob's reply was not encrypted on the wire");
    assert(
        aliceSees.getContent().body === "secret for alice",
        `alice decrypted ${JSON.stringify(aliceSees.getContent())}`,
    );
    step("alice decrypted bob's reply");

    for (const c of clients) c.stopClient();
    clearTimeout(globalTimer);
    step("OK");
    // The wasm crypto machine and keep-alive sockets can hold the event loop open.
    process.exit(0);
}

main().catch((e) => {
    const detail = e?.httpStatus ? ` (HTTP ${e.httpStatus}: ${JSON.stringify(e.data)})` : "";
    fail(`${e?.stack ?? e}${detail}`);
});
