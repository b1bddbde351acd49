//! Reading a column's text value as the type it is bound as, the same way for every SQL
//! dialect: a value that does not convert refuses its event alone (a permanent error
//! naming the column), whichever database would have been asked.

use super::SinkError;
use crate::retry::ErrorClass;

/// PostgreSQL's boolean spellings (any case, surrounding blanks ignored): t/true/y/yes/on/1
/// and f/false/n/no/off/0.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A decimal integer, surrounding blanks ignored.
pub fn parse_int<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.trim().parse().ok()
}

/// A UUID in its canonical hyphenated form, lower-cased.
pub fn parse_uuid(text: &str) -> Option<String> {
    let text = text.trim();
    let canonical = text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    canonical.then(|| text.to_ascii_lowercase())
}

/// An RFC 3339 timestamp (`2026-12-01T08:00:00Z`, `2026-12-01 08:00:00.5+01:00`) in UTC.
pub fn parse_timestamp(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Converts one value of `column`, or refuses it as `what` (e.g. "an integer").
pub fn convert<T>(
    column: &str,
    text: &str,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, SinkError> {
    parse(text).ok_or_else(|| {
        SinkError::new(
            ErrorClass::Permanent,
            format!("column {column:?}: {text:?} is not {what}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_read_as_postgresql_reads_them() {
        for yes in ["t", "TRUE", " yes", "on", "1", "Y"] {
            assert_eq!(parse_bool(yes), Some(true), "{yes:?}");
        }
        for no in ["f", "False", "no ", "OFF", "0", "n"] {
            assert_eq!(parse_bool(no), Some(false), "{no:?}");
        }
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn uuids_are_checked_and_lower_cased() {
        assert_eq!(
            parse_uuid("0B7D5C8E-4C59-4B1E-9D3E-2F1A6C7B8D90").as_deref(),
            Some("0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d90")
        );
        assert_eq!(parse_uuid("0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d9"), None);
        assert_eq!(parse_uuid("0b7d5c8e04c59-4b1e-9d3e-2f1a6c7b8d90"), None);
    }

    #[test]
    fn timestamps_are_read_as_rfc3339_in_utc() {
        let t = parse_timestamp("2026-12-01 09:30:00.25+01:00").map(|t| t.to_rfc3339());
        assert_eq!(t.as_deref(), Some("2026-12-01T08:30:00.250+00:00"));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn a_value_that_does_not_convert_names_its_column() {
        let e = convert("age", "x", "an integer", parse_int::<i64>).unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.message, "column \"age\": \"x\" is not an integer");
    }
}
