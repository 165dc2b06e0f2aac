//! The engine: the bounded queue of stored jobs, the jobs' runner (a generation thread with the
//! resident model, or Redis workers on any machine), progress with previews, cancellation, and
//! the notifications the HTTP side waits on.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use candle_core::Tensor;
use serde_json::{Value, json};

use super::jobs::{Finished, JobId, JobSpec, JobState, job_dir};
use super::monitor::INTERRUPTED;
use super::remote::{Message, ServerLink};
use super::runner::{Checkpoint, Runner, RunnerSettings, StepReport, Watch};
use super::store::{JobStore, StoredJob};

/// How the engine loads models, bounds work and where it runs jobs.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The model, models folder, precision and limits.
    pub runner: RunnerSettings,
    /// Where jobs, inputs and outputs are kept.
    pub state_dir: PathBuf,
    /// Jobs waiting or running at most.
    pub max_queue: usize,
    /// A Redis URL: jobs go to `diffctl worker`s through Redis Streams instead of running here.
    pub queue: Option<String>,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `max_queue` jobs.
    Full,
    /// The job store failed.
    Store(anyhow::Error),
}

/// What the progress route and the events report.
#[derive(Debug, Default)]
struct ProgressState {
    job: Option<JobId>,
    report: StepReport,
    iterations: usize,
    started: Option<Instant>,
    latents: Arc<Mutex<Option<Tensor>>>,
    /// A preview made elsewhere (by a Redis worker), base64 PNG.
    preview: Option<String>,
    sdxl: bool,
}

struct QueueState {
    pending: VecDeque<JobId>,
    running: HashMap<JobId, Arc<AtomicBool>>,
    stopping: bool,
}

/// The shared engine: see the module doc.
pub struct Engine {
    settings: EngineSettings,
    store: JobStore,
    queue: Mutex<QueueState>,
    wake: Condvar,
    progress: Mutex<ProgressState>,
    /// Bumped whenever a job ends; waiters re-read the store.
    ended: tokio::sync::watch::Sender<u64>,
    /// Progress and job events for push clients (JSON text).
    events: tokio::sync::broadcast::Sender<String>,
    current: Mutex<Checkpoint>,
    /// The default image side for the resident model (512, or an SDXL model's native size).
    default_size: AtomicUsize,
    hashes: Mutex<HashMap<PathBuf, String>>,
    counter: AtomicU64,
    remote: Option<ServerLink>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the store, loads the startup model (or connects to Redis), queues the jobs a
    /// previous run left unfinished and starts running jobs.
    pub fn start(settings: EngineSettings) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(settings.state_dir.join("jobs"))
            .map_err(|e| anyhow::anyhow!("creating the state folder {}: {e}", settings.state_dir.display()))?;
        let store = JobStore::open(&settings.state_dir)?;
        let runner_settings = settings.runner.clone();
        let (runner, remote) = match &settings.queue {
            Some(url) => (None, Some(ServerLink::connect(url, &settings.state_dir)?)),
            None => (Some(Runner::load(runner_settings.clone())?), None),
        };
        let unfinished = store.unfinished()?;
        let dispatched = match &remote {
            Some(link) => link.dispatched()?,
            None => Default::default(),
        };
        let mut pending = VecDeque::new();
        let mut running = HashMap::new();
        for job in unfinished {
            if dispatched.contains(&job.id) {
                running.insert(job.id, Arc::new(AtomicBool::new(false)));
            } else {
                pending.push_back(job.id);
            }
        }
        let (ended, _) = tokio::sync::watch::channel(0);
        let (events, _) = tokio::sync::broadcast::channel(256);
        let startup = Checkpoint { entry: runner_settings.startup_entry(), sha256: None };
        let engine = Arc::new(Self {
            store,
            queue: Mutex::new(QueueState { pending, running, stopping: false }),
            wake: Condvar::new(),
            progress: Mutex::new(ProgressState::default()),
            ended,
            events,
            current: Mutex::new(startup),
            default_size: AtomicUsize::new(runner.as_ref().map_or(512, Runner::default_size)),
            hashes: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            remote,
            settings,
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name.into()).spawn(f);
        match runner {
            Some(runner) => {
                let e = engine.clone();
                spawn("diffctl-generation", Box::new(move || e.run_local(runner)))?;
            }
            None => {
                let e = engine.clone();
                spawn("diffctl-dispatch", Box::new(move || e.dispatch()))?;
                let e = engine.clone();
                spawn("diffctl-results", Box::new(move || e.receive()))?;
            }
        }
        let e = engine.clone();
        spawn("diffctl-hashes", Box::new(move || e.hash_checkpoints()))?;
        Ok(engine)
    }

    /// The settings.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// A new job id (time-ordered, unique within this state folder).
    pub fn new_id(&self) -> JobId {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{:x}-{n}", now.as_secs(), now.subsec_nanos())
    }

    /// The folder of job `id` (created).
    pub fn job_dir(&self, id: &str) -> std::io::Result<PathBuf> {
        let dir = job_dir(&self.settings.state_dir, id);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Whether another job fits in the queue now.
    pub fn has_room(&self) -> bool {
        let q = lock(&self.queue);
        q.pending.len() + q.running.len() < self.settings.max_queue
    }

    /// Stores and queues job `id` (its inputs already in its folder); on refusal the folder goes.
    pub fn submit(&self, id: &str, spec: &JobSpec) -> Result<(), SubmitError> {
        let mut q = lock(&self.queue);
        let refuse = |e| {
            let _ = std::fs::remove_dir_all(job_dir(&self.settings.state_dir, id));
            e
        };
        if q.pending.len() + q.running.len() >= self.settings.max_queue {
            return Err(refuse(SubmitError::Full));
        }
        self.store.insert(id, spec).map_err(|e| refuse(SubmitError::Store(e)))?;
        q.pending.push_back(id.to_string());
        drop(q);
        self.wake.notify_all();
        self.publish_progress();
        Ok(())
    }

    /// The stored job `id`.
    pub fn job(&self, id: &str) -> anyhow::Result<Option<StoredJob>> {
        self.store.get(id)
    }

    /// Waits until job `id` has ended and returns it.
    pub async fn wait(&self, id: &str) -> anyhow::Result<StoredJob> {
        let mut ended = self.ended.subscribe();
        loop {
            match self.store.get(id)? {
                Some(job) if job.state.is_final() => return Ok(job),
                Some(_) => {}
                None => anyhow::bail!("job {id} is not stored"),
            }
            if ended.changed().await.is_err() || self.is_stopping() {
                anyhow::bail!("the server is shutting down; the job stays stored and runs when it restarts");
            }
        }
    }

    /// Cancels job `id`: a queued job ends at once, a running one at its next step.
    pub fn cancel(&self, id: &str) {
        let mut q = lock(&self.queue);
        if let Some(i) = q.pending.iter().position(|p| p == id) {
            q.pending.remove(i);
            drop(q);
            self.end(id, JobState::Cancelled, &Finished { error: Some(INTERRUPTED.into()), ..Default::default() });
            return;
        }
        if let Some(flag) = q.running.get(id) {
            flag.store(true, Ordering::Relaxed);
            drop(q);
            self.cancel_remote(id);
        }
    }

    /// Interrupts the running jobs (A1111's `interrupt` and `skip`).
    pub fn interrupt(&self) {
        let ids: Vec<JobId> = {
            let q = lock(&self.queue);
            q.running
                .iter()
                .map(|(id, flag)| {
                    flag.store(true, Ordering::Relaxed);
                    id.clone()
                })
                .collect()
        };
        for id in ids {
            self.cancel_remote(&id);
        }
    }

    fn cancel_remote(&self, id: &str) {
        if let Some(link) = &self.remote
            && let Err(e) = link.cancel(id)
        {
            eprintln!("diffctl serve: cancelling {id} on Redis: {e}");
        }
    }

    /// The default image side: 512, or an SDXL model's native size (A1111's defaults).
    pub fn default_size(&self) -> usize {
        self.default_size.load(Ordering::Relaxed)
    }

    /// Whether [`Self::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        lock(&self.queue).stopping
    }

    /// Stops taking jobs: the generation thread ends after its current job, waiters are told.
    pub fn stop(&self) {
        lock(&self.queue).stopping = true;
        self.wake.notify_all();
        self.ended.send_modify(|n| *n += 1);
    }

    /// A receiver of push events (JSON text).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// A receiver told whenever a job ends.
    pub fn ended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended.subscribe()
    }

    /// The resident checkpoint.
    pub fn current(&self) -> Checkpoint {
        let mut current = lock(&self.current).clone();
        current.sha256 = lock(&self.hashes).get(&current.entry.path).cloned();
        current
    }

    /// Every loadable checkpoint.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.settings.runner.checkpoints(&lock(&self.hashes))
    }

    /// The checkpoint a title names, or an error naming the choices.
    pub fn find_checkpoint(&self, title: &str) -> Result<Checkpoint, String> {
        self.settings.runner.find_checkpoint(title, &lock(&self.hashes))
    }

    /// The A1111 progress object; the preview image (base64 PNG) unless `skip_image`.
    pub fn progress_json(&self, skip_image: bool) -> Value {
        let (waiting, running) = {
            let q = lock(&self.queue);
            (q.pending.len(), q.running.len())
        };
        let p = lock(&self.progress);
        let total = (p.report.steps * p.iterations.max(1)) as f64;
        let done = (p.report.iteration * p.report.steps + p.report.step) as f64;
        let active = running > 0 && p.job.is_some();
        let fraction = if active && total > 0.0 { (done / total).min(1.0) } else { 0.0 };
        let eta = match p.started {
            Some(started) if fraction > 0.0 => started.elapsed().as_secs_f64() / fraction * (1.0 - fraction),
            _ => 0.0,
        };
        let image = if skip_image || !active {
            None
        } else {
            let latents = lock(&p.latents).clone();
            latents.and_then(|l| super::preview::preview_base64(&l, p.sdxl)).or_else(|| p.preview.clone())
        };
        json!({
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": false,
                "interrupted": false,
                "stopping_generation": false,
                "job": if active { p.job.clone().unwrap_or_default() } else { String::new() },
                "job_count": waiting + running,
                "job_timestamp": "0",
                "job_no": p.report.iteration,
                "sampling_step": p.report.step,
                "sampling_steps": p.report.steps,
            },
            "current_image": image,
            "textinfo": active.then(|| format!("Step {}/{}", p.report.step, p.report.steps)),
        })
    }

    fn publish_progress(&self) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(json!({"event": "progress", "data": self.progress_json(false)}).to_string());
        }
    }

    fn set_progress(&self, id: &str, report: StepReport, iterations: usize, preview: Option<String>) {
        {
            let mut p = lock(&self.progress);
            if p.job.as_deref() != Some(id) {
                *p = ProgressState { job: Some(id.to_string()), started: Some(Instant::now()), ..Default::default() };
            }
            p.report = report;
            p.iterations = iterations;
            if preview.is_some() {
                p.preview = preview;
            }
        }
        self.publish_progress();
    }

    fn end(&self, id: &str, state: JobState, finished: &Finished) {
        if let Err(e) = self.store.finish(id, state, finished) {
            eprintln!("diffctl serve: {e}");
        }
        {
            let mut p = lock(&self.progress);
            if p.job.as_deref() == Some(id) {
                *p = ProgressState::default();
            }
        }
        self.ended.send_modify(|n| *n += 1);
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(json!({"event": "job", "data": {"id": id, "state": state}}).to_string());
        }
        self.publish_progress();
    }

    /// The next pending job (marked running with a fresh cancel flag), or `None` once stopping.
    fn next_job(&self) -> Option<(JobId, Arc<AtomicBool>)> {
        let mut q = lock(&self.queue);
        loop {
            if q.stopping {
                return None;
            }
            if let Some(id) = q.pending.pop_front() {
                let cancel = Arc::new(AtomicBool::new(false));
                q.running.insert(id.clone(), cancel.clone());
                return Some((id, cancel));
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn stored(&self, id: &str) -> Result<StoredJob, String> {
        match self.store.get(id) {
            Ok(Some(job)) => Ok(job),
            Ok(None) => Err(format!("job {id} is not stored")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The generation thread: runs jobs in order on the resident model until stopped.
    fn run_local(self: Arc<Self>, mut runner: Runner) {
        while let Some((id, cancel)) = self.next_job() {
            let (state, finished) = match self.stored(&id).and_then(|job| {
                self.store.set_running(&id).map_err(|e| e.to_string())?;
                Ok(job)
            }) {
                Ok(job) => {
                    let latents = Arc::new(Mutex::new(None));
                    let iterations = match &job.spec {
                        JobSpec::Generate(spec) => spec.n_iter,
                        JobSpec::LoadModel { .. } => 1,
                    };
                    {
                        let mut p = lock(&self.progress);
                        *p = ProgressState {
                            job: Some(id.clone()),
                            started: Some(Instant::now()),
                            latents: latents.clone(),
                            sdxl: runner.is_sdxl(),
                            iterations,
                            ..Default::default()
                        };
                    }
                    let mut report = |r: StepReport| {
                        lock(&self.progress).report = r;
                        self.publish_progress();
                    };
                    let resolve = |title: &str| self.find_checkpoint(title);
                    let dir = job_dir(&self.settings.state_dir, &id);
                    let result = runner.run(&job.spec, &resolve, &dir, Watch { cancel, latents, report: &mut report });
                    *lock(&self.current) = runner.checkpoint().clone();
                    self.default_size.store(runner.default_size(), Ordering::Relaxed);
                    result
                }
                Err(message) => (JobState::Failed, Finished { error: Some(message), ..Default::default() }),
            };
            lock(&self.queue).running.remove(&id);
            self.end(&id, state, &finished);
            self.purge_old_jobs();
        }
    }

    /// With Redis: puts pending jobs on the stream, with their input files.
    fn dispatch(self: Arc<Self>) {
        let Some(link) = &self.remote else { return };
        while let Some((id, _)) = self.next_job() {
            let sent = self.stored(&id).and_then(|job| {
                let dir = job_dir(&self.settings.state_dir, &id);
                let files = std::fs::read_dir(&dir)
                    .map(|read| {
                        read.flatten()
                            .filter_map(|e| Some((e.file_name().into_string().ok()?, std::fs::read(e.path()).ok()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                self.store.set_running(&id).map_err(|e| e.to_string())?;
                link.dispatch(&id, &job.spec, files).map_err(|e| e.to_string())
            });
            if let Err(message) = sent {
                lock(&self.queue).running.remove(&id);
                self.end(&id, JobState::Failed, &Finished { error: Some(message), ..Default::default() });
            }
        }
    }

    /// With Redis: stores results and progress as workers send them (acknowledged once stored).
    fn receive(self: Arc<Self>) {
        let Some(link) = &self.remote else { return };
        while !self.is_stopping() {
            let (entry, message) = match link.next_message(500) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("diffctl serve: reading results from Redis: {e}");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    continue;
                }
            };
            match message {
                Message::Progress { id, iteration, step, steps, preview } => {
                    let iterations = match self.store.get(&id) {
                        Ok(Some(StoredJob { spec: JobSpec::Generate(spec), .. })) => spec.n_iter,
                        _ => 1,
                    };
                    if lock(&self.queue).running.contains_key(&id) {
                        self.set_progress(&id, StepReport { iteration, step, steps }, iterations, preview);
                    }
                }
                Message::Finished { id, state, finished, images, worker } => {
                    let already = matches!(self.store.get(&id), Ok(Some(job)) if job.state.is_final());
                    if !already {
                        let dir = job_dir(&self.settings.state_dir, &id);
                        let written = super::remote::decode_images(&images).and_then(|files| {
                            for (name, bytes) in files {
                                crate::io::output::write_bytes(&dir.join(&name), &bytes)?;
                            }
                            Ok(())
                        });
                        let (state, finished) = match written {
                            Ok(()) => (state, finished),
                            Err(e) => (
                                JobState::Failed,
                                Finished {
                                    error: Some(format!("storing the results of {worker}: {e}")),
                                    ..Default::default()
                                },
                            ),
                        };
                        lock(&self.queue).running.remove(&id);
                        self.end(&id, state, &finished);
                    }
                }
            }
            if let Err(e) = link.acknowledge(&entry) {
                eprintln!("diffctl serve: acknowledging a result on Redis: {e}");
            }
        }
    }

    /// Removes the folders of jobs that ended over an hour ago (their `url` images expire).
    fn purge_old_jobs(&self) {
        if let Ok(old) = self.store.ended_before(3600.0) {
            for id in old {
                let _ = std::fs::remove_dir_all(job_dir(&self.settings.state_dir, &id));
            }
        }
    }

    /// Computes the SHA-256 of every checkpoint file (for A1111's titles), cached in the state
    /// folder by path, size and modification time.
    fn hash_checkpoints(self: Arc<Self>) {
        let cache_path = self.settings.state_dir.join("hashes.json");
        let mut cache: HashMap<String, String> =
            std::fs::read(&cache_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        for checkpoint in self.checkpoints() {
            let path = &checkpoint.entry.path;
            let Ok(meta) = std::fs::metadata(path) else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let key = format!("{}|{}|{}", path.display(), meta.len(), mtime.map(|d| d.as_nanos()).unwrap_or(0));
            let hash = match cache.get(&key) {
                Some(hash) => hash.clone(),
                None => match sha256_file(path) {
                    Ok(hash) => hash,
                    Err(_) => continue,
                },
            };
            cache.insert(key, hash.clone());
            lock(&self.hashes).insert(path.clone(), hash);
        }
        if let Ok(bytes) = serde_json::to_vec(&cache) {
            let _ = crate::io::output::write_bytes(&cache_path, &bytes);
        }
    }
}

/// Hex SHA-256 of a file's bytes.
fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
