// Interop scenario: a real application service, built on matrix-bot-sdk's `Appservice`
// class (@vector-im/matrix-bot-sdk, Element's maintained fork that matrix-appservice-bridge
// 10 and matrix-hookshot build on), against a homeserver.
//
//   node scenario.mjs <server base url> <registration.yaml> <as port> [bridge|backlog]
//
// The homeserver must already be running with <registration.yaml> loaded (the caller writes
// it; `node scenario.mjs make-registration <file> <as port>` writes the one this scenario
// expects) and open registration (`m.login.dummy`). The application service listens on
// 127.0.0.1:<as port>, the `url` of the registration.
//
// Modes:
//   bridge (default)  the bridge walk-through: ping, puppet registration, masquerading,
//                     transactions, user and alias queries.
//   backlog [--pause] the AS stops listening, a human sends BACKLOG_MESSAGES messages, the
//                     AS listens again (a new instance, as after a bridge restart) and must
//                     receive every one, in order, exactly once. With --pause it prints
//                     "PAUSED: ..." after sending and waits for a line on stdin before
//                     listening again, so the caller can restart the homeserver meanwhile.
//
// Run from this directory after `npm ci` (`.ci/install-deps` does it); driven by
// src/main/tests/appservice_interop.rs. Prints one line per passed step and `OK` at the
// end; exits non-zero with a message on the first failure.

import { Appservice, LogLevel, LogService, MemoryStorageProvider } from "@vector-im/matrix-bot-sdk";
import yaml from "js-yaml";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { format } from "node:util";

const TOTAL_TIMEOUT_MS = 240_000;
const STEP_TIMEOUT_MS = 60_000;
// Homeservers retry a failed transaction with back-off (Synapse: 2 s, 4 s, 8 s, ...).
const BACKLOG_TIMEOUT_MS = 120_000;
const BACKLOG_MESSAGES = 5;
// How long the homeserver gets to attempt delivery of the backlog before a restart.
const SETTLE_MS = 2_000;

function usage() {
    console.error(
        "usage: node scenario.mjs <server base url> <registration.yaml> <as port> [bridge|backlog [--pause]]\n" +
            "       node scenario.mjs make-registration <registration.yaml> <as port>",
    );
    process.exit(2);
}

// The registration this scenario is written for (the Rust test writes the same file).
function registrationYaml(port, id = "trellis-interop-bridge") {
    const token = () => randomBytes(24).toString("hex");
    return [
        `id: ${id}`,
        `url: http://127.0.0.1:${port}`,
        `as_token: ${token()}`,
        `hs_token: ${token()}`,
        "sender_localpart: _bridge_bot",
        "namespaces:",
        "  users:",
        "    - exclusive: true",
        "      regex: '@_bridge_.*'",
        "  aliases:",
        "    - exclusive: true",
        "      regex: '#_bridge_.*'",
        "  rooms: []",
        "rate_limited: false",
        "receive_ephemeral: true",
        "",
    ].join("\n");
}

if (process.argv[2] === "make-registration") {
    const [file, port] = process.argv.slice(3);
    if (!file || !port) usage();
    writeFileSync(file, registrationYaml(Number(port)));
    process.exit(0);
}

const [base, registrationPath, portArg, mode = "bridge", ...flags] = process.argv.slice(2);
if (!base || !registrationPath || !portArg || !["bridge", "backlog"].includes(mode)) usage();
const asPort = Number(portArg);

const nodeMajor = Number(process.versions.node.split(".")[0]);
if (nodeMajor < 20) {
    console.error(`FAIL: this scenario needs Node.js >= 20, this is ${process.version}`);
    process.exit(1);
}

// Keep stdout for the step lines: the bot-sdk logs through LogService (and express/morgan
// through it too); send everything to stderr, at WARN unless AS_SDK_LOG=info|debug.
// AS_DUMP_TXNS=1 also prints every transaction body the homeserver sends.
const toStderr = (...args) => process.stderr.write(format(...args) + "\n");
console.log = console.info = toStderr;
console.debug = console.trace = () => {};
const sdkLevel = { debug: LogLevel.DEBUG, info: LogLevel.INFO, warn: LogLevel.WARN }[process.env.AS_SDK_LOG ?? "warn"];
LogService.setLevel(sdkLevel ?? LogLevel.WARN);
LogService.setLogger({
    trace: () => {},
    debug: (m, ...a) => toStderr("[sdk debug]", m, ...a),
    info: (m, ...a) => toStderr("[sdk info]", m, ...a),
    warn: (m, ...a) => toStderr("[sdk warn]", m, ...a),
    error: (m, ...a) => toStderr("[sdk error]", m, ...a),
});

const globalTimer = setTimeout(() => {
    fail(`global timeout: scenario did not finish within ${TOTAL_TIMEOUT_MS / 1000} s`);
}, TOTAL_TIMEOUT_MS);

const services = [];

function fail(msg) {
    console.error(`FAIL: ${msg}`);
    for (const as of services) stopListening(as);
    process.exit(1);
}

function step(msg) {
    process.stdout.write(msg + "\n");
}

function assert(cond, msg) {
    if (!cond) throw new Error(msg);
}

async function waitFor(what, fn, timeoutMs = STEP_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    let last;
    while (Date.now() < deadline) {
        try {
            const v = await fn();
            if (v) return v;
        } catch (e) {
            last = e;
        }
        await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${last.message ?? last})` : ""}`);
}

// Plain client-server API calls for the human user (no SDK, so nothing is hidden).
async function api(method, path, { token, body, query } = {}) {
    const url = new URL(base + path);
    for (const [k, v] of Object.entries(query ?? {})) url.searchParams.set(k, v);
    const headers = { "content-type": "application/json" };
    if (token) headers.authorization = `Bearer ${token}`;
    let res;
    try {
        res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
        throw new Error(`${method} ${url}: ${e.cause?.message ?? e.message}`);
    }
    const text = await res.text();
    let json;
    try {
        json = text ? JSON.parse(text) : {};
    } catch {
        json = { raw: text };
    }
    return { status: res.status, body: json };
}

async function apiOk(method, path, opts = {}) {
    const r = await api(method, path, opts);
    if (r.status !== 200) throw new Error(`${method} ${path} -> ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
}

const enc = encodeURIComponent;

// Open registration with the dummy stage: ask for the flows, then complete m.login.dummy.
async function registerHuman(username) {
    const password = "interop-" + randomBytes(8).toString("hex");
    const first = await api("POST", "/_matrix/client/v3/register", { body: { username, password } });
    if (first.status === 200) return first.body;
    assert(first.status === 401 && first.body.flows, `register ${username}: expected 401 with flows, got ${first.status} ${JSON.stringify(first.body)}`);
    assert(
        first.body.flows.some((f) => f.stages.length === 1 && f.stages[0] === "m.login.dummy"),
        `register ${username}: no m.login.dummy flow in ${JSON.stringify(first.body.flows)}`,
    );
    return apiOk("POST", "/_matrix/client/v3/register", {
        body: { username, password, auth: { type: "m.login.dummy", session: first.body.session } },
    });
}

function loadRegistration() {
    const reg = yaml.load(readFileSync(registrationPath, "utf8"));
    assert(reg && reg.id && reg.as_token && reg.hs_token && reg.sender_localpart, `incomplete registration in ${registrationPath}`);
    assert(reg.url === `http://127.0.0.1:${asPort}`, `registration url ${reg.url} is not http://127.0.0.1:${asPort}`);
    return reg;
}

// The server name is not an argument: ask the homeserver who the AS token belongs to (the
// sender_localpart user, no `user_id` given).
async function serverNameFor(reg) {
    const who = await apiOk("GET", "/_matrix/client/v3/account/whoami", { token: reg.as_token });
    const expectedLocal = `@${reg.sender_localpart}:`;
    assert(who.user_id?.startsWith(expectedLocal), `whoami with the as_token: expected ${expectedLocal}..., got ${JSON.stringify(who)}`);
    return who.user_id.slice(expectedLocal.length);
}

function newAppservice(reg, serverName) {
    const as = new Appservice({
        homeserverName: serverName,
        homeserverUrl: base,
        port: asPort,
        bindAddress: "127.0.0.1",
        registration: { ...reg, namespaces: structuredClone(reg.namespaces) },
        storage: new MemoryStorageProvider(),
    });
    // What the framework was sent, in arrival order (its own events included).
    as.received = [];
    as.on("room.event", (roomId, event) => as.received.push(event));
    // Ephemeral events as they arrived in transaction bodies, with the key that carried them:
    // this bot-sdk only hands the unstable `de.sorunome.msc2409.ephemeral` to its handlers,
    // Synapse with `receive_ephemeral: true` sends only the stable `ephemeral`.
    as.ephemeral = [];
    const handleTransaction = as.handleTransaction.bind(as);
    as.handleTransaction = (txnId, body) => {
        if (process.env.AS_DUMP_TXNS) console.error(`transaction ${txnId}: ${JSON.stringify(body)}`);
        for (const key of ["ephemeral", "de.sorunome.msc2409.ephemeral"]) {
            for (const e of Array.isArray(body?.[key]) ? body[key] : []) as.ephemeral.push({ key, event: structuredClone(e) });
        }
        return handleTransaction(txnId, body);
    };
    services.push(as);
    return as;
}

function stopListening(as) {
    try {
        as.stop();
        as.appServer?.closeAllConnections?.();
    } catch {}
}

// Human + room + bot: the part both modes share. The bot joins when its invite arrives in a
// transaction (the framework's `room.invite`), like a bridge would.
async function humanRoomWithBot(as, humanName) {
    const human = await registerHuman(humanName);
    const token = human.access_token;
    const { room_id: roomId } = await apiOk("POST", "/_matrix/client/v3/createRoom", {
        token,
        body: { name: "Bridge interop", preset: "private_chat" },
    });
    await apiOk("POST", `/_matrix/client/v3/rooms/${enc(roomId)}/invite`, { token, body: { user_id: as.botUserId } });
    await waitFor("the bot to join the human's room", async () => {
        const members = await apiOk("GET", `/_matrix/client/v3/rooms/${enc(roomId)}/joined_members`, { token });
        return Object.keys(members.joined ?? {}).includes(as.botUserId);
    });
    return { human, token, roomId };
}

function joinBotOnInvite(as) {
    as.on("room.invite", (roomId, event) => {
        if (event.state_key !== as.botUserId) return;
        as.botIntent.joinRoom(roomId).catch((e) => fail(`the bot could not join ${roomId}: ${e.message ?? e}`));
    });
}

function messageBodies(events, roomId, sender) {
    return events.filter((e) => e.type === "m.room.message" && e.room_id === roomId && (!sender || e.sender === sender));
}

async function bridgeScenario() {
    const reg = loadRegistration();
    const serverName = await serverNameFor(reg);
    const as = newAppservice(reg, serverName);
    joinBotOnInvite(as);

    // User and alias queries, answered through the framework's handlers.
    const userQueries = [];
    as.on("query.user", (userId, createUser) => {
        userQueries.push(userId);
        if (userId === `@_bridge_bob:${serverName}`) createUser({ display_name: "Bob (bridged)" });
        else createUser(false);
    });
    const aliasQueries = [];
    as.on("query.room", (alias, createRoom) => {
        aliasQueries.push(alias);
        if (alias === `#_bridge_room:${serverName}`) createRoom({ name: "Bridged room", preset: "public_chat" });
        else createRoom(false);
    });

    // 1. Listener up; `begin` also registers the bot (m.login.application_service register,
    //    M_USER_IN_USE accepted for the sender).
    await as.begin();
    const botId = await as.botClient.getUserId();
    assert(botId === as.botUserId, `bot whoami: ${botId} != ${as.botUserId}`);
    await as.botIntent.underlyingClient.setDisplayName("Interop bridge bot");
    step(`appservice listening on 127.0.0.1:${asPort}; bot ${botId} is usable`);

    // 2. The homeserver pings the framework back with the transaction id it was given.
    const ping = await as.pingHomeserver();
    assert(typeof ping?.duration_ms === "number", `ping: expected duration_ms, got ${JSON.stringify(ping)}`);
    step("homeserver pinged the appservice (POST /_matrix/client/v1/appservice/{id}/ping)");

    // 3. A puppet, registered by the framework (m.login.application_service).
    const aliceId = `@_bridge_alice:${serverName}`;
    const alice = as.getIntentForSuffix("alice");
    assert(alice.userId === aliceId, `puppet id ${alice.userId} != ${aliceId}`);
    const registered = await alice.ensureRegistered();
    assert(registered !== null, `${aliceId} was already registered (M_USER_IN_USE)`);
    const aliceWho = await alice.underlyingClient.getUserId();
    assert(aliceWho === aliceId, `masqueraded whoami: ${aliceWho} != ${aliceId}`);
    step(`puppet ${aliceId} registered through the appservice; whoami with user_id= is the puppet`);

    // 4. A human's room, the bot joins on its invite, the bot invites the puppet, the puppet joins.
    const { human, token, roomId } = await humanRoomWithBot(as, `human${randomBytes(3).toString("hex")}`);
    await as.botIntent.underlyingClient.inviteUser(aliceId, roomId);
    await alice.joinRoom(roomId);
    const joined = await apiOk("GET", `/_matrix/client/v3/rooms/${enc(roomId)}/joined_members`, { token });
    for (const u of [human.user_id, as.botUserId, aliceId]) {
        assert(Object.keys(joined.joined ?? {}).includes(u), `${u} not joined: ${JSON.stringify(joined)}`);
    }
    step("human created a room; the bot joined on its invite; the puppet joined by masquerading");

    // 5. The puppet speaks; the human reads it with /messages.
    const puppetText = "hello from the bridged side";
    const puppetEventId = await alice.sendText(roomId, puppetText);
    const seen = await waitFor("the puppet's message in /messages", async () => {
        const page = await apiOk("GET", `/_matrix/client/v3/rooms/${enc(roomId)}/messages`, { token, query: { dir: "b", limit: "20" } });
        return page.chunk.find((e) => e.event_id === puppetEventId);
    });
    assert(seen.sender === aliceId && seen.content?.body === puppetText, `puppet message as seen by the human: ${JSON.stringify(seen)}`);
    step("puppet's message reached the human with sender = puppet");

    // 6. The human speaks; the framework receives it in a transaction.
    const humanText = "hello from the Matrix side";
    const { event_id: humanEventId } = await apiOk(
        "PUT",
        `/_matrix/client/v3/rooms/${enc(roomId)}/send/m.room.message/${Date.now()}`,
        { token, body: { msgtype: "m.text", body: humanText } },
    );
    const got = await waitFor("the human's message in a transaction", () => as.received.find((e) => e.event_id === humanEventId));
    assert(got.sender === human.user_id && got.content?.body === humanText && got.room_id === roomId, `transaction event: ${JSON.stringify(got)}`);
    step("appservice received the human's message in a transaction");

    // Ephemeral events (receive_ephemeral: true): the human's typing notification in a room
    // the appservice's users are in arrives in a transaction.
    await apiOk("PUT", `/_matrix/client/v3/rooms/${enc(roomId)}/typing/${enc(human.user_id)}`, {
        token,
        body: { typing: true, timeout: 30_000 },
    });
    const typing = await waitFor("the human's typing notification in a transaction", () =>
        as.ephemeral.find(({ event: e }) => e.type === "m.typing" && e.room_id === roomId && e.content?.user_ids?.includes(human.user_id)),
    );
    console.error(`(typing notification arrived under "${typing.key}")`);
    step("appservice received the human's typing notification as an ephemeral event");

    // 7. User query for an unknown puppet in the namespace. Synapse asks the AS only when an
    //    event for an unknown namespaced user reaches the AS (the spec's example: an invite);
    //    a plain profile lookup does not. Try the lookup first, then the invite.
    const bobId = `@_bridge_bob:${serverName}`;
    const profilePath = `/_matrix/client/v3/profile/${enc(bobId)}`;
    const before = await api("GET", profilePath, { token });
    let trigger;
    if (before.status === 200) {
        assert(userQueries.includes(bobId), `profile of ${bobId} found without a user query: ${JSON.stringify(before.body)}`);
        trigger = "profile lookup";
    } else {
        assert(before.status === 404, `profile of the unknown ${bobId}: expected 404, got ${before.status} ${JSON.stringify(before.body)}`);
        assert(!userQueries.includes(bobId), `the user query for ${bobId} succeeded but the profile lookup still 404s`);
        await apiOk("POST", `/_matrix/client/v3/rooms/${enc(roomId)}/invite`, { token, body: { user_id: bobId } });
        await waitFor(`the homeserver's user query for ${bobId}`, () => userQueries.includes(bobId));
        trigger = "invite";
    }
    // The framework registers the user, then sets the display name, then answers the query.
    let bobProfile;
    await waitFor(`the profile of ${bobId} with the display name the appservice gave it`, async () => {
        const r = await api("GET", profilePath, { token });
        bobProfile = r;
        return r.status === 200 && r.body.displayname === "Bob (bridged)";
    }).catch((e) => {
        throw new Error(`${e.message}; last profile lookup: ${bobProfile?.status} ${JSON.stringify(bobProfile?.body)}`);
    });
    step(`homeserver queried the appservice for ${bobId} (on ${trigger}); it was created; profile lookup succeeds`);

    // 8. Alias query: the framework creates a room with that alias, and resolution succeeds.
    const alias = `#_bridge_room:${serverName}`;
    const resolved = await apiOk("GET", `/_matrix/client/v3/directory/room/${enc(alias)}`, { token });
    assert(aliasQueries.includes(alias), `alias ${alias} resolved without an alias query`);
    assert(typeof resolved.room_id === "string" && resolved.room_id.startsWith("!"), `resolve ${alias}: ${JSON.stringify(resolved)}`);
    const botRooms = await as.botIntent.getJoinedRooms();
    assert(botRooms.includes(resolved.room_id), `${alias} -> ${resolved.room_id}, not a room of the bot (${botRooms})`);
    const { room_id: joinedViaAlias } = await apiOk("POST", `/_matrix/client/v3/join/${enc(alias)}`, { token, body: {} });
    assert(joinedViaAlias === resolved.room_id, `join ${alias} -> ${joinedViaAlias}, resolved ${resolved.room_id}`);
    step(`homeserver queried the appservice for ${alias}; the bot created the room; the alias resolves and the human joined it`);

    // No duplicates: each event of the transactions arrives once.
    const ids = as.received.map((e) => e.event_id);
    const dup = ids.find((id, i) => ids.indexOf(id) !== i);
    assert(!dup, `event ${dup} delivered twice`);
}

async function backlogScenario() {
    const pause = flags.includes("--pause");
    const reg = loadRegistration();
    const serverName = await serverNameFor(reg);
    const first = newAppservice(reg, serverName);
    joinBotOnInvite(first);
    await first.begin();
    const { human, token, roomId } = await humanRoomWithBot(first, `backlog${randomBytes(3).toString("hex")}`);
    // Make sure the homeserver has nothing in flight for us before we go away.
    const { event_id: marker } = await apiOk("PUT", `/_matrix/client/v3/rooms/${enc(roomId)}/send/m.room.message/m${Date.now()}`, {
        token,
        body: { msgtype: "m.text", body: "before the outage" },
    });
    await waitFor("the marker message in a transaction", () => first.received.some((e) => e.event_id === marker));
    step("appservice is in the human's room and receiving transactions");

    stopListening(first);
    const sent = [];
    for (let i = 0; i < BACKLOG_MESSAGES; i++) {
        const body = `backlog ${i + 1} of ${BACKLOG_MESSAGES}`;
        const { event_id } = await apiOk("PUT", `/_matrix/client/v3/rooms/${enc(roomId)}/send/m.room.message/b${i}-${Date.now()}`, {
            token,
            body: { msgtype: "m.text", body },
        });
        sent.push({ event_id, body });
    }
    // Let the homeserver try (and fail) to deliver them before it may be restarted: Synapse
    // keeps the events it has not yet tried to send in memory only, and loses them on
    // shutdown; once a delivery failed it marks the appservice down and stores the rest.
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    step(`appservice stopped listening; human sent ${BACKLOG_MESSAGES} messages`);

    if (pause) {
        step("PAUSED: press enter to start the appservice again");
        await new Promise((resolve) => {
            const rl = createInterface({ input: process.stdin });
            rl.once("line", () => {
                rl.close();
                resolve();
            });
        });
    }

    // A new instance: no memory of the transactions the first one completed. Then one more
    // message: Synapse only starts retrying a down appservice after a restart once a new
    // event for some appservice arrives, and it must come after the backlog either way.
    const second = newAppservice(reg, serverName);
    await second.begin();
    const after = "after the outage";
    const { event_id: afterId } = await apiOk("PUT", `/_matrix/client/v3/rooms/${enc(roomId)}/send/m.room.message/a${Date.now()}`, {
        token,
        body: { msgtype: "m.text", body: after },
    });
    const expected = [...sent, { event_id: afterId, body: after }];
    const expectedIds = expected.map((s) => s.event_id);
    await waitFor(
        `all ${BACKLOG_MESSAGES} backlog messages and the one after them`,
        () => expectedIds.every((id) => second.received.some((e) => e.event_id === id)),
        BACKLOG_TIMEOUT_MS,
    );
    // Give a retry of an already-delivered transaction the chance to show up as a duplicate.
    await new Promise((r) => setTimeout(r, 2_000));
    const mine = messageBodies(second.received, roomId, human.user_id);
    assert(
        mine.length === expected.length && mine.every((e, i) => e.event_id === expectedIds[i]),
        `delivered after the outage: ${JSON.stringify(mine.map((e) => e.content?.body))}, expected ${JSON.stringify(expected.map((s) => s.body))}`,
    );
    assert(!second.received.some((e) => e.event_id === marker), "the marker message (acknowledged before the outage) was delivered again");
    step(`appservice received all ${BACKLOG_MESSAGES} messages after listening again, in order, none duplicated, before the next one`);
}

try {
    if (mode === "bridge") await bridgeScenario();
    else await backlogScenario();
    step("OK");
    clearTimeout(globalTimer);
    for (const as of services) stopListening(as);
    process.exit(0);
} catch (e) {
    // The bot-sdk rejects with MatrixError (an Error) or with plain objects from its HTTP layer.
    fail(e instanceof Error ? e.stack : format("%o", e));
}
