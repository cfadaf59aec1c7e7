//! Registrations added at runtime (admin API, `trellis appservice add`), kept as the YAML
//! they were given so that they read back exactly as a file would.

use trellis_core::Result;
use trellis_store::{Batch, Db, Direction, Table, catalog};

use crate::commit;

/// service id -> registration YAML
const REGISTRATIONS: Table<String, String> = Table::new(&catalog::APPSERVICE_REGISTRATIONS);

pub fn all(db: &Db) -> Result<Vec<(String, String)>> {
    REGISTRATIONS.scan_prefix(&**db, &(), Direction::Forward)?.map(|r| Ok(r?)).collect()
}

pub async fn put(db: &Db, id: &str, yaml: &str) -> Result<()> {
    let mut batch = Batch::new();
    REGISTRATIONS.put(&mut batch, &id.to_owned(), &yaml.to_owned());
    commit(db, batch).await
}

/// Removes a stored registration; false when there was none of that id.
pub async fn remove(db: &Db, id: &str) -> Result<bool> {
    if !REGISTRATIONS.contains(&**db, &id.to_owned())? {
        return Ok(false);
    }
    let mut batch = Batch::new();
    REGISTRATIONS.delete(&mut batch, &id.to_owned());
    commit(db, batch).await?;
    Ok(true)
}
