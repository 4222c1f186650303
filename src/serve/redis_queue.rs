//! The shared backend: jobs, progress, results and cancel kept in Redis (≥ 7), so API nodes and
//! workers on many machines serve one queue. Both seams at once, like [`Local`](super::local::Local).
//!
//! Layout, for the model named `{m}` (a worker takes only jobs for the model it loaded):
//! - `dynamicrafter:{m}:jobs`: a stream with the consumer group `workers`; one entry per job.
//!   A worker reads it with XREADGROUP, refreshes its claim while it runs (XCLAIM of its own
//!   entry), and acknowledges after the final state is written. An entry idle past the
//!   visibility timeout (its worker died) is taken over with XAUTOCLAIM.
//! - `dynamicrafter:{m}:waiting`: the ids not started yet, in order: capacity and positions.
//! - `dynamicrafter:{m}:workers`: worker name → last seen (unix seconds).
//! - `dynamicrafter:job:{id}` (hash) and `…:events` (list of event JSON): the job record.
//!
//! Every change to a job is one Lua script, so a state is written once: the final one only
//! by the attempt that holds the job (a late duplicate from a worker presumed dead is
//! discarded), and a job whose workers keep dying ends `failed` after `max_attempts`.

use super::backend::{Backend, EventBatch, JobSpec, NewJob, Outcome, SubmitError, Taken, Ticket, Unavailable, Video, Wait, WorkSource};
use super::form::decode_image;
use super::jobs::{CancelOutcome, Event, JobView, ProgressInfo, State};
use super::metrics;
use super::state::Limits;
use dynamicrafter_engine::{ModeKind, Report, Request};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{Client, Connection, RedisError, RedisResult, Script};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const GROUP: &str = "workers";
/// How long XREADGROUP blocks before a worker checks whether it is stopping.
const BLOCK_MS: u64 = 1000;
/// How often a running job's claim is refreshed and its cancel flag read.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// A worker not seen for this long counts as gone (for `Retry-After`).
const LIVENESS_SECONDS: f64 = 10.0;
/// The fields that hold a job's uploads, dropped once it ends.
const PAYLOAD: &str = "'spec', 'image', 'image2'";

/// Settings of one process's view of the shared queue.
pub struct Options {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The model's name: the queue's key.
    pub model: String,
    /// Jobs that may wait, across the cluster.
    pub capacity: usize,
    /// How long an entry may go without its worker's heartbeat before another takes it.
    pub visibility: Duration,
    /// Starts of one job before it is failed as poison.
    pub max_attempts: u32,
    /// How long a finished job and its video are kept.
    pub keep: Duration,
    /// Frames per second of the videos of jobs submitted here.
    pub fps: f64,
    /// Where this process's workers write a video before storing it.
    pub scratch: PathBuf,
    /// A folder every node sees at the same path: videos stay there as files, and Redis holds
    /// their paths (else Redis holds the videos).
    pub results: Option<PathBuf>,
}

pub struct RedisQueue {
    client: Client,
    idle: Mutex<Vec<Connection>>,
    url: String,
    jobs_stream: String,
    waiting: String,
    workers: String,
    stats: String,
    opts: Options,
    /// This process's name in worker names: `host:pid`.
    process: String,
    closing: AtomicBool,
    retry_after: AtomicU64,
    /// Cancel flags of the jobs this process runs, raised when it stops.
    running: Mutex<Vec<Arc<AtomicBool>>>,
    scripts: Scripts,
    /// Wakes event-stream readers when their job publishes (started with the first reader).
    notifier: Arc<Notifier>,
    notifier_started: std::sync::Once,
}

/// One subscription per API node to every job's change notices (`PUBLISH` from the scripts),
/// fanned out to the event-stream readers of this node.
#[derive(Default)]
struct Notifier {
    readers: Mutex<HashMap<String, watch::Sender<usize>>>,
    /// Subscribed now: readers may wait for a notice (else they poll).
    up: AtomicBool,
}

impl Notifier {
    const CHANNELS: &'static str = "dynamicrafter:events:*";

    fn watch(&self, id: &str) -> watch::Receiver<usize> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        readers.retain(|_, tx| tx.receiver_count() > 0);
        readers.entry(id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn wake(&self, id: Option<&str>) {
        let readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let bump = |tx: &watch::Sender<usize>| tx.send_modify(|n| *n += 1);
        match id {
            Some(id) => readers.get(id).into_iter().for_each(bump),
            None => readers.values().for_each(bump),
        }
    }

    /// Listens until the process ends, resubscribing after an outage.
    fn listen(&self, client: &Client) {
        loop {
            let result = (|| -> RedisResult<()> {
                let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
                let mut pubsub = con.as_pubsub();
                pubsub.psubscribe(Self::CHANNELS)?;
                pubsub.set_read_timeout(None)?;
                self.up.store(true, Ordering::Relaxed);
                // Notices sent while we were not listening are read by the readers' next poll.
                self.wake(None);
                loop {
                    let msg = pubsub.get_message()?;
                    if let Some(id) = msg.get_channel_name().strip_prefix("dynamicrafter:events:") {
                        self.wake(Some(id));
                    }
                }
            })();
            self.up.store(false, Ordering::Relaxed);
            if let Err(e) = result {
                tracing::debug!("event notices: {e}");
            }
            self.wake(None);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Where a finished job's video is kept.
enum Stored {
    Bytes(Vec<u8>),
    File(PathBuf),
    Nothing,
}

/// A worker's hold on a job.
pub struct Claim {
    entry: String,
    attempt: i64,
    consumer: String,
    /// A client asked to cancel (rather than this process stopping or losing the job).
    user_cancel: Arc<AtomicBool>,
    /// Another worker has taken the job over: nothing this attempt writes counts.
    lost: Arc<AtomicBool>,
    /// Dropped to stop the heartbeat (it wakes at once).
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

struct Scripts {
    submit: Script,
    start: Script,
    progress: Script,
    finish: Script,
    release: Script,
    cancel: Script,
    delete: Script,
}

impl Scripts {
    fn new() -> Self {
        // KEYS: waiting, job, events, stream. ARGV: id, capacity, spec, image, image2, mode,
        // seed, created, keep seconds.
        // The id is drawn before the call, so a submit retried after a lost reply finds its
        // own record and is not queued twice.
        let submit = r"
            if redis.call('EXISTS', KEYS[2]) == 1 then
                local at = redis.call('LPOS', KEYS[1], ARGV[1])
                if at then return at + 1 end
                return 0
            end
            local n = redis.call('LLEN', KEYS[1])
            if n >= tonumber(ARGV[2]) then return -1 end
            redis.call('HSET', KEYS[2], 'state', 'queued', 'spec', ARGV[3], 'image', ARGV[4], 'mode', ARGV[6],
                'seed', ARGV[7], 'created', ARGV[8], 'keep', ARGV[9], 'attempts', 0)
            if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'image2', ARGV[5]) end
            redis.call('RPUSH', KEYS[1], ARGV[1])
            redis.call('RPUSH', KEYS[3], cjson.encode({event = 'queued', position = n + 1}))
            redis.call('XADD', KEYS[4], '*', 'job', ARGV[1])
            return n + 1";
        // What ends a job (KEYS job, events, waiting, stream; ARGV[1] id, [2] group, [3] entry),
        // shared by the scripts below: payload gone, expiry set, entry acknowledged.
        let end = format!(
            r"
            local function ack()
                redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
                redis.call('XDEL', KEYS[4], ARGV[3])
            end
            local function close(state, event)
                redis.call('HSET', KEYS[1], 'state', state)
                redis.call('HDEL', KEYS[1], {PAYLOAD}, 'progress')
                redis.call('RPUSH', KEYS[2], event)
                redis.call('PUBLISH', 'dynamicrafter:events:' .. ARGV[1], '')
                redis.call('LREM', KEYS[3], 0, ARGV[1])
                local keep = tonumber(redis.call('HGET', KEYS[1], 'keep') or '3600')
                redis.call('EXPIRE', KEYS[1], keep)
                redis.call('EXPIRE', KEYS[2], keep)
            end"
        );
        // ARGV[4] worker, [5] max attempts, [6] a token drawn for this start (its retries send
        // the same). Returns {verdict, attempt, spec, image, image2}.
        let start = format!(
            r"{end}
            if redis.call('EXISTS', KEYS[1]) == 0 then ack() return {{'gone', 0, '', '', ''}} end
            local state = redis.call('HGET', KEYS[1], 'state')
            if state == 'done' or state == 'failed' or state == 'cancelled' then ack() return {{'final', 0, '', '', ''}} end
            if redis.call('HGET', KEYS[1], 'cancel') == '1' then
                close('cancelled', cjson.encode({{event = 'cancelled'}})) ack() return {{'final', 0, '', '', ''}}
            end
            if state == 'running' and redis.call('HGET', KEYS[1], 'start_token') == ARGV[6] then
                -- This very start, retried because its reply was lost.
                local f = redis.call('HMGET', KEYS[1], 'attempts', 'spec', 'image', 'image2')
                return {{'run', tonumber(f[1]), f[2] or '', f[3] or '', f[4] or ''}}
            end
            local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
            if attempt > tonumber(ARGV[5]) then
                local why = 'gave up after ' .. ARGV[5] .. ' attempts: the worker running this job stopped each time (killed or crashed) before it finished'
                redis.call('HSET', KEYS[1], 'error', why)
                close('failed', cjson.encode({{event = 'error', error = why}})) ack() return {{'final', 0, '', '', ''}}
            end
            redis.call('LREM', KEYS[3], 0, ARGV[1])
            redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[4], 'start_token', ARGV[6])
            redis.call('HDEL', KEYS[1], 'progress')
            local f = redis.call('HMGET', KEYS[1], 'spec', 'image', 'image2')
            return {{'run', attempt, f[1] or '', f[2] or '', f[3] or ''}}"
        );
        // KEYS job, events; ARGV attempt, progress JSON, event JSON, id. -1 when the job is no
        // longer this attempt's, else its cancel flag.
        let progress = r"
            if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then return -1 end
            redis.call('HSET', KEYS[1], 'progress', ARGV[2])
            redis.call('RPUSH', KEYS[2], ARGV[3])
            redis.call('PUBLISH', 'dynamicrafter:events:' .. ARGV[4], '')
            if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
            return 0";
        // ARGV[4] attempt, [5] state, [6] event JSON, [7] report JSON, [8] error, [9] video,
        // [10] seconds, [11] video path (a shared results folder); KEYS[5] stats. 1 written,
        // 0 already ended, -1 not this attempt's.
        let finish = format!(
            r"{end}
            local state = redis.call('HGET', KEYS[1], 'state')
            if state == 'done' or state == 'failed' or state == 'cancelled' then
                ack()
                -- This attempt's own write, retried because its reply was lost: it stands.
                if redis.call('HGET', KEYS[1], 'ended_by') == ARGV[4] then return 1 end
                return 0
            end
            if state == false then ack() return 0 end
            if state ~= 'running' or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[4] then return -1 end
            redis.call('HSET', KEYS[1], 'ended_by', ARGV[4])
            if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'report', ARGV[7]) end
            if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[8]) end
            if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'video', ARGV[9]) end
            if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'video_path', ARGV[11]) end
            close(ARGV[5], ARGV[6])
            ack()
            if ARGV[5] == 'done' then
                local s = tonumber(ARGV[10])
                local old = tonumber(redis.call('HGET', KEYS[5], 'mean_seconds') or '0')
                if old > 0 then s = 0.8 * old + 0.2 * s end
                redis.call('HSET', KEYS[5], 'mean_seconds', tostring(s))
            end
            return 1"
        );
        // A stopping worker hands its job back (KEYS job, events, waiting, stream; ARGV id,
        // group, entry, attempt, consumer): next in line, and the attempt does not count.
        let release = r"
            if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[4] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
            redis.call('HINCRBY', KEYS[1], 'attempts', -1)
            redis.call('HSET', KEYS[1], 'state', 'queued')
            redis.call('HDEL', KEYS[1], 'worker', 'progress')
            redis.call('LPUSH', KEYS[3], ARGV[1])
            redis.call('RPUSH', KEYS[2], cjson.encode({event = 'position', position = 1}))
            redis.call('PUBLISH', 'dynamicrafter:events:' .. ARGV[1], '')
            redis.call('XCLAIM', KEYS[4], ARGV[2], ARGV[5], 0, ARGV[3], 'IDLE', 1000000000000, 'JUSTID')
            return 1";
        // KEYS job, events, waiting, stream(unused); ARGV id. A waiting job ends at once; a
        // running one is flagged and its worker stops between steps.
        let cancel = format!(
            r"{end}
            local state = redis.call('HGET', KEYS[1], 'state')
            if state == false then return 'unknown' end
            if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
            redis.call('HSET', KEYS[1], 'cancel', '1')
            if state == 'queued' and redis.call('LREM', KEYS[3], 0, ARGV[1]) > 0 then
                close('cancelled', cjson.encode({{event = 'cancelled'}}))
                return 'dequeued'
            end
            return 'stopping'"
        );
        // KEYS job, events, waiting, stream(unused); ARGV id. Forgets the job (its worker, if
        // one still runs it, finds it gone and discards its result); returns its video file.
        let delete = r"
            if redis.call('EXISTS', KEYS[1]) == 0 then return false end
            local path = redis.call('HGET', KEYS[1], 'video_path')
            redis.call('LREM', KEYS[3], 0, ARGV[1])
            redis.call('DEL', KEYS[1], KEYS[2])
            redis.call('PUBLISH', 'dynamicrafter:events:' .. ARGV[1], '')
            return path or ''";
        Self {
            delete: Script::new(delete),
            submit: Script::new(submit),
            start: Script::new(&start),
            progress: Script::new(progress),
            finish: Script::new(&finish),
            release: Script::new(release),
            cancel: Script::new(&cancel),
        }
    }
}

fn job_key(id: &str) -> String {
    format!("dynamicrafter:job:{id}")
}

fn events_key(id: &str) -> String {
    format!("dynamicrafter:job:{id}:events")
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

fn mode_of(name: &str) -> ModeKind {
    ModeKind::ALL.into_iter().find(|m| m.name() == name).unwrap_or(ModeKind::ImageToVideo)
}

/// A connection error, as the API and the logs show it.
fn unavailable(e: &RedisError) -> Unavailable {
    Unavailable(e.to_string())
}

impl RedisQueue {
    /// Connects, checks the server answers and creates the consumer group: an unreachable or
    /// wrong URL fails here, with the URL named.
    pub fn connect(opts: Options) -> anyhow::Result<Self> {
        let client = Client::open(opts.url.as_str()).map_err(|e| anyhow::anyhow!("--queue {}: {e}", opts.url))?;
        let prefix = format!("dynamicrafter:{}", opts.model);
        let queue = Self {
            client,
            idle: Mutex::default(),
            url: opts.url.clone(),
            jobs_stream: format!("{prefix}:jobs"),
            waiting: format!("{prefix}:waiting"),
            workers: format!("{prefix}:workers"),
            stats: format!("{prefix}:stats"),
            process: format!("{}:{}", hostname(), std::process::id()),
            opts,
            closing: AtomicBool::new(false),
            retry_after: AtomicU64::new(1),
            running: Mutex::default(),
            scripts: Scripts::new(),
            notifier: Arc::default(),
            notifier_started: std::sync::Once::new(),
        };
        queue.with(|con| {
            let version: String = redis::cmd("INFO").arg("server").query(con)?;
            let major = version.lines().find_map(|l| l.strip_prefix("redis_version:")).and_then(|v| v.split('.').next()?.trim().parse::<u32>().ok());
            if major.is_some_and(|m| m < 7) {
                return Err(RedisError::from((redis::ErrorKind::Client, "Redis 7 or newer is needed", version.lines().find(|l| l.starts_with("redis_version")).unwrap_or("").to_string())));
            }
            queue.ensure_group(con)
        })
        .map_err(|e| anyhow::anyhow!("cannot use Redis at {}: {}", queue.url, e.0.replace('\n', " ")))?;
        Ok(queue)
    }

    /// The calling worker thread's name in the group (`host:pid:thread`): one consumer per
    /// worker thread, named so a job's view says which process runs it.
    pub fn worker_name(&self) -> String {
        format!("{}:{}", self.process, std::thread::current().name().unwrap_or("main"))
    }

    fn ensure_group(&self, con: &mut Connection) -> RedisResult<()> {
        match redis::cmd("XGROUP").arg("CREATE").arg(&self.jobs_stream).arg(GROUP).arg("0").arg("MKSTREAM").query::<()>(con) {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            r => r,
        }
    }

    /// Runs `f` on a pooled connection. A broken connection is dropped with every other idle
    /// one (after a Redis restart they all are) and the call is tried once more on a fresh one,
    /// so the process recovers as soon as Redis is back (a connection a restart closed never
    /// delivered the command).
    fn with<T>(&self, mut f: impl FnMut(&mut Connection) -> RedisResult<T>) -> Result<T, Unavailable> {
        let broken = |e: &RedisError| e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_unrecoverable_error();
        let mut pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        loop {
            let was_pooled = pooled.is_some();
            let mut con = match pooled.take() {
                Some(c) => c,
                None => self.open().map_err(|e| unavailable(&e))?,
            };
            let result = f(&mut con);
            match &result {
                Err(e) if broken(e) => {
                    self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    // Not after a timeout: the command may have run, and a script must not
                    // run twice (a job submitted twice).
                    if was_pooled && !e.is_timeout() {
                        continue;
                    }
                }
                _ => self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(con),
            }
            return result.map_err(|e| unavailable(&e));
        }
    }

    fn open(&self) -> RedisResult<Connection> {
        let con = self.client.get_connection_with_timeout(Duration::from_secs(2))?;
        // Longer than the longest blocking read (XREADGROUP BLOCK).
        let timeout = Some(Duration::from_millis(BLOCK_MS) + Duration::from_secs(5));
        con.set_read_timeout(timeout)?;
        con.set_write_timeout(timeout)?;
        Ok(con)
    }

    fn keys(&self, inv: &mut redis::ScriptInvocation<'_>, id: &str) {
        inv.key(job_key(id)).key(events_key(id)).key(&self.waiting).key(&self.jobs_stream);
    }

    fn position(con: &mut Connection, waiting: &str, id: &str) -> RedisResult<Option<usize>> {
        let index: Option<usize> = redis::cmd("LPOS").arg(waiting).arg(id).query(con)?;
        Ok(index.map(|i| i + 1))
    }

    fn live_workers(&self, con: &mut Connection) -> RedisResult<usize> {
        let seen: Vec<(String, f64)> = redis::cmd("HGETALL").arg(&self.workers).query(con)?;
        let now = now_unix();
        Ok(seen.iter().filter(|(_, t)| now - t < LIVENESS_SECONDS).count())
    }

    fn seen(&self, con: &mut Connection, consumer: &str) -> RedisResult<()> {
        redis::cmd("HSET").arg(&self.workers).arg(consumer).arg(now_unix()).query(con)
    }

    /// The next entry for `consumer`: one whose worker went silent first, else a new one
    /// (waiting up to [`BLOCK_MS`]).
    fn next_entry(&self, consumer: &str) -> Result<Option<(String, String)>, Unavailable> {
        let job_of = |e: &StreamId| e.get::<String>("job").map(|job| (e.id.clone(), job));
        self.with(|con| {
            self.seen(con, consumer)?;
            // XAUTOCLAIM looks at ten pending entries per call: walk the whole pending list
            // (one entry per running job), so a silent worker's job is found behind any number
            // of live ones.
            let mut cursor = "0-0".to_string();
            loop {
                let stale: RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                    .arg(&self.jobs_stream)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(self.opts.visibility.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(1)
                    .query(con);
                let stale = match stale {
                    // Redis lost the group (restarted without its data): make it again.
                    Err(e) if e.code() == Some("NOGROUP") => {
                        self.ensure_group(con)?;
                        return Ok(None);
                    }
                    r => r?,
                };
                if let Some(entry) = stale.claimed.first() {
                    tracing::info!(worker = consumer, "taking over job entry {} (its worker went silent)", entry.id);
                    return Ok(job_of(entry));
                }
                if stale.next_stream_id == "0-0" {
                    break;
                }
                cursor = stale.next_stream_id;
            }
            let read: RedisResult<Option<StreamReadReply>> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&self.jobs_stream)
                .arg(">")
                .query(con);
            let read = match read {
                // Redis lost the group (restarted without its data): make it again.
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.ensure_group(con)?;
                    return Ok(None);
                }
                r => r?,
            };
            Ok(read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.first().and_then(job_of)))
        })
    }

    /// Starts the job of a stream entry; `None` when it had ended meanwhile (acknowledged).
    fn start(&self, consumer: &str, entry: &str, id: &str) -> Result<Option<Taken>, Unavailable> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (verdict, attempt, spec, image, image2): (String, i64, String, Vec<u8>, Vec<u8>) = self.with(|con| {
            let mut inv = self.scripts.start.prepare_invoke();
            self.keys(&mut inv, id);
            inv.arg(id).arg(GROUP).arg(entry).arg(consumer).arg(self.opts.max_attempts).arg(&token).invoke(con)
        })?;
        if verdict != "run" {
            return Ok(None);
        }
        tracing::info!(worker = consumer, job = id, attempt, "running");
        let cancel = Arc::new(AtomicBool::new(false));
        let mut claim = Claim {
            entry: entry.to_string(),
            attempt,
            consumer: consumer.to_string(),
            user_cancel: Arc::default(),
            lost: Arc::default(),
            stop: None,
            heartbeat: None,
        };
        let (request, fps) = match self.rebuild(&spec, &image, &image2) {
            Ok(r) => r,
            Err(e) => {
                // A record this worker cannot read fails once, not on every worker in turn.
                let error = format!("{e:#}");
                self.store(id, &claim, State::Failed, &Event::Error { error: error.clone() }, "", &error, &Stored::Nothing, 0.0);
                return Ok(None);
            }
        };
        let (stop, stopped) = mpsc::channel();
        claim.stop = Some(stop);
        claim.heartbeat = Some(self.heartbeat(id, &claim, cancel.clone(), stopped));
        self.running.lock().unwrap_or_else(|e| e.into_inner()).push(cancel.clone());
        if self.closing.load(Ordering::Relaxed) {
            cancel.store(true, Ordering::Relaxed);
        }
        // Per attempt: a discarded duplicate must not touch the file of the attempt that counts.
        let video_path = self.opts.results.as_ref().unwrap_or(&self.opts.scratch).join(format!("{id}-{attempt}.mp4"));
        Ok(Some(Taken { id: id.to_string(), request, cancel, fps, video_path, ticket: Ticket::Redis(claim) }))
    }

    fn rebuild(&self, spec: &str, image: &[u8], image2: &[u8]) -> anyhow::Result<(Request, f64)> {
        let spec: JobSpec = serde_json::from_str(spec).map_err(|e| anyhow::anyhow!("job record is unreadable: {e}"))?;
        let limits = Limits { max_image_bytes: usize::MAX, max_image_pixels: u64::MAX, max_prompt_tokens: usize::MAX, upload_timeout: Duration::MAX };
        let decode = |field, bytes: &[u8]| decode_image(field, bytes, &limits).map_err(|e| anyhow::anyhow!("{}", e.message));
        let image = decode("image", image)?;
        let image2 = if image2.is_empty() { None } else { Some(decode("image2", image2)?) };
        let fps = spec.fps;
        Ok((spec.request(image, image2)?, fps))
    }

    /// A thread that keeps the job's entry from going idle and watches its cancel flag.
    fn heartbeat(&self, id: &str, claim: &Claim, cancel: Arc<AtomicBool>, stopped: mpsc::Receiver<()>) -> JoinHandle<()> {
        let client = self.client.clone();
        let (job, stream, consumer, entry, attempt) = (job_key(id), self.jobs_stream.clone(), claim.consumer.clone(), claim.entry.clone(), claim.attempt);
        let (lost, user_cancel) = (claim.lost.clone(), claim.user_cancel.clone());
        let workers = self.workers.clone();
        // KEYS job, stream, workers; ARGV attempt, group, consumer, entry, now. Keeps the entry
        // from going idle; -1 when the job is no longer this attempt's, else its cancel flag.
        let script = Script::new(
            r"
            if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then return -1 end
            redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
            redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
            if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
            return 0",
        );
        std::thread::spawn(move || {
            let mut con: Option<Connection> = None;
            let mut down = false;
            loop {
                if con.is_none() {
                    con = client.get_connection_with_timeout(Duration::from_secs(2)).ok();
                    if let Some(c) = &con {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    }
                }
                if let Some(c) = con.as_mut() {
                    let r: RedisResult<i64> = script.key(&job).key(&stream).key(&workers).arg(attempt).arg(GROUP).arg(&consumer).arg(&entry).arg(now_unix()).invoke(c);
                    match r {
                        Ok(-1) => {
                            lost.store(true, Ordering::Relaxed);
                            cancel.store(true, Ordering::Relaxed);
                        }
                        Ok(1) => {
                            user_cancel.store(true, Ordering::Relaxed);
                            cancel.store(true, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if !down {
                                tracing::warn!(worker = %consumer, "heartbeat: {e}; retrying");
                            }
                            con = None;
                        }
                    }
                }
                down = con.is_none();
                if !matches!(stopped.recv_timeout(HEARTBEAT), Err(mpsc::RecvTimeoutError::Timeout)) {
                    break;
                }
            }
        })
    }

    fn progress(&self, job: &Taken, info: ProgressInfo, event: Event) {
        let Ticket::Redis(claim) = &job.ticket else { return };
        let (info, event) = (serde_json::to_string(&info).unwrap_or_default(), serde_json::to_string(&event).unwrap_or_default());
        let r = self.with(|con| self.scripts.progress.key(job_key(&job.id)).key(events_key(&job.id)).arg(claim.attempt).arg(&info).arg(&event).arg(&job.id).invoke::<i64>(con));
        match r {
            Ok(-1) => {
                claim.lost.store(true, Ordering::Relaxed);
                job.cancel.store(true, Ordering::Relaxed);
            }
            Ok(1) => {
                claim.user_cancel.store(true, Ordering::Relaxed);
                job.cancel.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(worker = %claim.consumer, job = %job.id, "progress not published: {}", e.0),
        }
    }

    /// Writes a job's final state, unless it ended already or another attempt holds it. The
    /// result must land: it is retried through a Redis outage for as long as the claim would
    /// hold (after that another worker runs the job again).
    #[allow(clippy::too_many_arguments)]
    fn store(&self, id: &str, claim: &Claim, state: State, event: &Event, report: &str, error: &str, video: &Stored, seconds: f64) -> bool {
        let (bytes, path) = match video {
            Stored::Bytes(b) => (b.as_slice(), String::new()),
            Stored::File(p) => (&[][..], p.to_string_lossy().into_owned()),
            Stored::Nothing => (&[][..], String::new()),
        };
        let event = serde_json::to_string(event).unwrap_or_default();
        let deadline = std::time::Instant::now() + self.opts.visibility;
        loop {
            let r = self.with(|con| {
                let mut inv = self.scripts.finish.prepare_invoke();
                self.keys(&mut inv, id);
                inv.key(&self.stats);
                inv.arg(id).arg(GROUP).arg(&claim.entry).arg(claim.attempt).arg(state.name()).arg(&event).arg(report).arg(error).arg(bytes).arg(seconds).arg(&path);
                inv.invoke::<i64>(con)
            });
            match r {
                Ok(1) => {
                    metrics::job_finished(state.name());
                    tracing::info!(worker = %claim.consumer, job = id, "{}", state.name());
                    return true;
                }
                Ok(_) => {
                    tracing::warn!(worker = %claim.consumer, job = id, "the job had already ended elsewhere; this attempt's result is discarded");
                    return false;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(worker = %claim.consumer, job = id, "storing the result: {}; retrying", e.0);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(worker = %claim.consumer, job = id, "could not store the result ({}); another worker will run the job again", e.0);
                    return false;
                }
            }
        }
    }
}

impl Backend for RedisQueue {
    fn submit(&self, job: NewJob) -> Result<(String, usize), SubmitError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(SubmitError::Closed);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let spec = serde_json::to_string(&JobSpec::of(&job.request, self.opts.fps)).map_err(|e| Unavailable(e.to_string()))?;
        let position: i64 = self.with(|con| {
            let mut inv = self.scripts.submit.prepare_invoke();
            inv.key(&self.waiting).key(job_key(&id)).key(events_key(&id)).key(&self.jobs_stream);
            inv.arg(&id)
                .arg(self.opts.capacity)
                .arg(&spec)
                .arg(&job.image)
                .arg(job.image2.as_deref().unwrap_or_default())
                .arg(job.request.mode.kind().name())
                .arg(job.request.sampling.seed.to_string())
                .arg(now_unix())
                .arg(self.opts.keep.as_secs().max(1))
                .invoke(con)
        })?;
        if position < 0 {
            let estimate = self.with(|con| {
                let mean: Option<f64> = redis::cmd("HGET").arg(&self.stats).arg("mean_seconds").query(con)?;
                let workers = self.live_workers(con)?.max(1);
                Ok((mean.unwrap_or(1.0) * self.opts.capacity as f64 / workers as f64).ceil() as u64)
            });
            self.retry_after.store(estimate.unwrap_or(1).max(1), Ordering::Relaxed);
            return Err(SubmitError::Full { capacity: self.opts.capacity });
        }
        Ok((id, position as usize))
    }

    fn view(&self, id: &str) -> Result<Option<JobView>, Unavailable> {
        type Fields = (Option<String>, Option<String>, Option<String>, Option<f64>, Option<String>, Option<String>, Option<String>, Option<String>);
        let (fields, position): (Fields, Option<usize>) = self.with(|con| {
            let fields: Fields = redis::cmd("HMGET").arg(job_key(id)).arg(&["state", "mode", "seed", "created", "progress", "report", "error", "worker"]).query(con)?;
            Ok((fields, Self::position(con, &self.waiting, id)?))
        })?;
        let (Some(state), mode, seed, created, progress, report, error, worker) = fields else { return Ok(None) };
        let Some(state) = State::from_name(&state) else { return Ok(None) };
        Ok(Some(JobView {
            id: id.to_string(),
            state,
            mode: mode_of(mode.as_deref().unwrap_or_default()),
            seed: seed.and_then(|s| s.parse().ok()).unwrap_or_default(),
            position: position.filter(|_| state == State::Queued),
            progress: progress.filter(|_| state == State::Running).and_then(|p| serde_json::from_str(&p).ok()),
            report: report.and_then(|r| serde_json::from_str::<Report>(&r).ok()),
            error,
            video_url: (state == State::Done).then(|| format!("/api/v1/jobs/{id}/video")),
            created_unix: created.unwrap_or_default(),
            worker,
        }))
    }

    fn events_since(&self, id: &str, from: usize) -> Result<Option<EventBatch>, Unavailable> {
        self.notifier_started.call_once(|| {
            let (notifier, client) = (self.notifier.clone(), self.client.clone());
            let spawned = std::thread::Builder::new().name("event-notices".into()).spawn(move || notifier.listen(&client));
            if let Err(e) = spawned {
                tracing::warn!("event notices: {e}; event streams poll instead");
            }
        });
        // Watching before reading: a notice between the read and the wait still wakes us.
        let changed = self.notifier.watch(id);
        let (state, events, position): (Option<String>, Vec<String>, Option<usize>) = self.with(|con| {
            // One transaction: when the state read is final, every event is in the list read.
            let (state, events): (Option<String>, Vec<String>) =
                redis::pipe().atomic().cmd("HGET").arg(job_key(id)).arg("state").cmd("LRANGE").arg(events_key(id)).arg(from).arg(-1).query(con)?;
            Ok((state, events, Self::position(con, &self.waiting, id)?))
        })?;
        let Some(state) = state.as_deref().and_then(State::from_name) else { return Ok(None) };
        let events = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
        // Notices wake a reader at once; queue moves (no notice) and outages are caught by a poll.
        let wait = match self.notifier.up.load(Ordering::Relaxed) {
            true => Wait { changed: Some(changed), at_most: Some(Duration::from_secs(1)) },
            false => Wait { changed: None, at_most: Some(Duration::from_millis(250)) },
        };
        Ok(Some(EventBatch { events, ended: state.is_final(), position, wait }))
    }

    fn video(&self, id: &str) -> Result<Option<(State, Option<Video>)>, Unavailable> {
        let (state, bytes, path): (Option<String>, Option<Vec<u8>>, Option<String>) =
            self.with(|con| redis::cmd("HMGET").arg(job_key(id)).arg("state").arg("video").arg("video_path").query(con))?;
        let video = bytes.map(Video::Bytes).or_else(|| path.map(|p| Video::File(PathBuf::from(p))));
        Ok(state.as_deref().and_then(State::from_name).map(|s| (s, video)))
    }

    fn cancel(&self, id: &str) -> Result<Option<CancelOutcome>, Unavailable> {
        let verdict: String = self.with(|con| {
            let mut inv = self.scripts.cancel.prepare_invoke();
            self.keys(&mut inv, id);
            inv.arg(id).arg(GROUP).arg("").invoke(con)
        })?;
        Ok(match verdict.as_str() {
            "unknown" => None,
            "dequeued" => {
                metrics::job_finished(State::Cancelled.name());
                Some(CancelOutcome::Dequeued)
            }
            "stopping" => Some(CancelOutcome::Stopping),
            state => Some(CancelOutcome::AlreadyFinal(State::from_name(state).unwrap_or(State::Cancelled))),
        })
    }

    fn delete(&self, id: &str) -> Result<bool, Unavailable> {
        // Cancelled first, so a running job's worker stops and the metrics count it.
        if self.cancel(id)?.is_none() {
            return Ok(false);
        }
        let path: Option<String> = self.with(|con| {
            let mut inv = self.scripts.delete.prepare_invoke();
            self.keys(&mut inv, id);
            inv.arg(id).invoke(con)
        })?;
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            let _ = std::fs::remove_file(path);
        }
        Ok(true)
    }

    fn retry_after_seconds(&self) -> u64 {
        self.retry_after.load(Ordering::Relaxed)
    }

    fn shut_down(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for cancel in self.running.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            cancel.store(true, Ordering::Relaxed);
        }
    }

    fn expire(&self, _keep: Duration) {
        // Redis expires finished jobs itself (EXPIRE at the end of each).
    }

    fn refresh_metrics(&self) -> Result<(), Unavailable> {
        type Summary = (usize, Option<String>, Option<String>, Option<Vec<(String, usize)>>);
        let (waiting, summary, seen) = self.with(|con| {
            let waiting: usize = redis::cmd("LLEN").arg(&self.waiting).query(con)?;
            let summary: Summary = redis::cmd("XPENDING").arg(&self.jobs_stream).arg(GROUP).query(con)?;
            let seen: Vec<(String, f64)> = redis::cmd("HGETALL").arg(&self.workers).query(con)?;
            Ok((waiting, summary, seen))
        })?;
        let now = now_unix();
        // Workers gone for an hour are forgotten.
        let gone: Vec<&String> = seen.iter().filter(|(_, t)| now - t > 3600.0).map(|(w, _)| w).collect();
        if !gone.is_empty() {
            self.with(|con| redis::cmd("HDEL").arg(&self.workers).arg(&gone).query::<()>(con))?;
        }
        let workers: Vec<(String, bool)> = seen.iter().filter(|(_, t)| now - t <= 3600.0).map(|(w, t)| (w.clone(), now - t < LIVENESS_SECONDS)).collect();
        let live = |name: &str| workers.iter().any(|(w, up)| w == name && *up);
        let running = summary.3.iter().flatten().filter(|(w, _)| live(w)).map(|(_, n)| n).sum();
        metrics::cluster(waiting, summary.0, running, &workers);
        Ok(())
    }
}

impl WorkSource for RedisQueue {
    fn take(&self) -> Option<Taken> {
        let consumer = self.worker_name();
        let mut down_since: Option<std::time::Instant> = None;
        while !self.closing.load(Ordering::Relaxed) {
            let result = self.next_entry(&consumer).and_then(|entry| match entry {
                Some((entry, id)) => self.start(&consumer, &entry, &id),
                None => Ok(None),
            });
            match result {
                Ok(Some(taken)) => return Some(taken),
                Ok(None) => {
                    if down_since.take().is_some() {
                        tracing::info!(worker = %consumer, "Redis is back");
                    }
                }
                Err(e) => {
                    if down_since.is_none() {
                        tracing::warn!(worker = %consumer, "Redis at {} is unavailable ({}); retrying", self.url, e.0);
                        down_since = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        None
    }

    fn stage(&self, job: &Taken, stage: &str) {
        let info = ProgressInfo { stage: stage.to_string(), step: 0, total: 0, eta_seconds: None };
        self.progress(job, info, Event::Stage { stage: stage.to_string() });
    }

    fn step(&self, job: &Taken, step: usize, total: usize, eta_seconds: Option<f64>) {
        let info = ProgressInfo { stage: "denoise".into(), step, total, eta_seconds };
        self.progress(job, info, Event::Step { step, total, eta_seconds });
    }

    fn finish(&self, job: Taken, outcome: Outcome) -> bool {
        let Ticket::Redis(mut claim) = job.ticket else { return false };
        drop(claim.stop.take());
        if let Some(h) = claim.heartbeat.take() {
            let _ = h.join();
        }
        self.running.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| !Arc::ptr_eq(c, &job.cancel));
        let id = job.id.as_str();
        if claim.lost.load(Ordering::Relaxed) {
            tracing::warn!(worker = %claim.consumer, job = id, "another worker took this job over; this attempt's result is discarded");
            let _ = std::fs::remove_file(&job.video_path);
            return false;
        }
        if matches!(outcome, Err(None)) && !claim.user_cancel.load(Ordering::Relaxed) {
            // Stopped because this process is stopping: hand the job back for another worker.
            let r = self.with(|con| {
                let mut inv = self.scripts.release.prepare_invoke();
                self.keys(&mut inv, id);
                inv.arg(id).arg(GROUP).arg(&claim.entry).arg(claim.attempt).arg(&claim.consumer).invoke::<i64>(con)
            });
            tracing::info!(worker = %claim.consumer, job = id, "handed back to the queue ({})", if r.is_ok() { "next in line" } else { "after the visibility timeout" });
            return false;
        }
        let (state, event, report, error, video, seconds) = match outcome {
            Ok((report, path)) => {
                let video = match self.opts.results {
                    Some(_) => Ok(Stored::File(path)),
                    None => {
                        let bytes = std::fs::read(&path);
                        let _ = std::fs::remove_file(&path);
                        bytes.map(Stored::Bytes)
                    }
                };
                match video {
                    Ok(video) => {
                        let json = serde_json::to_string(&report).unwrap_or_default();
                        let seconds = report.total_seconds;
                        (State::Done, Event::Done { report: Box::new(report) }, json, String::new(), video, seconds)
                    }
                    Err(e) => {
                        let error = format!("reading the written video: {e}");
                        (State::Failed, Event::Error { error: error.clone() }, String::new(), error, Stored::Nothing, 0.0)
                    }
                }
            }
            Err(Some(error)) => (State::Failed, Event::Error { error: error.clone() }, String::new(), error, Stored::Nothing, 0.0),
            Err(None) => (State::Cancelled, Event::Cancelled, String::new(), String::new(), Stored::Nothing, 0.0),
        };
        let stored = self.store(id, &claim, state, &event, &report, &error, &video, seconds);
        if let (false, Stored::File(path)) = (stored, &video) {
            let _ = std::fs::remove_file(path);
        }
        stored
    }
}
