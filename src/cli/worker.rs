//! `diffctl worker`: runs jobs a `diffctl serve --queue redis://…` puts on Redis Streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use candle_core::DType;
use clap::Args;

use crate::limits::Limits;
use crate::pipeline::LoadOptions;
use crate::server::models_dir::ModelsDir;
use crate::server::redis_worker::{WorkerOptions, run as run_worker};
use crate::server::runner::RunnerSettings;

/// Arguments of `diffctl worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The Redis server the jobs are on (redis://HOST:PORT).
    #[arg(long, value_name = "URL")]
    queue: String,
    /// The model loaded at start.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The models folder (the same layout, at the same path as the server's).
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
    #[command(flatten)]
    source: super::source::SourceArgs,
    /// Precision of the networks: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = super::generate::parse_dtype, value_name = "DTYPE")]
    dtype: DType,
    /// Take over a job whose worker has not renewed its claim for this many seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    reclaim_after: f64,
    /// Where a job's files are kept while it runs.
    #[arg(long, default_value = "diffctl-worker", value_name = "DIR")]
    work_dir: PathBuf,
    /// Refuse images of more pixels than this.
    #[arg(long, default_value_t = 2048 * 2048, value_name = "N")]
    max_pixels: u64,
    /// Refuse more images per batch than this.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_batch: usize,
}

/// Runs the worker until Ctrl-C or SIGTERM (which let the running job finish).
pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    if !(args.reclaim_after.is_finite() && args.reclaim_after > 0.0) {
        anyhow::bail!("--reclaim-after {} is not a positive number of seconds", args.reclaim_after);
    }
    let options = WorkerOptions {
        queue: args.queue.clone(),
        runner: RunnerSettings {
            model: args.model.clone(),
            models_dir: ModelsDir::new(args.models_dir.clone()),
            load: LoadOptions { dtype: args.dtype, files: args.source.options(), ..Default::default() },
            limits: Limits { max_pixels: args.max_pixels, max_batch: args.max_batch, max_memory: None },
        },
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
