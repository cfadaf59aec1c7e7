//! TURN credentials for calls (`GET /voip/turnServer`): the TURN REST API scheme that
//! coturn and other TURN servers check, so a user's credentials expire by themselves
//! and the server never stores them. A configured external TURN server is offered if
//! there is one; otherwise the built-in one (`trellis-rtc`), once it listens.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use trellis_core::{Error, Result, config::VoipConfig, now_millis};

/// What a client gets: the TURN servers and the credentials to use them.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    pub ttl_seconds: u64,
}

/// The built-in TURN server as clients are told about it.
#[derive(Debug, Clone)]
pub struct BuiltinTurn {
    pub uris: Vec<String>,
    pub shared_secret: String,
}

/// The credentials for `user_id`, or `None` when no TURN server is configured or running
/// (or none is offered to guests): clients then call without a relay.
pub fn turn_server(
    config: &VoipConfig,
    builtin: Option<&BuiltinTurn>,
    user_id: &str,
    guest: bool,
) -> Result<Option<TurnCredentials>> {
    if guest && !config.turn_allow_guests {
        return Ok(None);
    }
    if config.turn_uris.is_empty() {
        let Some(builtin) = builtin else { return Ok(None) };
        let config = VoipConfig {
            turn_uris: builtin.uris.clone(),
            turn_shared_secret: builtin.shared_secret.clone(),
            ..config.clone()
        };
        return turn_server(&config, None, user_id, guest);
    }
    let ttl_seconds = config.turn_user_lifetime_seconds;
    let (username, password) = if config.turn_shared_secret.is_empty() {
        if config.turn_username.is_empty() {
            return Ok(None);
        }
        (config.turn_username.clone(), config.turn_password.clone())
    } else {
        let expiry = now_millis() / 1000 + ttl_seconds;
        let username = format!("{expiry}:{user_id}");
        let password = rest_api_password(&config.turn_shared_secret, &username)?;
        (username, password)
    };
    Ok(Some(TurnCredentials { username, password, uris: config.turn_uris.clone(), ttl_seconds }))
}

/// The TURN REST API password of `username`: base64 of HMAC-SHA1 under the shared secret.
fn rest_api_password(secret: &str, username: &str) -> Result<String> {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes())
        .map_err(|e| Error::internal("TURN credentials", e))?;
    mac.update(username.as_bytes());
    Ok(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_the_hmac_sha1_turn_servers_compute() {
        // RFC 2202 test case 2, base64-encoded.
        let password = rest_api_password("Jefe", "what do ya want for nothing?").unwrap();
        assert_eq!(password, "7/zfauXrL6LSdBbV8YTfnCWafHk=");
    }

    #[test]
    fn credentials_expire_and_name_the_user() {
        let config = VoipConfig {
            turn_uris: vec!["turn:turn.example.org:3478?transport=udp".into()],
            turn_shared_secret: "s3cret".into(),
            turn_user_lifetime_seconds: 600,
            ..VoipConfig::default()
        };
        let creds = turn_server(&config, None, "@alice:example.org", false).unwrap().unwrap();
        let (expiry, user) = creds.username.split_once(':').unwrap();
        let expiry: u64 = expiry.parse().unwrap();
        let now = now_millis() / 1000;
        assert!((now + 599..=now + 601).contains(&expiry));
        assert_eq!(user, "@alice:example.org");
        assert_eq!(creds.password, rest_api_password("s3cret", &creds.username).unwrap());
        assert_eq!(creds.ttl_seconds, 600);
        let no_guests = VoipConfig { turn_allow_guests: false, ..config.clone() };
        assert_eq!(turn_server(&no_guests, None, "@1:example.org", true).unwrap(), None);
        assert_eq!(
            turn_server(&VoipConfig::default(), None, "@a:example.org", false).unwrap(),
            None
        );
    }
}
