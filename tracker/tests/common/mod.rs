#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! What the ledger, global-limits and keys tests share: temporary directories, the
//! throwaway PostgreSQL server of the test process, a fresh database on it per test,
//! and connections of their own to a ledger, past the tracker.
#![allow(dead_code)] // each test crate uses its part

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("tollgate-ledger-{}-{name}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The URL of this process's PostgreSQL server, started on first use by `tests/pg.sh`
/// (stopped by the script's watchdog when this process exits); `None` when PostgreSQL
/// is not installed. Under CI (`CI=true` or `CI=1`) a missing server is a failure, not
/// a skip: CI must prove the PostgreSQL ledger works.
pub fn postgres_server() -> Option<&'static str> {
    static SERVER: OnceLock<Option<String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg.sh");
            let output = Command::new("bash")
                .arg(script)
                .arg(std::process::id().to_string())
                .stderr(Stdio::piped())
                .output()
                .expect("cannot run tests/pg.sh");
            match output.status.code() {
                Some(0) => Some(String::from_utf8(output.stdout).unwrap().trim().to_owned()),
                Some(77) => {
                    let why = String::from_utf8_lossy(&output.stderr);
                    let ci = std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
                    assert!(
                        !ci,
                        "CI is set, so the PostgreSQL ledger tests must run, not skip; install the \
                         postgresql package (`make setup`): {}",
                        why.trim()
                    );
                    // Straight to stderr, past the test harness's capture, so `cargo test` shows it.
                    let _ = writeln!(std::io::stderr(), "SKIP the PostgreSQL ledger tests: {}", why.trim());
                    None
                }
                _ => panic!(
                    "tests/pg.sh could not start PostgreSQL although it is installed:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                ),
            }
        })
        .as_deref()
}

/// A fresh database named `<prefix>_<test>` on this process's PostgreSQL server, as a
/// URL; `None` (after saying SKIP) when PostgreSQL is not installed.
pub async fn postgres_database(prefix: &str, test: &str) -> Option<String> {
    let Some(server) = tokio::task::spawn_blocking(postgres_server).await.unwrap() else {
        // Straight to stderr, past the test harness's capture, so `cargo test` shows it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test} on PostgreSQL: no server binaries (`make setup` installs the postgresql package)"
        );
        return None;
    };
    let client = postgres_client(server).await;
    let database = format!("{prefix}_{test}").to_lowercase();
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {database}")).await.unwrap();
    client.batch_execute(&format!("CREATE DATABASE {database}")).await.unwrap();
    let base = server.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{database}"))
}

/// A connection of its own to a PostgreSQL database.
pub async fn postgres_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A connection of its own to a SQLite ledger file (waiting for the tracker's locks).
pub fn sqlite(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn
}
