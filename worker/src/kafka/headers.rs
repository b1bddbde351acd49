//! The headers a dead-lettered record carries (set by the worker, read and removed by
//! `kubectl weir dead-letters` and `redrive`): one list, so the two cannot drift apart.

pub const ERROR_CLASS: &str = "weir.error.class";
pub const ERROR_MESSAGE: &str = "weir.error.message";
pub const ATTEMPTS: &str = "weir.attempts";
pub const SOURCE_TOPIC: &str = "weir.source.topic";
pub const SOURCE_PARTITION: &str = "weir.source.partition";
pub const SOURCE_OFFSET: &str = "weir.source.offset";
pub const FIRST_FAILURE: &str = "weir.first.failure";
pub const SINK: &str = "weir.sink";
/// Set by redrive on a re-sent record: `<dead-letter topic>/<partition>@<offset>`.
pub const REDRIVEN_FROM: &str = "weir.redriven.from";

/// Every header above: what redrive removes before re-sending (the record's own stay).
pub const ALL: [&str; 9] = [
    ERROR_CLASS,
    ERROR_MESSAGE,
    ATTEMPTS,
    SOURCE_TOPIC,
    SOURCE_PARTITION,
    SOURCE_OFFSET,
    FIRST_FAILURE,
    SINK,
    REDRIVEN_FROM,
];
