//! Weir's consumer engine. This first version reads and checks pipeline files; the engine
//! (consume → transform → batch → sink → commit) builds on it.

pub mod spec;
