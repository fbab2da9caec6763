//! Facts about processes and the machine, read from `/proc`: CPU time (to report
//! Envoy CPU per request, which is far less sensitive to a noisy shared machine than
//! requests per second), resident memory (the leak check), and the machine and tool
//! versions printed with every result.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

/// CPU time used so far by every thread of `pid`, in nanoseconds (sum of the first
/// field of `/proc/<pid>/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total: u64 = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let ns: u64 = text.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0);
        total = total.saturating_add(ns);
    }
    Ok(total)
}

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string()
        })
        .unwrap_or_else(|| format!("({cmd} not found)"))
}

/// `key: value` lines describing the machine and the tools.
pub fn machine_facts(envoy: &Path, wasm: &Path) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib as f64 / 1_048_576.0));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let envoy_version = first_line(&envoy.display().to_string(), &["--version"]);
    let envoy_version = envoy_version.split("version: ").nth(1).unwrap_or(&envoy_version).to_string();
    let wasm_size = std::fs::metadata(wasm).map_or(0, |m| m.len());
    let wasm_hash = std::fs::read(wasm)
        .map(|b| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&b)).chars().take(16).collect::<String>()
        })
        .unwrap_or_default();
    let git = first_line(
        "git",
        &["-C", &harness::paths::workspace_root().display().to_string(), "rev-parse", "--short=12", "HEAD"],
    );
    let dirty = Command::new("git")
        .args(["-C", &harness::paths::workspace_root().display().to_string(), "status", "--porcelain", "filter"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    vec![
        ("cpu".into(), format!("{cpu} ({cores} cores visible)")),
        ("memory".into(), mem),
        ("kernel".into(), first_line("uname", &["-srm"])),
        ("load average at start".into(), load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        ("envoy".into(), envoy_version),
        ("wrk".into(), first_line("wrk", &["-v"]).split(" [").next().unwrap_or("").to_string()),
        ("h2load".into(), first_line("h2load", &["--version"])),
        ("valgrind".into(), first_line("valgrind", &["--version"])),
        ("rustc".into(), first_line("rustc", &["-V"])),
        ("git".into(), format!("{git}{}", if dirty { " (filter/ has uncommitted changes)" } else { "" })),
        ("wasm".into(), format!("{} ({wasm_size} bytes, sha256 {wasm_hash}…)", wasm.display())),
    ]
}
