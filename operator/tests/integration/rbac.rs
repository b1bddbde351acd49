//! The chart's ClusterRole grants exactly the permissions in `weir_operator::rbac::RULES`,
//! the list kept beside the code that uses them. (That the list is sufficient is proven
//! by the API-server tests, which run the operator with only this role.)

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use weir_operator::rbac::RULES;

type Grant = (String, String, String);

fn grants_of_chart() -> anyhow::Result<BTreeSet<Grant>> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir/templates/clusterrole.yaml");
    let mut out = BTreeSet::new();
    for rule in common::chart_rules(&std::fs::read_to_string(path)?)? {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    anyhow::ensure!(
                        out.insert((group.clone(), resource.clone(), verb.clone())),
                        "the chart grants {verb} on {group}/{resource} twice"
                    );
                }
            }
        }
    }
    Ok(out)
}

fn grants_of_code() -> BTreeSet<Grant> {
    RULES
        .iter()
        .flat_map(|rule| {
            rule.resources.iter().flat_map(move |resource| {
                rule.verbs.iter().map(move |verb| {
                    (
                        rule.group.to_owned(),
                        (*resource).to_owned(),
                        (*verb).to_owned(),
                    )
                })
            })
        })
        .collect()
}

#[test]
fn the_chart_grants_exactly_what_the_code_uses() -> anyhow::Result<()> {
    let chart = grants_of_chart()?;
    let code = grants_of_code();
    let missing: Vec<_> = code.difference(&chart).collect();
    let extra: Vec<_> = chart.difference(&code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "charts/weir/templates/clusterrole.yaml differs from operator/src/rbac.rs\nmissing from the chart: {missing:?}\nnot used by the code: {extra:?}"
    );
    assert!(
        !code.iter().any(|(group, resource, verb)| verb == "*"
            || (verb == "delete"
                && (group.as_str(), resource.as_str()) != ("weir.dev", "kafkatopics"))),
        "no wildcard grants, and delete only for the KafkaTopics a pipeline no longer has"
    );
    Ok(())
}
