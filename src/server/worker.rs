//! The engine: the bounded queue of stored jobs, the one generation thread with its resident
//! model, progress with previews, cancellation, and the notifications the HTTP side waits on.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use candle_core::Tensor;
use serde_json::{Value, json};

use super::jobs::{Finished, GenerationSpec, JobId, JobSpec, JobState, job_dir};
use super::models_dir::{Entry, Kind, ModelsDir};
use super::monitor::{INTERRUPTED, JobMonitor};
use super::store::{JobStore, StoredJob};
use crate::Error;
use crate::io::model_files::SourceOptions;
use crate::limits::Limits;
use crate::noise::SeededNoise;
use crate::pipeline::{LoadOptions, Progress, StableDiffusion};

/// How the engine loads models and bounds work.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The model loaded at start.
    pub model: PathBuf,
    /// The models folder.
    pub models_dir: ModelsDir,
    /// Precision and how single-file checkpoints are read.
    pub load: LoadOptions,
    /// Where jobs, inputs and outputs are kept.
    pub state_dir: PathBuf,
    /// Jobs waiting or running at most.
    pub max_queue: usize,
    /// Generation limits.
    pub limits: Limits,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `max_queue` jobs.
    Full,
    /// The job store failed.
    Store(anyhow::Error),
}

/// A model the server can load: listed, or the startup model.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The entry.
    pub entry: Entry,
    /// Its SHA-256 once known (files only).
    pub sha256: Option<String>,
}

impl Checkpoint {
    /// A1111's title: `name [shorthash]` once the hash is known, else the name.
    pub fn title(&self) -> String {
        match &self.sha256 {
            Some(hash) => format!("{} [{}]", self.entry.name, &hash[..10]),
            None => self.entry.name.clone(),
        }
    }
}

/// What the progress route and the events report.
#[derive(Debug, Default)]
struct ProgressState {
    job: Option<JobId>,
    step: usize,
    steps: usize,
    iteration: usize,
    iterations: usize,
    started: Option<Instant>,
    latents: Arc<Mutex<Option<Tensor>>>,
    sdxl: bool,
}

struct QueueState {
    pending: VecDeque<JobId>,
    running: Option<(JobId, Arc<AtomicBool>)>,
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
    default_size: std::sync::atomic::AtomicUsize,
    hashes: Mutex<std::collections::HashMap<PathBuf, String>>,
    counter: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the store, loads the startup model, queues the jobs a previous run left unfinished
    /// and starts the generation thread.
    pub fn start(settings: EngineSettings) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(settings.state_dir.join("jobs"))
            .map_err(|e| anyhow::anyhow!("creating the state folder {}: {e}", settings.state_dir.display()))?;
        let store = JobStore::open(&settings.state_dir)?;
        let startup = Checkpoint { entry: startup_entry(&settings), sha256: None };
        let resident = Resident::load(&startup, &settings)?;
        let pending: VecDeque<JobId> = store.unfinished()?.into_iter().map(|job| job.id).collect();
        let (ended, _) = tokio::sync::watch::channel(0);
        let (events, _) = tokio::sync::broadcast::channel(256);
        let engine = Arc::new(Self {
            store,
            queue: Mutex::new(QueueState { pending, running: None, stopping: false }),
            wake: Condvar::new(),
            progress: Mutex::new(ProgressState::default()),
            ended,
            events,
            current: Mutex::new(startup),
            default_size: std::sync::atomic::AtomicUsize::new(resident.default_size()),
            hashes: Mutex::new(Default::default()),
            counter: AtomicU64::new(0),
            settings,
        });
        let worker = engine.clone();
        std::thread::Builder::new().name("diffctl-generation".into()).spawn(move || worker.run(resident))?;
        let hasher = engine.clone();
        std::thread::Builder::new().name("diffctl-hashes".into()).spawn(move || hasher.hash_checkpoints())?;
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
        q.pending.len() + usize::from(q.running.is_some()) < self.settings.max_queue
    }

    /// Stores and queues job `id` (its inputs already in its folder); on refusal the folder goes.
    pub fn submit(&self, id: &str, spec: &JobSpec) -> Result<(), SubmitError> {
        let mut q = lock(&self.queue);
        let refuse = |e| {
            let _ = std::fs::remove_dir_all(job_dir(&self.settings.state_dir, id));
            e
        };
        if q.pending.len() + usize::from(q.running.is_some()) >= self.settings.max_queue {
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
        if let Some((running, flag)) = &q.running
            && running == id
        {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Interrupts the running job (A1111's `interrupt` and `skip`).
    pub fn interrupt(&self) {
        if let Some((_, flag)) = &lock(&self.queue).running {
            flag.store(true, Ordering::Relaxed);
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

    /// The resident (or last requested) checkpoint.
    pub fn current(&self) -> Checkpoint {
        let mut current = lock(&self.current).clone();
        current.sha256 = lock(&self.hashes).get(&current.entry.path).cloned();
        current
    }

    /// Every loadable checkpoint: the startup model first when it is outside the models folder.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        let hashes = lock(&self.hashes);
        let mut entries = self.settings.models_dir.list(Kind::Checkpoint);
        let startup = startup_entry(&self.settings);
        if !entries.iter().any(|e| same_path(&e.path, &startup.path)) {
            entries.insert(0, startup);
        }
        entries
            .into_iter()
            .map(|entry| Checkpoint { sha256: hashes.get(&entry.path).cloned(), entry })
            .collect()
    }

    /// The checkpoint a title names (`name [hash]`, name, stem or hash), or an error naming the
    /// choices.
    pub fn find_checkpoint(&self, title: &str) -> Result<Checkpoint, String> {
        let all = self.checkpoints();
        let wanted = title.trim();
        let bare = super::models_dir::strip_hash(wanted);
        let found = all.iter().find(|c| c.title() == wanted).or_else(|| all.iter().find(|c| c.entry.is_named(bare))).or_else(
            || all.iter().find(|c| c.sha256.as_deref().is_some_and(|h| !wanted.is_empty() && h.starts_with(wanted))),
        );
        found.cloned().ok_or_else(|| {
            format!(
                "no checkpoint is titled `{wanted}`; available: {}",
                all.iter().map(Checkpoint::title).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The A1111 progress object; the preview image (base64 PNG) unless `skip_image`.
    pub fn progress_json(&self, skip_image: bool) -> Value {
        let (waiting, running) = {
            let q = lock(&self.queue);
            (q.pending.len(), q.running.as_ref().map(|(id, _)| id.clone()))
        };
        let p = lock(&self.progress);
        let job_count = waiting + usize::from(running.is_some());
        let total = (p.steps * p.iterations.max(1)) as f64;
        let done = (p.iteration * p.steps + p.step) as f64;
        let fraction = if running.is_some() && total > 0.0 { (done / total).min(1.0) } else { 0.0 };
        let eta = match p.started {
            Some(started) if fraction > 0.0 => started.elapsed().as_secs_f64() / fraction * (1.0 - fraction),
            _ => 0.0,
        };
        let image = if skip_image || running.is_none() {
            None
        } else {
            let latents = lock(&p.latents).clone();
            latents
                .and_then(|l| super::preview::cheap_preview(&l, p.sdxl).ok().flatten())
                .and_then(|img| super::png::encode(&img, None).ok())
                .map(|bytes| base64_encode(&bytes))
        };
        json!({
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": false,
                "interrupted": false,
                "stopping_generation": false,
                "job": running.clone().unwrap_or_default(),
                "job_count": job_count,
                "job_timestamp": "0",
                "job_no": p.iteration,
                "sampling_step": p.step,
                "sampling_steps": p.steps,
            },
            "current_image": image,
            "textinfo": running.map(|_| format!("Step {}/{}", p.step, p.steps)),
            "current_task": p.job,
        })
    }

    fn publish_progress(&self) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(json!({"event": "progress", "data": self.progress_json(false)}).to_string());
        }
    }

    fn end(&self, id: &str, state: JobState, finished: &Finished) {
        if let Err(e) = self.store.finish(id, state, finished) {
            eprintln!("diffctl serve: {e}");
        }
        self.ended.send_modify(|n| *n += 1);
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(json!({"event": "job", "data": {"id": id, "state": state}}).to_string());
        }
        self.publish_progress();
    }

    /// The generation thread: takes jobs in order until stopped.
    fn run(self: Arc<Self>, mut resident: Resident) {
        loop {
            let (id, cancel) = {
                let mut q = lock(&self.queue);
                loop {
                    if q.stopping {
                        return;
                    }
                    if let Some(id) = q.pending.pop_front() {
                        let cancel = Arc::new(AtomicBool::new(false));
                        q.running = Some((id.clone(), cancel.clone()));
                        break (id, cancel);
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let (state, finished) = self.run_job(&mut resident, &id, cancel);
            lock(&self.queue).running = None;
            self.end(&id, state, &finished);
            self.purge_old_jobs();
        }
    }

    fn run_job(&self, resident: &mut Resident, id: &str, cancel: Arc<AtomicBool>) -> (JobState, Finished) {
        let failed = |message: String, client_error: bool| {
            (JobState::Failed, Finished { error: Some(message), client_error, ..Default::default() })
        };
        let job = match self.store.get(id) {
            Ok(Some(job)) => job,
            Ok(None) => return failed(format!("job {id} is not stored"), false),
            Err(e) => return failed(e.to_string(), false),
        };
        if let Err(e) = self.store.set_running(id) {
            return failed(e.to_string(), false);
        }
        let dir = job_dir(&self.settings.state_dir, id);
        let result = match &job.spec {
            JobSpec::LoadModel { title } => self.switch(resident, title).map(|()| Finished::default()),
            JobSpec::Generate(spec) => self.generate(resident, id, spec, &dir, &cancel),
        };
        match result {
            Ok(finished) => (JobState::Done, finished),
            Err(_) if cancel.load(Ordering::Relaxed) => (
                JobState::Cancelled,
                Finished { error: Some(INTERRUPTED.into()), ..Default::default() },
            ),
            Err(JobError { message, client_error }) => failed(message, client_error),
        }
    }

    fn switch(&self, resident: &mut Resident, title: &str) -> Result<(), JobError> {
        let wanted = self.find_checkpoint(title).map_err(JobError::client)?;
        if same_path(&wanted.entry.path, &resident.checkpoint.entry.path) {
            return Ok(());
        }
        // The old model goes first: two resident models may not fit.
        *resident = Resident::empty(resident.checkpoint.clone());
        crate::allocator::release_free_memory();
        let loaded = Resident::load(&wanted, &self.settings).map_err(|e| JobError::server(format!("{e:#}")));
        match loaded {
            Ok(loaded) => {
                self.default_size.store(loaded.default_size(), Ordering::Relaxed);
                *resident = loaded;
                *lock(&self.current) = wanted;
                Ok(())
            }
            Err(e) => {
                // Back to the previous model so the server keeps serving.
                if let Ok(previous) = Resident::load(&lock(&self.current).clone(), &self.settings) {
                    *resident = previous;
                }
                Err(e)
            }
        }
    }

    fn generate(
        &self,
        resident: &mut Resident,
        id: &str,
        spec: &GenerationSpec,
        dir: &Path,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Finished, JobError> {
        if let Some(title) = &spec.checkpoint {
            self.switch(resident, title)?;
        }
        let model_title = resident.checkpoint.entry.stem.clone();
        let Some(model) = resident.model.as_mut() else {
            return Err(JobError::server("no model is loaded (the last switch failed)".into()));
        };
        let latents = Arc::new(Mutex::new(None));
        {
            let mut p = lock(&self.progress);
            *p = ProgressState {
                job: Some(id.to_string()),
                steps: spec.steps,
                iterations: spec.n_iter,
                started: Some(Instant::now()),
                latents: latents.clone(),
                sdxl: model.unet.config().add_embedding.is_some(),
                ..Default::default()
            };
        }
        self.publish_progress();
        let mut finished = Finished::default();
        for iteration in 0..spec.n_iter {
            lock(&self.progress).iteration = iteration;
            let mut request = spec.request(dir, iteration, self.settings.limits).map_err(JobError::from)?;
            request.embeddings.retain(|e| !resident.embeddings.contains(&e.path));
            let mut prepared = request.prepare(model, &self.settings.load).map_err(JobError::from)?;
            resident.embeddings.extend(request.embeddings.iter().map(|e| e.path.clone()));
            prepared.controls.push(Box::new(JobMonitor::new(cancel.clone(), latents.clone())));
            let mut noise = SeededNoise::new(request.seed);
            let mut on_progress = |p: Progress| {
                if let Progress::Step { done, total } = p {
                    {
                        let mut state = lock(&self.progress);
                        state.step = done;
                        state.steps = total;
                    }
                    self.publish_progress();
                }
            };
            let generated = model
                .generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut on_progress)
                .and_then(|g| prepared.postprocess(g))
                .map_err(JobError::from)?;
            let images = crate::io::image::to_rgb8(&generated.images).map_err(JobError::from)?;
            for (i, image) in images.iter().enumerate() {
                let seed = request.seed.wrapping_add(i as u64);
                let infotext = spec.infotext(seed, &model_title);
                let name = format!("output-{iteration}-{i}.png");
                let bytes = super::png::encode(image, Some(&infotext)).map_err(JobError::from)?;
                crate::io::output::write_file(&dir.join(&name), |file| {
                    use std::io::Write;
                    file.write_all(&bytes).map_err(|e| Error::io(dir.join(&name), e))
                })
                .map_err(JobError::from)?;
                finished.images.push(name);
                finished.seeds.push(seed);
                finished.infotexts.push(infotext);
            }
        }
        *lock(&self.progress) = ProgressState::default();
        Ok(finished)
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
        let mut cache: std::collections::HashMap<String, String> =
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
            let _ = crate::io::output::write_file(&cache_path, |file| {
                use std::io::Write;
                file.write_all(&bytes).map_err(|e| Error::io(&cache_path, e))
            });
        }
    }
}

/// A job's failure: its message and whether the request caused it.
#[derive(Debug)]
struct JobError {
    message: String,
    client_error: bool,
}

impl JobError {
    fn client(message: String) -> Self {
        Self { message, client_error: true }
    }

    fn server(message: String) -> Self {
        Self { message, client_error: false }
    }
}

impl From<Error> for JobError {
    fn from(e: Error) -> Self {
        let client_error = matches!(e, Error::InvalidArgument(_));
        Self { message: e.to_string(), client_error }
    }
}

/// The resident model and what was added to it.
struct Resident {
    checkpoint: Checkpoint,
    model: Option<StableDiffusion>,
    embeddings: HashSet<PathBuf>,
}

impl Resident {
    fn empty(checkpoint: Checkpoint) -> Self {
        Self { checkpoint, model: None, embeddings: HashSet::new() }
    }

    fn default_size(&self) -> usize {
        match &self.model {
            Some(model) if model.unet.config().add_embedding.is_some() => {
                model.unet.config().sample_size.unwrap_or(128) * model.vae_scale_factor()
            }
            _ => 512,
        }
    }

    fn load(checkpoint: &Checkpoint, settings: &EngineSettings) -> anyhow::Result<Self> {
        let path = &checkpoint.entry.path;
        // `--model-config` and `--tokenizer` describe single-file checkpoints; a diffusers folder
        // has its own.
        let files = if path.is_dir() {
            SourceOptions { model_config: None, tokenizer: None, ..settings.load.files.clone() }
        } else {
            settings.load.files.clone()
        };
        let options = LoadOptions { files, ..settings.load.clone() };
        let model = StableDiffusion::load(path, &options)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", path.display()))?;
        Ok(Self { checkpoint: checkpoint.clone(), model: Some(model), embeddings: HashSet::new() })
    }
}

fn startup_entry(settings: &EngineSettings) -> Entry {
    settings
        .models_dir
        .list(Kind::Checkpoint)
        .into_iter()
        .find(|e| same_path(&e.path, &settings.model))
        .unwrap_or_else(|| Entry::outside(&settings.model))
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Hex SHA-256 of a file's bytes.
fn sha256_file(path: &Path) -> std::io::Result<String> {
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

/// Standard base64 of `bytes`.
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
