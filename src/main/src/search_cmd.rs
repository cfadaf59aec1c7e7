//! `trellis search reindex`: builds the message search index again from the rooms. It
//! opens the database directly, so the server must be stopped; a running server rebuilds
//! a lost or corrupt index by itself at start-up.

use std::{process::ExitCode, sync::Arc};

use clap::Subcommand;
use trellis_core::Config;
use trellis_service::{rooms::Rooms, search::Search};

#[derive(Subcommand)]
pub enum SearchCommand {
    /// Drop the search index and index every room's messages again.
    Reindex,
}

pub fn run(config: Config, command: SearchCommand) -> ExitCode {
    crate::user_cmd::run_offline(execute(config, command))
}

async fn execute(config: Config, command: SearchCommand) -> Result<String, String> {
    let db = crate::user_cmd::open_offline(&config)?;
    match command {
        SearchCommand::Reindex => {
            let rooms = Arc::new(
                Rooms::open(db, &config.server.server_name)
                    .map_err(|e| format!("loading rooms: {e}"))?,
            );
            let search =
                Search::open(&config.search, &config.search_path()).map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let events = search.rebuild(rooms).await.map_err(|e| e.to_string())?;
            Ok(format!(
                "search index rebuilt: {events} events read in {:.1} s",
                started.elapsed().as_secs_f64()
            ))
        }
    }
}
