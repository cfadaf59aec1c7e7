//! TURN REST API credentials (draft-uberti-behave-turn-rest, what coturn's
//! `static-auth-secret` checks): the username is `<unix expiry>:<user>` and the password
//! is base64(HMAC-SHA1(secret, username)), so the homeserver can hand out credentials
//! that this server checks without either keeping a list of them.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Credentials for `user` valid for `lifetime` from now: the TURN username
/// (`"<unix expiry secs>:<user>"`) and its password.
pub fn rest_credentials(shared_secret: &str, user: &str, lifetime: Duration) -> (String, String) {
    let expiry = unix_now().saturating_add(lifetime.as_secs());
    let username = format!("{expiry}:{user}");
    let password = rest_password(shared_secret, &username);
    (username, password)
}

/// base64(HMAC-SHA1(secret, username)).
pub(crate) fn rest_password(shared_secret: &str, username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(shared_secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(username.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The expiry and the user of a REST username. The user keeps any further ':' (Matrix
/// ids have one).
pub(crate) fn parse_username(username: &str) -> Option<(u64, &str)> {
    let (expiry, user) = username.split_once(':')?;
    if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) || user.is_empty() {
        return None;
    }
    Some((expiry.parse().ok()?, user))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    Malformed,
    Expired,
    WrongRealm,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthError::Malformed => "username is not <expiry>:<user>",
            AuthError::Expired => "username has expired",
            AuthError::WrongRealm => "realm is not this server's",
        })
    }
}

/// Long-term credential keys for REST usernames, for the crate and for the gate (which
/// checks integrity itself before answering anything on the crate's behalf).
pub(crate) struct RestAuth {
    secret: String,
    realm: String,
}

impl RestAuth {
    pub(crate) fn new(secret: String, realm: String) -> Self {
        RestAuth { secret, realm }
    }

    /// The long-term key MD5(username:realm:password) for a valid, unexpired username.
    /// A wrong password is not detected here but by the message integrity check the key
    /// is used for.
    pub(crate) fn key(&self, username: &str, realm: &str) -> Result<Vec<u8>, AuthError> {
        // Keys are derived with the realm the client names, so another realm would make
        // a different key; refusing it keeps clients on the one this server announces.
        if realm != self.realm {
            return Err(AuthError::WrongRealm);
        }
        let (expiry, _) = parse_username(username).ok_or(AuthError::Malformed)?;
        if expiry <= unix_now() {
            return Err(AuthError::Expired);
        }
        let password = rest_password(&self.secret, username);
        Ok(::turn::auth::generate_auth_key(username, realm, &password))
    }
}

impl ::turn::auth::AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, ::turn::Error> {
        self.key(username, realm).map_err(|err| {
            tracing::debug!(%username, client = %src_addr, reason = %err, "TURN credentials refused");
            ::turn::Error::Other(err.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_known_hmac_sha1_vector() {
        // python3: base64.b64encode(hmac.new(b"s3cret",
        //     b"1700000000:@alice:example.org", hashlib.sha1).digest())
        assert_eq!(
            rest_password("s3cret", "1700000000:@alice:example.org"),
            "oKcYiX5WLXOJY95WjqLUBOVFmFk="
        );
    }

    #[test]
    fn key_is_md5_of_username_realm_password() {
        let auth = RestAuth::new("s3cret".into(), "example.org".into());
        let username = "99999999999:@alice:example.org";
        let key = auth.key(username, "example.org").unwrap();
        let password = rest_password("s3cret", username);
        assert_eq!(key, ::turn::auth::generate_auth_key(username, "example.org", &password));
        // python3: hashlib.md5(b"1700000000:@alice:example.org:example.org:"
        //     b"oKcYiX5WLXOJY95WjqLUBOVFmFk=").hexdigest()
        let fixed = ::turn::auth::generate_auth_key(
            "1700000000:@alice:example.org",
            "example.org",
            "oKcYiX5WLXOJY95WjqLUBOVFmFk=",
        );
        let hex: String = fixed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "7512c1cdb9d7a6107db939771b3b0804");
    }

    #[test]
    fn usernames_keep_colons_in_the_user() {
        assert_eq!(
            parse_username("1700000000:@alice:example.org"),
            Some((1_700_000_000, "@alice:example.org"))
        );
        assert_eq!(parse_username("@alice:example.org"), None);
        assert_eq!(parse_username(":@alice:example.org"), None);
        assert_eq!(parse_username("1700000000:"), None);
        assert_eq!(parse_username("+1700000000:bob"), None);
        assert_eq!(parse_username("99999999999999999999999:bob"), None);
        assert_eq!(parse_username("1700000000"), None);
    }

    #[test]
    fn expired_malformed_and_foreign_realm_are_refused() {
        let auth = RestAuth::new("s3cret".into(), "example.org".into());
        assert_eq!(
            auth.key("1700000000:@alice:example.org", "example.org"),
            Err(AuthError::Expired)
        );
        assert_eq!(auth.key("alice", "example.org"), Err(AuthError::Malformed));
        let (username, _) =
            rest_credentials("s3cret", "@alice:example.org", Duration::from_secs(60));
        assert!(auth.key(&username, "example.org").is_ok());
        assert_eq!(auth.key(&username, "evil.org"), Err(AuthError::WrongRealm));
    }

    #[test]
    fn rest_credentials_name_the_expiry_and_user() {
        let before = unix_now();
        let (username, password) =
            rest_credentials("s3cret", "@alice:example.org", Duration::from_secs(3600));
        let (expiry, user) = parse_username(&username).unwrap();
        assert_eq!(user, "@alice:example.org");
        assert!(expiry >= before + 3600 && expiry <= unix_now() + 3600);
        assert_eq!(password, rest_password("s3cret", &username));
    }
}
