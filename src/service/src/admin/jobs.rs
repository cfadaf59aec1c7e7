//! Background jobs an admin starts (Synapse's "background updates" admin API): one at a
//! time, run on the blocking pool, with what is running readable meanwhile.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::Serialize;
use trellis_core::{Error, Result};

use crate::Services;

/// The jobs there are.
pub const REGENERATE_DIRECTORY: &str = "regenerate_directory";

#[derive(Default)]
pub struct Jobs {
    running: Mutex<Option<(String, Instant)>>,
}

/// A running job, in Synapse's shape.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub name: String,
    pub total_item_count: u64,
    pub total_duration_ms: f64,
    pub average_items_per_ms: f64,
}

impl Jobs {
    /// The job running now, if any.
    pub fn current(&self) -> Option<Running> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.as_ref().map(|(name, started)| Running {
            name: name.clone(),
            total_item_count: 0,
            total_duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            average_items_per_ms: 0.0,
        })
    }

    fn finish(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Starts the job `name`: 400 for an unknown job or while one runs.
pub fn start(services: &Arc<Services>, name: &str) -> Result<()> {
    if name != REGENERATE_DIRECTORY {
        return Err(Error::invalid_param(format!("Invalid job_name: {name}")));
    }
    {
        let mut running = services.jobs.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((current, _)) = running.as_ref() {
            return Err(Error::invalid_param(format!(
                "Job {current} is already in queue of background updates."
            )));
        }
        *running = Some((name.to_owned(), Instant::now()));
    }
    let services = services.clone();
    let span = tracing::info_span!("background_job", job = name);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let directory = services.clone();
            let done = tokio::task::spawn_blocking(move || directory.directory.rebuild()).await;
            match done {
                Ok(Ok(users)) => tracing::info!(users, "background job done"),
                Ok(Err(e)) => tracing::error!(error = %e, "background job failed"),
                Err(e) => tracing::error!(error = %e, "background job failed"),
            }
            services.jobs.finish();
        },
        span,
    ));
    Ok(())
}
