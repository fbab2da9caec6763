//! Child processes of the stack: started with their output in a log file, in their
//! own process group, and killed with that group when dropped, so a failing test
//! leaves nothing running. On Linux they also die with the thread that started them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        configure_child(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("start {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), log: log.to_path_buf(), child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all.iter().skip(all.len().saturating_sub(lines)).copied().collect::<Vec<_>>().join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to the group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.stop_with(libc::SIGTERM, grace);
    }

    /// `signal` to the group (e.g. SIGINT, PostgreSQL's fast shutdown), then SIGKILL
    /// after `grace`.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = child.id() as i32;
        signal_group(pgid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                signal_group(pgid, libc::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group(pgid, libc::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL at once (tests of crashes).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id() as i32, libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A user to run a child as (PostgreSQL refuses to run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// The user `name`'s ids, from `id` (so any NSS source works).
    pub fn user(name: &str) -> anyhow::Result<RunAs> {
        let id = |flag: &str| -> anyhow::Result<u32> {
            let out = Command::new("id").args([flag, name]).output().context("run id")?;
            anyhow::ensure!(out.status.success(), "no user `{name}`: {}", String::from_utf8_lossy(&out.stderr).trim());
            String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("id {flag} {name}"))
        };
        Ok(RunAs { uid: id("-u")?, gid: id("-g")? })
    }

    /// Whether this process runs as root (and so must switch to another user for
    /// programs that refuse root).
    #[allow(unsafe_code)] // geteuid(2) cannot fail.
    pub fn is_root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    /// Makes `cmd` drop to this user between fork and exec. Register it before
    /// [`Proc::spawn`] adds its own `pre_exec`: that one then sets the parent-death
    /// signal after the switch (a change of credentials clears it).
    #[allow(unsafe_code)] // setgroups/setgid/setuid between fork and exec: async-signal-safe calls only.
    pub fn apply(self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let RunAs { uid, gid } = self;
        unsafe {
            cmd.pre_exec(move || {
                let groups = [gid];
                if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

#[allow(unsafe_code)] // kill(2) on our own child's process group.
fn signal_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

#[allow(unsafe_code)] // setpgid/prctl between fork and exec: async-signal-safe calls only.
fn configure_child(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
