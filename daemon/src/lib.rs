//! `migrated`, the per-host daemon: its config, the local API and its
//! client, VM supervision through `migrate-vmm` processes, and persisted
//! VM and migration records, and the pre-copy migration engine (`precopy`,
//! `outgoing`, `incoming`, over `peers`). `model` holds the API types
//! `migratectl` shares.

#![forbid(unsafe_code)]

// The API types, client and config live in `migrated-api` so that
// `migratectl` does not link the engine; the daemon keeps its old paths.
pub use migrated_api::{client, config, model, quantity};

pub mod api;
pub mod engine;
pub mod guestio;
pub mod incoming;
pub mod outgoing;
pub mod peers;
pub mod precopy;
pub mod service;
pub mod store;
pub mod supervisor;
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
