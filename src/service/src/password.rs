//! Password hashing with argon2id.

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
};
use trellis_core::{Error, Result};

pub fn hash(password: &str, memory_kib: u32, iterations: u32) -> Result<String> {
    let params = Params::new(memory_kib, iterations, 1, None)
        .map_err(|e| Error::internal("argon2 parameters", e))?;
    let salt = SaltString::encode_b64(&crate::random::bytes::<16>())
        .map_err(|e| Error::internal("argon2 salt", e))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal("argon2 hashing", e))
}

/// Checks a password against a stored PHC string; the parameters come from the string,
/// so hashes made under older settings still verify.
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_then_verify() {
        let h = super::hash("correct horse", 64, 1).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("correct horse", &h));
        assert!(!super::verify("wrong", &h));
        assert!(!super::verify("x", "not a hash"));
    }
}
