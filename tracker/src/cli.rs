//! Command line. Every option also reads an environment variable, so the Kubernetes
//! Deployment can set them without changing the container's arguments.

use clap::Parser;

use crate::metrics::Limits;

/// Tollgate usage-tracking service: takes usage events from the gateway on POST /track
/// and exports them as Prometheus counters on GET /metrics.
#[derive(Debug, Clone, Parser)]
#[command(name = "usage-tracking", version, about, long_about = None)]
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

    /// How many recent event ids are remembered to drop duplicates (first in, first
    /// out); a copy arriving after this many newer events counts again. 0 disables.
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
        }
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
        ])
        .unwrap();
        assert_eq!(args.listen, "0.0.0.0:9");
        let limits = args.limits();
        assert_eq!((limits.max_body_bytes, limits.max_batch, limits.dedup_window, limits.max_users), (2048, 5, 0, 3));
    }

    #[test]
    fn bad_flags() {
        for bad in [["--max-body-bytes", "10"], ["--max-batch", "0"], ["--dedup-window", "-1"]] {
            assert!(Args::try_parse_from(["usage-tracking", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
        Args::command().debug_assert();
    }
}
