//! What syncs deliver, and the live parts of the stream: `/sync`, sliding sync, the
//! response writer they share, typing, receipts, presence and sync filters.

pub mod events_stream;
pub mod filters;
pub mod initial;
pub mod live;
pub mod out;
pub mod presence;
pub mod receipts;
pub mod sliding;
pub mod sync;
pub mod typing;
