//! The lag autoscaler: [`policy`], a pure function from measured lag and rates to a
//! replica count.

pub mod policy;
