//! Blob format tests: round trip and every kind of damage.

use super::*;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs,
};
use proptest::prelude::*;

fn sample_vcpu(id: u32) -> VcpuState {
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = id as i8;
    VcpuState {
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806e9 + id,
            ..Default::default()
        }],
        mp_state: Default::default(),
        regs: kvm_regs {
            rip: 0x40_1000 + u64::from(id),
            rsp: 0x7fff_0000,
            rflags: 0x3002,
            ..Default::default()
        },
        sregs: Default::default(),
        fpu: Fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        xsave: (0..1024u32)
            .map(|w| w.wrapping_mul(2_654_435_761))
            .collect(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic,
        msrs: vec![
            MsrEntry {
                index: 0x10,
                data: 123_456_789,
            },
            MsrEntry {
                index: 0xc000_0080,
                data: 0x500,
            },
        ],
        vcpu_events: Default::default(),
        tsc_khz: Some(2_100_000),
    }
}

fn sample_state(vcpus: u32) -> VmState {
    let chip = |chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    VmState {
        layout: MemoryLayout::for_size(64 << 20).expect("layout"),
        vcpus: (0..vcpus).map(sample_vcpu).collect(),
        vm: VmWideState {
            pic_master: chip(0),
            pic_slave: chip(1),
            ioapic: chip(2),
            pit2: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            },
        },
        serial: SerialState {
            line_control: 3,
            in_buffer: vec![b'a', b'b'],
            ..Default::default()
        },
        workload: None,
    }
}

#[test]
fn round_trip_preserves_everything() {
    let state = sample_state(4);
    let blob = state.to_bytes();
    assert_eq!(&blob[..8], &MAGIC);
    let back = VmState::from_bytes(&blob).expect("decode");
    assert_eq!(back.vcpus, state.vcpus);
    assert_eq!(back.layout, state.layout);
    assert_eq!(back.serial, state.serial);
    assert_eq!(back.vm.clock, state.vm.clock);
    assert_eq!(back.vm.ioapic.chip_id, 2);
    // Re-encoding the decoded state gives the same bytes, which covers the
    // fields without PartialEq (irqchip unions).
    assert_eq!(back.to_bytes(), blob);
}

#[test]
fn file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let state = sample_state(1);
    state.write_to(&path).expect("write");
    let back = VmState::read_from(&path).expect("read");
    assert_eq!(back.vcpus, state.vcpus);
    let missing = VmState::read_from(dir.path().join("nope")).unwrap_err();
    assert!(matches!(missing, ReadStateError::Io { .. }), "{missing:?}");
}

#[test]
fn corrupted_body_byte_is_a_checksum_error() {
    let mut blob = sample_state(2).to_bytes();
    let i = HEADER_LEN + (blob.len() - HEADER_LEN) / 2;
    blob[i] ^= 0x40;
    let err = VmState::from_bytes(&blob).unwrap_err();
    assert!(
        matches!(err, DecodeStateError::ChecksumMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn corrupted_crc_field_is_a_checksum_error() {
    let mut blob = sample_state(1).to_bytes();
    blob[21] ^= 1;
    let err = VmState::from_bytes(&blob).unwrap_err();
    assert!(
        matches!(err, DecodeStateError::ChecksumMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn truncated_blob_is_a_truncation_error() {
    let blob = sample_state(1).to_bytes();
    for cut in [10, HEADER_LEN - 1, HEADER_LEN, blob.len() - 1] {
        let err = VmState::from_bytes(&blob[..cut]).unwrap_err();
        assert!(
            matches!(err, DecodeStateError::Truncated { .. }),
            "cut at {cut}: {err:?}"
        );
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut blob = sample_state(1).to_bytes();
    blob.push(0);
    let err = VmState::from_bytes(&blob).unwrap_err();
    assert!(
        matches!(err, DecodeStateError::TrailingBytes { extra: 1 }),
        "{err:?}"
    );
}

#[test]
fn wrong_version_is_a_version_error() {
    let mut blob = sample_state(1).to_bytes();
    blob[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = VmState::from_bytes(&blob).unwrap_err();
    assert!(
        matches!(err, DecodeStateError::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn wrong_magic_is_a_magic_error() {
    let mut blob = sample_state(1).to_bytes();
    blob[0] = b'X';
    assert!(matches!(
        VmState::from_bytes(&blob),
        Err(DecodeStateError::BadMagic)
    ));
    assert!(matches!(
        VmState::from_bytes(b"hello"),
        Err(DecodeStateError::BadMagic)
    ));
}

#[test]
fn oversized_blob_and_oversized_length_field_are_refused() {
    let big = vec![0u8; VmState::MAX_BYTES + 1];
    assert!(matches!(
        VmState::from_bytes(&big),
        Err(DecodeStateError::TooLarge { .. })
    ));
    // A small blob whose header claims a huge body is refused before any
    // allocation of that size.
    let mut blob = sample_state(1).to_bytes();
    blob[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        VmState::from_bytes(&blob),
        Err(DecodeStateError::TooLarge { .. })
    ));
}

#[test]
fn oversized_file_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let f = std::fs::File::create(&path).unwrap();
    // Sparse: costs no disk.
    f.set_len(VmState::MAX_BYTES as u64 * 4).unwrap();
    let err = VmState::read_from(&path).unwrap_err();
    assert!(
        matches!(
            err,
            ReadStateError::Decode {
                source: DecodeStateError::TooLarge { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn valid_envelope_with_garbage_body_is_malformed() {
    let body = [0xffu8; 40];
    let mut blob = Vec::new();
    blob.extend_from_slice(&MAGIC);
    blob.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    blob.extend_from_slice(&(body.len() as u64).to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    blob.extend_from_slice(&body);
    assert!(matches!(
        VmState::from_bytes(&blob),
        Err(DecodeStateError::Malformed(_))
    ));
}

#[test]
fn zero_vcpus_is_refused() {
    let mut state = sample_state(1);
    state.vcpus.clear();
    assert!(matches!(
        VmState::from_bytes(&state.to_bytes()),
        Err(DecodeStateError::NoVcpus)
    ));
}

#[test]
fn serial_state_converts_both_ways() {
    let ours = SerialState {
        baud_divisor_low: 1,
        baud_divisor_high: 2,
        interrupt_enable: 3,
        interrupt_identification: 4,
        line_control: 5,
        line_status: 6,
        modem_control: 7,
        modem_status: 8,
        scratch: 9,
        in_buffer: vec![10, 11],
    };
    let theirs = vm_superio::serial::SerialState::from(&ours);
    assert_eq!(SerialState::from(theirs), ours);
}

/// Puts a body that passes the envelope checks around arbitrary bytes so
/// the fuzzing reaches postcard, not just the CRC check.
fn envelope(body: &[u8]) -> Vec<u8> {
    let mut blob = Vec::new();
    blob.extend_from_slice(&MAGIC);
    blob.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    blob.extend_from_slice(&(body.len() as u64).to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    blob.extend_from_slice(body);
    blob
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = VmState::from_bytes(&bytes);
        let _ = VmState::from_bytes(&envelope(&bytes));
    }

    #[test]
    fn mutated_valid_blob_never_panics(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        let good = sample_state(1);
        let mut body = postcard::to_allocvec(&good).unwrap();
        let i = pos.index(body.len());
        body[i] = val;
        // Either decodes or errors; must not panic or allocate wildly.
        let _ = VmState::from_bytes(&envelope(&body));
    }
}
