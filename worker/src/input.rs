//! Reading events from JSON Lines or CSV files for `weir-worker produce`.
//!
//! JSON Lines: one JSON value per line; blank lines are ignored. CSV: the header row names
//! the fields; every other row becomes one JSON object of strings, an empty field becomes
//! null (as PostgreSQL's COPY reads CSV). A line that cannot be read is a [`BadLine`]
//! carrying its line number; the caller decides whether to skip it or stop.

use std::io::{BufRead, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::record::field;

/// The format of an input file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    JsonLines,
    Csv,
}

/// One event read from the input.
#[derive(Clone, Debug, PartialEq)]
pub struct InputEvent {
    /// 1-based line number where the event starts.
    pub line: u64,
    /// The key, when a key field was named.
    pub key: Option<String>,
    pub value: Value,
}

/// A line that cannot become an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct BadLine {
    pub line: u64,
    pub message: String,
}

/// Why reading stopped or a line was refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Bad(#[from] BadLine),
    #[error("cannot read the input: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts the bytes read through it (for progress).
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

enum Rows {
    Json {
        lines: std::io::Lines<std::io::BufReader<Counting<Box<dyn Read + Send>>>>,
        line: u64,
    },
    Csv {
        reader: csv::Reader<Counting<Box<dyn Read + Send>>>,
        headers: Option<Vec<String>>,
    },
}

/// Events read one at a time from a JSON Lines or CSV input.
pub struct EventReader {
    rows: Rows,
    key: Option<String>,
    bytes: Arc<AtomicU64>,
    done: bool,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EventReader {
    /// Reads `input` in `format`; `key` is the field path of each event's key, if any.
    pub fn new(input: Box<dyn Read + Send>, format: InputFormat, key: Option<String>) -> Self {
        let bytes = Arc::new(AtomicU64::new(0));
        let counting = Counting {
            inner: input,
            count: bytes.clone(),
        };
        let rows = match format {
            InputFormat::JsonLines => Rows::Json {
                lines: std::io::BufReader::new(counting).lines(),
                line: 0,
            },
            InputFormat::Csv => Rows::Csv {
                reader: csv::ReaderBuilder::new()
                    .has_headers(false)
                    .flexible(true)
                    .from_reader(counting),
                headers: None,
            },
        };
        Self {
            rows,
            key,
            bytes,
            done: false,
        }
    }

    /// Bytes read so far, for a progress bar over the file's size.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn next_value(&mut self) -> Option<Result<(u64, Value), InputError>> {
        match &mut self.rows {
            Rows::Json { lines, line } => loop {
                let text = match lines.next()? {
                    Ok(text) => text,
                    Err(e) => return Some(Err(e.into())),
                };
                *line += 1;
                if text.trim().is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(&text)
                        .map(|value| (*line, value))
                        .map_err(|e| {
                            BadLine {
                                line: *line,
                                message: format!("not JSON: {e}"),
                            }
                            .into()
                        }),
                );
            },
            Rows::Csv { reader, headers } => loop {
                let mut record = csv::StringRecord::new();
                let line = reader.position().line();
                match reader.read_record(&mut record) {
                    Ok(false) => return None,
                    Ok(true) => {}
                    Err(e) => {
                        let line = e.position().map_or(line, |p| p.line());
                        if e.is_io_error()
                            && let csv::ErrorKind::Io(e) = e.into_kind()
                        {
                            return Some(Err(e.into()));
                        }
                        return Some(Err(BadLine {
                            line,
                            message: "not CSV (invalid UTF-8)".to_owned(),
                        }
                        .into()));
                    }
                }
                let line = record.position().map_or(line, |p| p.line());
                let Some(names) = headers else {
                    let names: Vec<String> = record.iter().map(|h| h.trim().to_owned()).collect();
                    if let Some(blank) = names.iter().position(String::is_empty) {
                        self.done = true;
                        return Some(Err(BadLine {
                            line,
                            message: format!(
                                "the header row names no field in column {}: every column needs a name",
                                blank + 1
                            ),
                        }
                        .into()));
                    }
                    *headers = Some(names);
                    continue;
                };
                if record.len() == 1 && record.get(0) == Some("") {
                    continue;
                }
                if record.len() != names.len() {
                    return Some(Err(BadLine {
                        line,
                        message: format!(
                            "{} fields where the header has {}",
                            record.len(),
                            names.len()
                        ),
                    }
                    .into()));
                }
                let object: Map<String, Value> = names
                    .iter()
                    .zip(record.iter())
                    .map(|(name, value)| {
                        let value = if value.is_empty() {
                            Value::Null
                        } else {
                            Value::String(value.to_owned())
                        };
                        (name.clone(), value)
                    })
                    .collect();
                return Some(Ok((line, Value::Object(object))));
            },
        }
    }
}

impl Iterator for EventReader {
    type Item = Result<InputEvent, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (line, value) = match self.next_value()? {
            Ok(read) => read,
            Err(e) => return Some(Err(e)),
        };
        let key = match &self.key {
            None => None,
            Some(path) => match field(&value, path) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Null) | None => {
                    return Some(Err(BadLine {
                        line,
                        message: format!("the key field {path:?} is missing or null"),
                    }
                    .into()));
                }
                Some(other) => Some(other.to_string()),
            },
        };
        Some(Ok(InputEvent { line, key, value }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(text: &str, format: InputFormat, key: Option<&str>) -> Vec<Result<InputEvent, String>> {
        EventReader::new(
            Box::new(std::io::Cursor::new(text.to_owned())),
            format,
            key.map(str::to_owned),
        )
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
    }

    #[test]
    fn csv_rows_become_objects_keyed_by_a_field() {
        let rows = read(
            "email,name,age\na@x.io,Ann,31\n\"b@x.io\",\"Bo, Jr.\",\n",
            InputFormat::Csv,
            Some("email"),
        );
        assert_eq!(
            rows,
            vec![
                Ok(InputEvent {
                    line: 2,
                    key: Some("a@x.io".into()),
                    value: json!({"email": "a@x.io", "name": "Ann", "age": "31"}),
                }),
                Ok(InputEvent {
                    line: 3,
                    key: Some("b@x.io".into()),
                    value: json!({"email": "b@x.io", "name": "Bo, Jr.", "age": null}),
                }),
            ]
        );
    }

    #[test]
    fn a_short_csv_row_is_reported_with_its_line_and_reading_goes_on() {
        let rows = read("a,b\n1,2\n3\n4,5\n", InputFormat::Csv, None);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[1],
            Err("line 3: 1 fields where the header has 2".to_owned())
        );
        assert_eq!(rows[2].as_ref().map(|e| e.line), Ok(4));
    }

    #[test]
    fn json_lines_skip_blank_lines_and_report_bad_ones() {
        let rows = read(
            "{\"id\": 1}\n\n{oops\n{\"id\": 2}\n{\"other\": 3}\n",
            InputFormat::JsonLines,
            Some("event.id"),
        );
        assert_eq!(
            rows[0].as_ref().map(|e| e.key.clone()),
            Ok(Some("1".into()))
        );
        assert!(
            rows[1]
                .as_ref()
                .is_err_and(|e| e.starts_with("line 3: not JSON")),
            "{rows:?}"
        );
        assert_eq!(rows[2].as_ref().map(|e| e.line), Ok(4));
        assert_eq!(
            rows[3],
            Err("line 5: the key field \"event.id\" is missing or null".to_owned())
        );
    }
}
