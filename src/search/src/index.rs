//! The index on disk (a tantivy index in its own directory under data_dir) and the
//! queries `/search` asks of it. One document per searchable event; the event itself
//! stays in RocksDB, so the index holds only what finding and filtering need.

use std::{
    ops::Bound,
    path::{Path, PathBuf},
    sync::Mutex,
};

use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, Searcher, TantivyDocument,
    Term,
    collector::TopDocs,
    query::{
        BooleanQuery, BoostQuery, EmptyQuery, FuzzyTermQuery, Occur, Query as TantivyQuery,
        RangeQuery, TermQuery, TermSetQuery,
    },
    schema::{
        FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
        TextOptions, Value,
    },
};
use trellis_core::{Error, Result};

use crate::analysis::{Analyzers, Language, Word};

/// Bumped when the schema or the analysis changes: an index of another version is
/// rebuilt from the rooms.
const FORMAT: &str = "trellis-search-4";

/// Marks a stem in the words field, beside the words as written: a stem is a term of
/// its own (`\u{1}meet`), so prefixes of plain words never reach stems.
const STEM: char = '\u{1}';

/// A last query word found in at least this many documents is not also expanded as a
/// prefix.
const PREFIX_ONLY_BELOW: u64 = 1000;

/// Documents are grouped by stream position into blocks of `1 << BLOCK_BITS` positions,
/// and a removal looks for its position only among its block's documents: a term of its
/// own for every document made the term dictionary as large as the index, and cost a
/// third of the indexing CPU (building and merging it).
const BLOCK_BITS: u32 = 10;

/// Memory the writer buffers before it flushes a segment.
const WRITER_MEMORY: usize = 16 * 1024 * 1024;

/// Which part of an event a document holds, as `/search`'s `keys` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Body,
    Name,
    Topic,
}

impl Key {
    pub const ALL: [Key; 3] = [Key::Body, Key::Name, Key::Topic];

    pub fn as_str(self) -> &'static str {
        match self {
            Key::Body => "content.body",
            Key::Name => "content.name",
            Key::Topic => "content.topic",
        }
    }

    pub fn parse(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == key)
    }

    /// The event type whose documents hold this key.
    pub fn event_type(self) -> &'static str {
        match self {
            Key::Body => "m.room.message",
            Key::Name => "m.room.name",
            Key::Topic => "m.room.topic",
        }
    }
}

/// What a message carries, for `contains_url` and the `has` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Has {
    /// An `mxc://` URL (the spec's `contains_url`).
    Url,
    File,
    Image,
    Link,
}

impl Has {
    fn as_str(self) -> &'static str {
        match self {
            Has::Url => "url",
            Has::File => "file",
            Has::Image => "image",
            Has::Link => "link",
        }
    }
}

/// How far the index has got: every event up to stream position `up_to` is in, and a
/// catch-up towards `catching_up` may be part-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub up_to: u64,
    /// The highest position indexed as events came (past `up_to` when the last batch
    /// held events beyond the visible position). A catch-up replaces documents up to
    /// here; past it nothing can be indexed yet, so it only adds, which is far cheaper
    /// than replacing.
    pub indexed_to: u64,
    pub catching_up: Option<CatchUp>,
}

/// A catch-up (a first build, or the events a stop left out) goes room by room, in the
/// order of their short ids, to stream position `target`; `rooms_done` is the short id
/// of the last room finished, so a restart resumes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    pub target: u64,
    pub rooms_done: u64,
}

impl Progress {
    fn encode(&self) -> String {
        let (up_to, indexed_to) = (self.up_to, self.indexed_to);
        match self.catching_up {
            None => format!("{FORMAT}:{up_to}:{indexed_to}"),
            Some(c) => format!("{FORMAT}:{up_to}:{indexed_to}:{}:{}", c.target, c.rooms_done),
        }
    }

    fn decode(payload: &str) -> Option<Self> {
        let rest = payload.strip_prefix(FORMAT)?.strip_prefix(':')?;
        let numbers: Vec<u64> = rest.split(':').map(str::parse).collect::<Result<_, _>>().ok()?;
        match numbers[..] {
            [up_to, indexed_to] => Some(Self { up_to, indexed_to, catching_up: None }),
            [up_to, indexed_to, target, rooms_done] => {
                Some(Self { up_to, indexed_to, catching_up: Some(CatchUp { target, rooms_done }) })
            }
            _ => None,
        }
    }
}

/// One searchable event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    /// Which text of the event this is (which also says its type).
    pub key: Key,
    pub text: String,
    pub origin_server_ts: i64,
    pub position: u64,
    pub has: Vec<Has>,
    pub language: Language,
}

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderBy {
    Rank,
    Recent,
}

/// A search, with its filters. Empty lists mean "no restriction".
#[derive(Debug, Clone)]
pub struct Query {
    pub terms: String,
    /// The keys searched (after any `types` filter); empty: all.
    pub keys: Vec<Key>,
    /// The rooms to search; never empty (a user searches the rooms they are in). Hits
    /// may come from other rooms when these hold most of the index: the caller checks.
    pub rooms: Vec<String>,
    pub senders: Vec<String>,
    pub not_senders: Vec<String>,
    pub contains_url: Option<bool>,
    pub has: Vec<Has>,
    /// `origin_server_ts` from (inclusive) and to (exclusive).
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub order_by: OrderBy,
    /// `Recent`: only events at stream positions below this.
    pub before_position: Option<u64>,
    /// `Rank`: hits to skip.
    pub offset: usize,
    pub limit: usize,
}

/// One document found.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub event_id: String,
    pub room_id: String,
    pub position: u64,
    pub score: f32,
}

/// A page of hits and about how many documents match in all.
#[derive(Debug, Clone)]
pub struct Page {
    pub hits: Vec<Hit>,
    pub count: usize,
}

struct Fields {
    event_id: Field,
    room_id: Field,
    sender: Field,
    key: Field,
    has: Field,
    ts: Field,
    position: Field,
    /// `position >> BLOCK_BITS`, the only index of positions.
    block: Field,
    /// The words (lowercased, folded) and their stems ([`STEM`]), without positions
    /// (searches match words, not phrases) or frequencies (a word rarely comes twice in
    /// a message; block-max scores of frequencies were the dearest part of indexing).
    words: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let words = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            // The analysed words arrive space-separated (see `terms_text`).
            .set_tokenizer("whitespace")
            .set_index_option(IndexRecordOption::Basic),
    );
    let fields = Fields {
        // Documents are replaced and removed by stream position (unique per event).
        event_id: b.add_text_field("event_id", STORED),
        room_id: b.add_text_field("room_id", STRING | STORED),
        sender: b.add_text_field("sender", STRING),
        key: b.add_text_field("key", STRING),
        has: b.add_text_field("has", STRING),
        ts: b.add_i64_field("ts", FAST),
        position: b.add_u64_field("position", FAST | STORED),
        block: b.add_u64_field("block", INDEXED),
        words: b.add_text_field("words", words),
    };
    (b.build(), fields)
}

/// The index: written by one indexer, read by any number of searches.
pub struct SearchIndex {
    dir: PathBuf,
    fields: Fields,
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    /// Used by the indexer; searches take copies.
    analyzers: Mutex<Analyzers>,
    /// As last committed; `None` for an index never committed.
    progress: Mutex<Option<Progress>>,
}

fn internal(context: &'static str) -> impl Fn(tantivy::TantivyError) -> Error {
    move |e| Error::internal(context, e)
}

impl SearchIndex {
    /// Opens the index in `dir`, or creates it; an index that cannot be opened or was
    /// written by another format is removed and started afresh (it is rebuilt from the
    /// rooms, which are the truth), with a warning.
    pub fn open(dir: &Path, languages: &[Language]) -> Result<Self> {
        match Self::try_open(dir, languages) {
            Ok(index) => Ok(index),
            // Another process holds it: nothing to rebuild, and nothing to delete.
            Err(reason) if reason.contains("LockBusy") || reason.contains("Failed to acquire") => {
                Err(Error::internal(
                    "opening the search index (is another Trellis using it?)",
                    reason,
                ))
            }
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "the search index is unusable; rebuilding it");
                std::fs::remove_dir_all(dir)
                    .or_else(|e| if dir.exists() { Err(e) } else { Ok(()) })
                    .map_err(|e| Error::internal("removing the search index", e))?;
                Self::try_open(dir, languages)
                    .map_err(|e| Error::internal("creating the search index", e))
            }
        }
    }

    fn try_open(dir: &Path, languages: &[Language]) -> std::result::Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let (schema, fields) = schema();
        let mmap = tantivy::directory::MmapDirectory::open(dir).map_err(|e| e.to_string())?;
        let index = Index::open_or_create(mmap, schema).map_err(|e| e.to_string())?;
        let metas = index.load_metas().map_err(|e| e.to_string())?;
        let progress = match metas.payload.as_deref() {
            None => None,
            Some(payload) => Some(
                Progress::decode(payload)
                    .ok_or_else(|| format!("index format {payload:?}, not {FORMAT}"))?,
            ),
        };
        let writer = index
            .writer_with_num_threads(1, WRITER_MEMORY)
            .map_err(|e| format!("Failed to acquire the index writer: {e:?}"))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e: tantivy::TantivyError| e.to_string())?;
        Ok(Self {
            dir: dir.to_owned(),
            fields,
            writer: Mutex::new(writer),
            reader,
            analyzers: Mutex::new(Analyzers::new(languages)),
            progress: Mutex::new(progress),
        })
    }

    /// How far the index has got; `None` for an index never committed (to be built
    /// from the start).
    pub fn progress(&self) -> Option<Progress> {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[cfg(test)]
    pub(crate) fn set_merge_policy(&self, policy: Box<dyn tantivy::indexer::MergePolicy>) {
        self.writer().set_merge_policy(policy);
    }

    fn analyzers(&self) -> Analyzers {
        self.analyzers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, IndexWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `entry`, replacing any document of the same event (an edit, or an event
    /// indexed again): a replacement costs a lookup in every segment at the commit.
    pub fn replace(&self, entry: &Entry) -> Result<()> {
        self.remove(entry.position)?;
        self.put(entry)
    }

    /// Adds `entry`, an event not indexed before.
    pub fn put(&self, entry: &Entry) -> Result<()> {
        let mut analyzers = self.analyzers.lock().unwrap_or_else(|p| p.into_inner());
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.event_id, &entry.event_id);
        doc.add_text(f.room_id, &entry.room_id);
        doc.add_text(f.sender, &entry.sender);
        doc.add_text(f.key, entry.key.as_str());
        for has in &entry.has {
            doc.add_text(f.has, has.as_str());
        }
        doc.add_i64(f.ts, entry.origin_server_ts);
        doc.add_u64(f.position, entry.position);
        doc.add_u64(f.block, entry.position >> BLOCK_BITS);
        let words = analyzers.words(&entry.text, Some(entry.language));
        drop(analyzers);
        doc.add_text(f.words, terms_text(words));
        self.writer().add_document(doc).map_err(internal("indexing an event"))?;
        Ok(())
    }

    /// Removes the document of the event at stream position `position`, if there is one
    /// (a redaction).
    pub fn remove(&self, position: u64) -> Result<()> {
        let f = &self.fields;
        let block = Term::from_field_u64(f.block, position >> BLOCK_BITS);
        let at = Term::from_field_u64(f.position, position);
        let query = BooleanQuery::intersection(vec![
            Box::new(TermQuery::new(block, IndexRecordOption::Basic)),
            Box::new(RangeQuery::new(Bound::Included(at.clone()), Bound::Included(at))),
        ]);
        self.writer().delete_query(Box::new(query)).map_err(internal("removing an event"))?;
        Ok(())
    }

    /// Removes the documents at `positions` (expired messages) for good: commits, then
    /// merges the segments that held deleted documents, so that their words leave the
    /// disk rather than waiting for a merge that a deletion alone never starts.
    pub fn forget(&self, positions: &[u64]) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        for position in positions {
            self.remove(*position)?;
        }
        // Committed with the progress the index has: documents the indexer added since
        // its last commit go in with it, and a catch-up after a crash replaces them. An
        // index never committed, or catching up (which may roll back), is left to the
        // indexer's next commit.
        {
            // Under the writer's lock, so no commit of the indexer's comes in between
            // reading the progress and writing it back.
            let mut writer = self.writer();
            let Some(progress) = self.progress().filter(|p| p.catching_up.is_none()) else {
                return Ok(());
            };
            let mut prepared =
                writer.prepare_commit().map_err(internal("committing the search index"))?;
            prepared.set_payload(&progress.encode());
            prepared.commit().map_err(internal("committing the search index"))?;
        }
        let merge = {
            let mut writer = self.writer();
            let ids: Vec<_> = writer
                .index()
                .searchable_segment_metas()
                .map_err(internal("listing search segments"))?
                .into_iter()
                .filter(|meta| meta.has_deletes())
                .map(|meta| meta.id())
                .collect();
            (!ids.is_empty()).then(|| writer.merge(&ids))
        };
        if let Some(merge) = merge {
            // A segment a background merge holds already is rewritten by that merge.
            if let Err(e) = merge.wait() {
                tracing::debug!(error = %e, "merging search segments after removals");
            }
            let gc = self.writer().garbage_collect_files();
            if let Err(e) = gc.wait() {
                tracing::debug!(error = %e, "removing merged search segments");
            }
        }
        self.reader.reload().map_err(internal("reloading the search index"))?;
        Ok(())
    }

    /// Removes every document of `room_id` (a purge).
    pub fn remove_room(&self, room_id: &str) {
        self.writer().delete_term(Term::from_field_text(self.fields.room_id, room_id));
    }

    /// Drops everything written since the last commit.
    pub fn rollback(&self) -> Result<()> {
        self.writer().rollback().map_err(internal("rolling back the search index"))?;
        Ok(())
    }

    /// Removes every document (a reindex starts from nothing).
    pub fn clear(&self) -> Result<()> {
        self.writer().delete_all_documents().map_err(internal("clearing the search index"))?;
        Ok(())
    }

    /// Makes everything written so far durable and searchable, with how far that is.
    pub fn commit(&self, progress: Progress) -> Result<()> {
        {
            let mut writer = self.writer();
            let mut prepared =
                writer.prepare_commit().map_err(internal("committing the search index"))?;
            prepared.set_payload(&progress.encode());
            prepared.commit().map_err(internal("committing the search index"))?;
        }
        self.reader.reload().map_err(internal("reloading the search index"))?;
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(progress);
        Ok(())
    }

    /// The documents matching `query`.
    pub fn search(&self, query: &Query) -> Result<Page> {
        let searcher = self.reader.searcher();
        let Some((built, count)) = self.build(query, &searcher) else {
            return Ok(Page { hits: Vec::new(), count: 0 });
        };
        let limit = query.limit.max(1);
        let search = |e| Error::internal("searching", e);
        let hits = match query.order_by {
            OrderBy::Rank => {
                let top = TopDocs::with_limit(limit).and_offset(query.offset).order_by_score();
                let top = searcher.search(&built, &top).map_err(search)?;
                top.into_iter()
                    .map(|(score, address)| self.hit(&searcher, address, score))
                    .collect::<Result<Vec<_>>>()?
            }
            OrderBy::Recent => {
                let top =
                    TopDocs::with_limit(limit).order_by_fast_field::<u64>("position", Order::Desc);
                let top = searcher.search(&built, &top).map_err(search)?;
                top.into_iter()
                    .map(|(_, address)| self.hit(&searcher, address, 0.0))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(Page { hits, count: usize::try_from(count).unwrap_or(usize::MAX) })
    }

    fn hit(&self, searcher: &Searcher, address: DocAddress, score: f32) -> Result<Hit> {
        let doc: TantivyDocument =
            searcher.doc(address).map_err(|e| Error::internal("reading a search hit", e))?;
        let text =
            |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        Ok(Hit {
            event_id: text(self.fields.event_id),
            room_id: text(self.fields.room_id),
            position: doc.get_first(self.fields.position).and_then(|v| v.as_u64()).unwrap_or(0),
            score,
        })
    }

    /// The words of `query.terms` to highlight in `text`: each word of the text whose
    /// plain or stemmed form a query word has, as written in the text.
    pub fn highlights(&self, terms: &str, text: &str, language: Language) -> Vec<String> {
        let mut analyzers = self.analyzers();
        let wanted = query_words(&mut analyzers, terms);
        let mut out: Vec<String> = Vec::new();
        for word in analyzers.words(text, Some(language)) {
            let original = &text[word.offsets.0..word.offsets.1];
            let stem = word.stem.as_ref().unwrap_or(&word.plain);
            let hit = wanted.iter().enumerate().any(|(i, w)| {
                w.plain == word.plain
                    || w.stems.contains(stem)
                    || w.stems.contains(&word.plain)
                    || (i + 1 == wanted.len() && w.prefix && word.plain.starts_with(&w.plain))
            });
            if hit && !out.iter().any(|o| o == original) {
                out.push(original.to_owned());
            }
        }
        out
    }

    /// The tantivy query for `query` and an estimate of how many documents match it (for
    /// the word found in the fewest documents, the documents of its commonest form:
    /// counting exactly would visit every match); `None` when nothing can match.
    fn build(&self, query: &Query, searcher: &Searcher) -> Option<(BooleanQuery, u64)> {
        let f = &self.fields;
        let mut analyzers = self.analyzers();
        let words = query_words(&mut analyzers, &query.terms);
        if words.is_empty() || query.rooms.is_empty() {
            return None;
        }
        let mut must: Vec<(Occur, Box<dyn TantivyQuery>)> = Vec::new();
        let last = words.len() - 1;
        let mut estimate = u64::MAX;
        for (i, word) in words.iter().enumerate() {
            let term = |text: &str| -> Box<dyn TantivyQuery> {
                let term = Term::from_field_text(f.words, text);
                Box::new(TermQuery::new(term, IndexRecordOption::Basic))
            };
            let mut either: Vec<(Occur, Box<dyn TantivyQuery>)> =
                vec![(Occur::Should, term(&word.plain))];
            // A stem of the query word matches a word written so, or a word stemmed so.
            for stem in &word.stems {
                if *stem != word.plain {
                    either.push((Occur::Should, Box::new(BoostQuery::new(term(stem), 0.5))));
                }
                let stemmed = term(&format!("{STEM}{stem}"));
                either.push((Occur::Should, Box::new(BoostQuery::new(stemmed, 0.5))));
            }
            // The word being typed also matches longer words, unless it is a common word
            // on its own: then its own matches fill the page, and expanding a short
            // common prefix would cost more than the rest of the search.
            let freq =
                |text: &str| searcher.doc_freq(&Term::from_field_text(f.words, text)).unwrap_or(0);
            let own = freq(&word.plain);
            let stemmed = word.stems.iter().map(|s| freq(s).max(freq(&format!("{STEM}{s}"))));
            estimate = estimate.min(stemmed.fold(own, u64::max));
            if i == last && word.prefix && own < PREFIX_ONLY_BELOW {
                let prefix = Term::from_field_text(f.words, &word.plain);
                let q = FuzzyTermQuery::new_prefix(prefix, 0, false);
                either.push((Occur::Should, Box::new(BoostQuery::new(Box::new(q), 0.3))));
            }
            must.push((Occur::Must, Box::new(BooleanQuery::new(either))));
        }
        let set = |field: Field, values: &[String]| -> Box<dyn TantivyQuery> {
            Box::new(TermSetQuery::new(values.iter().map(|v| Term::from_field_text(field, v))))
        };
        // Restricting to the rooms costs a pass over all their documents: worth it when
        // they hold a small part of the index; otherwise the caller skips hits from other
        // rooms (it checks every hit anyway).
        let in_rooms: u64 = query
            .rooms
            .iter()
            .map(|r| searcher.doc_freq(&Term::from_field_text(f.room_id, r)).unwrap_or(0))
            .sum();
        if in_rooms.saturating_mul(2) < searcher.num_docs() {
            must.push((Occur::Must, set(f.room_id, &query.rooms)));
        }
        if !query.keys.is_empty() && query.keys.len() < Key::ALL.len() {
            let keys: Vec<String> = query.keys.iter().map(|k| k.as_str().to_owned()).collect();
            must.push((Occur::Must, set(f.key, &keys)));
        }
        for (values, field, occur) in [
            (&query.senders, f.sender, Occur::Must),
            (&query.not_senders, f.sender, Occur::MustNot),
        ] {
            if !values.is_empty() {
                must.push((occur, set(field, values)));
            }
        }
        let has = |h: Has| -> Box<dyn TantivyQuery> {
            Box::new(TermQuery::new(
                Term::from_field_text(f.has, h.as_str()),
                IndexRecordOption::Basic,
            ))
        };
        match query.contains_url {
            Some(true) => must.push((Occur::Must, has(Has::Url))),
            Some(false) => must.push((Occur::MustNot, has(Has::Url))),
            None => {}
        }
        for &h in &query.has {
            must.push((Occur::Must, has(h)));
        }
        if query.since.is_some() || query.until.is_some() {
            let lower = query
                .since
                .map_or(Bound::Unbounded, |t| Bound::Included(Term::from_field_i64(f.ts, t)));
            let upper = query
                .until
                .map_or(Bound::Unbounded, |t| Bound::Excluded(Term::from_field_i64(f.ts, t)));
            must.push((Occur::Must, Box::new(RangeQuery::new(lower, upper))));
        }
        if let (OrderBy::Recent, Some(before)) = (query.order_by, query.before_position) {
            let upper = Bound::Excluded(Term::from_field_u64(f.position, before));
            must.push((Occur::Must, Box::new(RangeQuery::new(Bound::Unbounded, upper))));
        }
        if must.iter().all(|(occur, _)| *occur == Occur::MustNot) {
            must.push((Occur::Must, Box::new(EmptyQuery)));
        }
        Some((BooleanQuery::new(must), estimate))
    }
}

/// One word of a search, as the index may hold it.
struct QueryWord {
    plain: String,
    stems: Vec<String>,
    /// Whether a word starting with it matches too (the word being typed).
    prefix: bool,
}

fn query_words(analyzers: &mut Analyzers, terms: &str) -> Vec<QueryWord> {
    analyzers
        .words(terms, None)
        .into_iter()
        .map(|w: Word| {
            let original = &terms[w.offsets.0..w.offsets.1];
            let stems = analyzers.stems_of(original);
            // One Latin letter would expand to a good share of the dictionary; in a
            // script without spaces one character is a word.
            let prefix = w.plain.chars().count() >= 2 || crate::analysis::unspaced_script(&w.plain);
            QueryWord { plain: w.plain, stems, prefix }
        })
        .collect()
}

/// The terms of `words` as one space-separated text, each word's stem (marked) before
/// it. Not tantivy's pre-tokenized text, which a document carries as JSON: writing and
/// reading that back cost a sixth of indexing.
fn terms_text(words: Vec<Word>) -> String {
    let mut text = String::with_capacity(words.iter().map(|w| w.plain.len() * 2 + 3).sum());
    for w in words {
        if let Some(stem) = &w.stem {
            text.push(STEM);
            text.push_str(stem);
            text.push(' ');
        }
        text.push_str(&w.plain);
        text.push(' ');
    }
    text
}
