//! `trellis`: the Matrix homeserver binary.

mod appservice_cmd;
mod backup_cmd;
mod bench;
mod http1;
mod limits;
mod plain;
mod search_cmd;
mod serve;
mod sfu;
mod tls;
mod turn;
mod user_cmd;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use trellis_core::Config;

// mimalloc: sending a message took 12-15% less server CPU than with glibc's allocator,
// delivering it to waiting syncs about 10% less. Built without transparent huge pages,
// which held 12 MB more at idle.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The documented example configuration; a test keeps it equal to the defaults.
const CONFIG_EXAMPLE: &str = include_str!("../../../config.example.toml");

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis, a Matrix homeserver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver. Without a config file every key takes its default:
    /// server name `localhost`, client API on 127.0.0.1:8008, data in ./data.
    Serve {
        /// TOML config file; `TRELLIS_<SECTION>__<KEY>` environment variables override it.
        #[arg(long, short, env = "TRELLIS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Administer accounts (the server must be stopped: these open the database).
    User {
        /// TOML config file (for the data directory and server name).
        #[arg(long, short, env = "TRELLIS_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: user_cmd::UserCommand,
    },
    /// Application service registrations kept in the database (the server must be
    /// stopped; on a running server use the admin API).
    Appservice {
        /// TOML config file (for the data directory and the registration files).
        #[arg(long, short, env = "TRELLIS_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: appservice_cmd::AppserviceCommand,
    },
    /// The message search index (the server must be stopped: these open the database).
    Search {
        /// TOML config file (for the data directory and the search settings).
        #[arg(long, short, env = "TRELLIS_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: search_cmd::SearchCommand,
    },
    /// Backups: take them (online), list, verify, restore into an empty data directory,
    /// prune (docs/operations.md).
    Backup {
        /// TOML config file (for the data directory and `[backup]`).
        #[arg(long, short, env = "TRELLIS_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: backup_cmd::BackupCommand,
    },
    /// Load scenarios against a running homeserver (any implementation), through the
    /// client-server API only. Each prints one JSON line; `scripts/bench-compare` runs them
    /// against Trellis and Synapse, `scripts/bench-federation` the two-server scenario
    /// (docs/performance.md).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (with environment overrides applied) and list every problem.
    Check { file: PathBuf },
    /// Print the documented default configuration.
    PrintDefaults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for every rustls user in the process (URL previews, S3,
    // SMTP); ring is the one built in. Installing fails only if one is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Serve { config } => {
            let config = match Config::load(config.as_deref(), std::env::vars()) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("invalid configuration:\n{errors}");
                    return ExitCode::from(78); // EX_CONFIG
                }
            };
            serve::run(config)
        }
        Command::User { config, command } => {
            with_config(config, |config| user_cmd::run(config, command))
        }
        Command::Appservice { config, command } => {
            with_config(config, |config| appservice_cmd::run(config, command))
        }
        Command::Search { config, command } => {
            with_config(config, |config| search_cmd::run(config, command))
        }
        Command::Backup { config, command } => {
            with_config(config, |config| backup_cmd::run(config, command))
        }
        Command::Bench { command } => bench::run(command),
        Command::Config { command: ConfigCommand::Check { file } } => {
            match Config::load(Some(&file), std::env::vars()) {
                Ok(_) => {
                    println!("{}: OK", file.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for issue in &errors.0 {
                        eprintln!("{}: {issue}", file.display());
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config { command: ConfigCommand::PrintDefaults } => {
            print!("{CONFIG_EXAMPLE}");
            ExitCode::SUCCESS
        }
    }
}

/// Runs an offline command with the configuration, or reports why it is invalid.
fn with_config(path: Option<PathBuf>, run: impl FnOnce(Config) -> ExitCode) -> ExitCode {
    match Config::load(path.as_deref(), std::env::vars()) {
        Ok(config) => run(config),
        Err(errors) => {
            eprintln!("invalid configuration:\n{errors}");
            ExitCode::from(78) // EX_CONFIG
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_exactly_the_defaults() {
        let parsed = Config::from_toml_str(CONFIG_EXAMPLE, Vec::new()).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn example_config_documents_every_key() {
        let example: toml::Table = CONFIG_EXAMPLE.parse().unwrap();
        let defaults: toml::Table = Config::defaults_toml().parse().unwrap();
        for (section, keys) in &defaults {
            let toml::Value::Table(keys) = keys else { continue };
            for key in keys.keys() {
                let present = example
                    .get(section)
                    .and_then(|s| s.as_table())
                    .is_some_and(|s| s.contains_key(key));
                assert!(present, "config.example.toml lacks {section}.{key}");
            }
        }
    }
}
