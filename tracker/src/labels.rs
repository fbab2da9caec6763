//! Label normalisation. Every label value that reaches Prometheus comes through here,
//! because each distinct value is a new time series: paths and deny reasons are mapped
//! onto fixed sets, free text is cut to [`MAX_LABEL_CHARS`], and the number of distinct
//! users, group sets and models is capped by [`CardinalityGuard`].

use std::collections::HashSet;

/// Longest label value kept, in characters; longer values are cut.
pub const MAX_LABEL_CHARS: usize = 128;

/// The label value that stands for everything over a cardinality cap.
pub const OTHER: &str = "other";

/// The `model` label when an event names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Routes that get their own `path` label value; any other path is `other`.
pub const ROUTES: [&str; 6] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models"];

/// Deny reasons that get their own `reason` label value; anything else is `other`.
pub const DENY_REASONS: [&str; 5] =
    ["missing_credential", "invalid_credential", "permission_denied", "rate_limited", "quota_exceeded"];

/// Maps a request path to its `path` label: the query string and fragment are dropped,
/// trailing slashes ignored, and only the exact OpenAI routes in [`ROUTES`] are kept.
pub fn route(path: &str) -> &'static str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let bare = path.get(..end).unwrap_or(path).trim_end_matches('/');
    ROUTES.iter().find(|r| **r == bare).copied().unwrap_or(OTHER)
}

/// Maps a deny reason to its `reason` label. The filter sends the canonical names; the
/// OpenAI error codes for the same cases are accepted as aliases.
pub fn deny_reason(reason: &str) -> &'static str {
    match reason.trim().to_ascii_lowercase().as_str() {
        "missing_credential" | "missing_api_key" => "missing_credential",
        "invalid_credential" | "invalid_api_key" | "invalid_token" => "invalid_credential",
        "permission_denied" | "forbidden" => "permission_denied",
        "rate_limited" | "rate_limit_exceeded" => "rate_limited",
        "quota_exceeded" | "insufficient_quota" => "quota_exceeded",
        _ => OTHER,
    }
}

/// Cuts `value` to at most [`MAX_LABEL_CHARS`] characters (never inside a character).
pub fn truncate(value: &str) -> String {
    match value.char_indices().nth(MAX_LABEL_CHARS) {
        Some((end, _)) => value.get(..end).unwrap_or(value).to_owned(),
        None => value.to_owned(),
    }
}

/// The `groups` label: trimmed, de-duplicated, sorted and joined with ",", so the same
/// set of groups is one series whatever order the sender used.
pub fn groups_label(groups: &[String]) -> String {
    let mut names: Vec<&str> = groups.iter().map(|g| g.trim()).filter(|g| !g.is_empty()).collect();
    names.sort_unstable();
    names.dedup();
    truncate(&names.join(","))
}

/// The `model` label: cut to length, `unknown` when missing or empty.
pub fn model_label(model: Option<&str>) -> String {
    match model.map(str::trim) {
        Some(m) if !m.is_empty() => truncate(m),
        _ => UNKNOWN_MODEL.to_owned(),
    }
}

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
    fn routes() {
        let cases = [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions/", "/v1/chat/completions"),
            ("/v1/chat/completions?stream=true", "/v1/chat/completions"),
            ("/v1/chat/completions/?a=b#frag", "/v1/chat/completions"),
            ("/v1/completions", "/v1/completions"),
            ("/v1/embeddings", "/v1/embeddings"),
            ("/v1/responses", "/v1/responses"),
            ("/v1/messages", "/v1/messages"),
            ("/v1/models", "/v1/models"),
            ("/v1/models/", "/v1/models"),
            ("/v1/models/Qwen", "other"),
            ("/V1/CHAT/COMPLETIONS", "other"),
            ("/v1/chat/completions/extra", "other"),
            ("/v2/chat/completions", "other"),
            ("", "other"),
            ("/", "other"),
            ("?", "other"),
            ("/v1/chat/compl\u{e9}tions", "other"),
        ];
        for (path, want) in cases {
            assert_eq!(route(path), want, "path {path:?}");
        }
    }

    #[test]
    fn deny_reasons() {
        let cases = [
            ("missing_credential", "missing_credential"),
            ("missing_api_key", "missing_credential"),
            ("invalid_credential", "invalid_credential"),
            ("invalid_api_key", "invalid_credential"),
            ("INVALID_TOKEN", "invalid_credential"),
            ("permission_denied", "permission_denied"),
            ("forbidden", "permission_denied"),
            ("rate_limited", "rate_limited"),
            ("rate_limit_exceeded", "rate_limited"),
            (" quota_exceeded ", "quota_exceeded"),
            ("insufficient_quota", "quota_exceeded"),
            ("", "other"),
            ("something new", "other"),
        ];
        for (reason, want) in cases {
            assert_eq!(deny_reason(reason), want, "reason {reason:?}");
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let cases = [
            ("short".to_owned(), "short".to_owned()),
            ("a".repeat(128), "a".repeat(128)),
            ("a".repeat(129), "a".repeat(128)),
            ("λ".repeat(200), "λ".repeat(128)),
        ];
        for (input, want) in cases {
            assert_eq!(truncate(&input), want);
        }
    }

    #[test]
    fn groups_labels() {
        let cases: [(&[&str], &str); 5] = [
            (&[], ""),
            (&["premium"], "premium"),
            (&["premium", "free"], "free,premium"),
            (&[" b ", "a", "b", ""], "a,b"),
            (&["z", "a", "m"], "a,m,z"),
        ];
        for (groups, want) in cases {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            assert_eq!(groups_label(&groups), want, "groups {groups:?}");
        }
    }

    #[test]
    fn model_labels() {
        assert_eq!(model_label(None), "unknown");
        assert_eq!(model_label(Some("")), "unknown");
        assert_eq!(model_label(Some("  ")), "unknown");
        assert_eq!(model_label(Some("Qwen/Qwen3-0.6B")), "Qwen/Qwen3-0.6B");
    }

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
