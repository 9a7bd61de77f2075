//! ditto-ir
