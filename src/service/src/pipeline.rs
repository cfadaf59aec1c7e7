//! The event pipeline: what runs once an event, local or from another server, has been
//! stored. One ordered list of consumers, built once at start-up in `Services::new`;
//! each is a module with a narrow interface (it holds what it needs, never the whole
//! `Services`). They run after the event's batch is applied and before the event
//! becomes visible on the stream, under no room lock, so a consumer's own writes (the
//! notification counts) are visible together with the event.
//!
//! The order today, and where the next capabilities plug in:
//! 1. push rules and notification counts (`notify::Notifier`);
//! 2. federation fan-out of this server's events (`federation::sender::FanOut`);
//! 3. guests leaving rooms that stop admitting them (`rooms::guests::GuestEviction`);
//! 4. application-service transactions (`appservice::delivery::Delivery`: a queue in
//!    RocksDB per service, sent by a task of its own);
//! 5. push gateways (`push::gateway::Gateway`: a queue in RocksDB per pusher, sent by
//!    a task per pusher while it has pushes);
//! 6. the search index (`search::Search`: an indexer task fed by a queue in memory,
//!    which catches up from the rooms after a restart);
//! 7. usage analytics (`analytics::Analytics`: daily counts gathered in memory and
//!    written every 30 seconds);
//! 8. delayed events (`delayed_events::DelayedEvents`): a state event cancels the
//!    delayed state events other users have waiting for its type and state key;
//! 9. call history (`call_history::CallHistory`): calls read from their signalling;
//! 10. media uses (`media::uses::MediaUses`): which events refer to this server's
//!     media, so that retention deletes the media only expired messages used.
//!
//! A new capability adds a `Consumer` to the list in `Services::new`. Queues that leave
//! the process write their items here, in RocksDB, and are drained by their own
//! background workers, so a slow consumer never holds up sending.

use std::sync::Arc;

use async_trait::async_trait;
use ruma::RoomId;
use tracing::Instrument;
use trellis_core::Result;

use crate::rooms::Pdu;

/// An event that was just stored and is about to become visible.
pub struct Appended<'a> {
    pub room_id: &'a RoomId,
    /// Its stream position.
    pub position: u64,
    /// The event as cached.
    pub pdu: &'a Arc<Pdu>,
    /// The room's joined members just after the event, read under the room's lock when
    /// it was stored (later events may have changed them since); `None` if they could not
    /// be read.
    pub members: Option<&'a Arc<Vec<String>>>,
}

/// One step of the pipeline.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Names the step in logs and spans.
    fn name(&self) -> &'static str;

    /// Handles one stored event. Anything the step wrote without waiting for the WAL
    /// sync is answered as its WAL ticket: the event's own sync then covers it instead
    /// of a sync of its own. A failure is logged and never undoes or blocks the event.
    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>>;
}

/// The consumers, in the order they run.
pub struct Pipeline {
    consumers: Vec<Arc<dyn Consumer>>,
}

impl Pipeline {
    pub fn new(consumers: Vec<Arc<dyn Consumer>>) -> Self {
        Self { consumers }
    }

    /// No consumers: for tools and tests that store events without side effects.
    pub fn empty() -> Self {
        Self { consumers: Vec::new() }
    }

    /// Runs every consumer on `event` in order; answers the highest WAL ticket they
    /// wrote, if any.
    pub async fn run(&self, event: &Appended<'_>) -> Option<u64> {
        let mut wal = None;
        for consumer in &self.consumers {
            let span = tracing::debug_span!(
                "pipeline",
                consumer = consumer.name(),
                room_id = %event.room_id,
                position = event.position,
            );
            match consumer.on_event(event).instrument(span).await {
                Ok(written) => wal = wal.max(written),
                Err(e) => tracing::warn!(
                    consumer = consumer.name(),
                    room_id = %event.room_id,
                    event_id = %event.pdu.event_id,
                    error = %e,
                    "an event pipeline step failed",
                ),
            }
        }
        wal
    }
}
