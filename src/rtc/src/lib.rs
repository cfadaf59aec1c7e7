//! Real-time communication for Trellis: the built-in TURN server that VoIP clients are
//! pointed at through `/voip/turnServer`, and the selective forwarding unit group calls
//! (Element Call, livekit-client apps) connect to.

pub mod sfu;
pub mod turn;
