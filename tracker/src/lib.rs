//! Tollgate's usage-tracking service: the Envoy filter posts usage events to
//! `POST /track`, and the service turns them into Prometheus counters on `GET /metrics`.
//!
//! It is a library as well as a binary so that the tests and the ingest benchmark run
//! the very same router in-process. The pieces, in the order a request meets them:
//! [`event`] checks a body event by event, keeping the good ones and reporting the bad
//! ones (a body that fails as a whole is a [`TrackError`]); what a valid event is comes
//! from the `tollgate-rules` crate, shared with the filter;
//! [`labels`] bounds every label value, [`dedup`] drops events seen before, and
//! [`metrics`] owns the registry. With a [`ledger`] (SQLite or PostgreSQL), every batch
//! is committed there before it is acknowledged, and the counters are restored from it
//! on start; [`usage_api`] serves what it holds. [`limits_sync`] is the trackers' side
//! of global limits (`POST /v1/limits/sync`): it grants each gateway replica its lease
//! of every limit window, carved from what is left in one transaction per sync, so a
//! limit holds for the whole fleet of gateways (README, "Global limits across gateway
//! replicas"). [`keys_api`] is managed API keys (issue 16): admins create and revoke
//! keys (`/v1/keys`, stored as their SHA-256 in the ledger), the gateways resolve the
//! keys they do not know by digest (`POST /v1/keys/resolve`, then cache them) and learn
//! of revoked and expired ones from `GET /v1/keys/changes`. [`http`] is the edge:
//! routes, body limit, and the one place where errors become status codes and JSON.

pub mod cli;
pub mod dedup;
pub mod error;
pub mod event;
pub mod http;
pub mod keys_api;
pub mod labels;
pub mod ledger;
pub mod limits_sync;
pub mod metrics;
pub mod time;
pub mod ui;
pub mod usage_api;

pub use cli::Args;
pub use error::TrackError;
pub use http::{router, serve};
pub use ledger::{Ledger, LedgerError};
pub use metrics::{Limits, Tracker};
