//! Whether the pipeline can run, decided from its spec and what it refers to: pure.

use std::sync::Arc;

use kube::ResourceExt as _;
use weir_crds::{EventPipeline, EventPipelineSpec, KafkaConnection, SecretSource};

use super::dereference::Dereferenced;

/// Why a pipeline gets no workers: `Ready=False` with this reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
    /// Whether a change of the pipeline itself is needed (else of something it refers to,
    /// which is watched).
    pub spec: bool,
}

/// The checks, in order: the spec (the worker's own `validate()`, CEL included), what a
/// worker pod cannot do that a worker on a machine can ([`in_cluster`]), and the existence
/// of its connection and of its kafka sinks' (the worker uses TLS and SASL as the operator
/// does).
pub fn validate(
    pipeline: &EventPipeline,
    refs: &Dereferenced,
) -> Result<Arc<KafkaConnection>, Refusal> {
    let namespace = pipeline.namespace().unwrap_or_default();
    if let Err(problems) = pipeline.spec.validate() {
        return Err(Refusal {
            reason: "InvalidSpec",
            message: problems.to_string(),
            spec: true,
        });
    }
    let problems = in_cluster(&pipeline.spec);
    if !problems.is_empty() {
        return Err(Refusal {
            reason: "InvalidSpec",
            message: problems.join("; "),
            spec: true,
        });
    }
    let name = &refs.connection_name;
    let Some(connection) = refs.connection.clone() else {
        return Err(Refusal {
            reason: "ConnectionNotFound",
            message: format!(
                "KafkaConnection {namespace}/{name} does not exist: create it, or set spec.connectionRef"
            ),
            spec: false,
        });
    };
    if let Some((missing, _)) = refs.sink_connections.iter().find(|(_, c)| c.is_none()) {
        return Err(Refusal {
            reason: "ConnectionNotFound",
            message: format!(
                "KafkaConnection {namespace}/{missing} (a kafka sink's connectionRef) does not exist: create it, or remove the sink's connectionRef to produce to the pipeline's own cluster"
            ),
            spec: false,
        });
    }
    // The worker refuses to start on a connection its validate() refuses; say so here,
    // instead of rendering workers that would exit at every start.
    let used = std::iter::once(&connection)
        .chain(refs.sink_connections.iter().filter_map(|(_, c)| c.as_ref()));
    for used in used {
        if let Err(problems) = used.spec.validate() {
            return Err(Refusal {
                reason: "ConnectionInvalid",
                message: format!(
                    "KafkaConnection {namespace}/{} is invalid, so its workers would not start: {problems}",
                    used.name_any()
                ),
                spec: false,
            });
        }
    }
    Ok(connection)
}

/// What `weir-worker run` does on a machine but a worker pod cannot: the pods have a
/// read-only root and no volume but their pipeline file, so there is nowhere for a SQLite
/// database or a secret read from a file. Each problem starts with its field path.
pub fn in_cluster(spec: &EventPipelineSpec) -> Vec<String> {
    let mut out = Vec::new();
    for (i, sink) in spec.sinks.iter().enumerate() {
        let at = format!("spec.sinks[{i}]");
        if sink.sqlite.is_some() {
            out.push(format!(
                "{at}.sqlite: a SQLite database needs a disk of its own, which the worker pods do not have (a read-only root, and no single writer once it scales): run it with `weir-worker run`, or use a postgres or mysql sink"
            ));
        }
        let mut sources: Vec<(String, &SecretSource)> = Vec::new();
        let sql = [
            ("postgres", &sink.postgres),
            ("mysql", &sink.mysql),
            ("sqlite", &sink.sqlite),
        ];
        for (kind, sql) in sql {
            if let Some(from) = sql.as_ref().and_then(|s| s.url_from.as_ref()) {
                sources.push((format!("{at}.{kind}.urlFrom"), from));
            }
        }
        if let Some(from) = sink.redis.as_ref().and_then(|s| s.url_from.as_ref()) {
            sources.push((format!("{at}.redis.urlFrom"), from));
        }
        if let Some(from) = sink.mongodb.as_ref().and_then(|s| s.url_from.as_ref()) {
            sources.push((format!("{at}.mongodb.urlFrom"), from));
        }
        if let Some(http) = &sink.http {
            if let Some(from) = &http.url_from {
                sources.push((format!("{at}.http.urlFrom"), from));
            }
            for (header, from) in &http.headers_from {
                sources.push((format!("{at}.http.headersFrom[{header:?}]"), from));
            }
        }
        for (path, source) in sources {
            if source.file.is_some() {
                out.push(format!(
                    "{path}.file: the worker pods mount no files of yours: use secretKeyRef (or env with spec.worker.env)"
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_and_file_secrets_are_refused_in_the_cluster_with_their_paths() {
        let spec: EventPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"topics": ["in"]},
            "sinks": [
                {"sqlite": {"url": "sqlite:///data/t.db", "table": "t", "columns": [{"name": "a", "type": "text"}]}},
                {"postgres": {"urlFrom": {"secretKeyRef": {"name": "db", "key": "url"}}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
                {"http": {"url": "http://x", "headersFrom": {"Authorization": {"file": "/run/token"}}}}
            ]
        }))
        .expect("spec parses");
        assert_eq!(spec.validate(), Ok(()), "weir-worker run takes it");
        let problems = in_cluster(&spec);
        let paths: Vec<&str> = problems
            .iter()
            .filter_map(|p| p.split_once(": ").map(|(path, _)| path))
            .collect();
        assert_eq!(
            paths,
            vec![
                "spec.sinks[0].sqlite",
                "spec.sinks[2].http.headersFrom[\"Authorization\"].file"
            ]
        );
    }

    #[test]
    fn a_connection_the_worker_would_refuse_refuses_the_pipeline() {
        let pipeline = EventPipeline::new(
            "orders",
            serde_json::from_value(serde_json::json!({
                "source": {"topics": ["in"]},
                "sinks": [{"kafka": {"topic": "out"}}]
            }))
            .expect("spec parses"),
        );
        let connection = |properties: serde_json::Value| {
            Arc::new(KafkaConnection::new(
                "default",
                serde_json::from_value(serde_json::json!({
                    "bootstrapServers": ["kafka:9092"],
                    "properties": properties
                }))
                .expect("connection parses"),
            ))
        };
        let refs = |c: Arc<KafkaConnection>| Dereferenced {
            connection_name: "shop/default".into(),
            connection: Some(c),
            sink_connections: Vec::new(),
            deployment: None,
            lag: None,
        };
        let fine = refs(connection(serde_json::json!({"client.rack": "a"})));
        assert!(validate(&pipeline, &fine).is_ok());
        let replaced = refs(connection(serde_json::json!({"linger.ms": "50"})));
        let refusal = validate(&pipeline, &replaced).expect_err("refused");
        assert_eq!(refusal.reason, "ConnectionInvalid");
        assert!(
            refusal.message.contains("spec.properties[\"linger.ms\"]"),
            "{}",
            refusal.message
        );
    }
}
