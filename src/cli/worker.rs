//! `diffctl worker`: runs jobs a `diffctl serve --queue redis://…` puts on Redis Streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;

use crate::server::redis_worker::{WorkerOptions, run as run_worker};

/// Arguments of `diffctl worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The Redis server the jobs are on (redis://HOST:PORT).
    #[arg(long, value_name = "URL")]
    queue: String,
    #[command(flatten)]
    resident: super::resident::ResidentArgs,
    /// Take over a job whose worker has not renewed its claim for this many seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    reclaim_after: f64,
    /// Where a job's files are kept while it runs.
    #[arg(long, default_value = "diffctl-worker", value_name = "DIR")]
    work_dir: PathBuf,
}

/// Runs the worker until Ctrl-C or SIGTERM (which let the running job finish).
pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    if !(args.reclaim_after.is_finite() && args.reclaim_after > 0.0) {
        anyhow::bail!("--reclaim-after {} is not a positive number of seconds", args.reclaim_after);
    }
    let options = WorkerOptions {
        queue: args.queue.clone(),
        runner: args.resident.runner()?,
        reclaim_after: Duration::from_secs_f64(args.reclaim_after),
        work_dir: args.work_dir.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            runtime.block_on(crate::server::termination());
            eprintln!("diffctl worker: stopping after the running job");
            flag.store(true, Ordering::Relaxed);
        }
    });
    run_worker(&options, &stop)
}
