//! The COM1 16550 UART (vm-superio) at I/O ports 0x3f8..=0x3ff: what the
//! guest writes goes to the serial log file; its interrupt is an eventfd
//! wired to GSI 4 of the in-kernel irqchip.
//!
//! All vCPU threads share one device behind a mutex; port I/O to it is rare
//! (console output only), so contention does not matter.

use std::fs::File;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::warn;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::ratelimit::RateLimit;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports a 16550 occupies.
pub const COM1_PORTS: u16 = 8;
/// The legacy IRQ line of COM1.
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt by signalling an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Failure to set up the serial console.
#[derive(Debug, thiserror::Error)]
pub enum CreateSerialError {
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot restore the serial state (receive fifo holds {len} bytes)")]
    State { len: usize },
}

type Uart = Serial<EventFdTrigger, NoEvents, File>;

/// The COM1 console.
pub struct SerialConsole {
    uart: Mutex<Uart>,
    write_errors: RateLimit,
}

impl SerialConsole {
    /// A console in power-on state writing to `out`. Returns it with the
    /// eventfd to register as an irqfd for [`COM1_GSI`].
    pub fn new(out: File) -> Result<(Self, EventFd), CreateSerialError> {
        Self::from_state(&SerialState::default(), out)
    }

    /// A console with restored register state.
    pub fn from_state(
        state: &SerialState,
        out: File,
    ) -> Result<(Self, EventFd), CreateSerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(CreateSerialError::EventFd)?;
        let irq = evt.try_clone().map_err(CreateSerialError::EventFd)?;
        let uart = Serial::from_state(state, EventFdTrigger(evt), NoEvents, out).map_err(|_| {
            CreateSerialError::State {
                len: state.in_buffer.len(),
            }
        })?;
        Ok((
            SerialConsole {
                uart: Mutex::new(uart),
                write_errors: RateLimit::new(),
            },
            irq,
        ))
    }

    /// Whether `port` belongs to COM1.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    fn uart(&self) -> MutexGuard<'_, Uart> {
        // A panic inside vm-superio cannot leave the registers unusable.
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guest `out` to a COM1 port.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let offset = port.wrapping_sub(COM1_BASE) as u8;
        // The log is an unbuffered File: each byte is in the file as soon
        // as the guest wrote it, so a crash loses no console output.
        if let Err(e) = self.uart().write(offset, value) {
            if self.write_errors.allow() {
                warn!(error = ?e, "serial console write failed");
            }
        }
    }

    /// A guest `in` from a COM1 port.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let offset = port.wrapping_sub(COM1_BASE) as u8;
        let value = self.uart().read(offset);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// The device registers, for saving.
    pub fn state(&self) -> SerialState {
        self.uart().state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn output_reaches_log_and_state_round_trips() {
        let mut log = tempfile::NamedTempFile::new().unwrap();
        let (console, _irq) = SerialConsole::new(log.reopen().unwrap()).unwrap();
        for b in b"hi\n" {
            console.pio_write(COM1_BASE, &[*b]);
        }
        // Scratch register: written value reads back, and survives save/restore.
        console.pio_write(COM1_BASE + 7, &[0x5a]);
        let mut out = [0u8; 1];
        console.pio_read(COM1_BASE + 7, &mut out);
        assert_eq!(out[0], 0x5a);

        let state = console.state();
        let (restored, _irq) =
            SerialConsole::from_state(&state, tempfile::tempfile().unwrap()).unwrap();
        restored.pio_read(COM1_BASE + 7, &mut out);
        assert_eq!(out[0], 0x5a);
        assert_eq!(restored.state(), state);

        let mut text = String::new();
        log.as_file_mut().read_to_string(&mut text).unwrap();
        assert_eq!(text, "hi\n");
    }

    #[test]
    fn port_range() {
        assert!(SerialConsole::handles(0x3f8));
        assert!(SerialConsole::handles(0x3ff));
        assert!(!SerialConsole::handles(0x3f7));
        assert!(!SerialConsole::handles(0x400));
    }

    #[test]
    fn oversized_fifo_state_is_rejected() {
        let state = SerialState {
            in_buffer: vec![0; 1 << 20],
            ..Default::default()
        };
        assert!(matches!(
            SerialConsole::from_state(&state, tempfile::tempfile().unwrap()),
            Err(CreateSerialError::State { .. })
        ));
    }
}
