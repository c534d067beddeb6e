//! What `migratectl`, the end-to-end tests and `migrated` share, without
//! the engine: the local API's types (`model`, `quantity`), its client
//! (`client`) and the daemon's config file (`config`, which `migratectl
//! demo` and the tests write). Nothing here links KVM or the HTTP server;
//! the daemon re-exports these modules under its own paths.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod model;
pub mod quantity;
