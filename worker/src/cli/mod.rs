//! The binary's commands beyond `run` and `validate`.

pub mod produce;
pub mod quickstart;
pub mod status;
