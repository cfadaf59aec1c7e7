//! Real-time communication for Trellis: the built-in TURN server that VoIP clients are
//! pointed at through `/voip/turnServer`.

pub mod turn;
