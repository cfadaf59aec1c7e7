//! Message search (`POST /search`): a pipeline step hands each searchable event to an
//! indexer task, which writes the full-text index (crate `trellis-search`) and commits
//! it about twice a second with the stream position it is complete up to. On start the
//! indexer first catches up from that position (or builds the index for a database
//! that has none), room by room and resumably; `trellis search reindex` starts over.

pub mod extract;
pub mod query;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tracing::Instrument;
use trellis_core::{Error, Result, config::SearchConfig};
use trellis_search::{CatchUp, Language, Progress, SearchIndex};

use crate::{
    pipeline::{Appended, Consumer},
    rooms::{Pdu, Rooms},
};
use extract::Action;

/// How long the indexer gathers events before it commits them: a message is found by
/// search at most about this long after it is sent. Every commit writes a segment that
/// merges rewrite later, so fewer, larger commits cost less CPU per message.
const COMMIT_INTERVAL: Duration = Duration::from_secs(2);

/// A catch-up commits (and logs its progress) after this many events.
const CATCH_UP_BATCH: usize = 20_000;

/// How long shutdown waits for the indexer's last commit.
const STOP_WAIT: Duration = Duration::from_secs(10);

type Queued = (u64, Arc<Pdu>);

pub struct Search {
    /// `None` when search is switched off.
    index: Option<Arc<SearchIndex>>,
    default_language: Language,
    queue: mpsc::UnboundedSender<Queued>,
    /// Taken by the indexer when it starts.
    queued: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    /// Set at shutdown: the indexer commits what it has and ends, before storage closes
    /// under it.
    stopping: Arc<AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
    running: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Search {
    /// Opens (or creates) the index at `path` as `config` says.
    pub fn open(config: &SearchConfig, path: &std::path::Path) -> Result<Self> {
        let default_language = Language::from_tag(&config.default_language).unwrap_or_else(|| {
            tracing::warn!(language = %config.default_language, "no stemmer for the default search language; using English");
            Language::ENGLISH
        });
        let mut languages: Vec<Language> = vec![default_language];
        for tag in &config.languages {
            match Language::from_tag(tag) {
                Some(l) if !languages.contains(&l) => languages.push(l),
                Some(_) => {}
                None => tracing::warn!(language = %tag, "no stemmer for this search language"),
            }
        }
        let index = match config.enabled {
            true => Some(Arc::new(SearchIndex::open(path, &languages)?)),
            false => None,
        };
        let (queue, queued) = mpsc::unbounded_channel();
        Ok(Self {
            index,
            default_language,
            queue,
            queued: Mutex::new(Some(queued)),
            stopping: Arc::default(),
            stop: tokio::sync::watch::Sender::new(false),
            running: Mutex::new(None),
        })
    }

    pub fn default_language(&self) -> Language {
        self.default_language
    }

    pub fn index(&self) -> Option<&Arc<SearchIndex>> {
        self.index.as_ref()
    }

    /// Starts the indexer: it catches up with the rooms, then indexes events as they
    /// come.
    pub fn start(&self, rooms: Arc<Rooms>) {
        let Some(index) = self.index.clone() else { return };
        let Some(queued) = self.queued.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let indexer = self.indexer(index, rooms);
        let stop = self.stop.subscribe();
        let task = tokio::spawn(
            indexer.run(queued, stop).instrument(tracing::info_span!("search_indexer")),
        );
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    fn indexer(&self, index: Arc<SearchIndex>, rooms: Arc<Rooms>) -> Indexer {
        Indexer {
            index,
            rooms,
            default_language: self.default_language,
            languages: HashMap::new(),
            stopping: self.stopping.clone(),
        }
    }

    /// Stops the indexer at shutdown: what it has is committed (a catch-up resumes at
    /// the next start), and it no longer touches storage once this returns.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let task = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(STOP_WAIT, task).await.is_err()
        {
            tracing::warn!("the search indexer did not stop in time");
        }
    }

    /// Builds the index again from nothing, in the calling task (`trellis search
    /// reindex`, with the server stopped).
    pub async fn rebuild(&self, rooms: Arc<Rooms>) -> Result<u64> {
        let index =
            self.index.clone().ok_or_else(|| Error::invalid_param("Search is switched off"))?;
        let mut indexer = self.indexer(index, rooms);
        tokio::task::spawn_blocking(move || {
            indexer.index.clear()?;
            indexer.index.commit(Progress::default())?;
            indexer.catch_up()
        })
        .await
        .map_err(|e| Error::internal("search rebuild task", e))?
    }
}

#[async_trait]
impl Consumer for Search {
    fn name(&self) -> &'static str {
        "search"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        if self.index.is_some() && extract::relevant(&event.pdu.kind) {
            // The indexer outlives every sender; a closed queue only means shutdown.
            let _ = self.queue.send((event.position, event.pdu.clone()));
        }
        Ok(None)
    }
}

struct Indexer {
    index: Arc<SearchIndex>,
    rooms: Arc<Rooms>,
    default_language: Language,
    /// Each room's language, as read from its state (MSC4334), once per room.
    languages: HashMap<String, Language>,
    stopping: Arc<AtomicBool>,
}

impl Indexer {
    async fn run(
        mut self,
        mut queued: mpsc::UnboundedReceiver<Queued>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // Events sent meanwhile wait in the queue; those the catch-up also saw are
        // skipped.
        let caught_up = tokio::task::spawn_blocking(move || {
            // A resumed catch-up ends at the target it had before the restart; a second
            // one takes what came between that and now.
            let done = self.catch_up().and_then(|a| self.catch_up().map(|b| a + b));
            (self, done)
        })
        .await;
        let Ok((mut indexer, done)) = caught_up else {
            tracing::error!("the search catch-up task failed; search stays as it was");
            return;
        };
        if let Err(e) = done {
            tracing::error!(error = %e, "catching up the search index failed; new events are still indexed");
        }
        let progress = indexer.index.progress().unwrap_or_default();
        let caught_up_to = progress.up_to;
        let mut indexed_to = progress.indexed_to.max(progress.up_to);
        loop {
            let first = tokio::select! {
                next = queued.recv() => match next {
                    Some(first) => first,
                    None => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            // Gather for a while, unless the server is stopping: then commit at once.
            let _ = tokio::time::timeout(COMMIT_INTERVAL, stop.wait_for(|s| *s)).await;
            // Every event at or below the visible position has passed the pipeline, so
            // it is in the queue by now: after draining it, the index is complete up to
            // there.
            let visible = indexer.rooms.stream.visible();
            let mut batch = vec![first];
            while let Ok(next) = queued.try_recv() {
                batch.push(next);
            }
            batch.retain(|(position, _)| *position > caught_up_to);
            indexed_to = batch.iter().map(|(p, _)| *p).fold(indexed_to.max(visible), u64::max);
            let result = tokio::task::spawn_blocking(move || {
                for (position, pdu) in &batch {
                    indexer.apply(*position, pdu, false);
                }
                let progress = Progress { up_to: visible, indexed_to, catching_up: None };
                let committed = indexer.index.commit(progress);
                (indexer, committed)
            })
            .await;
            match result {
                Ok((back, committed)) => {
                    indexer = back;
                    if let Err(e) = committed {
                        tracing::error!(error = %e, "committing the search index failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "the search indexer task failed; search stops indexing");
                    return;
                }
            }
        }
    }

    /// Indexes what the index lacks: every room's events after the position it is
    /// complete up to, resuming a catch-up a stop interrupted. Answers how many events
    /// it read.
    fn catch_up(&mut self) -> Result<u64> {
        let progress = self.index.progress().unwrap_or_default();
        // Past this no event can be in the index: it is added, not replaced.
        let indexed_to = progress.indexed_to;
        let (from, target, mut rooms_done) = match progress.catching_up {
            Some(c) => (progress.up_to, c.target, Some(c.rooms_done)),
            None => (progress.up_to, self.rooms.stream.visible(), None),
        };
        if target <= from {
            return Ok(0);
        }
        let rooms = self.rooms.rooms_with_events_after(from)?;
        let total_rooms = rooms.len();
        tracing::info!(from, target, rooms = total_rooms, "building the search index");
        let started = std::time::Instant::now();
        let mut read = 0u64;
        let mut since_commit = 0usize;
        for (n, (short, room_id)) in rooms.into_iter().enumerate() {
            if rooms_done.is_some_and(|done| short <= done) {
                continue;
            }
            let mut after = from;
            loop {
                if self.stopping.load(Ordering::Relaxed) {
                    return self.pause(read);
                }
                let page = self.rooms.scan_timeline(
                    &room_id,
                    std::ops::Bound::Excluded(after),
                    std::ops::Bound::Included(target),
                    true,
                    1000,
                    |_, _| Ok(true),
                )?;
                for (position, pdu) in &page.events {
                    if extract::relevant(&pdu.kind) {
                        self.apply(*position, pdu, *position <= indexed_to);
                    }
                }
                read += page.events.len() as u64;
                since_commit += page.events.len();
                match page.last {
                    Some(last) if page.more => after = last,
                    _ => break,
                }
            }
            rooms_done = Some(short);
            if since_commit >= CATCH_UP_BATCH {
                since_commit = 0;
                let catching_up = Some(CatchUp { target, rooms_done: short });
                self.index.commit(Progress { up_to: from, indexed_to, catching_up })?;
                tracing::info!(
                    rooms = n + 1,
                    of = total_rooms,
                    events = read,
                    "search index build progress"
                );
            }
        }
        let indexed_to = indexed_to.max(target);
        self.index.commit(Progress { up_to: target, indexed_to, catching_up: None })?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(events = read, rooms = total_rooms, seconds, "search index built");
        Ok(read)
    }

    /// Ends a catch-up at shutdown. What it indexed since its last commit is dropped:
    /// that holds part of a room, which the next start reads again from the room's
    /// start, so keeping it would index those events twice. The next start resumes after
    /// the last room that commit finished.
    fn pause(&self, read: u64) -> Result<u64> {
        self.index.rollback()?;
        tracing::info!(events = read, "search index build paused by shutdown");
        Ok(read)
    }

    /// Applies one event to the index; a failure is logged (the event stays unsearchable,
    /// and nothing else is held up). `again`: the event may be indexed already (a
    /// catch-up overlaps what the last commit held), so its document is replaced.
    fn apply(&mut self, position: u64, pdu: &Pdu, again: bool) {
        let Some(room_id) = pdu.room_id.as_ref().map(ToString::to_string) else { return };
        let language = self.language(&room_id);
        let result = match extract::action(pdu, position, language) {
            Action::Put(entry) if again => self.index.replace(&entry),
            Action::Put(entry) => self.index.put(&entry),
            Action::Remove(event_id) => self.remove(&event_id),
            Action::Edit { original, sender, new_content } => {
                self.edit(&room_id, &original, &sender, &new_content, language)
            }
            Action::Language(chosen) => {
                self.languages.insert(room_id, chosen.unwrap_or(self.default_language));
                Ok(())
            }
            Action::Nothing => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(event_id = %pdu.event_id, error = %e, "indexing an event for search failed");
        }
    }

    /// An edit: the original message is found by its new text, if the edit is valid (same
    /// room, same sender, an unredacted message).
    fn edit(
        &self,
        room_id: &str,
        original: &str,
        sender: &str,
        new_content: &serde_json::Value,
        language: Language,
    ) -> Result<()> {
        let Some(stored) = self.rooms.cached_event(original)? else { return Ok(()) };
        let pdu = &stored.pdu;
        let valid = pdu.room_id.as_ref().is_some_and(|r| r.as_str() == room_id)
            && pdu.sender.as_str() == sender
            && pdu.kind.to_string() == extract::MESSAGE
            && !stored.rejected
            && pdu.unsigned.as_ref().is_none_or(|u| !u.contains_key("redacted_because"));
        if !valid {
            return Ok(());
        }
        match extract::message(pdu, stored.position, new_content, language) {
            Some(entry) => self.index.replace(&entry),
            None => self.index.remove(stored.position),
        }
    }

    /// Removes the document of `event_id`, if it has one.
    fn remove(&self, event_id: &str) -> Result<()> {
        match self.rooms.cached_event(event_id)? {
            Some(stored) => self.index.remove(stored.position),
            None => Ok(()),
        }
    }

    fn language(&mut self, room_id: &str) -> Language {
        if let Some(&language) = self.languages.get(room_id) {
            return language;
        }
        let language = room_language(&self.rooms, room_id, self.default_language);
        self.languages.insert(room_id.to_owned(), language);
        language
    }
}

/// The language a room's messages are stemmed in: the one its state names (MSC4334),
/// else `default`.
pub fn room_language(rooms: &Rooms, room_id: &str, default: Language) -> Language {
    extract::LANGUAGE_TYPES
        .iter()
        .find_map(|kind| {
            let pdu = rooms.state_of(room_id, kind, "").ok()??;
            let content: serde_json::Value = serde_json::from_str(pdu.content.get()).ok()?;
            content["language"].as_str().and_then(Language::from_tag)
        })
        .unwrap_or(default)
}
