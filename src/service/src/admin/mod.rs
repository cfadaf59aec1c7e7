//! What a server admin does through the admin API (Synapse's shapes, so that existing
//! admin tools work): accounts, rooms, media, server notices and the audit log.

pub mod audit_log;
pub mod dashboard;
pub mod federation;
pub mod jobs;
pub mod media;
pub mod notices;
pub mod rooms;
pub mod users;
