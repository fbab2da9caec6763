//! Label normalisation. Every label value that reaches Prometheus comes through here,
//! because each distinct value is a new time series: paths and deny reasons are mapped
//! onto fixed sets, free text is cut to [`MAX_LABEL_CHARS`], and the number of distinct
//! users, group sets and models is capped by [`CardinalityGuard`].
//!
//! The normalisation itself is [`tollgate_rules`]'s (re-exported here), the same the
//! filter applies, so a value means the same on both sides; the guard is state, and the
//! tracker's own.

use std::collections::HashSet;

pub use tollgate_rules::{
    deny_reason, group, groups_label, model_label, route, truncate, user, DENY_REASONS, MAX_LABEL_CHARS, OTHER, ROUTES,
    UNKNOWN_MODEL,
};

/// Admits at most `max` distinct values of one label; later newcomers become
/// [`OTHER`]. Values once admitted stay admitted for the life of the process (the series
/// exist in the registry anyway), so a value never moves between series.
#[derive(Debug)]
pub struct CardinalityGuard {
    max: usize,
    seen: HashSet<String>,
}

impl CardinalityGuard {
    pub fn new(max: usize) -> Self {
        CardinalityGuard { max, seen: HashSet::new() }
    }

    /// The label value to use for `value`.
    pub fn admit(&mut self, value: String) -> String {
        if self.seen.contains(&value) {
            return value;
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.clone());
            return value;
        }
        OTHER.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_caps_distinct_values() {
        let mut guard = CardinalityGuard::new(2);
        assert_eq!(guard.admit("a".into()), "a");
        assert_eq!(guard.admit("b".into()), "b");
        assert_eq!(guard.admit("c".into()), "other");
        assert_eq!(guard.admit("a".into()), "a");
        assert_eq!(guard.admit("b".into()), "b");
        assert_eq!(guard.admit("d".into()), "other");
    }
}
