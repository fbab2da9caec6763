//! A throwaway PostgreSQL server for a stack whose trackers share one ledger
//! (`tollgate up --trackers M` with M > 1 and no `--database-url`), as
//! tracker/tests/pg.sh starts one for the ledger tests: Debian's server binaries under
//! `/usr/lib/postgresql/*/bin` (the newest; `TOLLGATE_PG_BIN` overrides), a fresh
//! cluster in the stack's run directory that trusts local connections (local test use
//! only), listening on 127.0.0.1 only (no Unix socket), and run as the `postgres` user
//! when the harness runs as root (initdb and postgres refuse root). The server is the
//! harness's child in its own process group, like every part of the stack: it is
//! stopped (fast shutdown) when dropped, its cluster (about 40 MB) deleted with it and
//! its log kept, and it dies with the harness.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{Proc, RunAs};

/// The running server; stopped when dropped.
pub struct Postgres {
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
    /// The cluster's data directory.
    pub data: PathBuf,
    proc: Proc,
}

/// The directory of the server binaries: `TOLLGATE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb` and `postgres`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(dir) = std::env::var("TOLLGATE_PG_BIN") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!("TOLLGATE_PG_BIN={} has no initdb and postgres", dir.display());
    }
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().split('.').map(str::parse).collect::<Result<Vec<u32>, _>>();
            Some((version.ok()?, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    found.sort();
    match found.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (run `make setup`, or apt-get install \
             postgresql), needed for several trackers without --database-url; or pass --database-url"
        ),
    }
}

impl Postgres {
    /// Creates a cluster (`dir/postgres/data`, or a directory of its own under the
    /// system temp dir when it runs as the `postgres` user; logs in `dir`) and starts it
    /// on a free port; returns once it accepts connections. Removed when dropped.
    pub fn start(dir: &Path) -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let run_as = if RunAs::is_root() {
            Some(
                RunAs::user("postgres")
                    .context("PostgreSQL refuses to run as root, and the `postgres` user it would run as")?,
            )
        } else {
            None
        };
        // Run as `postgres`, the server must reach its directory: the run directory's
        // parents may be closed to that user (a checkout under a 0700 `mktemp -d`), so
        // the cluster then lives in its own directory under the system temp dir.
        let home = match run_as {
            Some(_) => {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::env::temp_dir().join(format!("tollgate-pg-{}-{n}", std::process::id()))
            }
            None => dir.join("postgres"),
        };
        let _ = std::fs::remove_dir_all(&home); // a leftover of an earlier process with this pid
        std::fs::create_dir_all(&home).with_context(|| format!("create {}", home.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&home, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {} to the postgres user", home.display()))?;
        }
        let data = home.join("data");
        let init_log = dir.join("initdb.log");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .current_dir(&home);
        if let Some(user) = run_as {
            user.apply(&mut initdb);
        }
        let out = initdb.output().with_context(|| format!("run {}", bin.join("initdb").display()))?;
        std::fs::write(&init_log, [out.stdout.as_slice(), out.stderr.as_slice()].concat())?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}); log {}:\n{}",
                out.status,
                init_log.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // A port picked free can be taken before the server binds it: pick another.
        let mut attempt = 0;
        loop {
            let port = crate::stack::free_port()?;
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])
                .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB", "-c", "fsync=off"])
                .current_dir(&home);
            if let Some(user) = run_as {
                user.apply(&mut cmd);
            }
            let mut proc = Proc::spawn("postgres", cmd, &dir.join("postgres.log"))?;
            match wait_ready(&mut proc, port) {
                Ok(()) => {
                    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(Postgres { port, url, data, proc });
                }
                Err(_) if attempt < 3 && proc.log_text().contains("already in use") => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}

/// Waits for the log line that says the server takes connections, and the port.
fn wait_ready(proc: &mut Proc, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.exited() {
            bail!("postgres exited ({status}) before it was ready; log {}:\n{}", proc.log.display(), proc.log_tail(20));
        }
        let ready = proc.log_text().contains("database system is ready to accept connections")
            && TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200))
                .is_ok();
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("postgres not ready after 30 s; log {}:\n{}", proc.log.display(), proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (SIGTERM would wait for every client to disconnect).
        self.proc.stop_with(libc::SIGINT, Duration::from_secs(10));
        // Throwaway: the cluster goes (postgres.log and initdb.log stay in the run dir).
        if let Some(home) = self.data.parent() {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}
