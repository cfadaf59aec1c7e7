use super::*;

fn entry(n: u64, room: &str, text: &str) -> Entry {
    Entry {
        event_id: format!("$e{n}"),
        room_id: room.to_owned(),
        sender: "@a:x".to_owned(),
        key: Key::Body,
        text: text.to_owned(),
        origin_server_ts: 1000 * n as i64,
        position: n,
        has: Vec::new(),
        language: Language::ENGLISH,
    }
}

fn done(up_to: u64) -> Progress {
    Progress { up_to, indexed_to: up_to, catching_up: None }
}

fn query(terms: &str) -> Query {
    Query {
        terms: terms.to_owned(),
        keys: Vec::new(),
        rooms: vec!["!r:x".to_owned(), "!s:x".to_owned()],
        senders: Vec::new(),
        not_senders: Vec::new(),
        contains_url: None,
        has: Vec::new(),
        since: None,
        until: None,
        order_by: OrderBy::Recent,
        before_position: None,
        offset: 0,
        limit: 10,
    }
}

fn ids(index: &SearchIndex, q: &Query) -> Vec<String> {
    index.search(q).unwrap().hits.into_iter().map(|h| h.event_id).collect()
}

#[test]
fn finds_stems_prefixes_and_folded_words_and_forgets_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[Language::ENGLISH]).unwrap();
    assert_eq!(index.progress(), None);
    index.put(&entry(1, "!r:x", "The meetings are in the Café")).unwrap();
    index.put(&entry(2, "!r:x", "nothing to see")).unwrap();
    index.put(&entry(3, "!s:x", "meeting tomorrow")).unwrap();
    index.put(&entry(4, "!t:x", "meeting elsewhere")).unwrap();
    index.commit(done(4)).unwrap();
    // Rooms holding most of the index are not filtered in it: the caller checks every
    // hit's room.
    assert_eq!(ids(&index, &query("meeting")), ["$e4", "$e3", "$e1"]);
    assert_eq!(ids(&index, &query("cafe")), ["$e1"]);
    assert_eq!(ids(&index, &query("tomo")), ["$e3"], "the last word is a prefix");
    assert_eq!(ids(&index, &query("meeting tomorrow")), ["$e3"], "every word must match");
    let mut by_room = query("meeting");
    by_room.rooms = vec!["!s:x".to_owned()];
    assert_eq!(
        ids(&index, &by_room),
        ["$e3"],
        "a room with a small part of the index is filtered in it"
    );

    index.remove(3).unwrap();
    let mut edited = entry(1, "!r:x", "lunch instead");
    edited.position = 1;
    index.replace(&edited).unwrap();
    index.commit(done(5)).unwrap();
    assert_eq!(ids(&index, &query("meeting")), ["$e4"]);
    assert_eq!(ids(&index, &query("lunch")), ["$e1"]);
    assert_eq!(index.progress(), Some(done(5)));

    // Reopened, it remembers how far it got.
    drop(index);
    let index = SearchIndex::open(dir.path(), &[Language::ENGLISH]).unwrap();
    assert_eq!(index.progress(), Some(done(5)));
    assert_eq!(ids(&index, &query("lunch")), ["$e1"]);
}

#[test]
fn filters_order_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[Language::ENGLISH]).unwrap();
    for n in 1..=5 {
        let mut e = entry(n, "!r:x", &format!("report number {n}"));
        if n % 2 == 0 {
            e.has = vec![Has::Url, Has::File];
            e.sender = "@b:x".to_owned();
        }
        index.put(&e).unwrap();
    }
    index.commit(done(5)).unwrap();
    let mut q = query("report");
    q.limit = 2;
    let page = index.search(&q).unwrap();
    assert_eq!(page.count, 5);
    assert_eq!(page.hits.iter().map(|h| h.position).collect::<Vec<_>>(), [5, 4]);
    q.before_position = Some(4);
    assert_eq!(ids(&index, &q), ["$e3", "$e2"]);
    let mut files = query("report");
    files.has = vec![Has::File];
    assert_eq!(ids(&index, &files), ["$e4", "$e2"]);
    files.has.clear();
    files.contains_url = Some(false);
    files.not_senders = vec!["@nobody:x".to_owned()];
    assert_eq!(ids(&index, &files), ["$e5", "$e3", "$e1"]);
    let mut dates = query("report");
    dates.since = Some(2000);
    dates.until = Some(4000);
    assert_eq!(ids(&index, &dates), ["$e3", "$e2"]);
    let mut ranked = query("number 3");
    ranked.order_by = OrderBy::Rank;
    assert_eq!(ids(&index, &ranked), ["$e3"]);
    assert_eq!(
        index.highlights("Reports", "Report number 3 in REPORTS", Language::ENGLISH),
        ["Report", "REPORTS"]
    );
}

#[test]
fn removal_and_replacement_hit_only_their_own_position() {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[]).unwrap();
    // Several blocks of positions, over several segments.
    for n in 0..5000u64 {
        index.put(&entry(n, "!r:x", "common")).unwrap();
        if n % 1500 == 0 {
            index.commit(done(n)).unwrap();
        }
    }
    index.commit(done(5000)).unwrap();
    for gone in [0, 1023, 1024, 2048, 4999] {
        index.remove(gone).unwrap();
    }
    index.replace(&entry(1025, "!r:x", "rare")).unwrap();
    // Removing what is not there removes nothing.
    index.remove(9_999_999).unwrap();
    index.commit(done(5001)).unwrap();
    let mut all = query("common");
    all.limit = 10_000;
    let found: std::collections::BTreeSet<u64> =
        index.search(&all).unwrap().hits.into_iter().map(|h| h.position).collect();
    assert_eq!(found.len(), 5000 - 6);
    for absent in [0, 1023, 1024, 1025, 2048, 4999] {
        assert!(!found.contains(&absent), "{absent} should be gone");
    }
    assert!(found.contains(&1) && found.contains(&1022) && found.contains(&4998));
    assert_eq!(ids(&index, &query("rare")), ["$e1025"]);
}

#[test]
fn a_purged_room_leaves_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[]).unwrap();
    index.put(&entry(1, "!r:x", "hello")).unwrap();
    index.put(&entry(2, "!s:x", "hello")).unwrap();
    index.commit(done(2)).unwrap();
    index.remove_room("!s:x");
    index.put(&entry(3, "!s:x", "hello again")).unwrap();
    index.commit(done(3)).unwrap();
    assert_eq!(ids(&index, &query("hello")), ["$e3", "$e1"]);
}

#[test]
fn a_corrupt_index_is_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meta.json"), b"{ not json").unwrap();
    let index = SearchIndex::open(dir.path(), &[]).unwrap();
    assert_eq!(index.progress(), None);
    index.put(&entry(1, "!r:x", "hello")).unwrap();
    index.commit(done(1)).unwrap();
    assert_eq!(ids(&index, &query("hello")), ["$e1"]);
}

#[test]
fn a_catch_up_part_way_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[]).unwrap();
    let catching_up = Some(CatchUp { target: 90, rooms_done: 7 });
    let part_way = Progress { up_to: 3, indexed_to: 5, catching_up };
    index.commit(part_way).unwrap();
    drop(index);
    assert_eq!(SearchIndex::open(dir.path(), &[]).unwrap().progress(), Some(part_way));
}

/// `n` made-up messages of ten words each, for the measurements below.
fn made_up_texts(n: u64) -> Vec<String> {
    (0..n)
        .map(|k| {
            (0..10)
                .map(|i| format!("w{}x{}", (k * 31 + i * 7) % 5000, i))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Indexes `texts` into a fresh index with a commit every `every` documents, under
/// `policy` (tantivy's default when `None`); answers the number of segments left.
fn index_all(
    texts: &[String],
    every: usize,
    policy: Option<tantivy::indexer::LogMergePolicy>,
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let index = SearchIndex::open(dir.path(), &[Language::ENGLISH]).unwrap();
    if let Some(policy) = policy {
        index.set_merge_policy(Box::new(policy));
    }
    for (n, text) in texts.iter().enumerate() {
        index.put(&entry(n as u64, "!r:x", text)).unwrap();
        if n % every == every - 1 {
            index.commit(done(n as u64)).unwrap();
        }
    }
    index.commit(done(texts.len() as u64)).unwrap();
    drop(index);
    let segments = std::fs::read_dir(dir.path()).unwrap().flatten();
    segments.filter(|e| e.path().extension().is_some_and(|x| x == "idx")).count()
}

/// Where indexing time goes, on the calling thread (run by hand: `-- --ignored
/// --nocapture`).
#[test]
#[ignore]
fn indexing_cost_by_part() {
    let texts = made_up_texts(100_000);
    let mut a = analysis::Analyzers::new(&[Language::ENGLISH]);
    let t = std::time::Instant::now();
    for text in &texts {
        a.words(text, Some(Language::ENGLISH));
    }
    println!("analysis: {:?} per 100k", t.elapsed());
    for every in [1000, 3500, 10_000, 50_000] {
        let t = std::time::Instant::now();
        index_all(&texts, every, None);
        println!("put + commit every {every}: {:?} per 100k", t.elapsed());
    }
}

fn process_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 10
}

/// CPU of indexing under merge policies, merge threads included (run by hand).
#[test]
#[ignore]
fn indexing_cpu_by_merge_policy() {
    let texts = made_up_texts(300_000);
    for variant in 0..3 {
        let mut policy = tantivy::indexer::LogMergePolicy::default();
        match variant {
            1 => policy.set_min_num_segments(16),
            2 => policy.set_min_layer_size(50_000),
            _ => {}
        }
        let before = process_cpu_ms();
        let segments = index_all(&texts, 9000, Some(policy));
        let cpu = process_cpu_ms() - before;
        println!("variant {variant}: {cpu} ms CPU per 300k, {segments} segments");
    }
}
