//! ditto-passes
