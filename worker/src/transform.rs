//! CEL expressions over an event: the pipeline's filter and transform, and the sinks'
//! conditions. Variables: `event` (the decoded value), `key`, `headers`, `topic`,
//! `partition`, `offset`, `timestamp` (milliseconds since the epoch). Functions: those of
//! `weir_crds::cel::FUNCTIONS`, from [`functions::env`].

use std::fmt;

use serde_json::Value;
use weir_crds::EventPipelineSpec;

use crate::functions;
use crate::record::Record;

/// A compiled CEL expression and its source, for error messages.
pub struct Expression {
    source: String,
    program: cel::Program,
    variables: Variables,
}

/// Which of a record's variables expressions read: a context holds only those, so an
/// expression such as `"user:" + key` does not pay for converting the whole event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Variables(u8);

impl Variables {
    const NAMES: [&'static str; 7] = [
        "event",
        "key",
        "headers",
        "topic",
        "partition",
        "offset",
        "timestamp",
    ];

    /// Every variable.
    pub const ALL: Variables = Variables(0x7f);

    fn of(program: &cel::Program) -> Self {
        let references = program.references();
        let mut bits = 0;
        for (i, name) in Self::NAMES.iter().enumerate() {
            if references.has_variable(name) {
                bits |= 1 << i;
            }
        }
        Variables(bits)
    }

    /// The variables either reads.
    pub fn and(self, other: Variables) -> Self {
        Variables(self.0 | other.0)
    }

    /// Whether `event` is among them.
    pub fn reads_event(self) -> bool {
        self.has("event")
    }

    fn has(self, name: &str) -> bool {
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl Expression {
    /// Compiles `source`, refusing what `EventPipelineSpec::validate` refuses: a call of a
    /// function Weir's CEL lacks, or with the wrong number of arguments.
    pub fn compile(source: &str) -> Result<Self, String> {
        let invalid = |e: &dyn fmt::Display| format!("invalid CEL expression {source:?}: {e}");
        weir_crds::cel::check(source).map_err(|e| invalid(&e))?;
        let program = functions::env().compile(source).map_err(|e| invalid(&e))?;
        Ok(Self {
            source: source.to_owned(),
            variables: Variables::of(&program),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The record variables this expression reads.
    pub fn variables(&self) -> Variables {
        self.variables
    }

    /// Evaluates to a JSON value.
    pub fn eval(&self, context: &cel::Context<'_, '_>) -> Result<Value, String> {
        let value = self
            .program
            .execute(context)
            .map_err(|e| format!("{:?} failed: {e}", self.source))?;
        value
            .json()
            .map_err(|e| format!("{:?} gave a value JSON cannot hold: {e:?}", self.source))
    }

    /// Evaluates a condition; anything but `true` or `false` is an error.
    pub fn eval_bool(&self, context: &cel::Context<'_, '_>) -> Result<bool, String> {
        match self.program.execute(context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "{:?} must be true or false, got {other:?}",
                self.source
            )),
            // A condition over a field this event lacks does not hold.
            Err(cel::ExecutionError::NoSuchKey(_)) => Ok(false),
            Err(e) => Err(format!("{:?} failed: {e}", self.source)),
        }
    }
}

/// The variables an expression sees for one record.
pub fn context<'a>(record: &Record, event: &Value) -> Result<cel::Context<'a, 'a>, String> {
    Ok(context_with(record, event, Variables::ALL))
}

/// The context of [`context`] with only `variables` in it.
pub fn context_with<'a>(
    record: &Record,
    event: &Value,
    variables: Variables,
) -> cel::Context<'a, 'a> {
    let mut context = cel::Context::with_env(functions::env());
    fill(&mut context, record, event, variables);
    context
}

/// Sets `variables` in `context` for one record, replacing the previous record's: one
/// context serves a whole batch.
pub fn fill(
    context: &mut cel::Context<'_, '_>,
    record: &Record,
    event: &Value,
    variables: Variables,
) {
    if variables.has("event") {
        context.add_variable_from_value("event", to_cel(event));
    }
    if variables.has("key") {
        context.add_variable_from_value(
            "key",
            record.key_text().map_or(cel::Value::Null, cel::Value::from),
        );
    }
    if variables.has("headers") {
        let headers: std::collections::HashMap<String, cel::Value> = record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    cel::Value::from(String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect();
        context.add_variable_from_value("headers", headers);
    }
    if variables.has("topic") {
        context.add_variable_from_value("topic", record.topic.clone());
    }
    if variables.has("partition") {
        context.add_variable_from_value("partition", cel::Value::Int(i64::from(record.partition)));
    }
    if variables.has("offset") {
        context.add_variable_from_value("offset", cel::Value::Int(record.offset));
    }
    if variables.has("timestamp") {
        context.add_variable_from_value(
            "timestamp",
            record.timestamp.map_or(cel::Value::Null, cel::Value::Int),
        );
    }
}

/// An event as CEL sees it. JSON integers are CEL `int` (as Kubernetes' CEL reads JSON),
/// so `event.n % 5` and `event.priority >= 0` work; only an integer beyond int's range
/// becomes `uint`, and other numbers `double`.
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::from(s.clone()),
        Value::Array(items) => {
            cel::Value::List(std::sync::Arc::new(items.iter().map(to_cel).collect()))
        }
        Value::Object(fields) => {
            let map: std::collections::HashMap<String, cel::Value> =
                fields.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// The pipeline's filter and transform.
#[derive(Debug, Default)]
pub struct Transformer {
    filter: Option<Expression>,
    set: Vec<(String, Expression)>,
    remove: Vec<String>,
    variables: Variables,
}

impl Transformer {
    pub fn from_spec(spec: &EventPipelineSpec) -> Result<Self, String> {
        let filter = spec
            .filter
            .as_deref()
            .map(Expression::compile)
            .transpose()?;
        let (set, remove) = match &spec.transform {
            Some(t) => (
                t.set
                    .iter()
                    .map(|(field, source)| Ok((field.clone(), Expression::compile(source)?)))
                    .collect::<Result<Vec<_>, String>>()?,
                t.remove.clone(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let variables = filter
            .iter()
            .chain(set.iter().map(|(_, e)| e))
            .fold(Variables::default(), |all, e| all.and(e.variables()));
        Ok(Self {
            filter,
            set,
            remove,
            variables,
        })
    }

    /// Whether the filter or the transform reads or changes the event.
    pub fn reads_event(&self) -> bool {
        self.variables.reads_event() || !self.set.is_empty() || !self.remove.is_empty()
    }

    /// Whether the transform changes the event (`set` or `remove`); a filter alone does not.
    pub fn changes_event(&self) -> bool {
        !self.set.is_empty() || !self.remove.is_empty()
    }

    /// Whether there is anything to do (the common case has neither filter nor transform).
    pub fn is_identity(&self) -> bool {
        self.filter.is_none() && self.set.is_empty() && self.remove.is_empty()
    }

    /// `Ok(None)` when the filter drops the event; `Err` makes the record a poison record.
    pub fn apply(&self, record: &Record, event: Value) -> Result<Option<Value>, String> {
        if self.is_identity() {
            return Ok(Some(event));
        }
        let context = context_with(record, &event, self.variables);
        if let Some(filter) = &self.filter
            && !filter.eval_bool(&context)?
        {
            return Ok(None);
        }
        if self.set.is_empty() && self.remove.is_empty() {
            return Ok(Some(event));
        }
        let Value::Object(mut fields) = event else {
            return Err("transform needs the event to be a JSON object".into());
        };
        let mut computed = Vec::with_capacity(self.set.len());
        for (field, expression) in &self.set {
            computed.push((field.clone(), expression.eval(&context)?));
        }
        for (field, value) in computed {
            fields.insert(field, value);
        }
        for field in &self.remove {
            fields.remove(field);
        }
        Ok(Some(Value::Object(fields)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Record {
        Record {
            topic: "users".into(),
            partition: 2,
            offset: 41,
            key: Some(b"u1".to_vec()),
            payload: None,
            timestamp: Some(1_700_000_000_000),
            headers: vec![("source".into(), b"csv".to_vec())],
        }
    }

    fn pipeline(extra: &str) -> EventPipelineSpec {
        let yaml = format!(
            "source: {{topics: [t]}}\nsinks: [{{postgres: {{urlFrom: {{env: X}}, table: t, columns: [{{name: a, type: text}}]}}}}]\n{extra}"
        );
        serde_yaml_ng::from_str(&yaml).expect("test spec parses")
    }

    #[test]
    fn filter_drops_and_keeps() {
        let t = Transformer::from_spec(&pipeline(
            "filter: event.type != 'Heartbeat' && topic == 'users'",
        ))
        .expect("compiles");
        assert_eq!(t.apply(&record(), json!({"type": "Heartbeat"})), Ok(None));
        assert_eq!(
            t.apply(&record(), json!({"type": "Created"})),
            Ok(Some(json!({"type": "Created"})))
        );
    }

    #[test]
    fn transform_sets_and_removes_fields_with_record_variables() {
        let t = Transformer::from_spec(&pipeline(
            "transform:\n  set:\n    where: topic + '/' + string(partition) + '/' + string(offset)\n    who: key\n    from: headers.source\n  remove: [password]",
        ))
        .expect("compiles");
        let out = t
            .apply(&record(), json!({"email": "a@b", "password": "secret"}))
            .expect("applies")
            .expect("kept");
        assert_eq!(
            out,
            json!({"email": "a@b", "where": "users/2/41", "who": "u1", "from": "csv"})
        );
    }

    #[test]
    fn a_function_failing_on_one_record_is_an_error_naming_the_expression() {
        let t = Transformer::from_spec(&pipeline(
            "transform:\n  set:\n    passwordHash: bcrypt(event.password, 10)",
        ))
        .expect("compiles");
        for event in [json!({"email": "a@b"}), json!({"password": 42})] {
            let err = t.apply(&record(), event.clone()).expect_err("fails");
            assert!(
                err.contains("\"bcrypt(event.password, 10)\" failed"),
                "{event}: {err}"
            );
        }
        let hashed = t
            .apply(&record(), json!({"password": "s3cret"}))
            .expect("applies")
            .expect("kept");
        assert!(
            hashed["passwordHash"]
                .as_str()
                .is_some_and(|h| h.starts_with("$2b$10$"))
        );
    }

    #[test]
    fn an_expression_calling_an_unknown_function_does_not_compile() {
        let err = Expression::compile("lowerAscii(event.email)").expect_err("refused");
        assert!(
            err.contains("did you mean `event.email.lowerAscii()`?"),
            "{err}"
        );
        assert!(Expression::compile("event.email.lowerAscii()").is_ok());
    }

    #[test]
    fn a_context_holds_only_the_variables_its_expressions_read() {
        let e = Expression::compile("'user:' + key").expect("compiles");
        assert!(e.variables().has("key") && !e.variables().has("event"));
        let context = context_with(&record(), &json!({"big": [1, 2, 3]}), e.variables());
        assert_eq!(e.eval(&context), Ok(json!("user:u1")));
        // A variable left out is unknown to the expression, not silently null.
        let other = Expression::compile("event.big").expect("compiles");
        assert!(other.eval(&context).is_err());
        let both = e.variables().and(other.variables());
        assert!(both.has("key") && both.has("event") && !both.has("headers"));
    }

    #[test]
    fn a_failing_expression_is_an_error_not_a_panic() {
        let t = Transformer::from_spec(&pipeline("filter: event.count > 'x'")).expect("compiles");
        assert!(t.apply(&record(), json!({"count": 1})).is_err());
    }
}
