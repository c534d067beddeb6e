//! The wire between two `migrated` daemons: QUIC with mutual TLS, the
//! page-transfer protocol (sans-IO codec and session state machines), and the
//! thin async driver that connects them to quinn streams.
#![forbid(unsafe_code)]

pub mod codec;
pub mod layout;
pub mod session;

pub mod driver;
pub mod endpoint;
pub mod identity;
pub mod limiter;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
