//! Stored sync filters (`POST /user/{userId}/filter`): validated as the spec's filter
//! definition, kept per user under a short random id.

use ruma::api::client::filter::FilterDefinition;
use serde_json::Value;
use trellis_core::{Error, Result};
use trellis_store::{Batch, Db, Json, Table, catalog};

use crate::commit;

const FILTERS: Table<(String, String), Json<Value>> = Table::new(&catalog::FILTERS);

/// A filter larger than this is refused; real ones are a few hundred bytes.
const MAX_FILTER_BYTES: usize = 16 * 1024;

pub struct Filters {
    db: Db,
}

/// Parses a filter definition, with a clear error for a bad one.
pub fn parse(value: &Value) -> Result<FilterDefinition> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")))
}

impl Filters {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create(&self, localpart: &str, definition: Value) -> Result<String> {
        if !definition.is_object() {
            return Err(Error::bad_json("A filter must be a JSON object"));
        }
        if definition.to_string().len() > MAX_FILTER_BYTES {
            return Err(Error::too_large("The filter is too large"));
        }
        parse(&definition)?;
        let id = crate::random::alphanumeric(10);
        let mut batch = Batch::new();
        FILTERS.put(&mut batch, &(localpart.to_owned(), id.clone()), &Json(definition));
        commit(&self.db, batch).await?;
        Ok(id)
    }

    /// A filter given by id, or inline as JSON (some clients send the definition where
    /// an id is expected).
    pub fn resolve(&self, localpart: &str, filter: &str) -> Result<FilterDefinition> {
        if filter.trim_start().starts_with('{') {
            let value: Value = serde_json::from_str(filter)
                .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")))?;
            return parse(&value);
        }
        let value =
            self.get(localpart, filter)?.ok_or_else(|| Error::not_found("Unknown filter"))?;
        parse(&value)
    }

    pub fn get(&self, localpart: &str, id: &str) -> Result<Option<Value>> {
        Ok(FILTERS.get(&*self.db, &(localpart.to_owned(), id.to_owned()))?.map(|j| j.0))
    }
}
