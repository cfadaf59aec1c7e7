//! `trellis user ...`: account administration on the server host. These commands open
//! the database directly, so the server must be stopped (RocksDB allows one process).

use std::{path::Path, process::ExitCode, sync::Arc};

use clap::Subcommand;
use trellis_core::Config;
use trellis_service::{Accounts, Audit, Client};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create an account (registration mode and reserved names do not apply).
    Create {
        name: String,
        /// Make the account a server admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from this file (first line); without it, from standard input.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
        /// Create the account without a password (it can log in only by other means).
        #[arg(long, conflicts_with = "password_file")]
        no_password: bool,
        /// Mark the account as a bot (shown in its profile; not rate-limited unless
        /// `rate_limits.exempt_bots` is false).
        #[arg(long)]
        bot: bool,
    },
    /// Set a new password and sign the account out everywhere.
    ResetPassword {
        name: String,
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
    /// Deactivate an account for good: it can never log in again.
    Deactivate {
        name: String,
        /// Also erase the profile and account data.
        #[arg(long)]
        erase: bool,
    },
}

pub fn run(config: Config, command: UserCommand) -> ExitCode {
    run_offline(execute(config, command))
}

/// Opens the database for a command run beside a stopped server.
pub fn open_offline(config: &Config) -> Result<trellis_store::Db, String> {
    trellis_store::open(&config.database_path(), &config.storage).map_err(|e| {
        format!(
            "opening the database at {}: {e} (is the server running?)",
            config.database_path().display()
        )
    })
}

/// Runs an offline command (one that opens the database itself) to completion and prints
/// its result: the message on success, the error on failure.
pub fn run_offline(command: impl std::future::Future<Output = Result<String, String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_password(file: Option<&Path>) -> Result<String, String> {
    let text = match file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| format!("reading the password: {e}"))?;
            line
        }
    };
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(password)
}

async fn execute(config: Config, command: UserCommand) -> Result<String, String> {
    let db = open_offline(&config)?;
    let accounts = Accounts::new(
        db.clone(),
        config.server.server_name.clone(),
        config.registration.clone(),
        config.auth.clone(),
        Arc::new(Audit::new(db.clone())),
    );
    let client = Client::cli();
    let result = match command {
        UserCommand::Create { name, admin, password_file, no_password, bot } => {
            let password =
                if no_password { None } else { Some(read_password(password_file.as_deref())?) };
            let user_id = accounts
                .create_user(&name, password, admin, &client)
                .await
                .map_err(|e| e.message.to_string())?;
            if bot {
                let localpart = known_user(&accounts, &name)?;
                accounts.mark_bot(&localpart).await.map_err(|e| e.message.to_string())?;
            }
            let kind = match (admin, bot) {
                (true, true) => " (admin, bot)",
                (true, false) => " (admin)",
                (false, true) => " (bot)",
                (false, false) => "",
            };
            format!("created {user_id}{kind}")
        }
        UserCommand::ResetPassword { name, password_file } => {
            let localpart = known_user(&accounts, &name)?;
            let password = read_password(password_file.as_deref())?;
            accounts
                .set_password(&localpart, password, true, None, &client)
                .await
                .map_err(|e| e.message.to_string())?;
            format!(
                "password of {} reset; all its devices are signed out",
                accounts.user_id(&localpart)
            )
        }
        UserCommand::Deactivate { name, erase } => {
            let localpart = known_user(&accounts, &name)?;
            if erase {
                // Later joiners get the user's events redacted, as with the API. (Leaving
                // rooms needs the running server: it happens there, not here.)
                let rooms =
                    trellis_service::rooms::Rooms::open(db.clone(), &config.server.server_name)
                        .map_err(|e| e.message.to_string())?;
                let position = rooms.stream.visible();
                rooms
                    .erasures
                    .erase(&accounts.user_id(&localpart), position)
                    .await
                    .map_err(|e| e.message.to_string())?;
            }
            accounts
                .deactivate(&localpart, erase, &client)
                .await
                .map_err(|e| e.message.to_string())?;
            if erase {
                let media = trellis_service::media::Media::new(&config, db.clone(), None)?;
                let removed =
                    media.delete_uploads_of(&localpart).await.map_err(|e| e.message.to_string())?;
                let detail = Some(format!("{removed} items"));
                Audit::new(db.clone())
                    .log(Some(&localpart), "erase_media", &client, "ok", detail)
                    .await;
            }
            format!("deactivated {}", accounts.user_id(&localpart))
        }
    };
    db.flush().map_err(|e| format!("flushing storage: {e}"))?;
    Ok(result)
}

fn known_user(accounts: &Accounts, name: &str) -> Result<String, String> {
    let localpart = accounts.parse_username(name).map_err(|e| e.message.to_string())?;
    match accounts.user(&localpart).map_err(|e| e.message.to_string())? {
        Some(_) => Ok(localpart),
        None => Err(format!("no such user: {}", accounts.user_id(&localpart))),
    }
}
