#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // test code: a panic is a failed test
//! The real binary refuses to start with a secret anyone could guess (too short, or the
//! example value the bundle publishes), naming the variable and not echoing the value,
//! and starts with a strong one.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const STRONG: &str = "4c1d8e0b7a2f9e3d6b5a1c0f8e7d2b9a";

/// Runs the tracker with the three secrets strong but `name` = `value`: whether it came
/// to listen (then it is stopped), and everything it printed.
fn start_with(name: &str, value: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_usage-tracking"))
        .args(["--listen", "127.0.0.1:0"])
        .env("TRACKER_API_TOKEN", STRONG)
        .env("TRACKER_INGEST_TOKEN", STRONG)
        .env("TRACKER_ADMIN_TOKEN", STRONG)
        .env(name, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut printed = String::new();
    let mut started = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("listening on") {
            started = true;
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    child.stderr.take().unwrap().read_to_string(&mut printed).unwrap();
    assert!(started || !status.success(), "it exited 0 without listening: {printed}");
    (started, printed)
}

#[test]
fn weak_secrets_stop_the_start_with_their_variable_named() {
    let cases = [
        ("TRACKER_ADMIN_TOKEN", "hunter2", "TRACKER_ADMIN_TOKEN has 7 characters"),
        ("TRACKER_API_TOKEN", "short-api-token", "TRACKER_API_TOKEN has 15 characters"),
        (
            "TRACKER_INGEST_TOKEN",
            "example-ingest-token-8b2d6f1a3c9e7d5b4a2f0e8c6d1b3a57",
            "TRACKER_INGEST_TOKEN is an example value published",
        ),
    ];
    for (name, value, want) in cases {
        let (started, printed) = start_with(name, value);
        assert!(!started, "{name}={value} started: {printed}");
        assert!(printed.contains(want), "{name}: {printed}");
        assert!(!printed.contains(value), "{name}: the value is echoed: {printed}");
    }
}

#[test]
fn strong_secrets_start_it() {
    // A trailing newline (a Secret written from a file) is trimmed, not counted.
    let (started, printed) = start_with("TRACKER_INGEST_TOKEN", &format!("{STRONG}\n"));
    assert!(started, "{printed}");
}
