//! JWT login (`org.matrix.login.jwt`): a token signed by a trusted issuer names the user.

use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use trellis_core::{Error, config::JwtConfig};

pub const LOGIN_TYPE: &str = "org.matrix.login.jwt";

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    subject_claim: String,
}

impl JwtVerifier {
    /// Builds the verifier from config; `Ok(None)` when JWT login is off.
    pub fn from_config(config: &JwtConfig) -> Result<Option<Self>, String> {
        if !config.enabled {
            return Ok(None);
        }
        let algorithm =
            Algorithm::from_str(&config.algorithm).map_err(|e| format!("jwt.algorithm: {e}"))?;
        let key = if config.algorithm.starts_with("HS") {
            DecodingKey::from_secret(config.secret.as_bytes())
        } else {
            let pem = std::fs::read(&config.public_key_path).map_err(|e| {
                format!("jwt.public_key_path {}: {e}", config.public_key_path.display())
            })?;
            let parsed = match config.algorithm.as_str() {
                "EdDSA" => DecodingKey::from_ed_pem(&pem),
                a if a.starts_with("ES") => DecodingKey::from_ec_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            };
            parsed.map_err(|e| {
                format!("jwt.public_key_path: not a usable {} key: {e}", config.algorithm)
            })?
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = 30;
        if config.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&config.issuer]);
        }
        if config.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audiences);
        }
        Ok(Some(Self { key, validation, subject_claim: config.subject_claim.clone() }))
    }

    /// The user the token names, if the token is valid.
    pub fn subject(&self, token: &str) -> Result<String, Error> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| Error::forbidden(format!("Invalid JSON Web Token: {e}")))?;
        data.claims.get(&self.subject_claim).and_then(|v| v.as_str()).map(str::to_owned).ok_or_else(
            || Error::forbidden(format!("The token has no {} claim", self.subject_claim)),
        )
    }
}
