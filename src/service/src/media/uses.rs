//! Which events refer to which of this server's media: when retention purges a message,
//! media that no other remembered event uses go with it. Events from before this index
//! existed are not in it, so media they use are never deleted this way.

use async_trait::async_trait;
use serde_json::Value;
use trellis_core::Result;
use trellis_store::{Batch, Db, Direction, Table, catalog};

use crate::pipeline::{Appended, Consumer};

/// (server, media id, room id, position) -> ()
const USES: Table<(String, String, String, u64), ()> = Table::new(&catalog::MEDIA_EVENT_USES);

/// Adds to `batch` the removal of the uses of `media` by the event at `position` of
/// `room_id`; answers the media that event was recorded as using.
pub fn forget_into(
    db: &Db,
    batch: &mut Batch,
    media: &[(String, String)],
    room_id: &str,
    position: u64,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (server, id) in media {
        let key = (server.clone(), id.clone(), room_id.to_owned(), position);
        if USES.get(&**db, &key)?.is_some() {
            USES.delete(batch, &key);
            out.push((server.clone(), id.clone()));
        }
    }
    Ok(out)
}

/// Whether any remembered event still uses the media.
pub fn used(db: &Db, server: &str, id: &str) -> Result<bool> {
    let prefix = (server.to_owned(), id.to_owned());
    Ok(USES.scan_prefix(&**db, &prefix, Direction::Forward)?.next().transpose()?.is_some())
}

/// The pipeline consumer that records the uses.
pub struct MediaUses {
    db: Db,
    server_name: String,
}

impl MediaUses {
    pub fn new(db: Db, server_name: &str) -> Self {
        Self { db, server_name: server_name.to_owned() }
    }
}

#[async_trait]
impl Consumer for MediaUses {
    fn name(&self) -> &'static str {
        "media_uses"
    }

    async fn on_event(&self, event: &Appended<'_>) -> Result<Option<u64>> {
        if !event.pdu.content.get().contains("mxc://") {
            return Ok(None);
        }
        let Ok(content) = serde_json::from_str::<Value>(event.pdu.content.get()) else {
            return Ok(None);
        };
        let media = crate::rooms::retention::media_of(&content, &self.server_name);
        if media.is_empty() {
            return Ok(None);
        }
        let mut batch = Batch::new();
        for (server, id) in media {
            USES.put(&mut batch, &(server, id, event.room_id.to_string(), event.position), &());
        }
        // Unsynced, like the other consumers: the event's own sync covers the ticket.
        Ok(Some(self.db.write_unsynced(batch)?))
    }
}
