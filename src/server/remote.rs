//! Jobs on Redis Streams, for several machines: the server adds each accepted job (spec and
//! input images) to the stream `diffctl:jobs`, which workers read through the consumer group
//! `workers`; a worker that dies leaves its entry pending, and another claims it once it has been
//! idle for the reclaim time (workers renew their claim while they run). Results and progress come
//! back on the server's own stream `diffctl:results:<server id>`, which it reads through its
//! group `server` and acknowledges only once a result is stored: nothing is lost when either side
//! is killed. Cancellation is a key `diffctl:cancel:<job id>` that workers check every step.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use serde::{Deserialize, Serialize};

use super::images::{decode_base64_bytes, encode_base64};
use super::jobs::{Finished, JobSpec, JobState};
use super::runner::StepReport;

/// The stream of jobs.
pub const JOBS: &str = "diffctl:jobs";
/// The workers' consumer group on [`JOBS`].
pub const WORKERS: &str = "workers";
/// The server's consumer group on its results stream.
const SERVER_GROUP: &str = "server";

type Files = Vec<(String, Vec<u8>)>;

/// A message on a server's results stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// A job's progress, with a preview (base64 PNG).
    Progress {
        /// The job.
        id: String,
        /// Where it is.
        iteration: usize,
        /// Steps done.
        step: usize,
        /// Steps in all.
        steps: usize,
        /// The preview.
        preview: Option<String>,
    },
    /// A job ended; its images come as base64 by file name.
    Finished {
        /// The job.
        id: String,
        /// How it ended.
        state: JobState,
        /// What it produced.
        finished: Finished,
        /// The images.
        images: HashMap<String, String>,
        /// Which worker ran it.
        worker: String,
    },
}

fn unb64(text: &str) -> anyhow::Result<Vec<u8>> {
    decode_base64_bytes(text, "a file on the stream").map_err(anyhow::Error::msg)
}

fn connect(url: &str) -> anyhow::Result<redis::Connection> {
    let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("--queue {url}: {e}"))?;
    client.get_connection().map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))
}

/// Creates a consumer group at the stream's start (and the stream), unless it exists.
fn create_group(con: &mut redis::Connection, stream: &str, group: &str) -> anyhow::Result<()> {
    let created: redis::RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query(con);
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(anyhow::anyhow!("creating consumer group {group} on {stream}: {e}")),
    }
}

fn field(entry: &StreamId, name: &str) -> anyhow::Result<String> {
    entry.get::<String>(name).ok_or_else(|| anyhow::anyhow!("stream entry {} has no `{name}`", entry.id))
}

/// The server's side.
pub struct ServerLink {
    con: Mutex<redis::Connection>,
    results: String,
}

fn lock(m: &Mutex<redis::Connection>) -> std::sync::MutexGuard<'_, redis::Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServerLink {
    /// Connects; the server's id (its results stream) is kept in `state_dir/server-id` so a
    /// restarted server reads the results sent to it while it was down.
    pub fn connect(url: &str, state_dir: &Path) -> anyhow::Result<Self> {
        let mut con = connect(url)?;
        let id_file = state_dir.join("server-id");
        let id = match std::fs::read_to_string(&id_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let id = format!("{:x}{:x}-{}", now.as_secs(), now.subsec_nanos(), std::process::id());
                std::fs::write(&id_file, &id).map_err(|e| anyhow::anyhow!("writing {}: {e}", id_file.display()))?;
                id
            }
        };
        let results = format!("diffctl:results:{id}");
        create_group(&mut con, JOBS, WORKERS)?;
        create_group(&mut con, &results, SERVER_GROUP)?;
        Ok(Self { con: Mutex::new(con), results })
    }

    /// Ids of jobs on the stream (dispatched, not yet finished).
    pub fn dispatched(&self) -> anyhow::Result<HashSet<String>> {
        let reply: StreamRangeReply = redis::cmd("XRANGE").arg(JOBS).arg("-").arg("+").query(&mut *lock(&self.con))?;
        Ok(reply
            .ids
            .iter()
            .filter(|e| e.get::<String>("reply").as_deref() == Some(&self.results))
            .filter_map(|e| e.get("id"))
            .collect())
    }

    /// Puts job `id` on the stream with its input files.
    pub fn dispatch(&self, id: &str, spec: &JobSpec, files: Files) -> anyhow::Result<()> {
        let files: HashMap<String, String> =
            files.into_iter().map(|(name, bytes)| (name, encode_base64(&bytes))).collect();
        let _: String = redis::cmd("XADD")
            .arg(JOBS)
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("spec")
            .arg(serde_json::to_string(spec)?)
            .arg("files")
            .arg(serde_json::to_string(&files)?)
            .arg("reply")
            .arg(&self.results)
            .query(&mut *lock(&self.con))?;
        Ok(())
    }

    /// Asks the worker running job `id` to stop.
    pub fn cancel(&self, id: &str) -> anyhow::Result<()> {
        let _: () = redis::cmd("SET")
            .arg(format!("diffctl:cancel:{id}"))
            .arg(1)
            .arg("EX")
            .arg(86400)
            .query(&mut *lock(&self.con))?;
        Ok(())
    }

    /// The next message for this server (first those delivered before a restart and not
    /// acknowledged), waiting up to `block_ms`; with its entry id for [`Self::acknowledge`].
    pub fn next_message(&self, block_ms: usize) -> anyhow::Result<Option<(String, Message)>> {
        for start in ["0", ">"] {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(SERVER_GROUP).arg("server").arg("COUNT").arg(1);
            if start == ">" {
                cmd.arg("BLOCK").arg(block_ms);
            }
            let reply: Option<StreamReadReply> =
                cmd.arg("STREAMS").arg(&self.results).arg(start).query(&mut *lock(&self.con))?;
            if let Some(entry) = reply.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()) {
                let message = serde_json::from_str(&field(&entry, "message")?)?;
                return Ok(Some((entry.id, message)));
            }
        }
        Ok(None)
    }

    /// Acknowledges (and deletes) a handled message.
    pub fn acknowledge(&self, entry: &str) -> anyhow::Result<()> {
        let mut con = lock(&self.con);
        let _: i64 = redis::cmd("XACK").arg(&self.results).arg(SERVER_GROUP).arg(entry).query(&mut *con)?;
        let _: i64 = redis::cmd("XDEL").arg(&self.results).arg(entry).query(&mut *con)?;
        Ok(())
    }
}

/// A job as a worker takes it.
pub struct Envelope {
    /// The stream entry.
    pub entry: String,
    /// The job's id.
    pub id: String,
    /// What to do.
    pub spec: JobSpec,
    /// Its input files.
    pub files: Files,
    /// The stream to answer on.
    pub reply: String,
}

/// A worker's side.
pub struct WorkerLink {
    con: Mutex<redis::Connection>,
    /// This worker's consumer name.
    pub consumer: String,
}

impl WorkerLink {
    /// Connects as consumer `consumer`.
    pub fn connect(url: &str, consumer: &str) -> anyhow::Result<Self> {
        let mut con = connect(url)?;
        create_group(&mut con, JOBS, WORKERS)?;
        Ok(Self { con: Mutex::new(con), consumer: consumer.to_string() })
    }

    /// The next job: one another worker left idle for `reclaim_ms`, else a new one (waiting up to
    /// `block_ms`).
    pub fn take_job(&self, reclaim_ms: u64, block_ms: usize) -> anyhow::Result<Option<Envelope>> {
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(JOBS)
            .arg(WORKERS)
            .arg(&self.consumer)
            .arg(reclaim_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query(&mut *lock(&self.con))?;
        if let Some(entry) = claimed.claimed.into_iter().find(|e| !e.map.is_empty()) {
            return Ok(Some(envelope(entry)?));
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(WORKERS)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(JOBS)
            .arg(">")
            .query(&mut *lock(&self.con))?;
        match reply.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()) {
            Some(entry) => Ok(Some(envelope(entry)?)),
            None => Ok(None),
        }
    }

    /// Renews this worker's claim on `entry` (resets its idle time).
    pub fn heartbeat(&self, entry: &str) -> anyhow::Result<()> {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(JOBS)
            .arg(WORKERS)
            .arg(&self.consumer)
            .arg(0)
            .arg(entry)
            .arg("JUSTID")
            .query(&mut *lock(&self.con))?;
        Ok(())
    }

    /// Whether the server asked to stop job `id`.
    pub fn is_cancelled(&self, id: &str) -> bool {
        redis::cmd("EXISTS").arg(format!("diffctl:cancel:{id}")).query::<i64>(&mut *lock(&self.con)).unwrap_or(0) > 0
    }

    /// Sends a message to `reply`.
    pub fn send(&self, reply: &str, message: &Message) -> anyhow::Result<()> {
        let _: String = redis::cmd("XADD")
            .arg(reply)
            .arg("*")
            .arg("message")
            .arg(serde_json::to_string(message)?)
            .query(&mut *lock(&self.con))?;
        Ok(())
    }

    /// Sends the result and removes the job from the stream.
    pub fn finish(
        &self,
        envelope: &Envelope,
        state: JobState,
        finished: Finished,
        images: Files,
    ) -> anyhow::Result<()> {
        let images = images.into_iter().map(|(name, bytes)| (name, encode_base64(&bytes))).collect();
        let message =
            Message::Finished { id: envelope.id.clone(), state, finished, images, worker: self.consumer.clone() };
        self.send(&envelope.reply, &message)?;
        let mut con = lock(&self.con);
        let _: i64 = redis::cmd("XACK").arg(JOBS).arg(WORKERS).arg(&envelope.entry).query(&mut *con)?;
        let _: i64 = redis::cmd("XDEL").arg(JOBS).arg(&envelope.entry).query(&mut *con)?;
        Ok(())
    }
}

fn envelope(entry: StreamId) -> anyhow::Result<Envelope> {
    let files: HashMap<String, String> = serde_json::from_str(&field(&entry, "files")?)?;
    let files = files.into_iter().map(|(name, data)| Ok((name, unb64(&data)?))).collect::<anyhow::Result<_>>()?;
    Ok(Envelope {
        id: field(&entry, "id")?,
        spec: serde_json::from_str(&field(&entry, "spec")?)?,
        files,
        reply: field(&entry, "reply")?,
        entry: entry.id,
    })
}

/// Decodes a message's images.
pub fn decode_images(images: &HashMap<String, String>) -> anyhow::Result<Files> {
    images.iter().map(|(name, data)| Ok((name.clone(), unb64(data)?))).collect()
}

/// A progress message for `report` of job `id`.
pub fn progress(id: &str, report: StepReport, preview: Option<String>) -> Message {
    Message::Progress {
        id: id.to_string(),
        iteration: report.iteration,
        step: report.step,
        steps: report.steps,
        preview,
    }
}
