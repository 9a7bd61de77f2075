//! ditto-models
