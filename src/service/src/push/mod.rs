//! Push: users' push rules, their evaluation for every stored event (unread counts and
//! `/notifications`), pushers (where notifications go) and what is sent to them.

pub mod email;
pub mod gateway;
pub mod notify;
pub mod pushers;
pub mod rules;
