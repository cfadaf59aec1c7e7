//! Criterion benchmarks of the hot micro-paths: building a PDU (canonical JSON, content
//! hash, signature, reference hash) and verifying one, the event authorization checks,
//! state resolution of a forked DAG, key codec round trips, and a store batch write.
//!
//! `cargo bench -p trellis-service --bench hot_paths` (a filter after `--` picks some).
//! Figures are in docs/performance.md.

use std::{collections::HashMap, hint::black_box, time::Duration};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ruma::{
    EventId, OwnedEventId, RoomVersionId, ServerName, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    serde::Base64,
    state_res::{
        StateMap, auth_types_for_event, check_state_dependent_auth_rules,
        check_state_independent_auth_rules,
    },
};
use serde_json::{Value, json};
use trellis_core::config::StorageConfig;
use trellis_service::{
    ServerKeys,
    rooms::{EventRef, Pdu, PduTemplate, build_pdu, resolve::resolve_states},
};
use trellis_store::{Batch, KeyCodec, catalog};

const SERVER: &str = "bench.example";
const ALICE: &str = "@alice:bench.example";
const BOB: &str = "@bob:bench.example";
const CAROL: &str = "@carol:bench.example";

/// The state after a branch's newest event, and that event.
#[derive(Clone, Default)]
struct Branch {
    state: StateMap<OwnedEventId>,
    tip: Vec<OwnedEventId>,
}

/// A room built event by event with real hashes and signatures, each event authorized
/// against its branch's state before it is added.
struct Room {
    _dir: tempfile::TempDir,
    keys: ServerKeys,
    version: RoomVersionId,
    rules: RoomVersionRules,
    room_id: String,
    events: HashMap<OwnedEventId, Pdu>,
    clock: u64,
}

impl Room {
    fn new(version: RoomVersionId) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys =
            ServerKeys::load_or_generate(&dir.path().join("key"), SERVER, 24).expect("signing key");
        let rules = version.rules().expect("supported room version");
        let room_id = format!("!bench:{SERVER}");
        Self { _dir: dir, keys, version, rules, room_id, events: HashMap::new(), clock: 0 }
    }

    fn fetch(&self) -> impl Fn(&EventId) -> Option<Pdu> + '_ {
        |id: &EventId| self.events.get(id).cloned()
    }

    fn state_fn<'a>(
        &'a self,
        state: &'a StateMap<OwnedEventId>,
    ) -> impl Fn(&StateEventType, &str) -> Option<Pdu> + 'a {
        move |kind: &StateEventType, key: &str| {
            state.get(&(kind.clone(), key.to_owned())).and_then(|id| self.events.get(id).cloned())
        }
    }

    /// The template of an event on `branch`, citing the auth events its state selects.
    fn template(
        &mut self,
        branch: &Branch,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> PduTemplate {
        self.clock += 1;
        let raw = serde_json::value::to_raw_value(&content).expect("content");
        let sender_id = UserId::parse(sender).expect("user id");
        let auth_types = auth_types_for_event(
            &TimelineEventType::from(kind),
            &sender_id,
            state_key,
            &raw,
            &self.rules.authorization,
        )
        .expect("auth types");
        let refs = |ids: &mut dyn Iterator<Item = &OwnedEventId>| {
            ids.map(|id| EventRef { event_id: id.to_string(), sha256: String::new() }).collect()
        };
        let depth = branch.tip.iter().map(|id| self.events[id].depth).max().unwrap_or(0) + 1;
        PduTemplate {
            room_id: Some(self.room_id.clone()),
            sender: sender.into(),
            kind: kind.into(),
            state_key: state_key.map(str::to_owned),
            content,
            redacts: None,
            prev_events: refs(&mut branch.tip.iter()),
            auth_events: refs(&mut auth_types.iter().filter_map(|k| branch.state.get(k))),
            depth,
            origin_server_ts: 1_700_000_000_000 + self.clock,
        }
    }

    fn build(&self, template: PduTemplate) -> Pdu {
        let server = <&ServerName>::try_from(SERVER).expect("server name");
        build_pdu(&self.keys, server, &self.version, template).expect("build").0
    }

    fn send(
        &mut self,
        branch: &mut Branch,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) {
        let template = self.template(branch, sender, kind, state_key, content);
        let pdu = self.build(template);
        check_state_independent_auth_rules(&self.rules.authorization, &pdu, self.fetch())
            .expect("authorized");
        check_state_dependent_auth_rules(
            &self.rules.authorization,
            &pdu,
            self.state_fn(&branch.state),
        )
        .unwrap_or_else(|e| panic!("{kind} by {sender} is not authorized: {e}"));
        let id = pdu.event_id.clone();
        if let Some(key) = state_key {
            branch.state.insert((StateEventType::from(kind), key.to_owned()), id.clone());
        }
        branch.tip = vec![id.clone()];
        self.events.insert(id, pdu);
    }

    fn levels(users: &[(&str, i64)]) -> Value {
        let mut map = serde_json::Map::new();
        map.insert(ALICE.into(), json!(100));
        for (user, level) in users {
            map.insert((*user).into(), json!(level));
        }
        json!({"users": map, "state_default": 50, "ban": 50})
    }

    /// A public room of Alice (creator), Bob (moderator), Carol and `members` others.
    fn public(members: usize) -> (Self, Branch) {
        let mut room = Self::new(RoomVersionId::V11);
        let mut b = Branch::default();
        room.send(&mut b, ALICE, "m.room.create", Some(""), json!({"room_version": "11"}));
        room.send(&mut b, ALICE, "m.room.member", Some(ALICE), json!({"membership": "join"}));
        room.send(&mut b, ALICE, "m.room.power_levels", Some(""), Self::levels(&[(BOB, 50)]));
        room.send(&mut b, ALICE, "m.room.join_rules", Some(""), json!({"join_rule": "public"}));
        for user in [BOB, CAROL] {
            room.send(&mut b, user, "m.room.member", Some(user), json!({"membership": "join"}));
        }
        for i in 0..members {
            let user = format!("@member{i}:{SERVER}");
            room.send(&mut b, &user, "m.room.member", Some(&user), json!({"membership": "join"}));
        }
        (room, b)
    }
}

fn message_content() -> Value {
    json!({"msgtype": "m.text", "body": "A message of ordinary length, about as long as most."})
}

fn pdu(c: &mut Criterion) {
    let (mut room, base) = Room::public(0);
    let template = room.template(&base, CAROL, "m.room.message", None, message_content());
    c.bench_function("pdu/build_hash_sign (v11 message)", |b| {
        b.iter_batched(|| template.clone(), |t| room.build(black_box(t)), BatchSize::SmallInput)
    });
    let event = room.build(template);
    let mut keys = std::collections::BTreeMap::new();
    let public = Base64::parse(room.keys.public_key_base64()).expect("public key");
    keys.insert(
        SERVER.to_owned(),
        std::collections::BTreeMap::from([(room.keys.key_id().to_owned(), public)]),
    );
    c.bench_function("pdu/verify_hashes_and_signature (v11 message)", |b| {
        b.iter(|| ruma::signatures::verify_event(&keys, black_box(&event.json), &room.rules))
    });
}

fn auth(c: &mut Criterion) {
    let (mut room, base) = Room::public(50);
    let template = room.template(&base, CAROL, "m.room.message", None, message_content());
    let message = room.build(template);
    c.bench_function("auth/check (message, 53-member room)", |b| {
        b.iter(|| {
            let rules = &room.rules.authorization;
            check_state_independent_auth_rules(rules, black_box(&message), room.fetch()).and_then(
                |()| check_state_dependent_auth_rules(rules, &message, room.state_fn(&base.state)),
            )
        })
    });
}

fn state_resolution(c: &mut Criterion) {
    // A 53-member room forks: on one branch Alice demotes Bob and renames the room, and
    // 10 people join; on the other Bob promotes Carol, renames the room and sets the topic,
    // and 10 others join. Power events, names and memberships are all in play.
    let (mut room, base) = Room::public(50);
    let (mut a, mut b) = (base.clone(), base);
    room.send(&mut a, ALICE, "m.room.power_levels", Some(""), Room::levels(&[]));
    room.send(&mut a, ALICE, "m.room.name", Some(""), json!({"name": "Alice's"}));
    room.send(
        &mut b,
        BOB,
        "m.room.power_levels",
        Some(""),
        Room::levels(&[(BOB, 50), (CAROL, 50)]),
    );
    room.send(&mut b, BOB, "m.room.name", Some(""), json!({"name": "Bob's"}));
    room.send(&mut b, CAROL, "m.room.topic", Some(""), json!({"topic": "Carol's"}));
    for i in 0..10 {
        for (branch, side) in [(&mut a, "a"), (&mut b, "b")] {
            let user = format!("@joiner_{side}{i}:{SERVER}");
            room.send(branch, &user, "m.room.member", Some(&user), json!({"membership": "join"}));
        }
    }
    let states = [a.state, b.state];
    c.bench_function("state_res/forked DAG (53 members, 2 branches of 12-13 events)", |bench| {
        bench.iter(|| resolve_states(&room.rules, black_box(&states), room.fetch()))
    });
}

fn codecs(c: &mut Criterion) {
    let timeline = (42u64, 1_234_567u64);
    c.bench_function("codec/(u64, u64) round trip", |b| {
        b.iter(|| <(u64, u64)>::from_key(&black_box(&timeline).to_key()))
    });
    let membership =
        ("!abcdefghijklmnop:bench.example".to_owned(), "@member17:bench.example".to_owned());
    c.bench_function("codec/(String, String) round trip", |b| {
        b.iter(|| <(String, String)>::from_key(&black_box(&membership).to_key()))
    });
    let account_data = (
        "@alice:bench.example".to_owned(),
        "!room:bench.example".to_owned(),
        "m.fully_read".to_owned(),
    );
    c.bench_function("codec/(String, String, String) round trip", |b| {
        b.iter(|| <(String, String, String)>::from_key(&black_box(&account_data).to_key()))
    });
}

/// The shape of an event append: the event JSON, its short id both ways, its timeline
/// and membership entries, the transaction id.
fn append_batch(n: u64, event_json: &[u8]) -> Batch {
    let mut batch = Batch::new();
    let event_id = format!("$event{n}abcdefghijklmnopqrstuvwxyz0123456789ab");
    batch.put_raw(&catalog::EVENTS, n.to_key(), event_json.to_vec());
    batch.put_raw(&catalog::SHORT_IDS, event_id.to_key(), n.to_be_bytes().to_vec());
    batch.put_raw(&catalog::SHORT_IDS_REV, n.to_key(), event_id.into_bytes());
    batch.put_raw(&catalog::TIMELINE, (7u64, n).to_key(), n.to_be_bytes().to_vec());
    batch.put_raw(
        &catalog::TXN_IDS,
        (format!("@alice:{SERVER}"), format!("t{n}")).to_key(),
        vec![1],
    );
    batch
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let event = {
        let (mut room, base) = Room::public(0);
        let template = room.template(&base, CAROL, "m.room.message", None, message_content());
        serde_json::to_vec(&*room.build(template).json).expect("json")
    };
    let cfg = StorageConfig { sync_writes: false, ..StorageConfig::default() };
    let db = trellis_store::open(&dir.path().join("db"), &cfg).expect("open store");
    let mut n = 0u64;
    c.bench_function("store/batch write (event append shape, 5 puts, no fsync)", |b| {
        b.iter_batched(
            || {
                n += 1;
                append_batch(n, &event)
            },
            |batch| db.write_unsynced(batch),
            BatchSize::SmallInput,
        )
    });
    let synced = StorageConfig { sync_writes: true, ..StorageConfig::default() };
    let db = trellis_store::open(&dir.path().join("synced"), &synced).expect("open store");
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.bench_function("batch write + WAL fsync (event append shape)", |b| {
        b.iter_batched(
            || {
                n += 1;
                append_batch(n, &event)
            },
            |batch| db.write(batch),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = pdu, auth, state_resolution, codecs, store
}
criterion_main!(hot_paths);
