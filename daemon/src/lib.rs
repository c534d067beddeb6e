//! `migrated`, the per-host daemon: the local API (`api`, `service`), VM
//! supervision through `migrate-vmm` processes (`supervisor`), persisted
//! VM and migration records (`store`), and live migration (`migration`:
//! the engine, the records table, the source and target sides).
//!
//! The API types, the client and the config file come from the
//! `migrated-api` crate and are re-exported here under their old paths.

#![forbid(unsafe_code)]

// In their own crate so that `migratectl` does not link the engine.
pub use migrated_api::{client, config, model, quantity};

pub mod api;
pub mod cluster;
pub mod migration;
pub mod qemu;
pub mod service;
pub mod store;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;

/// An error and its sources as one line: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        // Some errors repeat their source's message; print it once.
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
