//! The Kafka admin operations the controllers need, from the Kafka client module both
//! binaries share (`weir_worker::kafka`, built with only its `kafka` feature): topics,
//! cluster metadata, a group's committed offsets and the high watermarks, each bounded by
//! a timeout, with a failure's cause (authentication, TLS, unreachable) when it is known.

pub use weir_worker::kafka::{
    Admin, AdminError, Cause, ClusterInfo, CommittedRange, Observer, TopicState,
};
