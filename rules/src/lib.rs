//! What a valid Tollgate usage event is, defined once.
//!
//! The filter (in Envoy) reports every request it handles to the usage-tracking service
//! as a JSON event; the tracker checks each event and turns it into Prometheus label
//! values and counts. Both sides used to carry their own copy of these rules, and a
//! copy that drifts costs data: an event the filter sends but the tracker refuses is
//! lost (the filter cannot fix and resend it), and a label value the two normalise
//! differently splits one series in two. So the limits and the normalisation live here,
//! in one crate both depend on:
//!
//! - the **filter** builds its events with these functions ([`tokens`], [`status`],
//!   [`event_id`], …), so it never sends what the tracker refuses;
//! - the **tracker** checks incoming events against the same limits and derives its
//!   label values with the same functions ([`route`], [`deny_reason`], [`user`],
//!   [`groups_label`], [`model_label`]), so a value means the same on both sides.
//!
//! No dependencies and no panics: the filter links this crate into its Wasm module,
//! where a panic traps the VM.

#![forbid(unsafe_code)]

pub mod lease;

use std::borrow::Cow;

/// Longest event id, in characters (ids are the tracker's dedup key).
pub const MAX_ID_CHARS: usize = 128;

/// Largest count accepted per token kind per event: the largest integer a JSON number
/// holds exactly in most parsers (2^53 - 1), and in Prometheus's float64.
pub const MAX_TOKENS: u64 = (1 << 53) - 1;

/// Largest HTTP status an event may carry.
pub const MAX_STATUS: u16 = 999;

/// Longest label value kept, in characters; longer values are cut.
pub const MAX_LABEL_CHARS: usize = 128;

/// Largest `count` of an aggregated denial event (one event standing for `count`
/// denied requests of one reason and route in one flush interval). A billion is beyond
/// any real traffic, and it keeps the ledger's sums of counts far inside a signed 64-bit
/// integer (2^53 per event overflowed them after 1 024 events).
pub const MAX_DENIED_COUNT: u64 = 1_000_000_000;

/// Routes that get their own `path` label value; any other path is [`OTHER`].
pub const ROUTES: [&str; 6] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models"];

/// Deny reasons that get their own `reason` label value; anything else is [`OTHER`].
/// `limit_unavailable`: the limit state could not be checked and `limits.on_contention`
/// is `deny`. `key_service_unavailable`: a managed API key could not be resolved (the
/// key service failed, or the per-worker bounds on lookups refused one).
pub const DENY_REASONS: [&str; 7] = [
    "missing_credential",
    "invalid_credential",
    "permission_denied",
    "rate_limited",
    "quota_exceeded",
    "limit_unavailable",
    "key_service_unavailable",
];

/// The label value of everything outside a fixed set (routes, deny reasons) or over a
/// cardinality cap.
pub const OTHER: &str = "other";

/// The `model` label of an event that reports usage but names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The `path` label of a request path: the query string and fragment are dropped,
/// trailing slashes ignored, and only the exact routes in [`ROUTES`] are kept.
pub fn route(path: &str) -> &'static str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let bare = path.get(..end).unwrap_or(path).trim_end_matches('/');
    ROUTES.iter().find(|r| **r == bare).copied().unwrap_or(OTHER)
}

/// The `reason` label of a deny reason (trimmed, case-insensitive). The filter sends
/// the canonical names of [`DENY_REASONS`]; the OpenAI error codes for the same cases
/// are accepted as aliases; anything else is [`OTHER`].
pub fn deny_reason(reason: &str) -> &'static str {
    let reason = reason.trim();
    let is = |name: &str| reason.eq_ignore_ascii_case(name);
    if is("missing_credential") || is("missing_api_key") {
        "missing_credential"
    } else if is("invalid_credential") || is("invalid_api_key") || is("invalid_token") {
        "invalid_credential"
    } else if is("permission_denied") || is("forbidden") {
        "permission_denied"
    } else if is("rate_limited") || is("rate_limit_exceeded") {
        "rate_limited"
    } else if is("quota_exceeded") || is("insufficient_quota") {
        "quota_exceeded"
    } else if is("limit_unavailable") {
        "limit_unavailable"
    } else if is("key_service_unavailable") {
        "key_service_unavailable"
    } else {
        OTHER
    }
}

/// `value` cut to at most [`MAX_LABEL_CHARS`] characters (never inside a character).
pub fn truncate(value: &str) -> &str {
    match value.char_indices().nth(MAX_LABEL_CHARS) {
        Some((end, _)) => value.get(..end).unwrap_or(value),
        None => value,
    }
}

/// The `user` label: trimmed and cut to [`MAX_LABEL_CHARS`]; refused when blank (an
/// authorized event without a user is invalid) or holding a control character (no
/// identity has one: [`check_user`]; PostgreSQL cannot store a NUL).
pub fn user(value: &str) -> Result<&str, &'static str> {
    let value = value.trim();
    if value.is_empty() {
        Err("must not be empty")
    } else if value.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else {
        Ok(truncate(value))
    }
}

/// Whether `user` may be an identity's user name, and why not: it goes into a request
/// header and into usage events, so it must be a [`user`] label value as it is (not
/// blank, no surrounding whitespace) and must not hold control characters (header
/// injection) or `,` (it would read as two values in comma-joined fields). The filter
/// admits an identity only when this holds, so every event it sends has a valid user.
pub fn check_user(user: &str) -> Result<(), &'static str> {
    if user.trim().is_empty() {
        Err("must not be empty")
    } else if user.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else if user.contains(',') {
        Err("must not contain commas")
    } else if user.trim() != user {
        Err("must not start or end with whitespace")
    } else {
        Ok(())
    }
}

/// Whether `group` may be one of an identity's group names, and why not: groups travel
/// comma-joined in a header and in the `groups` label, so a name is a valid [`group`]
/// with no whitespace or control characters.
pub fn check_group(group: &str) -> Result<(), &'static str> {
    if group.is_empty() {
        Err("must not be empty")
    } else if group.contains(',') || group.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("must not contain commas, whitespace or control characters")
    } else {
        Ok(())
    }
}

/// One group name, trimmed; `None` when blank, when it holds `,`, the separator of the
/// `groups` label (such a name would read as two groups), or a control character (no
/// valid identity has one: [`check_group`]).
pub fn group(value: &str) -> Option<&str> {
    let value = value.trim();
    (!value.is_empty() && !value.contains(',') && !value.chars().any(char::is_control)).then_some(value)
}

/// The `groups` label: the valid [`group`] names, sorted, de-duplicated, joined with
/// `,` and cut to [`MAX_LABEL_CHARS`], so the same set of groups is one series whatever
/// order the sender used. No groups is the empty value.
pub fn groups_label<S: AsRef<str>>(groups: &[S]) -> String {
    let mut names: Vec<&str> = groups.iter().filter_map(|g| group(g.as_ref())).collect();
    names.sort_unstable();
    names.dedup();
    truncate(&names.join(",")).to_owned()
}

/// A model name as an event carries it: cut to [`MAX_LABEL_CHARS`], control characters
/// replaced by U+FFFD. It comes from the upstream's response, so it is whatever a model
/// server (or a client it echoes) says; a NUL cannot be stored in PostgreSQL (the batch
/// holding it would fail to commit again and again) and a newline or escape has no
/// place in a label. Replaced, not refused: the event's usage is kept.
pub fn model_name(model: &str) -> Cow<'_, str> {
    let cut = truncate(model);
    if cut.chars().any(char::is_control) {
        Cow::Owned(cut.chars().map(|c| if c.is_control() { char::REPLACEMENT_CHARACTER } else { c }).collect())
    } else {
        Cow::Borrowed(cut)
    }
}

/// The `model` label: trimmed, then as [`model_name`]; [`UNKNOWN_MODEL`] when missing
/// or blank.
pub fn model_label(model: Option<&str>) -> Cow<'_, str> {
    match model.map(str::trim) {
        Some(m) if !m.is_empty() => model_name(m),
        _ => Cow::Borrowed(UNKNOWN_MODEL),
    }
}

/// A token count as the filter sends it: clamped to [`MAX_TOKENS`] (an absurd count
/// from an upstream must not make the whole event invalid).
pub fn tokens(n: u64) -> u64 {
    n.min(MAX_TOKENS)
}

/// An HTTP status worth sending: `Some` for 100..=[`MAX_STATUS`], `None` (leave the
/// field out) otherwise.
pub fn status(n: u32) -> Option<u16> {
    u16::try_from(n).ok().filter(|s| (100..=MAX_STATUS).contains(s))
}

/// Whether `id` is a valid event id: 1..=[`MAX_ID_CHARS`] characters, none of them a
/// control character (the ledger stores ids as text, and PostgreSQL's cannot hold a NUL).
pub fn event_id(id: &str) -> bool {
    !id.is_empty() && id.chars().nth(MAX_ID_CHARS).is_none() && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(MAX_TOKENS, 9_007_199_254_740_991);
        assert_eq!((MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_STATUS), (128, 128, 999));
        for r in ROUTES {
            assert_eq!(route(r), r);
        }
        for r in DENY_REASONS {
            assert_eq!(deny_reason(r), r);
        }
    }

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
            ("/v1/models//", "/v1/models"),
            ("/v1/models#x", "/v1/models"),
            ("/v1/models/Qwen", "other"),
            ("/V1/CHAT/COMPLETIONS", "other"),
            ("/v1/chat/completions/extra", "other"),
            ("/v2/chat/completions", "other"),
            ("v1/models", "other"),
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
            ("\tRate_Limited\n", "rate_limited"),
            ("limit_unavailable", "limit_unavailable"),
            ("", "other"),
            ("other", "other"),
            ("something new", "other"),
            ("rate_limited_x", "other"),
            ("ınvalid_token", "other"), // dotless i: not ASCII, no case folding
        ];
        for (reason, want) in cases {
            assert_eq!(deny_reason(reason), want, "reason {reason:?}");
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let cases = [
            (String::new(), String::new()),
            ("short".to_owned(), "short".to_owned()),
            ("a".repeat(128), "a".repeat(128)),
            ("a".repeat(129), "a".repeat(128)),
            ("λ".repeat(200), "λ".repeat(128)),
            (format!("{}λ", "a".repeat(127)), format!("{}λ", "a".repeat(127))),
            (format!("{}λλ", "a".repeat(127)), format!("{}λ", "a".repeat(127))),
        ];
        for (input, want) in cases {
            assert_eq!(truncate(&input), want, "{input:?}");
        }
    }

    #[test]
    fn users() {
        let long = "u".repeat(200);
        let empty = Err("must not be empty");
        let control = Err("must not contain control characters");
        let cases: [(&str, Result<&str, &str>); 8] = [
            ("mittens", Ok("mittens")),
            ("  mittens\n", Ok("mittens")),
            ("a b", Ok("a b")),
            ("", empty),
            (" \t\n", empty),
            (&long, Ok(&long[..128])),
            ("mit\0tens", control),
            ("a\nb", control),
        ];
        for (input, want) in cases {
            assert_eq!(user(input), want, "{input:?}");
        }
    }

    #[test]
    fn groups() {
        let cases: [(&str, Option<&str>); 8] = [
            ("premium", Some("premium")),
            (" premium ", Some("premium")),
            ("", None),
            ("  ", None),
            ("a,b", None),
            (",", None),
            ("pre\0mium", None),
            ("a\u{7f}", None),
        ];
        for (input, want) in cases {
            assert_eq!(group(input), want, "{input:?}");
        }
    }

    #[test]
    fn groups_labels() {
        let many: Vec<String> = (0..40).map(|i| format!("group{i:02}")).collect();
        let many_label = many.join(",");
        let cases: [(&[&str], &str); 8] = [
            (&[], ""),
            (&["premium"], "premium"),
            (&["premium", "free"], "free,premium"),
            (&[" b ", "a", "b", ""], "a,b"),
            (&["z", "a", "m"], "a,m,z"),
            (&["a,b", "c"], "c"),
            (&[" ", ","], ""),
            (&["B", "a", "b"], "B,a,b"),
        ];
        for (groups, want) in cases {
            assert_eq!(groups_label(groups), want, "groups {groups:?}");
            let owned: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            assert_eq!(groups_label(&owned), want, "groups {groups:?}");
        }
        assert_eq!(groups_label(&many), &many_label[..128]);
    }

    #[test]
    fn model_labels() {
        let long = "m".repeat(129);
        let nul_at_the_cut = format!("{}\0", "m".repeat(127));
        let replaced_at_the_cut = format!("{}\u{FFFD}", "m".repeat(127));
        let cases: [(Option<&str>, &str); 10] = [
            (None, "unknown"),
            (Some(""), "unknown"),
            (Some("  "), "unknown"),
            (Some("Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0.6B"),
            (Some(" gpt-4.1 "), "gpt-4.1"),
            (Some(&long), &long[..128]),
            (Some("evil\0model"), "evil\u{FFFD}model"),
            (Some("a\nb\x1b[31m"), "a\u{FFFD}b\u{FFFD}[31m"),
            (Some("x\u{85}y"), "x\u{FFFD}y"),
            (Some(&nul_at_the_cut), &replaced_at_the_cut),
        ];
        for (input, want) in cases {
            assert_eq!(model_label(input), want, "{input:?}");
        }
    }

    #[test]
    fn token_counts() {
        let cases = [
            (0, 0),
            (1, 1),
            (MAX_TOKENS - 1, MAX_TOKENS - 1),
            (MAX_TOKENS, MAX_TOKENS),
            (MAX_TOKENS + 1, MAX_TOKENS),
            (u64::MAX, MAX_TOKENS),
        ];
        for (input, want) in cases {
            assert_eq!(tokens(input), want, "{input}");
        }
    }

    #[test]
    fn statuses() {
        let cases = [
            (0, None),
            (99, None),
            (100, Some(100)),
            (200, Some(200)),
            (503, Some(503)),
            (999, Some(999)),
            (1000, None),
            (65_536 + 200, None),
            (u32::MAX, None),
        ];
        for (input, want) in cases {
            assert_eq!(status(input), want, "{input}");
        }
    }

    #[test]
    fn event_ids() {
        let cases = [
            (String::new(), false),
            ("a".to_owned(), true),
            ("0123456789abcdef-17".to_owned(), true),
            (" ".to_owned(), true),
            ("x".repeat(128), true),
            ("x".repeat(129), false),
            ("λ".repeat(128), true),
            ("λ".repeat(129), false),
            ("a\0b".to_owned(), false),
            ("a\nb".to_owned(), false),
        ];
        for (id, want) in cases {
            assert_eq!(event_id(&id), want, "{id:?}");
        }
    }

    #[test]
    fn identity_names() {
        let users = [
            ("mittens", Ok(())),
            ("müller", Ok(())),
            ("", Err("must not be empty")),
            ("   ", Err("must not be empty")),
            (" a", Err("must not start or end with whitespace")),
            ("a\r\nx-evil: 1", Err("must not contain control characters")),
            ("a,b", Err("must not contain commas")),
        ];
        for (name, want) in users {
            assert_eq!(check_user(name), want, "{name:?}");
            if want.is_ok() {
                assert_eq!(user(name), Ok(name), "a valid user is its own label");
            }
        }
        let groups = [("premium", true), ("", false), ("a,b", false), ("a b", false), ("a\tb", false)];
        for (name, ok) in groups {
            assert_eq!(check_group(name).is_ok(), ok, "{name:?}");
            if ok {
                assert_eq!(group(name), Some(name));
            }
        }
    }
}
