//! A consumed Kafka record, owned (detached from the consumer), and its decoded event.

use serde_json::Value;
use weir_crds::PayloadFormat;

/// One Kafka record as consumed.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Milliseconds since the epoch, when the broker gave one.
    pub timestamp: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// Bytes this record counts for in a batch's size limit.
    pub fn size(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len) + self.key.as_ref().map_or(0, Vec::len)
    }

    /// The key as text (lossy), for expressions and logs.
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// Decodes the value: JSON by default (a tombstone is `null`), or the raw bytes as a
    /// string of their UTF-8 (lossy) for `format: Raw`.
    pub fn decode(&self, format: PayloadFormat) -> Result<Value, String> {
        let Some(payload) = &self.payload else {
            return Ok(Value::Null);
        };
        match format {
            PayloadFormat::Json => {
                serde_json::from_slice(payload).map_err(|e| format!("value is not valid JSON: {e}"))
            }
            PayloadFormat::Raw => Ok(Value::String(String::from_utf8_lossy(payload).into_owned())),
        }
    }
}

/// Reads a dotted field path (`event.payload.id` or `payload.id`) from an event.
pub fn field<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.strip_prefix("event.").unwrap_or(path);
    path.split('.')
        .try_fold(event, |value, segment| value.get(segment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_paths_may_start_with_event() {
        let event = json!({"payload": {"id": 7}, "type": "X"});
        assert_eq!(field(&event, "event.payload.id"), Some(&json!(7)));
        assert_eq!(field(&event, "payload.id"), Some(&json!(7)));
        assert_eq!(field(&event, "type"), Some(&json!("X")));
        assert_eq!(field(&event, "payload.missing"), None);
    }

    #[test]
    fn invalid_json_is_a_decode_error_and_a_tombstone_is_null() {
        let mut record = Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(b"{not json".to_vec()),
            timestamp: None,
            headers: vec![],
        };
        assert!(record.decode(PayloadFormat::Json).is_err());
        record.payload = None;
        assert_eq!(record.decode(PayloadFormat::Json), Ok(Value::Null));
    }
}
