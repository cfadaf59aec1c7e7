//! Search: fills rooms with `messages` messages of made-up words whose frequencies fall
//! off as in natural text (a few very common words, a long tail of rare ones), waits
//! until a last message is found (how far indexing trails sending), then times
//! `POST /search` for common words, rare words, two-word searches and a prefix.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Api, Common, ServerProbe, per_second,
    rooms::{send_load, shared_room},
    round2, summary,
};

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent senders while filling the rooms.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages to index.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Rooms the messages are spread over (the searching user is in all of them).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Distinct words the messages are made of.
    #[arg(long, default_value_t = 50_000)]
    pub vocabulary: u64,
    /// Searches timed per kind of search (0: only fill, for a baseline of sending
    /// without an index).
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// The server's data directory, when it runs here: the index's size on disk is
    /// reported (its `search` directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// A made-up word for rank `i` (0 the most common): syllables spelling `i` in base 16,
/// so every word is distinct and looks like a word to a word splitter.
fn word(i: u64) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "ze", "bo", "du", "fa", "gi", "ho",
        "je",
    ];
    let mut out = String::from("w");
    let mut n = i;
    loop {
        out.push_str(SYLLABLES[(n % 16) as usize]);
        n /= 16;
        if n == 0 {
            return out;
        }
    }
}

/// A 64-bit mix (splitmix64): message texts are reproducible without a generator to
/// share between sending tasks.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Message `k`: 6 to 15 words, word ranks drawn log-uniformly over the vocabulary
/// (rank r about as frequent as 1/r, as in Zipf's law).
fn text(k: u64, vocabulary: u64) -> String {
    let mut state = mix(k);
    let count = 6 + state % 10;
    let mut words = Vec::with_capacity(count as usize);
    for _ in 0..count {
        state = mix(state);
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let rank = ((vocabulary as f64).powf(u) as u64).saturating_sub(1).min(vocabulary - 1);
        words.push(word(rank));
    }
    words.join(" ")
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub async fn search(args: SearchArgs) -> Result<Value, String> {
    let vocabulary = args.vocabulary.max(100);
    let api = Api::new(&args.common, args.senders)?;
    let prefix = format!("bench_search_{}", std::process::id());
    let tokens = api.register_many(&prefix, args.senders.max(1)).await?;
    let searcher = tokens[0].clone();
    let mut rooms = Vec::new();
    for _ in 0..args.rooms.max(1) {
        rooms.push(shared_room(&api, &tokens).await?);
    }

    let probe = ServerProbe::start(args.common.server_pid);
    let started = Instant::now();
    let texts: super::rooms::Texts = Arc::new(move |k| text(k, vocabulary));
    let (mut latencies, errors) = send_load(&api, tokens, &rooms, args.messages, 0, texts).await?;
    let send_elapsed = started.elapsed();
    let sent = latencies.len();
    let send_cpu = probe.cpu_ms_per(sent);
    let mut figures = json!({
        "scenario": "search",
        "params": {"senders": args.senders, "messages": args.messages, "rooms": args.rooms,
                   "vocabulary": vocabulary, "queries": args.queries},
        "messages_per_second": per_second(sent, send_elapsed),
        "send_latency": summary(&mut latencies),
        "server_cpu_ms_per_message": send_cpu,
        "errors": errors,
    });
    if args.queries == 0 {
        figures["server"] = probe.report();
        return Ok(figures);
    }

    // Indexing trails sending by at most the time until a last message is found.
    let marker = format!("marker{}", std::process::id());
    api.send_text(&searcher, &rooms[0], &format!("m{marker}"), &marker).await?;
    let sent_marker = Instant::now();
    let lag = loop {
        let found = run_query(&api, &searcher, &marker, "rank").await?;
        if found.1 > 0 {
            break sent_marker.elapsed();
        }
        if sent_marker.elapsed() > Duration::from_secs(600) {
            return Err("the last message was never found".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let indexing_cpu = probe.cpu();

    let mut kinds = serde_json::Map::new();
    let n = args.queries as u64;
    let kinds_of: [(&str, Term, &str); 5] = [
        ("common_word", Box::new(|i| word(i % 5)), "rank"),
        ("common_word_recent", Box::new(|i| word(i % 5)), "recent"),
        (
            "rare_word",
            Box::new(move |i| word(vocabulary - 1 - (i * 7919) % (vocabulary / 4))),
            "rank",
        ),
        ("two_words", Box::new(|i| format!("{} {}", word(i % 20), word(20 + i % 200))), "rank"),
        ("prefix", Box::new(|i| word(100 + i % 100)[..4].to_owned()), "rank"),
    ];
    for (name, query, order) in kinds_of {
        let mut times = Vec::with_capacity(args.queries);
        let mut hits = 0usize;
        for i in 0..n {
            let (elapsed, count) = run_query(&api, &searcher, &query(i), order).await?;
            times.push(elapsed);
            hits += count;
        }
        let mut stats = summary(&mut times);
        stats["mean_results"] = json!(round2(hits as f64 / n.max(1) as f64));
        kinds.insert(name.into(), stats);
    }
    figures["indexing_lag_after_last_send_ms"] = json!(round2(lag.as_secs_f64() * 1000.0));
    figures["server_cpu_seconds_to_index"] = json!(indexing_cpu.map(|c| round2(c.as_secs_f64())));
    figures["search_latency"] = Value::Object(kinds);
    figures["index_disk_mb"] =
        json!(args.data_dir.map(|d| { round2(dir_size(&d.join("search")) as f64 / 1_048_576.0) }));
    figures["server"] = probe.report();
    Ok(figures)
}

/// The search term of query `i` of one kind.
type Term = Box<dyn Fn(u64) -> String>;

/// One search; answers its time and how many results came back.
async fn run_query(
    api: &Api,
    token: &str,
    term: &str,
    order: &str,
) -> Result<(Duration, usize), String> {
    let body = json!({"search_categories": {"room_events": {
        "search_term": term, "order_by": order, "filter": {"limit": 10}}}});
    let started = Instant::now();
    let answer = api.call(Method::POST, "/_matrix/client/v3/search", token, Some(&body)).await?;
    let elapsed = started.elapsed();
    let results =
        answer["search_categories"]["room_events"]["results"].as_array().map_or(0, Vec::len);
    Ok((elapsed, results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_texts_are_reproducible_and_skewed() {
        assert_eq!(text(7, 1000), text(7, 1000));
        assert_ne!(word(1), word(16));
        let mut common = 0;
        for k in 0..1000 {
            common += text(k, 50_000).split(' ').filter(|w| *w == word(0)).count();
        }
        assert!(common > 300, "the commonest word is common: {common}");
    }
}
