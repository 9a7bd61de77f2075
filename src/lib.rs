//! ditto facade
