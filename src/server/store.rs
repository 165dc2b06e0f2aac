//! The embedded job store: every accepted job is written to SQLite in the state directory before
//! it is acknowledged, with its state and result, so a killed server resumes queued jobs and
//! reports finished ones after a restart.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::jobs::{Finished, JobId, JobSpec, JobState};

/// A stored job.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// Its id.
    pub id: JobId,
    /// What it does.
    pub spec: JobSpec,
    /// Where it is.
    pub state: JobState,
    /// What it produced, once final.
    pub finished: Option<Finished>,
}

/// The SQLite job table (one connection, serialised: every statement is short).
pub struct JobStore {
    connection: Mutex<Connection>,
}

/// A store error as text (the server reports it; nothing in it is the client's fault).
fn db_error(what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("job store: {what}: {e}")
}

impl JobStore {
    /// Opens (or creates) `jobs.sqlite3` in `state_dir`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("jobs.sqlite3");
        let connection = Connection::open(&path).map_err(|e| db_error(&format!("opening {}", path.display()), e))?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS jobs (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     id TEXT NOT NULL UNIQUE,
                     spec TEXT NOT NULL,
                     state TEXT NOT NULL,
                     result TEXT,
                     created REAL NOT NULL,
                     ended REAL
                 );",
            )
            .map_err(|e| db_error(&format!("setting up {}", path.display()), e))?;
        Ok(Self { connection: Mutex::new(connection) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a new queued job (durably: the call returns once it is on disk).
    pub fn insert(&self, id: &str, spec: &JobSpec) -> anyhow::Result<()> {
        let spec = serde_json::to_string(spec)?;
        self.lock()
            .execute(
                "INSERT INTO jobs (id, spec, state, created) VALUES (?1, ?2, 'queued', ?3)",
                params![id, spec, now()],
            )
            .map_err(|e| db_error("storing a job", e))?;
        Ok(())
    }

    /// Marks a job running.
    pub fn set_running(&self, id: &str) -> anyhow::Result<()> {
        self.lock()
            .execute("UPDATE jobs SET state = 'running' WHERE id = ?1", params![id])
            .map_err(|e| db_error("marking a job running", e))?;
        Ok(())
    }

    /// Records how a job ended.
    pub fn finish(&self, id: &str, state: JobState, finished: &Finished) -> anyhow::Result<()> {
        let result = serde_json::to_string(finished)?;
        self.lock()
            .execute(
                "UPDATE jobs SET state = ?2, result = ?3, ended = ?4 WHERE id = ?1",
                params![id, state.as_str(), result, now()],
            )
            .map_err(|e| db_error("recording a finished job", e))?;
        Ok(())
    }

    /// The job `id`, if stored.
    pub fn get(&self, id: &str) -> anyhow::Result<Option<StoredJob>> {
        self.lock()
            .query_row("SELECT id, spec, state, result FROM jobs WHERE id = ?1", params![id], row_to_job)
            .optional()
            .map_err(|e| db_error("reading a job", e))?
            .transpose()
    }

    /// The jobs not yet ended, oldest first (a running job was cut off by a restart: it runs again).
    pub fn unfinished(&self) -> anyhow::Result<Vec<StoredJob>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT id, spec, state, result FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq")
            .map_err(|e| db_error("listing jobs", e))?;
        let rows = statement.query_map([], row_to_job).map_err(|e| db_error("listing jobs", e))?;
        rows.map(|row| row.map_err(|e| db_error("listing jobs", e))?).collect()
    }

    /// Ids of jobs that ended more than `age_secs` ago (whose files may go).
    pub fn ended_before(&self, age_secs: f64) -> anyhow::Result<Vec<JobId>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT id FROM jobs WHERE ended IS NOT NULL AND ended < ?1")
            .map_err(|e| db_error("listing old jobs", e))?;
        let rows = statement
            .query_map(params![now() - age_secs], |row| row.get::<_, String>(0))
            .map_err(|e| db_error("listing old jobs", e))?;
        rows.map(|row| row.map_err(|e| db_error("listing old jobs", e))).collect()
    }
}

fn row_to_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<StoredJob>> {
    let id: String = row.get(0)?;
    let spec: String = row.get(1)?;
    let state: String = row.get(2)?;
    let result: Option<String> = row.get(3)?;
    Ok((|| {
        let spec = serde_json::from_str(&spec).map_err(|e| db_error(&format!("job {id}'s spec"), e))?;
        let state =
            JobState::parse(&state).ok_or_else(|| anyhow::anyhow!("job store: job {id} has state `{state}`"))?;
        let finished = result
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| db_error(&format!("job {id}'s result"), e))?;
        Ok(StoredJob { id, spec, state, finished })
    })())
}

/// Seconds since the Unix epoch.
fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
