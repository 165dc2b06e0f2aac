//! `diffctl worker`: takes jobs from Redis Streams (see [`super::remote`]), runs them on its
//! resident model and sends progress and results back to the server that queued them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::remote::{Envelope, WorkerLink, progress};
use super::runner::{Runner, RunnerSettings, StepReport, Watch};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The Redis URL.
    pub queue: String,
    /// The model and models folder (paths in jobs must be valid on this machine).
    pub runner: RunnerSettings,
    /// A job whose worker has not renewed its claim for this long is taken over.
    pub reclaim_after: Duration,
    /// Where jobs' files are kept while they run.
    pub work_dir: PathBuf,
}

/// Runs jobs until `stop` is set (checked between jobs).
pub fn run(options: &WorkerOptions, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut runner = Runner::load(options.runner.clone())?;
    let host =
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    let consumer = format!("{host}-{}", std::process::id());
    let link = Arc::new(WorkerLink::connect(&options.queue, &consumer)?);
    let heartbeat_link = Arc::new(WorkerLink::connect(&options.queue, &consumer)?);
    let reclaim_ms = options.reclaim_after.as_millis().max(1) as u64;
    eprintln!("diffctl worker {consumer}: waiting for jobs on {}", options.queue);
    while !stop.load(Ordering::Relaxed) {
        let envelope = match link.take_job(reclaim_ms, 1000) {
            Ok(Some(envelope)) => envelope,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("diffctl worker: reading jobs: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        eprintln!("diffctl worker {consumer}: running job {}", envelope.id);
        // The claim is renewed while the job runs, so other workers leave it alone.
        let running = Arc::new(AtomicBool::new(true));
        let heartbeat = {
            let (running, link, entry) = (running.clone(), heartbeat_link.clone(), envelope.entry.clone());
            let every = options.reclaim_after / 3;
            std::thread::spawn(move || {
                while running.load(Ordering::Relaxed) {
                    let _ = link.heartbeat(&entry);
                    std::thread::sleep(every.max(Duration::from_millis(50)));
                }
            })
        };
        let result = run_job(&mut runner, &link, &envelope, &options.work_dir);
        running.store(false, Ordering::Relaxed);
        let _ = heartbeat.join();
        if let Err(e) = result {
            eprintln!("diffctl worker: job {}: {e}", envelope.id);
        }
    }
    Ok(())
}

fn run_job(
    runner: &mut Runner,
    link: &WorkerLink,
    envelope: &Envelope,
    work_dir: &std::path::Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(work_dir)?;
    let dir = tempfile::tempdir_in(work_dir)?;
    for (name, bytes) in &envelope.files {
        let name = std::path::Path::new(name).file_name().ok_or_else(|| anyhow::anyhow!("bad file name {name}"))?;
        std::fs::write(dir.path().join(name), bytes)?;
    }
    let cancel = Arc::new(AtomicBool::new(link.is_cancelled(&envelope.id)));
    let latents = Arc::new(Mutex::new(None));
    let sdxl = runner.is_sdxl();
    let mut report = |r: StepReport| {
        if link.is_cancelled(&envelope.id) {
            cancel.store(true, Ordering::Relaxed);
        }
        let preview =
            latents.lock().ok().and_then(|l| l.clone()).and_then(|l| super::preview::preview_base64(&l, sdxl));
        let _ = link.send(&envelope.reply, &progress(&envelope.id, r, preview));
    };
    let settings = runner.settings().clone();
    let resolve = |title: &str| settings.find_checkpoint(title, &Default::default());
    let watch = Watch { cancel: cancel.clone(), latents: latents.clone(), report: &mut report };
    let (state, finished) = runner.run(&envelope.spec, &resolve, dir.path(), watch);
    let images = finished
        .images
        .iter()
        .map(|name| Ok((name.clone(), std::fs::read(dir.path().join(name))?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    link.finish(envelope, state, finished, images)
}
