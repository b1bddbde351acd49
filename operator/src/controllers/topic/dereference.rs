//! What a KafkaTopic's reconcile reads before it changes anything: the KafkaTopic that
//! owns its name on its cluster (from the cache), its KafkaConnection (from the cache) as
//! client properties (its Secrets from the API), and the topic as Kafka has it. The only
//! IO before apply.

use std::sync::Arc;

use kube::ResourceExt as _;
use weir_crds::KafkaTopic;

use super::{owner, topic_name};
use crate::connection;
use crate::context::{Context, Error};
use crate::kafka::{Admin, TopicState};
use crate::render::connection_name;

/// The KafkaTopic that owns this topic's name on its cluster, when it is another one.
pub fn other_owner(ctx: &Context, topic: &KafkaTopic) -> Option<Arc<KafkaTopic>> {
    owner(ctx, topic).filter(|o| o.uid() != topic.uid())
}

/// What a topic refers to, on the broker's side.
#[derive(Debug)]
pub struct Dereferenced {
    pub admin: Admin,
    /// The topic as Kafka has it; `None` when it does not exist.
    pub current: Option<TopicState>,
    /// The brokers the KafkaConnection last counted.
    pub brokers: Option<i32>,
}

/// The connection's admin client, for the cleanup of a deleted topic.
pub async fn admin(ctx: &Context, topic: &KafkaTopic) -> Result<(Admin, Option<i32>), Error> {
    let namespace = topic.namespace().unwrap_or_default();
    let name = connection_name(topic.spec.connection_ref.as_ref(), &ctx.config);
    let connection = ctx
        .connection(&namespace, name)
        .ok_or_else(|| Error::ConnectionNotFound {
            namespace: namespace.clone(),
            name: name.to_owned(),
        })?;
    let config = connection::client_config(&ctx.client, &namespace, &connection.spec).await?;
    let brokers = connection.status.as_ref().and_then(|s| s.brokers);
    Ok((ctx.admin(&config)?, brokers))
}

pub async fn dereference(ctx: &Context, topic: &KafkaTopic) -> Result<Dereferenced, Error> {
    let (admin, brokers) = admin(ctx, topic).await?;
    let current = admin.describe(&topic_name(topic)).await?;
    Ok(Dereferenced {
        admin,
        current,
        brokers,
    })
}
