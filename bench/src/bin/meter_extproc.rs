//! Variant (f') of the benchmarks: the metering half of the architecture Tollgate
//! replaces (the seed's meter-extproc, Envoy AI Gateway's design): an Envoy `ext_proc`
//! service that reads every response body to count tokens. Beside `ext_authz` to
//! `authz-service` for the key check, it makes the peer of variant (e).
//!
//! gRPC `ext_proc` (the harness's hand-encoded server, [`harness::extproc::serve`]),
//! configured by the bench as `request_header_mode: SEND` (the identity `ext_authz` set,
//! the method, host and path), `response_header_mode: SEND` (status, content type and
//! encoding), `response_body_mode: STREAMED` (every chunk sent here and acknowledged
//! unchanged), trailers skipped. Per exchange it runs *the filter's own* usage parser
//! (`tollgate_filter::usage::UsageParser`, the same JSON and SSE reader, natively),
//! builds the filter's `UsageEvent` when the stream ends and queues its JSON; a thread
//! posts the queue to the tracker's `/track` every `--flush-ms` as JSON arrays of at
//! most 500 events (the filter's `flush_interval_ms` and `max_batch` defaults).
//!
//! `meter-extproc --listen 127.0.0.1:PORT --tracker http://127.0.0.1:PORT/track`

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use harness::extproc::{BodyAnswer, Processor, StreamHandler};
use tollgate_filter::events::{report_path, EventIds, UsageEvent};
use tollgate_filter::usage::{BodyKind, UsageParser, DEFAULT_MAX_CARRY};

#[derive(Parser)]
#[command(about = "ext_proc metering service for the benchmarks: the filter's usage parser behind gRPC ext_proc")]
struct Args {
    /// Loopback address to listen on (gRPC, HTTP/2 prior knowledge).
    #[arg(long, default_value = "127.0.0.1:9192")]
    listen: String,
    /// The tracker's report URL.
    #[arg(long)]
    tracker: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Milliseconds between posts of the queued events.
    #[arg(long, default_value_t = 500)]
    flush_ms: u64,
}

/// Events per POST (the filter's `max_batch` default).
const MAX_BATCH: usize = 500;
/// Events kept while the tracker is away (the filter's `max_queue` default).
const MAX_QUEUE: usize = 10_000;

#[derive(Default)]
struct Queue {
    events: Vec<String>,
    /// Exchanges that ended, events queued, events the tracker took, events dropped
    /// (queue full).
    streams: u64,
    queued: u64,
    posted: u64,
    dropped: u64,
}

struct Meter {
    ids: Mutex<EventIds>,
    queue: Arc<Mutex<Queue>>,
}

impl Processor for Meter {
    fn open(&self) -> Box<dyn StreamHandler> {
        let id = self.ids.lock().unwrap_or_else(PoisonError::into_inner).next_id();
        Box::new(Exchange { id, queue: Arc::clone(&self.queue), ..Exchange::default() })
    }
}

/// One HTTP exchange being metered.
#[derive(Default)]
struct Exchange {
    id: String,
    queue: Arc<Mutex<Queue>>,
    user: Option<String>,
    groups: Vec<String>,
    method: String,
    host: String,
    path: String,
    status: Option<String>,
    parser: Option<UsageParser>,
    done: bool,
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

impl StreamHandler for Exchange {
    fn headers(&mut self, response: bool, headers: &[(&[u8], &[u8])]) {
        if response {
            let mut content_type = None;
            let mut readable = true;
            for &(name, value) in headers {
                match name {
                    b":status" => self.status = Some(text(value)),
                    b"content-type" => content_type = Some(text(value)),
                    b"content-encoding" => readable = value.eq_ignore_ascii_case(b"identity"),
                    _ => {}
                }
            }
            if readable {
                let kind = BodyKind::from_content_type(content_type.as_deref());
                self.parser = Some(UsageParser::new(kind, DEFAULT_MAX_CARRY));
            }
            return;
        }
        for &(name, value) in headers {
            match name {
                b"x-tollgate-user" => self.user = Some(text(value)),
                b"x-tollgate-groups" => {
                    self.groups =
                        value.split(|&b| b == b',').filter(|g| !g.is_empty()).map(|g| text(g.trim_ascii())).collect();
                }
                b":method" => self.method = text(value),
                b":authority" => self.host = text(value),
                b":path" => self.path = report_path(&String::from_utf8_lossy(value)).to_string(),
                _ => {}
            }
        }
    }

    fn body(&mut self, response: bool, chunk: &[u8], end_of_stream: bool) -> BodyAnswer {
        if response {
            if let Some(parser) = self.parser.as_mut() {
                parser.feed(chunk);
                if end_of_stream {
                    parser.finish();
                }
            }
            self.done |= end_of_stream;
        }
        BodyAnswer::Continue
    }

    /// The exchange ended: one event, as the filter records at `on_log` (authorized
    /// requests only: the identity `ext_authz` set).
    fn end(mut self: Box<Self>) {
        let Some(user) = self.user.take() else {
            self.queue.lock().unwrap_or_else(PoisonError::into_inner).streams += 1;
            return;
        };
        let mut done = self.done;
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut event = UsageEvent::started(&self.method, &self.host, &self.path, ts);
        event.id = std::mem::take(&mut self.id);
        event.user = Some(user);
        event.groups = std::mem::take(&mut self.groups);
        event.set_status(self.status.as_deref());
        if let Some(parser) = self.parser.as_mut() {
            if !done {
                parser.finish();
            }
            done |= parser.done();
            event.set_usage(parser.usage());
            event.model = parser.model().map(|m| tollgate_rules::truncate(m).to_string());
        }
        event.incomplete = !done;
        let Ok(json) = serde_json::to_string(&event) else { return };
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.streams += 1;
        if q.events.len() >= MAX_QUEUE {
            q.dropped += 1;
        } else {
            q.queued += 1;
            q.events.push(json);
        }
    }
}

/// Posts the queue every `every`, in arrays of at most [`MAX_BATCH`] events; a batch the
/// tracker did not take goes back to the front. Logs its counters when they changed.
fn flusher(queue: Arc<Mutex<Queue>>, url: String, every: Duration) {
    let Ok(client) = reqwest::blocking::Client::builder().timeout(Duration::from_secs(1)).build() else { return };
    let mut logged = (0, 0, 0, 0);
    loop {
        std::thread::sleep(every);
        let now = {
            let q = queue.lock().unwrap_or_else(PoisonError::into_inner);
            (q.streams, q.queued, q.posted, q.dropped)
        };
        if now != logged {
            eprintln!(
                "meter-extproc: {} exchanges ended, {} events queued, {} taken by the tracker, {} dropped (queue full)",
                now.0, now.1, now.2, now.3
            );
            logged = now;
        }
        loop {
            let batch: Vec<String> = {
                let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
                let n = q.events.len().min(MAX_BATCH);
                q.events.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let mut body = String::with_capacity(batch.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
            body.push('[');
            body.push_str(&batch.join(","));
            body.push(']');
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .is_ok_and(|r| r.status().is_success());
            if sent {
                queue.lock().unwrap_or_else(PoisonError::into_inner).posted += batch.len() as u64;
            } else {
                let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
                let rest = std::mem::take(&mut q.events);
                q.events = batch;
                q.events.extend(rest);
                break;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ u64::from(std::process::id());
    let queue = Arc::new(Mutex::new(Queue::default()));
    let meter = Arc::new(Meter { ids: Mutex::new(EventIds::new(seed)), queue: Arc::clone(&queue) });
    let every = Duration::from_millis(args.flush_ms.max(1));
    let url = args.tracker.clone();
    std::thread::Builder::new().name("flush".into()).spawn(move || flusher(queue, url, every))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        harness::extproc::serve(listener, meter).await;
        Ok(())
    })
}
