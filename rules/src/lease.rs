//! Global limits: how much of a limit window one gateway replica may admit on its own
//! (its **lease**), defined once for the filter (which asks and enforces) and the
//! tracker (which grants, in one ledger transaction per sync).
//!
//! Every limit of a `"scope": "global"` section is counted per fixed window aligned to
//! the UTC clock (`window_start_ms`, `window_ms`), per **limit key** (what is counted,
//! the window and the user: [`limit_key`]). Each replica (one Envoy worker) holds a
//! [`Holding`] per limit window: what the trackers granted it so far (cumulative over
//! the window), what it reported using, and its recent demand. Grants are never taken
//! back within their window, so the sum over the replicas of `max(granted, used)` never
//! exceeds the limit while everyone goes through the trackers: that is the bound. A
//! replica that goes away strands its unused grant until the window ends (an undershoot,
//! never an overshoot), which is why grants are sized to a replica's demand over
//! [`HORIZON_INTERVALS`] sync intervals and no more.
//!
//! Reports are idempotent: `used` and `granted` are cumulative per window, so a sync
//! sent twice (its answer lost) grants nothing twice.

/// Longest limit key, in characters.
pub const MAX_KEY_CHARS: usize = 320;
/// Most limit windows in one sync.
pub const MAX_LEASES_PER_SYNC: usize = 4_096;
/// Longest replica id, in characters.
pub const MAX_REPLICA_CHARS: usize = 64;
/// A lease is sized to cover this many sync intervals of the replica's demand.
pub const HORIZON_INTERVALS: u64 = 2;
/// A replica's demand counts in the split of what is left while it synced within this
/// many intervals.
pub const ACTIVE_INTERVALS: u64 = 3;
/// Replicas that synced within this many intervals are counted in `replicas` (the
/// divisor of the fallback share when the trackers cannot be reached).
pub const REPLICA_INTERVALS: u64 = 10;
/// Shortest and longest sync interval a gateway may announce.
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Limit windows a lease may be for: a second up to a day (as `limits` allows).
pub const WINDOWS_MS: [u64; 4] = [1_000, 60_000, 3_600_000, 86_400_000];

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counted {
    /// `requests_per_*`: admitted requests.
    Requests,
    /// `tokens_per_*`: tokens used plus reserved by requests in flight.
    Tokens,
    /// `quota.requests`.
    QuotaRequests,
    /// `quota.tokens`.
    QuotaTokens,
}

impl Counted {
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Requests => "requests",
            Counted::Tokens => "tokens",
            Counted::QuotaRequests => "quota_requests",
            Counted::QuotaTokens => "quota_tokens",
        }
    }
}

/// The limit key of `counted` per `window_ms` for `user`: `requests/60000/alice`.
pub fn limit_key(counted: Counted, window_ms: u64, user: &str) -> String {
    format!("{}/{}/{}", counted.as_str(), window_ms, user)
}

/// Whether `key` may be a limit key, and why not: `counted/window_ms/user` with a
/// known count, a window of [`WINDOWS_MS`] and a valid user (`check_user`), at most
/// [`MAX_KEY_CHARS`].
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.chars().count() > MAX_KEY_CHARS {
        return Err("is too long");
    }
    let mut parts = key.splitn(3, '/');
    let (Some(counted), Some(window), Some(user)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("must be counted/window_ms/user");
    };
    let known = [Counted::Requests, Counted::Tokens, Counted::QuotaRequests, Counted::QuotaTokens];
    if !known.iter().any(|c| c.as_str() == counted) {
        return Err("counts something unknown");
    }
    if !window.parse::<u64>().is_ok_and(|w| WINDOWS_MS.contains(&w)) {
        return Err("has a window that is not a second, minute, hour or day");
    }
    crate::check_user(user)
}

/// Whether `replica` may be a replica id: 1 to [`MAX_REPLICA_CHARS`] ASCII letters,
/// digits, `-`, `_` or `.`.
pub fn check_replica(replica: &str) -> Result<(), &'static str> {
    if replica.is_empty() || replica.len() > MAX_REPLICA_CHARS {
        return Err("must be 1 to 64 characters");
    }
    if !replica.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("may hold only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// The start of the window of `window_ms` containing `now_ms` (aligned to the epoch).
pub fn window_start(now_ms: u64, window_ms: u64) -> u64 {
    now_ms - now_ms % window_ms.max(1)
}

/// One replica's share of one limit window, as the trackers keep it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holding {
    /// Granted to the replica so far in the window (cumulative; never taken back).
    pub granted: u64,
    /// What the replica last reported using in the window (may exceed `granted` after
    /// it admitted on its fallback share while the trackers were away).
    pub used: u64,
    /// What it admitted (or wanted to) in its last sync interval.
    pub demand: u64,
    /// When it last synced this window (tracker clock).
    pub seen_ms: u64,
}

impl Holding {
    /// What this replica takes from the limit: its grant, or more if it used more.
    pub fn consumed(&self) -> u64 {
        self.granted.max(self.used)
    }

    fn unused(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }
}

/// What a replica reports for one limit window in a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub limit: u64,
    /// Used in the window so far (requests admitted; tokens settled plus reserved).
    pub used: u64,
    /// Admitted or wanted in the last interval.
    pub demand: u64,
    /// Needed now, beyond what is left of its grant, for a request waiting on it.
    pub need: u64,
    /// The grant the replica keeps, having given back the rest (a grant it cannot use:
    /// beyond its demand, or too small for its next request). Never below `used`.
    pub kept: Option<u64>,
}

/// The new holding of a replica after its report: its `used` and `demand` taken from
/// the report, its grant lowered to what it `kept` (if it gave some back: then only a
/// waiting `need` raises it again), else raised by what it may have of what is left.
///
/// `left = limit − Σ consumed` (all replicas, this one with its new `used`). Far from
/// the limit (`left` covers the demand of the replicas active within
/// [`ACTIVE_INTERVALS`] over [`HORIZON_INTERVALS`]) the replica is topped up to
/// `demand × HORIZON_INTERVALS` unused; near it, nothing is handed out ahead. A waiting
/// request's `need` (beyond the replica's unused grant) is granted whole whenever
/// `left` covers it, so the last units of a limit go to requests that can use them.
pub fn grant(mine: Holding, others: &[Holding], report: Report, now_ms: u64, interval_ms: u64) -> Holding {
    let granted = match report.kept {
        Some(kept) => mine.granted.min(kept.max(report.used)),
        None => mine.granted,
    };
    let mut me = Holding { granted, used: report.used, demand: report.demand, seen_ms: now_ms };
    let consumed = others.iter().fold(me.consumed(), |sum, h| sum.saturating_add(h.consumed()));
    let left = report.limit.saturating_sub(consumed);
    let active_since = now_ms.saturating_sub(interval_ms.saturating_mul(ACTIVE_INTERVALS));
    let total_demand =
        others.iter().filter(|h| h.seen_ms >= active_since).fold(me.demand, |sum, h| sum.saturating_add(h.demand));
    // Near the limit (what is left would not cover the fleet's demand over the horizon)
    // shares of it would be too small to use, and strand: only a waiting need is
    // granted, whole. A replica giving back is not topped up in the same sync either
    // (what it gave back would come straight back to it).
    let near = left < total_demand.saturating_mul(HORIZON_INTERVALS);
    let topped_up = if near || report.kept.is_some() {
        0
    } else {
        me.demand.saturating_mul(HORIZON_INTERVALS).saturating_sub(me.unused())
    };
    let whole_need = if report.need <= left { report.need } else { 0 };
    let extra = whole_need.max(topped_up).min(left);
    me.granted = me.granted.saturating_add(extra);
    me
}

/// How many replicas share a limit when the trackers cannot be reached: each may then
/// admit up to `ceil(limit / replicas)` per window on its own.
pub fn fallback_share(limit: u64, replicas: u64) -> u64 {
    limit.div_ceil(replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(granted: u64, used: u64, demand: u64) -> Holding {
        Holding { granted, used, demand, seen_ms: 10_000 }
    }

    #[test]
    fn keys() {
        assert_eq!(limit_key(Counted::QuotaTokens, 3_600_000, "alice"), "quota_tokens/3600000/alice");
        for (key, ok) in [
            ("requests/60000/alice", true),
            ("tokens/86400000/a/b", true),
            ("requests/60000/", false),
            ("requests/61000/alice", false),
            ("bananas/60000/alice", false),
            ("requests/60000/al,ice", false),
            ("requests", false),
        ] {
            assert_eq!(check_key(key).is_ok(), ok, "{key}");
        }
        assert!(check_key(&format!("requests/1000/{}", "u".repeat(400))).is_err());
        assert!(check_replica("gw-0123abcd").is_ok());
        assert!(check_replica("").is_err());
        assert!(check_replica("a b").is_err());
    }

    /// Table: (mine, others, report) → new grant.
    #[test]
    fn grants() {
        let r = |limit, used, demand, need| Report { limit, used, demand, need, kept: None };
        let back = |limit, used, demand, kept| Report { limit, used, demand, need: 0, kept: Some(kept) };
        for (name, mine, others, report, granted) in [
            ("alone, far from the limit: two intervals of demand", holding(0, 0, 0), vec![], r(100, 0, 5, 0), 10),
            ("unused grant counts towards the target", holding(10, 4, 5), vec![], r(100, 4, 5, 0), 14),
            ("near the limit: nothing ahead", holding(0, 0, 0), vec![holding(95, 90, 5)], r(100, 0, 50, 0), 0),
            (
                "far: two intervals, others' demand aside",
                holding(0, 0, 0),
                vec![holding(0, 0, 30)],
                r(100, 0, 10, 0),
                20,
            ),
            ("a need beyond the unused grant, whole", holding(10, 4, 1), vec![], r(100, 4, 1, 30), 40),
            ("a waiting need is granted whole if left", holding(0, 0, 0), vec![holding(0, 0, 100)], r(40, 0, 1, 1), 1),
            ("nothing left: nothing", holding(5, 5, 5), vec![holding(95, 95, 5)], r(100, 5, 5, 1), 5),
            ("over-use by fallback counts", holding(0, 0, 0), vec![holding(10, 99, 1)], r(100, 0, 0, 1), 1),
            ("over-use leaves less", holding(0, 0, 0), vec![holding(10, 99, 1)], r(100, 0, 0, 2), 0),
            ("idle replica gets nothing new", holding(3, 1, 0), vec![], r(100, 1, 0, 0), 3),
            ("what is given back goes", holding(30, 10, 0), vec![], back(100, 10, 0, 12), 12),
            ("never below what was used", holding(30, 10, 0), vec![], back(100, 10, 0, 4), 10),
            ("never above what was granted", holding(30, 10, 0), vec![], back(100, 10, 0, 50), 30),
            ("given back: not topped up at once", holding(30, 10, 5), vec![], back(100, 10, 5, 10), 10),
        ] {
            let got = grant(mine, &others, report, 10_000, 1_000);
            assert_eq!(got.granted, granted, "{name}");
            assert_eq!((got.used, got.demand, got.seen_ms), (report.used, report.demand, 10_000), "{name}");
        }
    }

    /// Replicas taking turns, each using all it gets and asking for more: the sum of
    /// what they hold never passes the limit.
    #[test]
    fn the_sum_never_passes_the_limit() {
        let limit = 97;
        let mut fleet = [Holding::default(); 5];
        for round in 0..200u64 {
            let i = (round * 7 % 5) as usize;
            let me = fleet[i];
            let others: Vec<Holding> = fleet.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, h)| *h).collect();
            let used = me.granted; // everything granted was used
            let kept = (round % 3 == 0).then_some(used);
            let report = Report { limit, used, demand: 3 + round % 4, need: round % 2, kept };
            fleet[i] = grant(me, &others, report, 10_000 + round, 1_000);
            let total: u64 = fleet.iter().map(Holding::consumed).sum();
            assert!(total <= limit, "round {round}: {total} > {limit}");
        }
        let total: u64 = fleet.iter().map(|h| h.granted).sum();
        assert_eq!(total, limit, "the whole limit is handed out when asked for");
        assert_eq!(fallback_share(20, 3), 7);
        assert_eq!(fallback_share(20, 0), 20);
        assert_eq!(window_start(61_500, 60_000), 60_000);
    }
}
