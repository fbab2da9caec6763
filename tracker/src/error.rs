//! The one error type of the service. Everything that can go wrong with a request is a
//! variant here; [`crate::http`] maps it to a status and an OpenAI-style JSON body, so
//! clients get one error shape whatever failed.

use std::fmt;

/// Why a request was refused. Every variant except `NotFound`, `MethodNotAllowed` and
/// `Internal` is bad input to `/track` and is counted in
/// `tracker_requests_rejected_total{reason}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackError {
    /// The body is not JSON (or not readable).
    BadJson(String),
    /// The body is JSON but an event in it breaks the schema.
    InvalidEvent(String),
    /// The body or the batch is over its limit.
    TooLarge(String),
    NotFound(String),
    MethodNotAllowed(String),
    Internal(String),
}

impl TrackError {
    /// The `reason` label of `tracker_requests_rejected_total`, for bad input only.
    pub fn rejected_reason(&self) -> Option<&'static str> {
        match self {
            TrackError::BadJson(_) => Some("bad_json"),
            TrackError::InvalidEvent(_) => Some("invalid_event"),
            TrackError::TooLarge(_) => Some("too_large"),
            TrackError::NotFound(_) | TrackError::MethodNotAllowed(_) | TrackError::Internal(_) => None,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            TrackError::BadJson(_) | TrackError::InvalidEvent(_) => 400,
            TrackError::NotFound(_) => 404,
            TrackError::MethodNotAllowed(_) => 405,
            TrackError::TooLarge(_) => 413,
            TrackError::Internal(_) => 500,
        }
    }

    /// The OpenAI error `type`: the client's fault or ours.
    pub fn error_type(&self) -> &'static str {
        match self {
            TrackError::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            TrackError::BadJson(m)
            | TrackError::InvalidEvent(m)
            | TrackError::TooLarge(m)
            | TrackError::NotFound(m)
            | TrackError::MethodNotAllowed(m)
            | TrackError::Internal(m) => m,
        }
    }

    /// `{"error":{"message":…,"type":…}}`
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message(), "type": self.error_type()}})
    }
}

impl fmt::Display for TrackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for TrackError {}
