//! Spec problems, each with the field path a user can find in their YAML.

use std::fmt;

/// One problem with a resource, e.g. `spec.sinks[0].postgres.table: must not be empty`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.scaling.minReplicas`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one resource. Validation never stops at the first one.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }

    /// Ok when there is nothing to report.
    pub fn into_result(self) -> Result<(), Problems> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }

    pub fn contains_path(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(f, "{count} problem{}:", if count == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// Collects problems while walking a spec; `at` builds child paths.
#[derive(Debug)]
pub(crate) struct Collector<'a> {
    path: String,
    out: &'a mut Vec<FieldError>,
}

impl<'a> Collector<'a> {
    pub(crate) fn new(root: &str, out: &'a mut Vec<FieldError>) -> Self {
        Self {
            path: root.to_owned(),
            out,
        }
    }

    /// The collector for a named field below this one.
    pub(crate) fn at(&mut self, field: &str) -> Collector<'_> {
        Collector {
            path: format!("{}.{field}", self.path),
            out: self.out,
        }
    }

    /// The collector for an element of a list below this one.
    pub(crate) fn index(&mut self, field: &str, index: usize) -> Collector<'_> {
        Collector {
            path: format!("{}.{field}[{index}]", self.path),
            out: self.out,
        }
    }

    /// The collector for a map entry below this one.
    pub(crate) fn key(&mut self, field: &str, key: &str) -> Collector<'_> {
        Collector {
            path: format!("{}.{field}[{key:?}]", self.path),
            out: self.out,
        }
    }

    pub(crate) fn error(&mut self, message: impl Into<String>) {
        self.out.push(FieldError {
            path: self.path.clone(),
            message: message.into(),
        });
    }

    /// Records an error on a child field without building a collector for it.
    pub(crate) fn field_error(&mut self, field: &str, message: impl Into<String>) {
        self.at(field).error(message);
    }
}
