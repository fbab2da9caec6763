//! The local stack: real Envoy with the Tollgate filter, the mock OpenAI-compatible
//! model server, the usage tracker and Prometheus, started and stopped as one.
//! `tollgate up` and the end-to-end tests both go through [`stack::Stack`].
pub mod background;
pub mod dev;
pub mod devconfig;
pub mod envoy;
pub mod extproc;
pub mod fault;
pub mod jsonpb;
pub mod keys;
pub mod mock;
pub mod paths;
pub mod postgres;
pub mod process;
pub mod render;
pub mod stack;
pub mod usage;
