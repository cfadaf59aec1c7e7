//! `trellis appservice ...`: application service registrations kept in the database (as
//! the admin API adds them), from the server host. These open the database directly, so
//! the server must be stopped; on a running server use `/_trellis/admin/v1/appservices`.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;
use trellis_core::Config;
use trellis_service::appservice::{Appservices, Registration, stored};

#[derive(Subcommand)]
pub enum AppserviceCommand {
    /// Add a registration (the bridge's YAML file); its id and tokens must be unused.
    Add { file: PathBuf },
    /// List every registration, from files and from the database.
    List,
    /// Remove a registration added with `add` (or the admin API).
    Remove { id: String },
}

pub fn run(config: Config, command: AppserviceCommand) -> ExitCode {
    crate::user_cmd::run_offline(execute(config, command))
}

async fn execute(config: Config, command: AppserviceCommand) -> Result<String, String> {
    let db = crate::user_cmd::open_offline(&config)?;
    let files = &config.appservice.registration_files;
    let result = match command {
        AppserviceCommand::Add { file } => {
            let yaml = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
            let reg = Registration::from_yaml(&yaml, &file.display().to_string())?;
            stored::put(&db, &reg.id, &yaml).await.map_err(|e| e.to_string())?;
            // The whole set must still hold together (unique ids and tokens).
            if let Err(e) = Appservices::load(files, &db) {
                stored::remove(&db, &reg.id).await.map_err(|e| e.to_string())?;
                return Err(e);
            }
            format!("added application service {}", reg.id)
        }
        AppserviceCommand::List => {
            let all = Appservices::load(files, &db)?;
            let lines: Vec<String> = all
                .iter()
                .map(|r| format!("{}\t{}", r.id, r.url.as_deref().unwrap_or("(no url)")))
                .collect();
            if lines.is_empty() { "no application services".to_owned() } else { lines.join("\n") }
        }
        AppserviceCommand::Remove { id } => {
            if !stored::remove(&db, &id).await.map_err(|e| e.to_string())? {
                return Err(format!(
                    "no stored registration {id:?} (those from files stay until their file is removed from the configuration)"
                ));
            }
            format!("removed application service {id}")
        }
    };
    db.flush().map_err(|e| format!("flushing storage: {e}"))?;
    Ok(result)
}
