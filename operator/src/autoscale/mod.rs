//! The lag autoscaler: [`lag`] reads a pipeline's consumer group every lag interval (5 s
//! by default, the pipeline's reconcile period), [`policy`] turns two readings into a
//! replica count. The pipeline controller writes that count to the Deployment's scale
//! subresource unless `spec.replicas` pins it (the autoscaler then only reports).

pub mod lag;
pub mod policy;

use std::time::Instant;

use weir_crds::EventPipelineSpec;

/// What the autoscaler remembers of one pipeline between its readings.
#[derive(Debug)]
pub struct PipelineState {
    /// The replay last carried out (the cache may not show its status yet).
    pub replayed: Option<weir_crds::ReplayStatus>,
    epoch: Instant,
    last: Option<lag::Reading>,
    memory: policy::Memory,
}

impl Default for PipelineState {
    fn default() -> Self {
        Self {
            replayed: None,
            epoch: Instant::now(),
            last: None,
            memory: policy::Memory::default(),
        }
    }
}

/// One step of the autoscaler: a reading, what it says, and the decision.
#[derive(Clone, Debug)]
pub struct Step {
    pub reading: lag::Reading,
    /// Absent on the first reading (or after the partitions changed).
    pub rates: Option<lag::Rates>,
    pub decision: policy::Decision,
}

impl PipelineState {
    /// Takes in `reading`, taken while `replicas` workers ran, and decides.
    pub fn step(&mut self, spec: &EventPipelineSpec, reading: lag::Reading, replicas: i32) -> Step {
        let rates = self
            .last
            .as_ref()
            .and_then(|before| lag::rates(before, &reading));
        let observation = policy::Observation {
            at: reading.at.duration_since(self.epoch).as_secs_f64(),
            replicas,
            lag: reading.lags(),
            drained: rates
                .as_ref()
                .map(|r| r.drained.clone())
                .unwrap_or_default(),
            arrival_rate: rates.as_ref().map(|r| r.arrival),
        };
        let decision = policy::decide(&settings(spec), &observation, &mut self.memory);
        self.last = Some(reading.clone());
        Step {
            reading,
            rates,
            decision,
        }
    }
}

/// The policy's settings from the spec (durations the spec validated already).
pub fn settings(spec: &EventPipelineSpec) -> policy::Settings {
    let scaling = &spec.scaling;
    let defaults = policy::Settings::default();
    let seconds = |d: &weir_crds::duration::DurationString, fallback: f64| {
        d.parse().map(|d| d.as_secs_f64()).unwrap_or(fallback)
    };
    policy::Settings {
        min_replicas: scaling.min_replicas,
        max_replicas: scaling.max_replicas,
        target_lag_per_replica: scaling.target_lag_per_replica,
        target_catch_up: scaling
            .target_catch_up_time
            .as_ref()
            .map_or(defaults.target_catch_up, |d| {
                seconds(d, defaults.target_catch_up)
            }),
        activation_lag: scaling.activation_lag,
        cooldown: seconds(&scaling.cooldown, defaults.cooldown),
    }
}
