//! What an HTTP answer means for the records of its request: delivered, refused (they go to
//! the dead-letter topic), or a failure of the whole write classified for the retry policy;
//! and how long `Retry-After` asks to wait.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::retry::ErrorClass;

/// How many bytes of a response body a refusal quotes.
pub const BODY_START: usize = 256;

/// The class of a failed answer; `None` when the status says the request was accepted.
///
/// - 2xx: delivered.
/// - 408, 429, 502, 503, 504: the receiver says "not now" — retried without limit (like a
///   connection error), so that an overloaded or restarting receiver never sends records
///   to the dead-letter topic.
/// - other 5xx: may be caused by the record (a bug in the receiver) — retried up to
///   `retry.attempts` tries, then dead-lettered.
/// - 401, 403, 404, 405, 407, 501, 505 and redirects (which are not followed): the URL,
///   the method or the credentials are wrong for every record — the pipeline stops.
/// - any other 4xx: the receiver refuses the records of this request.
pub fn class_of(status: u16) -> Option<ErrorClass> {
    match status {
        200..=299 => None,
        408 | 429 | 502 | 503 | 504 => Some(ErrorClass::Unavailable),
        401 | 403 | 404 | 405 | 407 | 501 | 505 => Some(ErrorClass::Fatal),
        300..=399 => Some(ErrorClass::Fatal),
        400..=499 => Some(ErrorClass::Permanent),
        _ => Some(ErrorClass::Transient),
    }
}

/// The wait a `Retry-After` value asks for at `now`: a number of seconds, or an HTTP date
/// (IMF-fixdate, e.g. `Wed, 21 Oct 2026 07:28:00 GMT`; a date already past asks for none).
/// `None` when the value is neither.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(date.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The start of a response body, as text for a dead letter's reason: at most
/// [`BODY_START`] bytes, invalid UTF-8 and control characters replaced.
pub fn body_start(body: &[u8]) -> String {
    let start = &body[..body.len().min(BODY_START)];
    let text: String = String::from_utf8_lossy(start)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if body.len() > BODY_START {
        format!("{text}…")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_for_the_retry_policy() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(class_of(status), None, "{status}");
        }
        for status in [408, 429, 502, 503, 504] {
            assert_eq!(class_of(status), Some(ErrorClass::Unavailable), "{status}");
        }
        for status in [500, 507, 599] {
            assert_eq!(class_of(status), Some(ErrorClass::Transient), "{status}");
        }
        for status in [301, 302, 401, 403, 404, 405, 407, 501] {
            assert_eq!(class_of(status), Some(ErrorClass::Fatal), "{status}");
        }
        for status in [400, 409, 410, 413, 415, 422] {
            assert_eq!(class_of(status), Some(ErrorClass::Permanent), "{status}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past asks for no wait"
        );
        assert_eq!(retry_after("-1", now), None);
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
    }

    #[test]
    fn a_refusal_quotes_the_start_of_the_body_as_one_line() {
        assert_eq!(
            body_start(b"{\"error\":\n\"bad title\"}"),
            "{\"error\": \"bad title\"}"
        );
        let long = vec![b'x'; 1000];
        let quoted = body_start(&long);
        assert_eq!(quoted.chars().filter(|c| *c == 'x').count(), BODY_START);
        assert!(quoted.ends_with('…'));
        assert_eq!(body_start(b"\xff\xfeok"), "\u{fffd}\u{fffd}ok");
    }
}
