//! A fault-injecting stand-in for the usage tracker, at the TCP level.
//!
//! [`FaultTracker`] listens where Envoy's usage cluster points and, in
//! [`FaultMode::Healthy`], forwards each HTTP/1.1 request (one usage report) to the real
//! tracker and relays its answer. Switched at run time with [`FaultTracker::set_mode`],
//! it refuses connections, resets them after a response head or mid-body, hangs, answers
//! error statuses, a huge body, bytes that are not HTTP, or answers slowly. Most modes
//! forward the request first, so the events *are* delivered and only the answer is lost:
//! the filter must retry with the same ids and the tracker must drop the copies.
//!
//! It counts, per mode, the requests it read completely ([`FaultTracker::seen`]), so a
//! test can wait until a fault was exercised instead of sleeping. It also reads the
//! event ids of the reports it delivers, to tell when every event whose answer was lost
//! has been sent again and acknowledged ([`FaultTracker::unsettled`]), and how many
//! copies the tracker should have dropped ([`FaultTracker::expected_duplicates`]). It runs in-process on
//! its own thread and Tokio runtime (like `MockServer`) and stops when dropped.

use crate::background::Background;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the fault tracker does with the next request (or connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultMode {
    /// Forward every request to the real tracker and relay its answer; connections are
    /// kept alive.
    Healthy,
    /// Connection refused: the listener is closed while in this mode (and bound again on
    /// the same port when the mode changes), so connects get a RST. Requests are never
    /// read in this mode, so [`FaultTracker::seen`] stays 0 for it: count refusals with
    /// Envoy's `cluster.<usage cluster>.upstream_cx_connect_fail`.
    Refuse,
    /// Forward the request (the events are delivered), then write only a response head
    /// (`200 OK`, `content-length: 1000`) and reset the connection (RST).
    ResetAfterHead,
    /// Forward, then write a head (`content-length: 1000`) and half the body, then RST.
    ResetMidBody,
    /// Forward, then never answer: the connection is held open until the client gives
    /// up (past the filter's `timeout_ms`).
    Hang,
    /// Answer this status with a small JSON body, without forwarding.
    Status(u16),
    /// Forward, then answer `200` with a 64 MiB body, streamed.
    HugeBody,
    /// Forward, then answer bytes that are not HTTP (an SSH banner and binary noise)
    /// and close.
    NotHttp,
    /// Each new connection is read only after [`SLOW_ACCEPT_DELAY`] and each answer starts
    /// after [`SLOW_ANSWER_DELAY`] (together under the filter's timeout); otherwise
    /// as `Healthy`.
    SlowAccept,
}

/// Wait before the first read of a new connection in [`FaultMode::SlowAccept`].
pub const SLOW_ACCEPT_DELAY: Duration = Duration::from_millis(200);
/// Wait before the first byte of each answer in [`FaultMode::SlowAccept`].
pub const SLOW_ANSWER_DELAY: Duration = Duration::from_millis(150);
/// The body size announced by [`FaultMode::ResetAfterHead`] and [`FaultMode::ResetMidBody`].
const ANNOUNCED_BODY: usize = 1000;
/// The body size of [`FaultMode::HugeBody`].
pub const HUGE_BODY: usize = 64 * 1024 * 1024;
/// Pause between the last bytes written and the reset, so the peer has parsed them.
const BEFORE_RESET: Duration = Duration::from_millis(50);
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

impl FaultMode {
    /// Every mode the fault suite exercises.
    pub const ALL: [FaultMode; 10] = [
        FaultMode::Refuse,
        FaultMode::ResetAfterHead,
        FaultMode::ResetMidBody,
        FaultMode::Hang,
        FaultMode::Status(500),
        FaultMode::Status(503),
        FaultMode::Status(429),
        FaultMode::HugeBody,
        FaultMode::NotHttp,
        FaultMode::SlowAccept,
    ];

    /// Whether the request is forwarded to the real tracker before the fault.
    pub fn forwards(self) -> bool {
        !matches!(self, FaultMode::Refuse | FaultMode::Status(_))
    }

    /// Whether the tracker's answer is passed on (the report succeeds).
    pub fn answers(self) -> bool {
        matches!(self, FaultMode::Healthy | FaultMode::SlowAccept)
    }
}

impl fmt::Display for FaultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultMode::Healthy => f.write_str("healthy"),
            FaultMode::Refuse => f.write_str("refuse"),
            FaultMode::ResetAfterHead => f.write_str("reset-after-head"),
            FaultMode::ResetMidBody => f.write_str("reset-mid-body"),
            FaultMode::Hang => f.write_str("hang"),
            FaultMode::Status(s) => write!(f, "status-{s}"),
            FaultMode::HugeBody => f.write_str("huge-body"),
            FaultMode::NotHttp => f.write_str("not-http"),
            FaultMode::SlowAccept => f.write_str("slow-accept"),
        }
    }
}

impl FromStr for FaultMode {
    type Err = anyhow::Error;

    /// The [`Display`](fmt::Display) names: `healthy`, `refuse`, `reset-after-head`,
    /// `reset-mid-body`, `hang`, `status-NNN`, `huge-body`, `not-http`, `slow-accept`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "healthy" => FaultMode::Healthy,
            "refuse" => FaultMode::Refuse,
            "reset-after-head" => FaultMode::ResetAfterHead,
            "reset-mid-body" => FaultMode::ResetMidBody,
            "hang" => FaultMode::Hang,
            "huge-body" => FaultMode::HugeBody,
            "not-http" => FaultMode::NotHttp,
            "slow-accept" => FaultMode::SlowAccept,
            other => match other.strip_prefix("status-").map(str::parse::<u16>) {
                Some(Ok(code)) if (100..=999).contains(&code) => FaultMode::Status(code),
                _ => bail!(
                    "unknown fault mode `{s}`: use healthy, refuse, reset-after-head, reset-mid-body, hang, \
                     status-NNN, huge-body, not-http or slow-accept"
                ),
            },
        })
    }
}

/// State shared by the controlling thread, the accept loop and the connections.
struct Shared {
    /// The requested mode with a sequence number (bumped by every `set_mode`).
    mode: watch::Sender<(u64, FaultMode)>,
    /// The sequence number the accept loop has applied, and an error if it could not
    /// (binding the port again failed).
    applied: Mutex<(u64, Option<String>)>,
    applied_cv: Condvar,
    seen: Mutex<HashMap<FaultMode, u64>>,
    ledger: Mutex<Ledger>,
    forwarded: AtomicU64,
    backend: SocketAddr,
    client: reqwest::Client,
}

/// The event ids of the reports the real tracker accepted.
#[derive(Debug, Default)]
struct Ledger {
    /// Event copies delivered, counting every retry.
    copies: u64,
    delivered: HashSet<String>,
    /// Delivered in a report whose answer the fault then lost.
    answer_lost: HashSet<String>,
    /// Delivered in a report whose answer was passed on.
    answered: HashSet<String>,
}

/// The `id`s of a report: a JSON array of events, or one event.
fn event_ids(body: &[u8]) -> Vec<String> {
    let id = |e: &serde_json::Value| e.get("id").and_then(|i| i.as_str()).map(str::to_string);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(events)) => events.iter().filter_map(id).collect(),
        Ok(event) => id(&event).into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

impl Shared {
    /// Notes the events of a report the tracker accepted, and whether its answer
    /// reached the client.
    /// Returns the ids this call newly marked answered (see [`Shared::answer_lost_after_all`]).
    fn delivered(&self, body: &[u8], answered: bool) -> Vec<String> {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let mut newly_answered = Vec::new();
        for id in event_ids(body) {
            ledger.copies += 1;
            if answered {
                if ledger.answered.insert(id.clone()) {
                    newly_answered.push(id.clone());
                }
            } else {
                ledger.answer_lost.insert(id.clone());
            }
            ledger.delivered.insert(id);
        }
        newly_answered
    }

    /// The answer of a report noted as answered (before it was written, so that a
    /// client that has read it finds the ledger up to date) could not be written after
    /// all: its newly answered ids count as answer lost.
    fn answer_lost_after_all(&self, ids: Vec<String>) {
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            ledger.answered.remove(&id);
            ledger.answer_lost.insert(id);
        }
    }

    fn count(&self, mode: FaultMode) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        *seen.entry(mode).or_insert(0) += 1;
    }

    fn mark_applied(&self, seq: u64, error: Option<String>) {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.0 != seq || error.is_some() {
            *applied = (seq, error);
            self.applied_cv.notify_all();
        }
    }
}

/// The fault-injecting tracker proxy; stops when dropped.
pub struct FaultTracker {
    /// The port it listens on (also while refusing: it binds the same port again).
    pub port: u16,
    shared: Arc<Shared>,
    _server: Background,
}

impl fmt::Debug for FaultTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultTracker").field("port", &self.port).field("mode", &self.mode()).finish()
    }
}

/// Binds a port below the kernel's ephemeral range when possible: the port is released
/// while refusing, and an outgoing connection must not take it meanwhile. The bind is
/// the check (a port tested free and bound later can be taken in between by another
/// process), so a taken port is skipped for another; a port this process handed out
/// to another part of a stack is never tried (a fleet has one fault tracker per tracker
/// replica). Falls back to a port of the OS's choosing.
fn listen_quiet() -> io::Result<TcpListener> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    if low > 12_000 {
        let mut rng = rand::thread_rng();
        for _ in 0..64 {
            let port = rng.gen_range(10_000..low);
            if !crate::stack::claim_port(port) {
                continue;
            }
            if let Ok(l) = listen(port) {
                return Ok(l);
            }
        }
    }
    listen(0)
}

/// A listener on 127.0.0.1:`port` with SO_REUSEADDR (so the port can be bound again at
/// once after a refusal, despite connections in TIME_WAIT).
fn listen(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

/// Binds `port` again, retrying for a while if something holds it.
async fn relisten(port: u16) -> io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listen(port) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl FaultTracker {
    /// Starts in [`FaultMode::Healthy`], forwarding to the tracker on 127.0.0.1:`tracker_port`,
    /// on a free port.
    pub fn start(tracker_port: u16) -> anyhow::Result<FaultTracker> {
        Self::start_on(0, tracker_port)
    }

    /// As [`start`](Self::start), on `port` (0 picks a free one outside the ephemeral range).
    pub fn start_on(port: u16, tracker_port: u16) -> anyhow::Result<FaultTracker> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| anyhow!("fault tracker client: {e}"))?;
        let (mode_tx, mode_rx) = watch::channel((0u64, FaultMode::Healthy));
        let shared = Arc::new(Shared {
            mode: mode_tx,
            applied: Mutex::new((0, None)),
            applied_cv: Condvar::new(),
            seen: Mutex::new(HashMap::new()),
            ledger: Mutex::new(Ledger::default()),
            forwarded: AtomicU64::new(0),
            backend: SocketAddr::from(([127, 0, 0, 1], tracker_port)),
            client,
        });
        let loop_shared = Arc::clone(&shared);
        let (server, port) = Background::spawn("fault-tracker", move |ready, stop| async move {
            let bound = if port == 0 { listen_quiet() } else { listen(port) };
            let (port, listener) = match bound.and_then(|l| Ok((l.local_addr()?.port(), l))) {
                Ok(x) => x,
                Err(e) => return ready.fail(anyhow!("bind fault tracker port {port}: {e}")),
            };
            ready.ok(port);
            accept_loop(listener, port, loop_shared, mode_rx, stop).await;
        })?;
        // No other part may get it from free_port (a quiet port is claimed already).
        crate::stack::claim_port(port);
        Ok(FaultTracker { port, shared, _server: server })
    }

    /// Switches the mode; returns once it is in force (for [`FaultMode::Refuse`]: the
    /// port is closed; leaving it: the port is listening again). Idle connections are
    /// closed on every change, so a kept-alive connection does not carry the old mode on.
    pub fn set_mode(&self, mode: FaultMode) -> anyhow::Result<()> {
        let mut seq = 0;
        self.shared.mode.send_modify(|(s, m)| {
            *s += 1;
            seq = *s;
            *m = mode;
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut applied = self.shared.applied.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if applied.0 >= seq {
                return match &applied.1 {
                    Some(e) if applied.0 == seq => Err(anyhow!("fault tracker: mode {mode} not applied: {e}")),
                    _ => Ok(()),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("fault tracker: mode {mode} not applied after 10 s");
            }
            applied = self.shared.applied_cv.wait_timeout(applied, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The mode in force (last set).
    pub fn mode(&self) -> FaultMode {
        self.shared.mode.borrow().1
    }

    /// Requests read while in `mode` and answered (or faulted) to the end: the answer
    /// written, the connection closed or reset, a hang given up by the client. 0 for
    /// [`FaultMode::Refuse`], where nothing is read.
    pub fn seen(&self, mode: FaultMode) -> u64 {
        self.shared.seen.lock().unwrap_or_else(PoisonError::into_inner).get(&mode).copied().unwrap_or(0)
    }

    /// Every mode with its count of requests read.
    pub fn seen_all(&self) -> Vec<(FaultMode, u64)> {
        let mut all: Vec<_> =
            self.shared.seen.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(m, n)| (*m, *n)).collect();
        all.sort_by_key(|(m, _)| m.to_string());
        all
    }

    /// Requests the real tracker answered (in any mode).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Events the tracker accepted in a report whose answer a fault lost and that have
    /// not been delivered again with the answer passed on. When the sender retries
    /// every failed report with the same ids, this returns to 0 once the fault is over.
    pub fn unsettled(&self) -> usize {
        let ledger = self.shared.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.answer_lost.difference(&ledger.answered).count()
    }

    /// Copies of already delivered events the tracker got through here (every copy
    /// beyond an id's first): what its duplicate counter should show.
    pub fn expected_duplicates(&self) -> u64 {
        let ledger = self.shared.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.copies - ledger.delivered.len() as u64
    }

    /// Distinct event ids the tracker accepted through here.
    pub fn delivered_events(&self) -> usize {
        self.shared.ledger.lock().unwrap_or_else(PoisonError::into_inner).delivered.len()
    }

    /// Waits until at least `n` requests were handled in `mode` (see [`seen`](Self::seen));
    /// returns the count.
    pub fn wait_seen(&self, mode: FaultMode, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen(mode);
            if seen >= n {
                return Ok(seen);
            }
            if Instant::now() > deadline {
                bail!("fault tracker saw {seen} requests in mode {mode} after {timeout:?}, wanted {n}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

async fn accept_loop(
    first: TcpListener,
    port: u16,
    shared: Arc<Shared>,
    mut modes: watch::Receiver<(u64, FaultMode)>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut listener = Some(first);
    loop {
        let (seq, mode) = *modes.borrow_and_update();
        let mut error = None;
        if mode == FaultMode::Refuse {
            // Closing the listener makes the kernel refuse (RST) new connections; any in
            // its backlog are reset too.
            listener = None;
        } else if listener.is_none() {
            match relisten(port).await {
                Ok(l) => listener = Some(l),
                Err(e) => error = Some(format!("bind 127.0.0.1:{port} again: {e}")),
            }
        }
        shared.mark_applied(seq, error);
        let accepted = match &listener {
            Some(l) => tokio::select! {
                a = l.accept() => a.ok(),
                c = modes.changed() => { if c.is_err() { return; } None }
                _ = &mut shutdown => return,
            },
            None => tokio::select! {
                c = modes.changed() => { if c.is_err() { return; } None }
                _ = &mut shutdown => return,
            },
        };
        if let Some((stream, _)) = accepted {
            tokio::spawn(serve_connection(stream, Arc::clone(&shared), modes.clone()));
        }
    }
}

/// One HTTP/1.1 request, as read from the wire.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// The real tracker's answer.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// What becomes of a connection after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Wait for the next request on it.
    KeepAlive,
    /// Close it (FIN).
    Close,
    /// Reset it (RST): SO_LINGER 0 is set; it is dropped without a shutdown.
    Reset,
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>, mut modes: watch::Receiver<(u64, FaultMode)>) {
    let _ = stream.set_nodelay(true);
    if modes.borrow().1 == FaultMode::SlowAccept {
        tokio::time::sleep(SLOW_ACCEPT_DELAY).await;
    }
    let mut buf = Vec::new();
    loop {
        // A connection kept alive across a mode change is closed while idle.
        if modes.has_changed().unwrap_or(true) {
            return;
        }
        let request = tokio::select! {
            r = read_request(&mut stream, &mut buf) => r,
            _ = modes.changed() => return,
        };
        let Ok(Some(request)) = request else { return };
        let mode = modes.borrow().1;
        // Counted once the fault has played out (the answer written, the connection
        // closed or reset, a hang given up by the client), so a test that waits for the
        // count sees the client's reaction to it.
        match answer(&mut stream, &request, mode, &shared).await.unwrap_or(After::Close) {
            After::KeepAlive if !request.wants_close() => shared.count(mode),
            After::KeepAlive | After::Close => {
                let _ = stream.shutdown().await;
                drop(stream);
                shared.count(mode);
                return;
            }
            After::Reset => {
                // Written bytes have had time to arrive; now RST.
                tokio::time::sleep(BEFORE_RESET).await;
                let _ = stream.set_zero_linger();
                drop(stream);
                shared.count(mode);
                return;
            }
        }
    }
}

/// Handles one request in `mode`.
async fn answer(stream: &mut TcpStream, request: &Request, mode: FaultMode, shared: &Shared) -> io::Result<After> {
    let forwarded = if mode.forwards() { Some(forward(shared, request).await) } else { None };
    let accepted = matches!(&forwarded, Some(Ok(a)) if (200..300).contains(&a.status));
    if accepted && !mode.answers() {
        let _ = shared.delivered(&request.body, false);
    }
    match mode {
        FaultMode::Healthy | FaultMode::SlowAccept => {
            if mode == FaultMode::SlowAccept {
                tokio::time::sleep(SLOW_ANSWER_DELAY).await;
            }
            match forwarded {
                Some(Ok(a)) => {
                    // Noted before the answer is written: a client that has read it
                    // must find the ledger up to date.
                    let noted = if accepted { shared.delivered(&request.body, true) } else { Vec::new() };
                    let written = write_response(stream, a.status, &a.content_type, &a.body, false).await;
                    if written.is_err() {
                        shared.answer_lost_after_all(noted);
                    }
                    written?;
                    Ok(After::KeepAlive)
                }
                Some(Err(e)) => {
                    let body = serde_json::json!({"error": format!("fault tracker: forward failed: {e}")}).to_string();
                    write_response(stream, 502, "application/json", body.as_bytes(), true).await?;
                    Ok(After::Close)
                }
                None => Ok(After::Close),
            }
        }
        // Only reached by a request that raced the listener's closing.
        FaultMode::Refuse => Ok(After::Reset),
        FaultMode::ResetAfterHead => {
            stream.write_all(&head(200, "application/json", ANNOUNCED_BODY, false)).await?;
            Ok(After::Reset)
        }
        FaultMode::ResetMidBody => {
            stream.write_all(&head(200, "application/json", ANNOUNCED_BODY, false)).await?;
            let mut half = b"[{\"accepted\":".to_vec();
            half.resize(ANNOUNCED_BODY / 2, b' ');
            stream.write_all(&half).await?;
            Ok(After::Reset)
        }
        FaultMode::Hang => {
            // Never answer; wait for the client to give up (or the tracker to stop).
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
            Ok(After::Close)
        }
        FaultMode::Status(code) => {
            let body = serde_json::json!({"error": {"message": "injected fault", "status": code}}).to_string();
            write_response(stream, code, "application/json", body.as_bytes(), true).await?;
            Ok(After::Close)
        }
        FaultMode::HugeBody => {
            stream.write_all(&head(200, "application/json", HUGE_BODY, true)).await?;
            // Streamed: one 64 KiB piece in memory, however large the body.
            let piece = vec![b' '; 64 * 1024];
            let mut left = HUGE_BODY;
            while left > 0 {
                let n = left.min(piece.len());
                stream.write_all(piece.get(..n).unwrap_or_default()).await?;
                left -= n;
            }
            Ok(After::Close)
        }
        FaultMode::NotHttp => {
            let mut bytes = b"SSH-2.0-OpenSSH_9.6\r\n".to_vec();
            bytes.extend_from_slice(&[0, 0, 0x05, 0xdc, 0x07, 0x14, 0xff, 0xfe, 0x00, 0x9c]);
            bytes.extend((0u8..=255).rev());
            stream.write_all(&bytes).await?;
            Ok(After::Close)
        }
    }
}

/// Sends the request to the real tracker and reads its whole answer.
async fn forward(shared: &Shared, request: &Request) -> anyhow::Result<Answer> {
    let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
    let url = format!("http://{}{}", shared.backend, request.target);
    let mut req = shared.client.request(method, url).body(request.body.clone());
    for (name, value) in &request.headers {
        let hop = ["host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"];
        if !hop.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            req = req.header(name.as_str(), value.as_str());
        }
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let body = resp.bytes().await?.to_vec();
    shared.forwarded.fetch_add(1, Ordering::Relaxed);
    Ok(Answer { status, content_type, body })
}

fn reason(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Unknown")
}

fn head(status: u16, content_type: &str, content_length: usize, close: bool) -> Vec<u8> {
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {content_length}\r\n{connection}\r\n",
        reason(status)
    )
    .into_bytes()
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut bytes = head(status, content_type, body.len(), close);
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads more bytes into `buf`; an error at end of stream.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = r.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(())
}

/// Takes the next `n` bytes of the stream (from `buf` first).
async fn take<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, n: usize) -> io::Result<Vec<u8>> {
    while buf.len() < n {
        fill(r, buf).await?;
    }
    Ok(buf.drain(..n).collect())
}

/// Takes one CRLF-terminated line (without the CRLF).
async fn take_line<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<String> {
    loop {
        if let Some(i) = find(buf, b"\r\n") {
            let line: Vec<u8> = buf.drain(..i + 2).take(i).collect();
            return String::from_utf8(line).map_err(|_| bad("line is not UTF-8"));
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("line too long"));
        }
        fill(r, buf).await?;
    }
}

/// Reads one request: the head up to the blank line, then a body framed by
/// `content-length` or `transfer-encoding: chunked`. `Ok(None)` at a clean end of stream.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("request head too long"));
        }
        match fill(r, buf).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.is_empty() => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    let head: Vec<u8> = buf.drain(..head_end).collect();
    let head = String::from_utf8(head).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next()) else {
        return Err(bad("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not HTTP/1: {version}")));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = Request { method: method.to_string(), target: target.to_string(), headers, body: Vec::new() };
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked")));
    if chunked {
        loop {
            let line = take_line(r, buf).await?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| bad(format!("bad chunk size `{line}`")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !take_line(r, buf).await?.is_empty() {}
                break;
            }
            if request.body.len() + size > MAX_BODY {
                return Err(bad("request body too large"));
            }
            let data = take(r, buf, size + 2).await?;
            let (chunk, crlf) = data.split_at(size);
            if crlf != b"\r\n" {
                return Err(bad("chunk not followed by CRLF"));
            }
            request.body.extend_from_slice(chunk);
        }
    } else if let Some(len) = request.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad("request body too large"));
        }
        request.body = take(r, buf, len).await?;
    }
    Ok(Some(request))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    use axum::routing::post;
    use serde_json::Value;

    use super::*;

    /// A stand-in for the real tracker: records every /track body, answers 200 JSON.
    struct Backend {
        port: u16,
        bodies: Arc<Mutex<Vec<String>>>,
        _rt: tokio::runtime::Runtime,
    }

    impl Backend {
        fn start() -> Backend {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let b = Arc::clone(&bodies);
            let app = axum::Router::new().route(
                "/track",
                post(move |body: String| {
                    let b = Arc::clone(&b);
                    async move {
                        b.lock().unwrap().push(body);
                        ([("content-type", "application/json")], r#"{"accepted":1}"#)
                    }
                }),
            );
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            let port = listener.local_addr().unwrap().port();
            rt.spawn(async move { axum::serve(listener, app).await });
            Backend { port, bodies, _rt: rt }
        }

        fn received(&self) -> Vec<String> {
            self.bodies.lock().unwrap().clone()
        }
    }

    fn setup(mode: FaultMode) -> (Backend, FaultTracker) {
        let backend = Backend::start();
        let fault = FaultTracker::start(backend.port).unwrap();
        fault.set_mode(mode).unwrap();
        (backend, fault)
    }

    fn connect(port: u16) -> StdStream {
        let s = StdStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn post_raw(s: &mut StdStream, body: &str) {
        let req = format!(
            "POST /track HTTP/1.1\r\nhost: usage-tracking\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
    }

    /// Reads until the peer closes or resets: the bytes, and the error that ended it.
    fn read_to_end(s: &mut StdStream) -> (Vec<u8>, Option<io::ErrorKind>) {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(e.kind())),
            }
        }
    }

    /// Reads one response with a content-length body from a kept-alive connection.
    fn read_response(s: &mut StdStream) -> (String, String) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while find(&buf, b"\r\n\r\n").is_none() {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed in the head: {}", String::from_utf8_lossy(&buf));
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    #[test]
    fn healthy_forwards_content_length_and_chunked_on_one_kept_alive_connection() {
        let (backend, fault) = setup(FaultMode::Healthy);
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"a"}]"#);
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, r#"{"accepted":1}"#);
        // Same connection, chunked, with a chunk extension and a trailer.
        let chunked =
            "POST /track HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
                       5\r\n[{\"id\r\n7;ext=1\r\n\":\"b\"}]\r\n0\r\nx-trailer: 1\r\n\r\n";
        s.write_all(chunked.as_bytes()).unwrap();
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(backend.received(), vec![r#"[{"id":"a"}]"#.to_string(), r#"[{"id":"b"}]"#.to_string()]);
        fault.wait_seen(FaultMode::Healthy, 2, Duration::from_secs(5)).unwrap();
        assert_eq!(fault.forwarded(), 2);

        // And through an ordinary HTTP client.
        let resp = reqwest::blocking::Client::new()
            .post(format!("http://127.0.0.1:{}/track", fault.port))
            .header("content-type", "application/json")
            .body(r#"[{"id":"c"}]"#)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().unwrap()["accepted"], 1);
        assert_eq!(backend.received().len(), 3);
    }

    #[test]
    fn refuse_really_refuses_and_the_port_comes_back() {
        let (backend, fault) = setup(FaultMode::Healthy);
        // A kept-alive connection from before the refusal is closed, not served.
        let mut old = connect(fault.port);
        post_raw(&mut old, "[]");
        read_response(&mut old);
        fault.set_mode(FaultMode::Refuse).unwrap();
        let err = StdStream::connect(("127.0.0.1", fault.port)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let (rest, _) = read_to_end(&mut old);
        assert!(rest.is_empty());
        fault.set_mode(FaultMode::Healthy).unwrap();
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"x"}]"#);
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(backend.received().len(), 2);
        assert_eq!(fault.seen(FaultMode::Refuse), 0);
    }

    #[test]
    fn reset_after_head_delivers_then_resets() {
        let (backend, fault) = setup(FaultMode::ResetAfterHead);
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"r1"}]"#);
        let (bytes, end) = read_to_end(&mut s);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("content-length: 1000\r\n\r\n"), "{text}");
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(backend.received(), vec![r#"[{"id":"r1"}]"#.to_string()]);
        assert_eq!(fault.wait_seen(FaultMode::ResetAfterHead, 1, Duration::from_secs(5)).unwrap(), 1);
        // The event was delivered but its answer lost: unsettled until sent again.
        assert_eq!((fault.unsettled(), fault.expected_duplicates()), (1, 0));
        fault.set_mode(FaultMode::Healthy).unwrap();
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"r1"},{"id":"r2"}]"#);
        read_response(&mut s);
        assert_eq!((fault.unsettled(), fault.expected_duplicates(), fault.delivered_events()), (0, 1, 2));
    }

    #[test]
    fn reset_mid_body_delivers_then_resets_after_half_the_body() {
        let (backend, fault) = setup(FaultMode::ResetMidBody);
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"m1"}]"#);
        let (bytes, end) = read_to_end(&mut s);
        let split = find(&bytes, b"\r\n\r\n").unwrap() + 4;
        assert!(bytes.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(bytes.len() - split, ANNOUNCED_BODY / 2);
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(backend.received().len(), 1);
    }

    #[test]
    fn hang_delivers_and_never_answers() {
        let (backend, fault) = setup(FaultMode::Hang);
        let mut s = connect(fault.port);
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        post_raw(&mut s, r#"[{"id":"h1"}]"#);
        let mut buf = [0u8; 16];
        let err = s.read(&mut buf).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        assert_eq!(backend.received().len(), 1);
        // Counted when the client gives up.
        assert_eq!(fault.seen(FaultMode::Hang), 0);
        drop(s);
        fault.wait_seen(FaultMode::Hang, 1, Duration::from_secs(5)).unwrap();
        assert_eq!(fault.unsettled(), 1);
    }

    #[test]
    fn status_modes_answer_without_forwarding() {
        let (backend, fault) = setup(FaultMode::Status(503));
        for code in [500u16, 503, 429] {
            fault.set_mode(FaultMode::Status(code)).unwrap();
            let resp = reqwest::blocking::Client::new()
                .post(format!("http://127.0.0.1:{}/track", fault.port))
                .body("[]")
                .send()
                .unwrap();
            assert_eq!(resp.status().as_u16(), code);
            assert_eq!(resp.json::<Value>().unwrap()["error"]["status"], code);
            assert_eq!(fault.wait_seen(FaultMode::Status(code), 1, Duration::from_secs(5)).unwrap(), 1);
        }
        assert!(backend.received().is_empty());
        assert_eq!(fault.unsettled(), 0);
    }

    #[test]
    fn huge_body_is_streamed_after_delivering() {
        let (backend, fault) = setup(FaultMode::HugeBody);
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"big"}]"#);
        let (bytes, end) = read_to_end(&mut s);
        assert_eq!(end, None);
        let split = find(&bytes, b"\r\n\r\n").unwrap() + 4;
        assert!(String::from_utf8_lossy(&bytes[..split]).contains(&format!("content-length: {HUGE_BODY}")));
        assert_eq!(bytes.len() - split, HUGE_BODY);
        assert_eq!(backend.received().len(), 1);
    }

    #[test]
    fn not_http_answers_garbage_after_delivering() {
        let (backend, fault) = setup(FaultMode::NotHttp);
        let err = reqwest::blocking::Client::new()
            .post(format!("http://127.0.0.1:{}/track", fault.port))
            .body("[]")
            .send()
            .unwrap_err();
        assert!(!err.is_status(), "{err}");
        let mut s = connect(fault.port);
        post_raw(&mut s, r#"[{"id":"n1"}]"#);
        let (bytes, _) = read_to_end(&mut s);
        assert!(bytes.starts_with(b"SSH-2.0-"));
        assert_eq!(backend.received().len(), 2);
        assert_eq!(fault.wait_seen(FaultMode::NotHttp, 2, Duration::from_secs(5)).unwrap(), 2);
    }

    #[test]
    fn slow_accept_is_slow_but_healthy() {
        let (backend, fault) = setup(FaultMode::SlowAccept);
        let start = Instant::now();
        let mut s = connect(fault.port);
        post_raw(&mut s, "[]");
        let (head, _) = read_response(&mut s);
        let first = start.elapsed();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(first >= SLOW_ACCEPT_DELAY + SLOW_ANSWER_DELAY, "{first:?}");
        // Kept alive: the next answer only waits for the answer delay.
        let start = Instant::now();
        post_raw(&mut s, "[]");
        read_response(&mut s);
        let second = start.elapsed();
        assert!(second >= SLOW_ANSWER_DELAY && second < SLOW_ACCEPT_DELAY + SLOW_ANSWER_DELAY, "{second:?}");
        assert_eq!(backend.received().len(), 2);
    }

    #[test]
    fn mode_names_round_trip() {
        for mode in FaultMode::ALL.into_iter().chain([FaultMode::Healthy]) {
            assert_eq!(mode.to_string().parse::<FaultMode>().unwrap(), mode);
        }
        assert_eq!("status_503".parse::<FaultMode>().unwrap(), FaultMode::Status(503));
        assert!("status-9999".parse::<FaultMode>().is_err());
        assert!("explode".parse::<FaultMode>().is_err());
    }

    #[test]
    fn malformed_requests_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for raw in [
            &b"GET / SPDY/3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX",
            b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nshort",
        ] {
            let mut r = raw;
            let mut buf = Vec::new();
            assert!(rt.block_on(read_request(&mut r, &mut buf)).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        let mut r = &b""[..];
        assert!(rt.block_on(read_request(&mut r, &mut Vec::new())).unwrap().is_none());
    }
}
