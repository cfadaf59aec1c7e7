//! `trellis serve`: wiring, listeners, signals and an orderly shutdown.

use std::{process::ExitCode, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tracing_subscriber::EnvFilter;
use trellis_core::{Config, config::LogFormat};
use trellis_service::{ServerKeys, Services};

pub fn run(config: Config) -> ExitCode {
    if let Err(e) = init_logging(&config) {
        eprintln!("logging.level: {e}");
        return ExitCode::from(78);
    }
    // Panics (caught per request by the HTTP layer) go to the log like everything else,
    // inside the span of the request that caused them.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => {
            // Storage is flushed. Ending the process without running C++ static
            // destructors: RocksDB's would tear down its mutexes while its background
            // threads may still hold them ("pthread lock: Invalid argument", an abort
            // seen after heavy writes).
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            use std::io::Write;
            let _ = std::io::stderr().flush();
            let _ = std::io::stdout().flush();
            // SAFETY: `_exit` ends the process at once; nothing runs after it.
            unsafe { libc::_exit(0) }
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("trellis: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> Result<(), String> {
    // The TURN crate logs every malformed or wrongly signed datagram at error level:
    // anyone could fill the log. The gate counts those in the metrics instead. The
    // WebRTC crates under the SFU warn about every connection that closes (the ICE
    // crate logs an error per datagram still arriving for one). A directive
    // naming a crate itself (`turn=debug`) brings its lines back.
    const QUIETED: &[(&str, &str)] = &[
        ("turn", "off"),
        ("webrtc", "error"),
        ("webrtc_ice", "off"),
        ("webrtc_sctp", "error"),
        ("dtls", "error"),
        ("srtp", "error"),
        ("webrtc_data", "error"),
        ("webrtc_mdns", "error"),
        ("interceptor", "error"),
    ];
    let quieted = |level: &str| {
        let mut filter = level.to_owned();
        for (name, quiet) in QUIETED {
            let named = level.split(',').any(|d| {
                d == *name
                    || d.starts_with(&format!("{name}="))
                    || d.starts_with(&format!("{name}::"))
            });
            if !named {
                filter.push_str(&format!(",{name}={quiet}"));
            }
        }
        filter
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|l| !l.is_empty())
        .and_then(|l| EnvFilter::try_new(quieted(&l)).ok())
        .map_or_else(
            || EnvFilter::try_new(quieted(&config.logging.level)).map_err(|e| e.to_string()),
            Ok,
        )?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match config.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Opening the database, running migrations and building the router allocate and free
/// several megabytes that glibc keeps in its arenas; a server then idles holding pages
/// it will not need again, so they are handed back once, when start-up is over.
fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes the
    // allocator's own locks and touches no memory still in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn serve(mut config: Config) -> Result<(), String> {
    let db_path = config.database_path();
    let storage = config.storage.clone();
    let db = tokio::task::spawn_blocking(move || trellis_store::open(&db_path, &storage))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!("opening the database at {}: {e}", config.database_path().display())
        })?;
    let keys = ServerKeys::load_or_generate(
        &config.signing_key_path(),
        &config.server.server_name,
        config.federation.key_validity_hours,
    )
    .map_err(|e| format!("signing key: {e}"))?
    .with_old_keys(config.federation.old_signing_keys.clone());

    let listen = config.server.listen;
    let tls = match config.federation.tls_listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => {
            let fed = &config.federation;
            let certificate =
                crate::tls::Certificate::load(&fed.tls_certificate, &fed.tls_private_key)?;
            Some((addr, std::sync::Arc::new(certificate)))
        }
        Err(_) => None,
    };
    let metrics = config.metrics.enabled.then_some(config.metrics.listen);
    let grace = Duration::from_secs(config.http.shutdown_grace_seconds);
    trellis_core::error::set_admin_contact(config.server.admin_contact());
    let sfu = crate::sfu::prepare(&mut config, &keys).await;
    let services = Services::new(config, db, keys)?;

    if let Err(e) = trellis_service::admin::rooms::fail_interrupted(&services).await {
        tracing::warn!(error = %e, "marking interrupted room deletions");
    }
    let janitor = tokio::spawn(trellis_service::run_janitor(services.clone()));
    let storage_watch = tokio::spawn(trellis_service::watch_storage(services.clone()));
    let analytics = tokio::spawn(trellis_service::analytics::run(services.analytics.clone()));
    let delayed_events = tokio::spawn(trellis_service::delayed_events::run(services.clone()));
    let backups = tokio::spawn(trellis_service::backup::run_schedule(services.clone()));
    let reseal = tokio::spawn(trellis_service::reseal_media(services.clone()));
    let retention = tokio::spawn(trellis_service::rooms::retention::run(services.clone()));
    trellis_service::export::clear_leftovers(&services);
    let turn = crate::turn::start(&services).await;
    // Application services: their users exist, their queues (kept over a restart) go out,
    // and SIGHUP re-reads their registrations.
    trellis_service::appservice::ensure_senders(&services)
        .await
        .map_err(|e| format!("creating application service users: {e}"))?;
    services.appservice_delivery.start(&services);
    services.push_gateway.start(&services).map_err(|e| format!("starting push delivery: {e}"))?;
    services.search.start(services.rooms.clone());
    let email_notifications = services
        .mailer
        .is_some()
        .then(|| tokio::spawn(trellis_service::push::email::run(services.clone())));
    let appservice_reloader = tokio::spawn(reload_appservices_on_sighup(services.clone()));
    // Transactions queued for other servers before a restart go out again.
    if let Err(e) = trellis_service::federation::sender::resume(&services.federation) {
        tracing::warn!(error = %e, "resuming the federation queue failed");
    }

    // Before anything listens: from then on a SIGTERM means an orderly shutdown.
    let shutdown = shutdown_signal();
    let listener =
        TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut tasks = tokio::task::JoinSet::new();
    let app = trellis_api::main_router(services.clone());
    let app = match sfu {
        Some(sfu) => crate::sfu::routes(services.clone(), sfu).fallback_service(app),
        None => app,
    };
    let open_files = crate::limits::raise_open_files();
    let connections = services.metrics.connections.clone();
    let limits = || {
        crate::limits::ConnectionLimits::new(&services.config.http, open_files, connections.clone())
    };
    tasks.spawn(crate::plain::serve(listener, app.clone(), stop_rx.clone(), limits()));
    let mut reloader = None;
    if let Some((addr, certificate)) = tls {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (federation TLS): {e}"))?;
        reloader = Some(tokio::spawn(crate::tls::reload_on_sighup(certificate.clone())));
        tasks.spawn(crate::tls::serve(listener, app, certificate, stop_rx.clone(), limits()));
        tracing::info!(%addr, "federation TLS listening");
    }
    if let Some(addr) = metrics {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (metrics): {e}"))?;
        tasks.spawn(crate::plain::serve(
            listener,
            trellis_api::metrics_router(services.clone()),
            stop_rx,
            limits(),
        ));
        tracing::info!(%addr, "metrics listening");
    }
    tracing::info!(
        %listen,
        server_name = services.server_name(),
        version = trellis_core::VERSION,
        "Trellis is listening"
    );
    release_startup_memory();

    shutdown.await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            seconds = grace.as_secs(),
            "requests still running after the grace period; closing them"
        );
        tasks.abort_all();
    }

    janitor.abort();
    storage_watch.abort();
    delayed_events.abort();
    backups.abort();
    reseal.abort();
    retention.abort();
    if let Some(turn) = turn {
        turn.close().await;
    }
    appservice_reloader.abort();
    if let Some(task) = email_notifications {
        task.abort();
    }
    if let Some(r) = reloader {
        r.abort();
    }
    // Background work that reads storage ends before storage closes.
    services.search.stop().await;
    analytics.abort();
    if let Err(e) = services.analytics.flush().await {
        tracing::warn!(error = %e, "writing analytics at shutdown failed");
    }
    let db = services.db.clone();
    drop(services);
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("flushing storage: {e}"))?;
    tracing::info!("storage flushed; goodbye");
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers at once and answers a future that completes
/// on the first of them: installed only when awaited, a signal arriving once the
/// listeners answer but before that would kill the process without its orderly
/// shutdown (the storage flush).
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = received(term) => {},
            () = received(interrupt) => {},
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Re-reads the application service registrations on every SIGHUP; a broken set keeps
/// the one before.
async fn reload_appservices_on_sighup(services: std::sync::Arc<Services>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match trellis_service::appservice::reload(&services).await {
            Ok(n) => tracing::info!(registrations = n, "application services reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reloading application services failed; keeping the old ones")
            }
        }
    }
}
