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

/// Caps the label combinations counted, over all labels: each new (user, groups, path,
/// model) is a handful of new series (requests, four token types, …), and the per-label
/// caps alone still allow their product. Beyond `max`, a new combination is counted as
/// user, groups and model [`OTHER`] (its path stays: a fixed set), so memory stays
/// bounded whatever labels arrive.
#[derive(Debug)]
pub struct SeriesGuard {
    max: usize,
    seen: HashSet<(String, String, &'static str, String)>,
}

impl SeriesGuard {
    pub fn new(max: usize) -> Self {
        SeriesGuard { max, seen: HashSet::new() }
    }

    /// Whether the combination gets its own series (seen before, or there is room).
    pub fn admit(&mut self, user: &str, groups: &str, path: &'static str, model: &str) -> bool {
        let key = (user.to_owned(), groups.to_owned(), path, model.to_owned());
        if self.seen.contains(&key) {
            return true;
        }
        if self.seen.len() < self.max {
            self.seen.insert(key);
            return true;
        }
        false
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

    #[test]
    fn series_guard_caps_combinations() {
        let mut guard = SeriesGuard::new(2);
        let cases = [
            (("a", "g", "/v1/models", ""), true),
            (("a", "g", "/v1/embeddings", "m"), true),
            (("a", "g", "/v1/chat/completions", "m"), false),
            (("a", "g", "/v1/models", ""), true),
            (("b", "", "/v1/models", ""), false),
        ];
        for ((user, groups, path, model), want) in cases {
            assert_eq!(guard.admit(user, groups, path, model), want, "{user} {groups} {path} {model}");
        }
    }
}
