//! Command line. Every option also reads an environment variable, so the Kubernetes
//! Deployment can set them without changing the container's arguments. The secrets are
//! environment variables only (`TRACKER_API_TOKEN`, `TRACKER_INGEST_TOKEN`,
//! `TRACKER_ADMIN_TOKEN`), so they never show in `ps`.

use std::path::PathBuf;

use clap::Parser;

use crate::metrics::Limits;

/// The environment variable that holds the usage API's bearer secret.
pub const API_TOKEN_ENV: &str = "TRACKER_API_TOKEN";
/// The environment variable that holds the bearer secret `POST /track` requires.
pub const INGEST_TOKEN_ENV: &str = "TRACKER_INGEST_TOKEN";
/// The environment variable that holds the keys API's (`/v1/keys`) bearer secret.
pub const ADMIN_TOKEN_ENV: &str = "TRACKER_ADMIN_TOKEN";

/// Tollgate usage-tracking service: takes usage events from the gateway on POST /track
/// and exports them as Prometheus counters on GET /metrics.
///
/// WITHOUT --data-dir OR --database-url, USAGE IS KEPT IN MEMORY ONLY: a restart loses
/// the counters and every event not yet scraped. That is fine for the local dev stack,
/// not for billing or quotas.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "usage-tracking",
    version,
    about,
    after_help = "Environment only:\n  TRACKER_API_TOKEN     bearer secret of GET /v1/usage and GET /v1/usage/recent \
                  (unset or empty: those answer 404)\n  TRACKER_INGEST_TOKEN  bearer secret POST /track requires \
                  (the gateway's usage.token_env; unset or empty: /track is open to anyone who can reach it, \
                  and a warning is printed at start; it also guards POST /v1/limits/sync, POST /v1/keys/resolve \
                  and GET /v1/keys/changes)\n  TRACKER_ADMIN_TOKEN   bearer secret of the keys API: POST /v1/keys, \
                  GET /v1/keys, DELETE /v1/keys/{id} (unset or empty: those answer 404; needs a ledger)\n\
                  A secret shorter than 32 characters or beginning with \"example-\" (the published \
                  example values) stops the start, the variable named."
)]
pub struct Args {
    /// Address to listen on (host:port; use 0.0.0.0:8081 in a pod).
    #[arg(long, env = "TRACKER_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,

    /// Largest /track body in bytes; bigger bodies get 413. The filter's default batch
    /// (500 events) is about 150 KB.
    #[arg(long, env = "TRACKER_MAX_BODY_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_body_bytes: u32,

    /// Most events in one /track array; more gets 413.
    #[arg(long, env = "TRACKER_MAX_BATCH", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,

    /// Without a ledger: how many recent event ids are remembered to drop duplicates
    /// (first in, first out); a copy arriving after this many newer events counts
    /// again; 0 disables. With a ledger it is not used: an id is remembered as long as
    /// its event is in the ledger (--retention-days), across restarts and replicas.
    #[arg(long, env = "TRACKER_DEDUP_WINDOW", default_value_t = 100_000)]
    pub dedup_window: u32,

    /// Most distinct `user` label values; later new users are counted as user="other".
    #[arg(long, env = "TRACKER_MAX_USERS", default_value_t = 10_000)]
    pub max_users: u32,

    /// Most distinct `groups` label values; later new ones are counted as groups="other".
    #[arg(long, env = "TRACKER_MAX_GROUPS", default_value_t = 1_000)]
    pub max_groups: u32,

    /// Most distinct `model` label values; later new ones are counted as model="other".
    #[arg(long, env = "TRACKER_MAX_MODELS", default_value_t = 1_000)]
    pub max_models: u32,

    /// Most label combinations (user, groups, path, model) with series of their own,
    /// over all labels (the per-label caps alone allow their product); later new
    /// combinations are counted as user, groups and model "other" (and in
    /// tracker_series_overflow_total). Each combination is up to ten series.
    #[arg(long, env = "TRACKER_MAX_SERIES", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series: u32,

    /// Durable SQLite ledger in this directory (created if missing; file
    /// usage.sqlite3). Every accepted event is committed and fsynced there before
    /// /track answers 200; counters and duplicate detection continue from it after a
    /// restart; the usage API reads it. Without this or --database-url: memory only.
    #[arg(long, env = "TRACKER_DATA_DIR", value_name = "DIR", conflicts_with = "database_url")]
    pub data_dir: Option<PathBuf>,

    /// PostgreSQL ledger shared by several replicas, instead of --data-dir:
    /// postgres://user:password@host:port/database (no TLS). Prefer the environment
    /// variable: the URL may hold a password.
    #[arg(long, env = "TRACKER_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Days raw events stay in the ledger; older ones are compacted into per-day totals
    /// (the totals stay exact; single events and hour resolution of those days go).
    #[arg(long, env = "TRACKER_RETENTION_DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub retention_days: u32,

    /// Seconds between compaction runs (the first runs at start).
    #[arg(long, env = "TRACKER_COMPACT_INTERVAL_SECS", default_value_t = 3_600,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub compact_interval_secs: u32,

    /// This replica's name in the ledger; its counters are restored from its own rows
    /// only, so several replicas sharing one PostgreSQL each need a stable, distinct
    /// name (e.g. the StatefulSet pod name). Default: "local" with --data-dir, the host
    /// name with --database-url.
    #[arg(long, env = "TRACKER_REPLICA_ID", value_name = "NAME")]
    pub replica_id: Option<String>,
}

/// Where usage is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// Memory only (no --data-dir, no --database-url).
    Memory,
    Sqlite(PathBuf),
    Postgres(String),
}

impl Args {
    pub fn limits(&self) -> Limits {
        let size = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        Limits {
            max_body_bytes: size(self.max_body_bytes),
            max_batch: size(self.max_batch),
            dedup_window: size(self.dedup_window),
            max_users: size(self.max_users),
            max_groups: size(self.max_groups),
            max_models: size(self.max_models),
            max_series: size(self.max_series),
        }
    }

    pub fn store(&self) -> Store {
        match (&self.data_dir, &self.database_url) {
            (_, Some(url)) if !url.is_empty() => Store::Postgres(url.clone()),
            (Some(dir), _) if !dir.as_os_str().is_empty() => Store::Sqlite(dir.clone()),
            _ => Store::Memory,
        }
    }

    /// The replica name: `--replica-id`, else "local" for SQLite (one file, one
    /// writer; the name must not change when the host does), else the host name.
    pub fn replica(&self) -> String {
        if let Some(id) = self.replica_id.as_deref().map(str::trim).filter(|id| !id.is_empty()) {
            return id.to_owned();
        }
        match self.store() {
            Store::Postgres(_) => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tracker".to_owned()),
            Store::Memory | Store::Sqlite(_) => "local".to_owned(),
        }
    }
}

/// Fewest characters a tracker secret may have (`openssl rand -hex 16`, 128 bits). The
/// secrets are all that guards the usage, keys and ingest endpoints, and nothing slows
/// guessing down (a lockout after failures would let anyone lock the gateways out), so
/// they must be too long to guess.
pub const MIN_SECRET_CHARS: usize = 32;
/// How the example values published in `istio/base/tracker-secret.yaml` begin: anyone
/// can read them, so a tracker started with one is refused.
pub const PUBLISHED_EXAMPLE_PREFIX: &str = "example-";

/// The secret in the environment variable `name`, trimmed (a Secret written from a file
/// often ends in a newline): `None` when unset or empty; refused, the variable named,
/// when it is not UTF-8, a published example value or too short.
pub fn secret_from_env(name: &str) -> Result<Option<String>, String> {
    check_secret(name, std::env::var(name))
}

/// [`secret_from_env`]'s rule on what the environment held.
pub fn check_secret(name: &str, raw: Result<String, std::env::VarError>) -> Result<Option<String>, String> {
    let value = match raw {
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => return Err(format!("{name} is not valid UTF-8")),
        Ok(value) => value.trim().to_owned(),
    };
    let fix = "set a secret of your own, e.g. `openssl rand -hex 32`";
    if value.is_empty() {
        Ok(None)
    } else if value.starts_with(PUBLISHED_EXAMPLE_PREFIX) {
        Err(format!(
            "{name} is an example value published with Tollgate (it begins with {PUBLISHED_EXAMPLE_PREFIX:?}, \
             as in istio/base/tracker-secret.yaml): anyone can read it; {fix}"
        ))
    } else if value.chars().count() < MIN_SECRET_CHARS {
        Err(format!(
            "{name} has {} characters, fewer than {MIN_SECRET_CHARS}: too easy to guess; {fix}",
            value.chars().count()
        ))
    } else {
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_match_limits_default() {
        let args = Args::try_parse_from(["usage-tracking"]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:8081");
        assert_eq!(args.limits(), Limits::default());
    }

    #[test]
    fn flags() {
        let args = Args::try_parse_from([
            "usage-tracking",
            "--listen",
            "0.0.0.0:9",
            "--max-body-bytes",
            "2048",
            "--max-batch",
            "5",
            "--dedup-window",
            "0",
            "--max-users",
            "3",
            "--max-series",
            "7",
        ])
        .unwrap();
        assert_eq!(args.listen, "0.0.0.0:9");
        let limits = args.limits();
        assert_eq!((limits.max_body_bytes, limits.max_batch, limits.dedup_window, limits.max_users), (2048, 5, 0, 3));
        assert_eq!(limits.max_series, 7);
    }

    #[test]
    fn stores_and_replicas() {
        let cases: [(&[&str], Store, Option<&str>); 5] = [
            (&[], Store::Memory, Some("local")),
            (&["--data-dir", "/d"], Store::Sqlite("/d".into()), Some("local")),
            (&["--data-dir", "/d", "--replica-id", "a"], Store::Sqlite("/d".into()), Some("a")),
            (&["--database-url", "postgres://h/db"], Store::Postgres("postgres://h/db".into()), None),
            (
                &["--database-url", "postgres://h/db", "--replica-id", "r-0"],
                Store::Postgres("postgres://h/db".into()),
                Some("r-0"),
            ),
        ];
        for (flags, store, replica) in cases {
            let args = Args::try_parse_from(std::iter::once("usage-tracking").chain(flags.iter().copied())).unwrap();
            assert_eq!(args.store(), store, "{flags:?}");
            if let Some(replica) = replica {
                assert_eq!(args.replica(), replica, "{flags:?}");
            } else {
                assert!(!args.replica().is_empty());
            }
            assert_eq!((args.retention_days, args.compact_interval_secs), (90, 3600));
        }
    }

    #[test]
    fn bad_flags() {
        for bad in [
            &["--max-body-bytes", "10"][..],
            &["--max-batch", "0"],
            &["--dedup-window", "-1"],
            &["--retention-days", "0"],
            &["--compact-interval-secs", "0"],
            &["--max-series", "0"],
            &["--data-dir", "/d", "--database-url", "postgres://h/db"],
        ] {
            let argv = std::iter::once("usage-tracking").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
        }
        Args::command().debug_assert();
    }

    #[test]
    fn secrets_too_easy_to_guess_are_refused_with_their_variable() {
        use std::env::VarError::{NotPresent, NotUnicode};
        let strong = "0123456789abcdef0123456789abcdef";
        let ok = |v: &str| Ok::<_, std::env::VarError>(v.to_owned());
        let cases: [(&str, Result<String, std::env::VarError>, Result<Option<&str>, &str>); 9] = [
            ("unset", Err(NotPresent), Ok(None)),
            ("empty", ok(""), Ok(None)),
            ("blank", ok(" \n"), Ok(None)),
            ("strong", ok(strong), Ok(Some(strong))),
            ("trailing newline", ok(&format!("{strong}\n")), Ok(Some(strong))),
            ("one short", ok(&strong[1..]), Err("has 31 characters, fewer than 32")),
            ("a word", ok("s3cret"), Err("has 6 characters")),
            (
                "published",
                ok("example-admin-token-3e7a1c9d5b2f8e4a6c0d2b9f7e1a5c38"),
                Err("an example value published"),
            ),
            ("not UTF-8", Err(NotUnicode(std::ffi::OsString::new())), Err("is not valid UTF-8")),
        ];
        for (case, raw, want) in cases {
            let got = check_secret("TRACKER_X_TOKEN", raw);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got.as_deref(), want, "{case}"),
                (Err(e), Err(want)) => {
                    assert!(e.starts_with("TRACKER_X_TOKEN ") && e.contains(want), "{case}: {e}");
                    assert!(!e.contains("3e7a1c9d"), "{case}: the value is not echoed: {e}");
                }
                (got, want) => panic!("{case}: {got:?}, want {want:?}"),
            }
        }
    }

    /// The values the bundle publishes cannot start a tracker.
    #[test]
    fn the_bundles_example_secrets_are_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../istio/base/tracker-secret.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let values: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .filter(|(k, _)| [API_TOKEN_ENV, INGEST_TOKEN_ENV, ADMIN_TOKEN_ENV].contains(k))
            .collect();
        assert_eq!(values.len(), 3, "{text}");
        for (name, value) in values {
            let e = check_secret(name, Ok(value.to_owned())).unwrap_err();
            assert!(e.contains("example value published"), "{e}");
        }
    }
}
