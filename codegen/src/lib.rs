//! ditto-codegen
