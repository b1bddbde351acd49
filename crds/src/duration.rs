//! Durations written the way Kubernetes users write them: `100ms`, `30s`, `5m`, `1h30m`.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pattern the CRD schema enforces at apply time; `parse_duration` is the same grammar.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A duration such as `100ms`, `30s`, `5m` or `1h30m` (units: ns, us, ms, s, m, h).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("pattern" = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
pub struct DurationString(pub String);

impl DurationString {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The parsed value, or a message saying what is wrong and how to write it.
    pub fn parse(&self) -> Result<Duration, String> {
        parse_duration(&self.0)
    }
}

impl fmt::Display for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for DurationString {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

/// Parses a Go-style duration (`1h30m`, `250ms`, `1.5s`). Negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = || {
        format!(
            "invalid duration {text:?}: write a number followed by a unit (ns, us, ms, s, m, h), e.g. \"100ms\", \"30s\", \"1h30m\""
        )
    };
    if text.is_empty() {
        return Err(fail());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(fail)?;
        if number_len == 0 {
            return Err(fail());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| fail())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(fail()),
        };
        total += number * nanos_per_unit;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(fail());
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_users_write() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    }

    #[test]
    fn refuses_malformed_durations_with_a_hint() {
        for bad in ["", "30", "s", "3 0s", "-1s", "10 minutes", "1d"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("e.g. \"100ms\""), "{err}");
        }
    }

    #[test]
    fn schema_carries_the_documented_pattern() {
        // The pattern is written twice (a const for code, a literal in the schemars
        // attribute); the API server enforces the latter, so they must be identical.
        let schema = schemars::schema_for!(DurationString);
        assert_eq!(
            schema.get("pattern").and_then(|p| p.as_str()),
            Some(DURATION_PATTERN)
        );
    }
}
