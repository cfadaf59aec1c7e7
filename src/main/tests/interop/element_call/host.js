// A minimal Matrix client hosting Element Call as a widget, as Element Web does: it
// answers the widget API (matrix-widget-api's ClientWidgetApi) with plain client-server
// requests to the homeserver, and feeds the room's events to the widget from /sync.
// Query parameters: hs (homeserver base URL), token, user, device, room, ec (widget URL).
/* global mxwidgets */
"use strict";

const params = new URLSearchParams(location.search);
const hs = params.get("hs");
const token = params.get("token");
const userId = params.get("user");
const deviceId = params.get("device");
const roomId = params.get("room");
const log = (window.hostLog = []);
const note = (...args) => log.push(args.map(a => (typeof a === "string" ? a : JSON.stringify(a))).join(" "));

async function call(method, path, body) {
  const resp = await fetch(hs + path, {
    method,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    note("host:", method, path, resp.status, json);
    throw new Error(`${method} ${path}: ${resp.status} ${JSON.stringify(json)}`);
  }
  return json;
}
const enc = encodeURIComponent;
let txn = 0;
const txnId = () => `host${Date.now()}.${txn++}`;

// Where a room event (no state key) or a state event is sent.
function eventPath(room, type, stateKey, query) {
  const base = `/_matrix/client/v3/rooms/${enc(room)}`;
  return stateKey === null || stateKey === undefined
    ? `${base}/send/${enc(type)}/${txnId()}${query}`
    : `${base}/state/${enc(type)}/${enc(stateKey)}${query}`;
}

class Driver extends mxwidgets.WidgetDriver {
  async validateCapabilities(requested) {
    return requested;
  }
  async sendEvent(type, content, stateKey, room) {
    const r = room || roomId;
    const { event_id } = await call("PUT", eventPath(r, type, stateKey, ""), content);
    return { roomId: r, eventId: event_id };
  }
  async sendDelayedEvent(delay, type, content, stateKey, room) {
    const r = room || roomId;
    const query = `?org.matrix.msc4140.delay=${delay}`;
    const { delay_id } = await call("PUT", eventPath(r, type, stateKey, query), content);
    return { roomId: r, delayId: delay_id };
  }
  async updateDelayed(delayId, action) {
    await call("POST", `/_matrix/client/unstable/org.matrix.msc4140/delayed_events/${enc(delayId)}`, { action });
  }
  cancelScheduledDelayedEvent(id) {
    return this.updateDelayed(id, "cancel");
  }
  restartScheduledDelayedEvent(id) {
    return this.updateDelayed(id, "restart");
  }
  sendScheduledDelayedEvent(id) {
    return this.updateDelayed(id, "send");
  }
  async sendToDevice(type, encrypted, contentMap) {
    // The call's room is unencrypted: Element Call has no reason to ask for Olm here.
    if (encrypted) throw new Error("this host does not encrypt to-device messages");
    await call("PUT", `/_matrix/client/v3/sendToDevice/${enc(type)}/${txnId()}`, { messages: contentMap });
  }
  async readRoomState(room, type, stateKey) {
    const state = await call("GET", `/_matrix/client/v3/rooms/${enc(room)}/state`);
    return state
      .filter(e => e.type === type && (stateKey === undefined || e.state_key === stateKey))
      .map(e => ({ ...e, room_id: room }));
  }
  async readRoomTimeline(room, type, msgtype, stateKey, limit) {
    const page = await call("GET", `/_matrix/client/v3/rooms/${enc(room)}/messages?dir=b&limit=${Math.min(limit || 50, 100)}`);
    return page.chunk
      .filter(e => e.type === type && (msgtype === undefined || e.content?.msgtype === msgtype))
      .filter(e => stateKey === undefined || e.state_key === stateKey)
      .map(e => ({ ...e, room_id: room }));
  }
  async readStickyEvents() {
    return [];
  }
  askOpenID(observer) {
    call("POST", `/_matrix/client/v3/user/${enc(userId)}/openid/request_token`, {}).then(
      credentials => observer.update({ state: mxwidgets.OpenIDRequestState.Allowed, token: credentials }),
      () => observer.update({ state: mxwidgets.OpenIDRequestState.Blocked }),
    );
  }
  async getRtcTransports() {
    const { rtc_transports } = await call("GET", "/_matrix/client/v1/rtc/transports");
    return { rtc_transports };
  }
  async *getTurnServers() {}
  getKnownRooms() {
    return [roomId];
  }
}

async function syncLoop(api) {
  let since = (await call("GET", "/_matrix/client/v3/sync?timeout=0")).next_batch;
  for (;;) {
    let batch;
    try {
      batch = await call("GET", `/_matrix/client/v3/sync?timeout=10000&since=${enc(since)}`);
    } catch (e) {
      await new Promise(r => setTimeout(r, 1000));
      continue;
    }
    since = batch.next_batch;
    for (const ev of batch.to_device?.events ?? []) {
      await api.feedToDevice(ev, false).catch(e => note("host: feedToDevice", String(e)));
    }
    const joined = batch.rooms?.join ?? {};
    for (const [room, data] of Object.entries(joined)) {
      for (const ev of data.state?.events ?? []) {
        await api.feedStateUpdate({ ...ev, room_id: room }).catch(e => note("host: feedStateUpdate", String(e)));
      }
      for (const ev of data.timeline?.events ?? []) {
        const full = { ...ev, room_id: room };
        await api.feedEvent(full).catch(e => note("host: feedEvent", String(e)));
        if (ev.state_key !== undefined) {
          await api.feedStateUpdate(full).catch(e => note("host: feedStateUpdate", String(e)));
        }
      }
    }
  }
}

function start() {
  const widgetId = "trellis-element-call";
  const ec = new URL(params.get("ec"), location.href);
  const widgetParams = new URLSearchParams({
    widgetId,
    parentUrl: location.href,
    roomId,
    userId,
    deviceId,
    baseUrl: hs,
    // Join at once with camera and microphone, as a "join" button in the host would.
    intent: "join_existing",
    skipLobby: "true",
    preload: "false",
    confineToRoom: "true",
    header: "none",
    lang: "en",
    theme: "dark",
    perParticipantE2EE: "false",
  });
  if (params.get("password")) widgetParams.set("password", params.get("password"));
  ec.hash = "?" + widgetParams.toString();
  const widget = new mxwidgets.Widget({
    id: widgetId,
    creatorUserId: userId,
    type: "m.custom",
    url: ec.toString(),
    data: {},
  });
  const iframe = document.createElement("iframe");
  iframe.allow = "camera; microphone; display-capture; autoplay; clipboard-write";
  iframe.style.width = "1280px";
  iframe.style.height = "720px";
  // The API talks to the frame's window, which exists once the frame is in the page.
  document.body.appendChild(iframe);
  const api = new mxwidgets.ClientWidgetApi(widget, iframe, new Driver());
  window.widgetApi = api;
  api.on("ready", () => {
    note("host: widget ready");
    api.setViewedRoomId(roomId);
    syncLoop(api);
  });
  api.on("action:io.element.join", ev => {
    ev.preventDefault();
    api.transport.reply(ev.detail, {});
  });
  // Element Call asks to stay on screen; say yes, as Element Web does.
  api.on(`action:${mxwidgets.WidgetApiFromWidgetAction.UpdateAlwaysOnScreen}`, ev => {
    ev.preventDefault();
    api.transport.reply(ev.detail, { success: true });
  });
  iframe.src = ec.toString();
}

start();
