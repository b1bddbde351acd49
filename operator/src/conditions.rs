//! Status conditions: set one, keeping its lastTransitionTime unless its status changes, so
//! a reconcile that finds nothing new computes the same status (and writes nothing).

use k8s_openapi::jiff::Timestamp;
use weir_crds::{Condition, ConditionStatus};

/// Now, as a condition timestamp (RFC 3339, seconds).
pub fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Sets condition `type_`; `status` true/false.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now();
            }
            existing.status = status;
            existing.reason = reason.to_owned();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time: now(),
            observed_generation: generation,
        }),
    }
}

/// Removes condition `type_`.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The reason of condition `type_`, if it is set.
pub fn reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

/// Whether condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::True)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            "Ready",
            false,
            "Creating",
            "creating",
            Some(1),
        );
        conditions[0].last_transition_time = "2026-01-01T00:00:00Z".into();
        set(&mut conditions, "Ready", false, "Waiting", "still", Some(2));
        assert_eq!(conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(conditions[0].reason, "Waiting");
        set(&mut conditions, "Ready", true, "Ready", "done", Some(2));
        assert_ne!(conditions[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert!(is_true(&conditions, "Ready"));
        remove(&mut conditions, "Ready");
        assert!(conditions.is_empty());
    }
}
