//! Rooms as event DAGs. This first layer builds, hashes and signs PDUs for every room
//! version and exposes them to ruma's event authorization; storage, state and the client
//! room APIs build on it.

pub mod aliases;
pub mod append;
pub mod blocks;
pub mod builder;
pub mod cache;
pub mod create;
pub mod erasure;
pub mod filter;
pub mod guests;
pub mod history;
pub mod intake;
pub mod members;
pub mod membership;
pub mod pdu;
pub mod public;
pub mod purge;
pub mod reads;
pub mod relations;
pub mod resolve;
pub mod retention;
pub mod send;
pub mod short;
pub mod state;
pub mod stream;
pub mod sync_state;
pub mod upgrade;
pub mod viewer;
pub mod visibility;

pub use builder::{EventRef, PduTemplate, build_pdu};
pub use pdu::Pdu;
pub use reads::Rooms;
