//! Integration tests of `ditto_runtime::scheduler`. The tests live in a module named
//! `scheduler` so that `cargo test -p ditto-runtime scheduler` selects them.

mod scheduler;
