//! The VMM process library: one KVM guest whose RAM is a memfd shared with the
//! daemon, the built-in workload guest, state capture/restore and the control
//! socket the daemon drives it through.

pub mod control;
pub mod handler;
pub mod kvm_check;
pub mod machine;
pub mod multiboot;
pub mod qemu_check;
pub mod ratelimit;
pub mod serial;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod workload;
