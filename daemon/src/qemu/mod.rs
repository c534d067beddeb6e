//! The `qemu` VM backend's groundwork: QEMU guests described by a
//! [`QemuVmSpec`](spec::QemuVmSpec), started from an argv built only from
//! that spec ([`args`]), supervised and migrated through QMP ([`qmp`],
//! [`commands`]) as daemonized processes the daemon can leave and find
//! again ([`process`]). [`probe`] asks a guest-less QEMU what this host
//! offers (CPU models, machine types, migration capabilities).
//!
//! QEMU never listens on the network: its QMP socket, its migration
//! endpoints and NBD exports are unix sockets in the VM's state directory,
//! owned by the daemon.

pub mod args;
pub mod commands;
pub mod probe;
pub mod process;
pub mod qmp;
pub mod spec;

#[cfg(test)]
mod live_tests;
