//! The one Kafka client module of both binaries: a KafkaConnection and its resolved
//! secrets become librdkafka settings ([`client_config`]); [`Observer`] turns librdkafka's
//! errors into a cause a user can act on (wrong password, unknown CA, broker unreachable)
//! and keeps an outage to a few log lines; [`Admin`] is the admin client the operator
//! manages topics with and reads a consumer group's committed offsets and the high
//! watermarks through (the lag autoscaler's input).
//!
//! Built with the `kafka` feature alone, this module needs neither the engine nor the
//! sinks, so the operator links it without them.

mod admin;
mod config;
pub mod headers;
mod observe;
pub mod records;
mod wire;

pub use admin::{Admin, AdminError, ClusterInfo, TopicState};
pub use config::{ConfigError, Credentials, Role, SecretPurpose, client_config, secret_selectors};
pub use observe::{Cause, Failure, Observer, Throttle, ThrottleReport};
pub use wire::{CommittedRange, Wire, WireError};
