//! The API permissions the operator's code uses: the one list the chart's ClusterRole
//! (charts/weir/templates/clusterrole.yaml) must grant exactly. A test compares the two,
//! and the real-API-server tests run the operator with only that role.

/// One rule: API group, resources, verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// Every permission the controllers need, and why.
pub const RULES: &[Rule] = &[
    // Watch the three kinds; finalizers on KafkaTopics; dead-letter KafkaTopics applied
    // for pipelines (server-side apply creates through PATCH, which needs create too) and
    // deleted once the pipeline's spec no longer has one.
    Rule {
        group: "weir.dev",
        resources: &["kafkaconnections", "eventpipelines"],
        verbs: &["get", "list", "watch"],
    },
    Rule {
        group: "weir.dev",
        resources: &["kafkatopics"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        group: "weir.dev",
        resources: &[
            "kafkaconnections/status",
            "kafkatopics/status",
            "eventpipelines/status",
        ],
        verbs: &["get", "patch"],
    },
    // What runs a pipeline, applied server-side; replicas through the scale subresource.
    Rule {
        group: "apps",
        resources: &["deployments"],
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    Rule {
        group: "apps",
        resources: &["deployments/scale"],
        verbs: &["get", "patch"],
    },
    Rule {
        group: "",
        resources: &["configmaps", "services", "serviceaccounts"],
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    Rule {
        group: "policy",
        resources: &["poddisruptionbudgets"],
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    // KafkaConnection TLS and SASL material; watched so a rotated Secret is picked up.
    Rule {
        group: "",
        resources: &["secrets"],
        verbs: &["get", "list", "watch"],
    },
    // Leader election.
    Rule {
        group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "create", "update"],
    },
    // Events on every change (kube's recorder creates, then patches a series).
    Rule {
        group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];
