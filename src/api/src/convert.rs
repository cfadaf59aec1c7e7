//! Moving JSON between ruma's typed requests/responses and the services' plain values.

use ruma::serde::Raw;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_core::{Error, Result};

/// A raw JSON value from a ruma `Raw`: bad JSON inside is the client's error.
pub fn raw_value<T>(raw: &Raw<T>) -> Result<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// A ruma response field from the JSON a service built.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_str(&value.to_string()).map_err(|e| Error::internal("building a response", e))
}
