// Trellis's admin panel: a page of plain JavaScript over the admin API. The access token
// lives in this tab's sessionStorage and goes in an Authorization header, never in a
// cookie, so no other site can make the browser act with it (no CSRF). Everything shown
// is put in the page as text nodes, never as HTML.
'use strict';

const SYN = '/_synapse/admin';
const TRL = '/_trellis/admin/v1';
const TOKEN_KEY = 'trellis_admin_token';
let token = sessionStorage.getItem(TOKEN_KEY);
let refresh = null;
// The analytics part of the dashboard, fetched at most every five minutes.
let analytics = { at: 0, data: null };
// The server name (from the dashboard), for user ids typed as bare names.
let serverName = sessionStorage.getItem('trellis_admin_server') || location.hostname;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'class') node.className = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function flash(message, kind) {
  const box = document.getElementById('flash');
  box.className = kind || 'ok';
  box.textContent = message || '';
}

async function api(method, path, body) {
  const options = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const json = await response.json().catch(() => ({}));
  if (response.status === 401) {
    forget();
    throw new Error('Your session ended; log in again.');
  }
  if (!response.ok) throw new Error(json.error || `${response.status} ${response.statusText}`);
  return json;
}

const enc = encodeURIComponent;
const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) : '');
const bytes = (n) => {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const flags = (pairs) => pairs.filter(([, on]) => on).map(([name, , bad]) => el('span', { class: bad ? 'flag bad' : 'flag' }, name));

function table(columns, rows, testId) {
  return el('table', { 'data-test': testId },
    el('thead', {}, el('tr', {}, columns.map((c) => el('th', {}, c)))),
    el('tbody', {}, rows.map((cells) => el('tr', {}, cells.map((c) => el('td', {}, c))))));
}

function show(...nodes) {
  const main = document.getElementById('main');
  main.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function forget() {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('nav').hidden = true;
}

// Runs an action, reporting its outcome, then shows the page again.
async function act(label, action, after) {
  try {
    await action();
    flash(`${label}: done`, 'ok');
    if (after) await after(); else await route();
  } catch (e) {
    flash(`${label}: ${e.message}`, 'error');
  }
}

function loginPage(message) {
  const user = el('input', { id: 'login-user', name: 'user', autocomplete: 'username', required: true, placeholder: 'admin' });
  const password = el('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const form = el('form', {
    id: 'login-form',
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        const response = await fetch('/_matrix/client/v3/login', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({
            type: 'm.login.password',
            identifier: { type: 'm.id.user', user: user.value },
            password: password.value,
            initial_device_display_name: 'Trellis admin panel',
          }),
        });
        const json = await response.json();
        if (!response.ok) throw new Error(json.error || 'Login failed');
        token = json.access_token;
        try {
          await api('GET', `${TRL}/dashboard`);
        } catch (e) {
          await fetch('/_matrix/client/v3/logout', { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
          forget();
          throw new Error('This account is not a server admin.');
        }
        sessionStorage.setItem(TOKEN_KEY, token);
        flash('');
        location.hash = '#/dashboard';
        await route();
      } catch (e) {
        flash(e.message, 'error');
      }
    },
  }, el('label', { for: 'login-user' }, 'User'), user,
  el('label', { for: 'login-password' }, 'Password'), password,
  el('button', { type: 'submit', id: 'login-submit' }, 'Log in'));
  show(el('div', { class: 'login' }, el('h1', {}, 'Log in as a server admin'), message ? el('p', {}, message) : null, form));
}

function card(label, value, id) {
  return el('div', { class: 'card' }, el('div', { class: 'label' }, label), el('div', { class: 'value', id }, value));
}

async function dashboardPage() {
  const d = await api('GET', `${TRL}/dashboard`);
  serverName = d.server_name;
  sessionStorage.setItem('trellis_admin_server', serverName);
  const max = Math.max(1, ...d.messages_per_hour.map((h) => h.messages));
  if (!analytics.data || Date.now() - analytics.at > 300000) {
    analytics = { at: Date.now(), data: await api('GET', `${TRL}/analytics?days=14`) };
  }
  const stats = analytics.data;
  show(
    el('h1', {}, `Dashboard — ${d.server_name}`),
    el('div', { class: 'cards' },
      card('Version', d.version),
      card('Uptime', `${Math.floor(d.uptime_seconds / 3600)} h ${Math.floor((d.uptime_seconds % 3600) / 60)} min`),
      card('Users', d.users.total, 'dash-users'),
      card('Active now / today / month', `${d.users.active_now} / ${d.users.active_today} / ${d.users.active_month}`, 'dash-active'),
      card('Rooms', d.rooms, 'dash-rooms'),
      card('Messages, last hour', d.messages_per_hour[d.messages_per_hour.length - 1].messages, 'dash-messages-hour'),
      card('Media stored', bytes(d.media_bytes)),
      card('Federation', `${d.federation.destinations} servers, ${d.federation.failing} failing`, 'dash-federation'),
      card('Queues', `${d.queues.federation} to servers, ${d.queues.push} pushes`),
      card('Server errors', `${(d.requests.error_rate * 100).toFixed(2)} % of ${d.requests.total}`),
      card('Calls now / TURN relays', `${d.calls.group_calls_now} / ${d.calls.turn_allocations}`, 'dash-calls'),
      card('On the built-in SFU', `${d.calls.sfu_calls_now} calls, ${d.calls.sfu_participants_now} participants`, 'dash-sfu')),
    el('h2', {}, 'Messages per hour, last 24 hours'),
    el('div', { class: 'bars', 'data-test': 'hourly' },
      d.messages_per_hour.map((h) => el('div', { class: 'bar', title: `${when(h.hour_ts)}: ${h.messages}`, style: null, 'data-height': Math.round((h.messages / max) * 100) }))),
    d.federation.failing_destinations.length ? el('p', {}, `Failing: ${d.federation.failing_destinations.join(', ')}`) : null,
    el('h2', {}, 'Last 14 days'),
    table(['Day', 'Active users', 'Sent', 'Received', 'Read receipts'],
      stats.daily.slice().reverse().map((x) => [x.date, x.active_users, x.messages_sent, x.messages_received, x.read_receipts]), 'daily'),
    el('h2', {}, 'Busiest rooms'),
    table(['Room', 'Messages'], stats.rooms.map((r) => [el('a', { href: `#/rooms/${enc(r.room_id)}` }, r.room_id), r.messages])),
    el('h2', {}, 'Registration cohorts'),
    table(['Registered on', 'Users', 'Back after 1 day', '7 days', '30 days'],
      stats.cohorts.map((c) => [c.date, c.registered, c.active_day_1 ?? '—', c.active_day_7 ?? '—', c.active_day_30 ?? '—'])));
  // Bar heights through the CSSOM (allowed by the style policy, unlike style attributes).
  document.querySelectorAll('.bar').forEach((bar) => { bar.style.height = `${bar.dataset.height}%`; });
  refresh = setTimeout(() => { if (location.hash === '#/dashboard') route(); }, 5000);
}

async function usersPage(params) {
  const name = params.get('name') || '';
  const from = Number(params.get('from') || 0);
  const query = new URLSearchParams({ from, limit: 50, deactivated: 'true', locked: 'true' });
  if (name) query.set('name', name);
  const list = await api('GET', `${SYN}/v2/users?${query}`);
  const search = el('input', { id: 'user-search', name: 'name', value: name, placeholder: 'name or display name' });
  const newName = el('input', { id: 'new-user-name', placeholder: 'new user name' });
  const newPassword = el('input', { id: 'new-user-password', type: 'password', placeholder: 'password' });
  show(
    el('h1', {}, 'Users'),
    el('form', { onsubmit: (e) => { e.preventDefault(); location.hash = `#/users?name=${enc(search.value)}`; } },
      search, el('button', { type: 'submit', id: 'user-search-go' }, 'Find')),
    table(['User', 'Display name', 'State', 'Created', 'Last seen'],
      list.users.map((u) => [
        el('a', { href: `#/users/${enc(u.name)}`, 'data-user': u.name }, u.name),
        u.displayname || '',
        flags([['admin', u.admin], ['bot', u.user_type === 'bot'], ['guest', u.is_guest], ['deactivated', u.deactivated, true], ['locked', u.locked, true], ['suspended', u.suspended, true], ['shadow-banned', u.shadow_banned, true], ['erased', u.erased, true]]),
        when(u.creation_ts), when(u.last_seen_ts)]), 'users'),
    el('p', { class: 'muted' }, `${list.total} users`),
    list.next_token ? el('a', { href: `#/users?name=${enc(name)}&from=${list.next_token}` }, 'Next page') : null,
    el('h2', {}, 'Create a user'),
    el('form', {
      onsubmit: (e) => {
        e.preventDefault();
        const id = newName.value.startsWith('@') ? newName.value : `@${newName.value}:${serverName}`;
        act('Create user', () => api('PUT', `${SYN}/v2/users/${enc(id)}`, { password: newPassword.value }));
      },
    }, newName, newPassword, el('button', { type: 'submit' }, 'Create')));
}

async function userPage(id) {
  const user = await api('GET', `${SYN}/v2/users/${enc(id)}`);
  const [devices, rooms] = await Promise.all([
    api('GET', `${SYN}/v2/users/${enc(id)}/devices`).catch(() => ({ devices: [] })),
    api('GET', `${SYN}/v1/users/${enc(id)}/joined_rooms`).catch(() => ({ joined_rooms: [] })),
  ]);
  const erase = el('input', { type: 'checkbox', id: 'deactivate-erase' });
  const confirmDeactivate = el('button', {
    type: 'button', class: 'danger', id: 'deactivate-confirm', hidden: true,
    onclick: () => act('Deactivate', () => api('POST', `${SYN}/v1/deactivate/${enc(id)}`, { erase: erase.checked })),
  }, 'Yes, deactivate this account');
  const password = el('input', { type: 'password', id: 'reset-password', placeholder: 'new password' });
  const notice = el('input', { id: 'user-notice', placeholder: 'message' });
  const toggle = (label, path, on, body) => el('button', {
    type: 'button', class: 'secondary',
    onclick: () => act(label, () => api(body === undefined ? (on ? 'DELETE' : 'POST') : 'PUT', path, body)),
  }, label);
  show(
    el('h1', {}, user.name),
    el('p', {}, flags([['admin', user.admin], ['deactivated', user.deactivated, true], ['locked', user.locked, true], ['suspended', user.suspended, true], ['shadow-banned', user.shadow_banned, true], ['erased', user.erased, true]])),
    table(['', ''], [
      ['Display name', user.displayname || ''], ['Created', when(user.creation_ts)], ['Last seen', when(user.last_seen_ts)],
      ['Email', user.threepids.map((t) => t.address).join(', ')], ['Application service', user.appservice_id || '']], 'user-details'),
    el('h2', {}, 'Actions'),
    user.deactivated ? el('p', { id: 'user-deactivated' }, 'This account is deactivated.') : el('div', { class: 'row' },
      el('button', { type: 'button', class: 'danger', id: 'deactivate', onclick: () => { confirmDeactivate.hidden = false; } }, 'Deactivate'),
      el('label', {}, erase, ' also erase'), confirmDeactivate),
    el('div', { class: 'row' },
      toggle(user.locked ? 'Unlock' : 'Lock', `${SYN}/v2/users/${enc(id)}`, user.locked, { locked: !user.locked }),
      toggle(user.suspended ? 'Unsuspend' : 'Suspend', `${SYN}/v1/suspend/${enc(id)}`, user.suspended, { suspend: !user.suspended }),
      toggle(user.shadow_banned ? 'Lift shadow ban' : 'Shadow-ban', `${SYN}/v1/users/${enc(id)}/shadow_ban`, user.shadow_banned),
      toggle(user.admin ? 'Remove admin' : 'Make admin', `${SYN}/v1/users/${enc(id)}/admin`, user.admin, { admin: !user.admin })),
    el('form', { onsubmit: (e) => { e.preventDefault(); act('Reset password', () => api('POST', `${SYN}/v1/reset_password/${enc(id)}`, { new_password: password.value })); } },
      password, el('button', { type: 'submit' }, 'Reset password')),
    el('form', { onsubmit: (e) => { e.preventDefault(); act('Server notice', () => api('POST', `${SYN}/v1/send_server_notice`, { user_id: id, content: { msgtype: 'm.text', body: notice.value } })); } },
      notice, el('button', { type: 'submit' }, 'Send server notice')),
    el('h2', {}, 'Devices'),
    table(['Device', 'Name', 'Last seen', 'Address', ''], devices.devices.map((d) => [d.device_id, d.display_name || '', when(d.last_seen_ts), d.last_seen_ip || '',
      el('button', { type: 'button', class: 'secondary', onclick: () => act('Delete device', () => api('DELETE', `${SYN}/v2/users/${enc(id)}/devices/${enc(d.device_id)}`, {})) }, 'Sign out')])),
    el('h2', {}, 'Rooms'),
    table(['Room'], rooms.joined_rooms.map((r) => [el('a', { href: `#/rooms/${enc(r)}` }, r)])));
}

async function roomsPage(params) {
  const term = params.get('q') || '';
  const query = new URLSearchParams({ limit: 100, order_by: 'joined_members' });
  if (term) query.set('search_term', term);
  const list = await api('GET', `${SYN}/v1/rooms?${query}`);
  const search = el('input', { id: 'room-search', value: term, placeholder: 'name, alias or id' });
  show(
    el('h1', {}, 'Rooms'),
    el('form', { onsubmit: (e) => { e.preventDefault(); location.hash = `#/rooms?q=${enc(search.value)}`; } }, search, el('button', { type: 'submit' }, 'Find')),
    table(['Room', 'Alias', 'Members', 'Local', 'State'], list.rooms.map((r) => [
      el('a', { href: `#/rooms/${enc(r.room_id)}` }, r.name || r.room_id), r.canonical_alias || '', r.joined_members, r.joined_local_members,
      flags([['public', r.public], ['encrypted', !!r.encryption], ['space', r.room_type === 'm.space']])]), 'rooms'),
    el('p', { class: 'muted' }, `${list.total_rooms} rooms`));
}

function eventText(e) {
  const c = e.content || {};
  if (e.type === 'm.room.message') return c.body || '';
  if (e.type === 'm.room.member') return `${e.state_key} ${c.membership}`;
  return Object.keys(c).length ? JSON.stringify(c) : '(redacted)';
}

async function roomPage(id) {
  const room = await api('GET', `${SYN}/v1/rooms/${enc(id)}`);
  const members = await api('GET', `${SYN}/v1/rooms/${enc(id)}/members`);
  let recent = null;
  if (!room.encryption) {
    const messages = await api('GET', `${SYN}/v1/rooms/${enc(id)}/messages?dir=b&limit=30`);
    recent = table(['Time', 'Sender', 'Type', 'Content'], messages.chunk.map((e) => [when(e.origin_server_ts), e.sender, e.type, eventText(e)]), 'room-messages');
  }
  const purge = el('input', { type: 'checkbox', id: 'room-purge' });
  show(
    el('h1', {}, room.name || room.room_id),
    table(['', ''], [['Id', room.room_id], ['Alias', room.canonical_alias || ''], ['Topic', room.topic || ''], ['Version', room.version], ['Creator', room.creator || ''],
      ['Members', `${room.joined_members} (${room.joined_local_members} here)`], ['Join rule', room.join_rules || ''], ['History', room.history_visibility || ''],
      ['State', flags([['public', room.public], ['encrypted', !!room.encryption], ['blocked', room.blocked, true], ['tombstoned', room.tombstoned, true]])]], 'room-details'),
    el('h2', {}, 'Actions'),
    el('div', { class: 'row' },
      el('button', { type: 'button', class: 'secondary', onclick: () => act(room.blocked ? 'Unblock' : 'Block', () => api('PUT', `${SYN}/v1/rooms/${enc(id)}/block`, { block: !room.blocked })) }, room.blocked ? 'Unblock' : 'Block'),
      el('button', { type: 'button', class: 'danger', id: 'room-delete', onclick: () => act('Shut down', () => api('DELETE', `${SYN}/v1/rooms/${enc(id)}`, { block: true, purge: purge.checked })) }, 'Shut down and block'),
      el('label', {}, purge, ' and purge: delete everything stored of the room (cannot be undone)')),
    el('h2', {}, 'Recent messages'),
    recent || el('p', { class: 'muted' }, 'This room is encrypted: its messages cannot be shown.'),
    el('h2', {}, 'Members'),
    table(['User'], members.members.map((m) => [m])));
}

async function reportsPage(params) {
  const status = params.get('status') || 'open';
  const query = new URLSearchParams({ limit: 100 });
  if (status !== 'all') query.set('status', status);
  const list = await api('GET', `${SYN}/v1/event_reports?${query}`);
  const me = (await api('GET', '/_matrix/client/v3/account/whoami')).user_id;
  const pick = el('select', { id: 'report-status', onchange: () => { location.hash = `#/reports?status=${pick.value}`; } },
    ['open', 'assigned', 'resolved', 'all'].map((s) => el('option', { value: s, selected: s === status }, s)));
  const rows = list.event_reports.map((r) => {
    const note = el('input', { placeholder: 'note', 'data-note': r.id });
    const triage = (label, body) => el('button', { type: 'button', class: 'secondary', 'data-report': r.id, 'data-action': label,
      onclick: () => act(`Report ${r.id}`, () => api('PUT', `${TRL}/reports/${r.id}`, Object.assign({ note: note.value || undefined }, body))) }, label);
    return [r.id, when(r.received_ts), r.user_id,
      r.target_user_id ? `user ${r.target_user_id}` : el('span', {}, r.name || r.room_id || '', r.event_id ? el('div', { class: 'muted' }, `event from ${r.sender || '?'}`) : null),
      r.reason || '', el('span', { 'data-report-status': r.id }, r.status), r.assignee || '',
      el('div', {}, (r.notes || []).map((n) => el('div', { class: 'muted' }, `${n.author}: ${n.text}`)), note,
        el('div', { class: 'row' }, triage('assign to me', { assignee: me }), triage('resolve', { status: 'resolved' }), triage('reopen', { status: 'open' }),
          el('button', { type: 'button', class: 'danger', onclick: () => act(`Delete report ${r.id}`, () => api('DELETE', `${SYN}/v1/event_reports/${r.id}`)) }, 'delete')))];
  });
  show(el('h1', {}, 'Reports'), el('div', { class: 'row' }, el('label', { for: 'report-status' }, 'Show'), pick),
    table(['#', 'Received', 'By', 'About', 'Reason', 'Status', 'Assignee', 'Handling'], rows, 'reports'),
    el('p', { class: 'muted' }, `${list.total} reports`));
}

async function mediaPage(params) {
  const user = params.get('user') || '';
  const stats = await api('GET', `${SYN}/v1/statistics/users/media?order_by=media_length&dir=b&limit=50`);
  const input = el('input', { id: 'media-user', value: user, placeholder: '@user:server' });
  let items = null;
  if (user) {
    const media = await api('GET', `${SYN}/v1/users/${enc(user)}/media?limit=100`);
    const server = user.split(':').slice(1).join(':');
    items = table(['Id', 'Name', 'Type', 'Size', 'Uploaded', 'State', ''], media.media.map((m) => [m.media_id, m.upload_name || '', m.media_type || '', bytes(m.media_length), when(m.created_ts),
      flags([['quarantined', !!m.quarantined_by, true], ['protected', m.safe_from_quarantine]]),
      el('div', { class: 'row' },
        el('button', { type: 'button', class: 'secondary', onclick: () => act('Quarantine', () => api('POST', `${SYN}/v1/media/${m.quarantined_by ? 'unquarantine' : 'quarantine'}/${enc(server)}/${enc(m.media_id)}`, {})) }, m.quarantined_by ? 'release' : 'quarantine'),
        el('button', { type: 'button', class: 'secondary', onclick: () => act('Protect', () => api('POST', `${SYN}/v1/media/${m.safe_from_quarantine ? 'unprotect' : 'protect'}/${enc(m.media_id)}`, {})) }, m.safe_from_quarantine ? 'unprotect' : 'protect'),
        el('button', { type: 'button', class: 'danger', onclick: () => act('Delete media', () => api('DELETE', `${SYN}/v1/media/${enc(server)}/${enc(m.media_id)}`)) }, 'delete'))]), 'media');
  }
  show(el('h1', {}, 'Media'),
    el('form', { onsubmit: (e) => { e.preventDefault(); location.hash = `#/media?user=${enc(input.value)}`; } }, input, el('button', { type: 'submit' }, 'Show uploads')),
    items,
    el('h2', {}, 'Who stores most'),
    table(['User', 'Files', 'Size'], stats.users.map((u) => [el('a', { href: `#/media?user=${enc(u.user_id)}` }, u.user_id), u.media_count, bytes(u.media_length)])));
}

async function tokensPage() {
  const list = await api('GET', `${SYN}/v1/registration_tokens`);
  const uses = el('input', { id: 'token-uses', type: 'number', min: 1, placeholder: 'uses (empty: unlimited)' });
  show(el('h1', {}, 'Registration tokens'),
    el('form', { onsubmit: (e) => { e.preventDefault(); act('New token', () => api('POST', `${SYN}/v1/registration_tokens/new`, uses.value ? { uses_allowed: Number(uses.value) } : {})); } },
      uses, el('button', { type: 'submit', id: 'token-create' }, 'Create token')),
    table(['Token', 'Uses allowed', 'Pending', 'Completed', 'Expires', ''], list.registration_tokens.map((t) => [t.token, t.uses_allowed ?? '∞', t.pending, t.completed, when(t.expiry_time),
      el('button', { type: 'button', class: 'danger', onclick: () => act('Delete token', () => api('DELETE', `${SYN}/v1/registration_tokens/${enc(t.token)}`)) }, 'delete')]), 'tokens'));
}

async function auditPage(params) {
  const query = new URLSearchParams({ limit: 100 });
  for (const key of ['actor', 'action', 'target', 'from']) if (params.get(key)) query.set(key, params.get(key));
  const list = await api('GET', `${TRL}/audit?${query}`);
  const inputs = ['actor', 'action', 'target'].map((key) => el('input', { id: `audit-${key}`, name: key, value: params.get(key) || '', placeholder: key }));
  show(el('h1', {}, 'Audit log'),
    el('form', { onsubmit: (e) => { e.preventDefault(); const q = new URLSearchParams(); inputs.forEach((i) => { if (i.value) q.set(i.name, i.value); }); location.hash = `#/audit?${q}`; } },
      inputs, el('button', { type: 'submit', id: 'audit-filter' }, 'Filter')),
    table(['Time', 'Actor', 'Action', 'Detail', 'Outcome', 'Address'], list.entries.map((e) => [when(e.ts), e.actor || '', e.action, e.detail || '', e.outcome, e.client_ip || '']), 'audit'),
    list.next_token ? el('a', { href: `#/audit?${new URLSearchParams(Object.assign(Object.fromEntries(query), { from: list.next_token }))}` }, 'Older') : null);
}

async function callsPage(params) {
  const from = Number(params.get('from') || 0);
  const list = await api('GET', `${TRL}/calls?${new URLSearchParams({ from, limit: 50 })}`);
  const minutes = (ms) => (ms == null ? '—' : `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`);
  show(el('h1', {}, `Calls (${list.total})`),
    table(['Started', 'Room', 'Kind', 'Caller', 'Participants', 'State', 'Duration', 'Ended by', 'Media (built-in SFU)'],
      list.calls.map((c) => [when(c.started_ts), el('a', { href: `#/rooms/${enc(c.room_id)}` }, c.room_id),
        `${c.type}${c.video ? ', video' : ''}`, c.caller, c.participants.join(', '), c.state, minutes(c.duration_ms), c.end_reason || '',
        c.media ? `${c.media.peak_participants} at most, ${(c.media.forwarded_bytes / 1e6).toFixed(1)} MB forwarded` : '']), 'calls'),
    list.next_token != null ? el('a', { href: `#/calls?from=${list.next_token}` }, 'Older') : null);
}

function noticesPage() {
  const user = el('input', { id: 'notice-user', placeholder: '@user:server', required: true });
  const body = el('textarea', { id: 'notice-body', required: true });
  show(el('h1', {}, 'Server notices'),
    el('p', { class: 'muted' }, 'A notice arrives in a room of the user\'s own, from the server, where the user cannot reply.'),
    el('form', { onsubmit: (e) => { e.preventDefault(); act('Server notice', () => api('POST', `${SYN}/v1/send_server_notice`, { user_id: user.value, content: { msgtype: 'm.text', body: body.value } }), async () => {}); } },
      user, body, el('button', { type: 'submit', id: 'notice-send' }, 'Send')));
}

async function route() {
  clearTimeout(refresh);
  if (!token) { loginPage(); return; }
  document.getElementById('nav').hidden = false;
  const hash = location.hash || '#/dashboard';
  const [path, query] = hash.slice(1).split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.getAttribute('href') === `#/${parts[0]}`));
  try {
    switch (parts[0]) {
      case 'users': await (parts[1] ? userPage(parts[1]) : usersPage(params)); break;
      case 'rooms': await (parts[1] ? roomPage(parts[1]) : roomsPage(params)); break;
      case 'reports': await reportsPage(params); break;
      case 'media': await mediaPage(params); break;
      case 'tokens': await tokensPage(); break;
      case 'audit': await auditPage(params); break;
      case 'calls': await callsPage(params); break;
      case 'notices': noticesPage(); break;
      default: await dashboardPage();
    }
  } catch (e) {
    if (!token) loginPage(e.message); else flash(e.message, 'error');
  }
}

document.getElementById('logout').addEventListener('click', async () => {
  try { await api('POST', '/_matrix/client/v3/logout', {}); } catch (e) { /* the session is gone either way */ }
  forget();
  location.hash = '';
  loginPage('Logged out.');
});
window.addEventListener('hashchange', () => { flash(''); route(); });
route();
