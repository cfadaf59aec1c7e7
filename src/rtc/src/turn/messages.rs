//! The STUN reading and writing the gate and the TCP framer share.

use std::net::SocketAddr;
use std::time::Duration;

use ::turn::proto::lifetime::Lifetime;
use ::turn::proto::peeraddr::PeerAddress;
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS, AttrType};
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_REQUEST, Getter, METHOD_REFRESH, Message, MessageType, Setter,
    is_message,
};
use stun::textattrs::TextAttribute;

/// What a datagram or frame is, from its first bytes alone.
pub(crate) enum Peek {
    ChannelData,
    Stun(MessageType),
    Other,
}

pub(crate) fn peek(buf: &[u8]) -> Peek {
    match buf.first() {
        Some(0x40..=0x7f) if buf.len() >= 4 => Peek::ChannelData,
        Some(first) if first & 0xc0 == 0 && is_message(buf) => {
            let mut typ = MessageType::default();
            typ.read_value(u16::from_be_bytes([buf[0], buf[1]]));
            Peek::Stun(typ)
        }
        _ => Peek::Other,
    }
}

pub(crate) fn decode(buf: &[u8]) -> Option<Message> {
    let mut m = Message { raw: buf.to_vec(), ..Default::default() };
    m.decode().ok()?;
    Some(m)
}

pub(crate) fn text(m: &Message, attr: AttrType) -> Option<String> {
    TextAttribute::get_from_as(m, attr).ok().map(|t| t.text)
}

/// The long-term credential attributes of a request: username, realm and nonce.
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) realm: String,
    pub(crate) nonce: String,
}

pub(crate) fn credentials(m: &Message) -> Option<Credentials> {
    Some(Credentials {
        username: text(m, ATTR_USERNAME)?,
        realm: text(m, ATTR_REALM)?,
        nonce: text(m, ATTR_NONCE)?,
    })
}

pub(crate) fn integrity_holds(m: &Message, key: &[u8]) -> bool {
    MessageIntegrity(key.to_vec()).check(&mut m.clone()).is_ok()
}

/// Every XOR-PEER-ADDRESS of a message. The crate reads only the first, but the gate
/// judges them all so that an extra one cannot ride along unchecked.
pub(crate) fn peer_addresses(m: &Message) -> Vec<SocketAddr> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
        .filter_map(|a| {
            // Decoded exactly as the crate decodes it: alone, against this message's
            // transaction id.
            let single = Message {
                transaction_id: m.transaction_id,
                attributes: stun::attributes::Attributes(vec![a.clone()]),
                ..Default::default()
            };
            let mut peer = PeerAddress::default();
            peer.get_from(&single).ok()?;
            Some(SocketAddr::new(peer.ip, peer.port))
        })
        .collect()
}

pub(crate) fn error_code(m: &Message) -> Option<u16> {
    let mut code = ErrorCodeAttribute::default();
    code.get_from(m).ok()?;
    Some(code.code.0)
}

/// An error response to `request`, signed with `key` when given (RFC 5389 §10.2.2: a
/// response to an authenticated request carries MESSAGE-INTEGRITY).
pub(crate) fn error_response(
    request: &Message,
    code: u16,
    reason: &str,
    mut extra: Vec<Box<dyn Setter>>,
    key: Option<&[u8]>,
    fingerprint: bool,
) -> Option<Message> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(request.transaction_id),
        Box::new(MessageType::new(request.typ.method, CLASS_ERROR_RESPONSE)),
        Box::new(ErrorCodeAttribute { code: ErrorCode(code), reason: reason.as_bytes().to_vec() }),
    ];
    setters.append(&mut extra);
    if let Some(key) = key {
        setters.push(Box::new(MessageIntegrity(key.to_vec())));
    }
    if fingerprint {
        setters.push(Box::new(FINGERPRINT));
    }
    build(&setters)
}

/// A Refresh with LIFETIME 0, which makes the crate delete the allocation of the
/// 5-tuple it arrives on.
pub(crate) fn refresh_to_zero(
    username: &str,
    realm: &str,
    nonce: &str,
    key: &[u8],
) -> Option<Message> {
    build(&[
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
        Box::new(Lifetime(Duration::ZERO)),
        Box::new(TextAttribute::new(ATTR_USERNAME, username.to_owned())),
        Box::new(TextAttribute::new(ATTR_REALM, realm.to_owned())),
        Box::new(TextAttribute::new(ATTR_NONCE, nonce.to_owned())),
        Box::new(MessageIntegrity(key.to_vec())),
        Box::new(FINGERPRINT),
    ])
}

/// A Refresh the gate hands the crate to be answered with a fresh nonce: without
/// credentials the crate challenges it (401); with `stale`, a nonce the crate no longer
/// honours, and any MESSAGE-INTEGRITY, it drops that nonce from its map and says so
/// (438), which is the only way its map ever shrinks.
pub(crate) fn nonce_request(stale: Option<&str>) -> Option<Message> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
    ];
    if let Some(nonce) = stale {
        setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.to_owned())));
        // The crate looks at the nonce before the integrity, so no key is needed.
        setters.push(Box::new(MessageIntegrity(vec![0; 16])));
    }
    build(&setters)
}

fn build(setters: &[Box<dyn Setter>]) -> Option<Message> {
    let mut m = Message::new();
    match m.build(setters) {
        Ok(()) => Some(m),
        Err(err) => {
            tracing::warn!(error = %err, "could not build a STUN message");
            None
        }
    }
}

/// What the socket wrappers answer for the `Conn` methods the crate never calls on them
/// (connected-socket use).
pub(crate) fn unsupported(what: &'static str) -> webrtc_util::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, what).into()
}

#[cfg(test)]
mod tests {
    use stun::message::{CLASS_INDICATION, METHOD_SEND};

    use super::*;

    #[test]
    fn every_peer_address_is_read() {
        let peers: [SocketAddr; 2] =
            ["8.8.8.8:53".parse().unwrap(), "127.0.0.1:9".parse().unwrap()];
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            Box::new(PeerAddress { ip: peers[0].ip(), port: peers[0].port() }),
            Box::new(PeerAddress { ip: peers[1].ip(), port: peers[1].port() }),
        ])
        .unwrap();
        let decoded = decode(&m.raw).unwrap();
        assert_eq!(peer_addresses(&decoded), peers);
        assert!(
            matches!(peek(&m.raw), Peek::Stun(t) if t == MessageType::new(METHOD_SEND, CLASS_INDICATION))
        );
    }

    #[test]
    fn peek_tells_channel_data_stun_and_garbage_apart() {
        assert!(matches!(peek(&[0x40, 0, 0, 0]), Peek::ChannelData));
        assert!(matches!(peek(&[0x80, 0, 0, 0]), Peek::Other));
        assert!(matches!(peek(&[0x00, 1, 0, 0]), Peek::Other));
        assert!(matches!(peek(&[]), Peek::Other));
    }

    #[test]
    fn signed_error_responses_verify() {
        let mut request = Message::new();
        request
            .build(&[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            ])
            .unwrap();
        let key = [7u8; 16];
        let response =
            error_response(&request, 403, "Forbidden", Vec::new(), Some(&key), true).unwrap();
        let decoded = decode(&response.raw).unwrap();
        assert_eq!(decoded.transaction_id, request.transaction_id);
        assert_eq!(error_code(&decoded), Some(403));
        assert!(integrity_holds(&decoded, &key));
        assert!(!integrity_holds(&decoded, &[8u8; 16]));
        FINGERPRINT.check(&decoded).unwrap();
    }
}
