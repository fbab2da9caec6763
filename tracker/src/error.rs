//! The one error type of the service's requests. Everything that can go wrong with a
//! request is a variant here; [`crate::http`] maps it to a status and an OpenAI-style
//! JSON body, so clients get one error shape whatever failed. The ledger has its own
//! domain error, [`crate::ledger::LedgerError`], which reaches a client as
//! `Unavailable` (503: retry) — never as a 4xx, because the batch was not at fault.

use std::fmt;

use serde::Serialize;

/// One bad event of a `/track` body, as the answer reports it: which (its index in the
/// array; 0 for a lone event), why (the `reason` label it is counted under) and what is
/// wrong, naming the event and field (`events[3].prompt_tokens: …`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub index: usize,
    pub reason: &'static str,
    pub message: String,
}

impl Rejected {
    pub fn invalid_event(index: usize, message: String) -> Rejected {
        Rejected { index, reason: "invalid_event", message }
    }
}

/// Why a request was refused. `BadJson`, `InvalidEvent`, `InvalidEvents` and `TooLarge`
/// are bad input to `/track` and are counted in `tracker_requests_rejected_total{reason}`
/// (`InvalidEvents` once per bad event); the others are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackError {
    /// The body is not JSON (or not readable).
    BadJson(String),
    /// The body is JSON but neither an event nor an array of events.
    InvalidEvent(String),
    /// Every event of the body breaks the schema (a lone bad event, or an array of only
    /// bad ones; never empty). An array with some good events is not an error: the good
    /// ones are counted and the bad ones listed in the 200 answer.
    InvalidEvents(Vec<Rejected>),
    /// The body or the batch is over its limit.
    TooLarge(String),
    NotFound(String),
    MethodNotAllowed(String),
    /// Usage API: no or a wrong bearer secret.
    Unauthorized(String),
    /// Usage API: a query parameter is missing, malformed or out of range.
    BadQuery(String),
    /// `POST /v1/limits/sync`: the body is JSON but breaks the schema (the message names
    /// the field); nothing was changed.
    InvalidBody(String),
    /// Usage API: the ledger has never seen the user asked about.
    UnknownUser(String),
    /// The ledger failed; nothing was written, the sender should retry.
    Unavailable(String),
    Internal(String),
}

impl TrackError {
    /// The `reason` label of `tracker_requests_rejected_total`, for bad input only.
    pub fn rejected_reason(&self) -> Option<&'static str> {
        match self {
            TrackError::BadJson(_) => Some("bad_json"),
            TrackError::InvalidEvent(_) | TrackError::InvalidEvents(_) => Some("invalid_event"),
            TrackError::TooLarge(_) => Some("too_large"),
            TrackError::NotFound(_)
            | TrackError::MethodNotAllowed(_)
            | TrackError::Unauthorized(_)
            | TrackError::BadQuery(_)
            | TrackError::InvalidBody(_)
            | TrackError::UnknownUser(_)
            | TrackError::Unavailable(_)
            | TrackError::Internal(_) => None,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            TrackError::BadJson(_)
            | TrackError::InvalidEvent(_)
            | TrackError::InvalidEvents(_)
            | TrackError::BadQuery(_)
            | TrackError::InvalidBody(_) => 400,
            TrackError::Unauthorized(_) => 401,
            TrackError::NotFound(_) | TrackError::UnknownUser(_) => 404,
            TrackError::MethodNotAllowed(_) => 405,
            TrackError::TooLarge(_) => 413,
            TrackError::Internal(_) => 500,
            TrackError::Unavailable(_) => 503,
        }
    }

    /// The OpenAI error `type`: the client's fault or ours.
    pub fn error_type(&self) -> &'static str {
        match self {
            TrackError::Internal(_) | TrackError::Unavailable(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// How many times the refusal counts in `tracker_requests_rejected_total`: once per
    /// bad event for `InvalidEvents`, else once.
    pub fn rejected_count(&self) -> u64 {
        match self {
            TrackError::InvalidEvents(rejected) => rejected.len() as u64,
            _ => 1,
        }
    }

    /// The message; for `InvalidEvents` the first bad event's.
    pub fn message(&self) -> &str {
        match self {
            TrackError::InvalidEvents(rejected) => rejected.first().map_or("", |r| r.message.as_str()),
            TrackError::BadJson(m)
            | TrackError::InvalidEvent(m)
            | TrackError::TooLarge(m)
            | TrackError::NotFound(m)
            | TrackError::MethodNotAllowed(m)
            | TrackError::Unauthorized(m)
            | TrackError::BadQuery(m)
            | TrackError::InvalidBody(m)
            | TrackError::UnknownUser(m)
            | TrackError::Unavailable(m)
            | TrackError::Internal(m) => m,
        }
    }

    /// `{"error":{"message":…,"type":…}}`, plus `"rejected":[…]` (every bad event) for
    /// `InvalidEvents`.
    pub fn body(&self) -> serde_json::Value {
        let error = serde_json::json!({"message": self.message(), "type": self.error_type()});
        match self {
            TrackError::InvalidEvents(rejected) => serde_json::json!({"error": error, "rejected": rejected}),
            _ => serde_json::json!({"error": error}),
        }
    }
}

impl fmt::Display for TrackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for TrackError {}
