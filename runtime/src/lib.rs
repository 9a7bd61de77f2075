//! ditto-runtime
