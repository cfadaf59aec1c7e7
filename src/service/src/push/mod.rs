//! Push: users' push rules, their evaluation for every stored event (unread counts and
//! `/notifications`), and pushers (where notifications go).

pub mod notify;
pub mod pushers;
pub mod rules;
