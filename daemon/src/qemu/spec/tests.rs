//! Unit tests of the spec: serde forms, defaults, validation messages.

use super::*;

fn minimal() -> QemuVmSpec {
    serde_json::from_str(
        r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/boot/vmlinuz"}}"#,
    )
    .unwrap()
}

fn err(spec: &QemuVmSpec) -> String {
    spec.validate().unwrap_err().to_string()
}

#[test]
fn defaults_fill_in() {
    let s = minimal();
    assert_eq!(s.machine, "q35");
    assert_eq!(s.cpu.model, "host");
    assert_eq!(s.vcpus, 1);
    assert!(s.disks.is_empty() && s.nics.is_empty());
    assert_eq!(s.memory, Quantity::mib(64));
    s.validate().unwrap();
}

#[test]
fn a_full_spec_reads_from_yaml() {
    let yaml = r#"
name: web-1
machine: pc-q35-7.2
cpu:
  model: Skylake-Server-v4
memory: 2Gi
vcpus: 2
boot:
  kernel: /images/vmlinuz
  initrd: /images/initrd.img
  cmdline: console=ttyS0 root=/dev/vda1
disks:
  - path: /images/root.qcow2
    format: qcow2
  - path: /dev/mapper/data
    bus: ide
    shared: true
    readOnly: true
nics:
  - bridge: br0
    mac: "52:54:00:aa:bb:cc"
  - bridge: br-mig
    model: e1000e
"#;
    let s: QemuVmSpec = serde_norway::from_str(yaml).unwrap();
    s.validate().unwrap();
    assert_eq!(s.memory, Quantity(2 << 30));
    assert_eq!(s.disks[0].format, DiskFormat::Qcow2);
    assert_eq!(s.disks[0].bus, DiskBus::Virtio);
    assert!(!s.disks[0].shared);
    assert!(s.disks[1].shared && s.disks[1].read_only);
    assert_eq!(s.disks[1].bus, DiskBus::Ide);
    assert_eq!(
        s.nics[0].mac,
        Some(MacAddress([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]))
    );
    assert_eq!(s.nics[1].model, NicModel::E1000e);
    assert!(matches!(
        s.boot.mode(),
        BootMode::Kernel { cmdline: Some(c), .. } if c.starts_with("console=")
    ));
    // JSON round trip keeps every field.
    let back: QemuVmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let e = serde_json::from_str::<QemuVmSpec>(
        r#"{"name": "a", "memory": "64Mi", "disks": [{"path": "/x", "cache": "none"}]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("cache"), "{e}");
    let e = serde_json::from_str::<QemuVmSpec>(
        r#"{"name": "a", "memory": "64Mi", "nics": [{"bridge": "br0", "mac": "52:54:00:zz:00:01"}]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a MAC address"), "{e}");
}

#[test]
fn errors_name_the_field() {
    let mut s = minimal();
    s.name = "Bad_Name".into();
    assert!(err(&s).starts_with("name: "), "{}", err(&s));

    let mut s = minimal();
    s.machine = "pc-i440fx-7.2".into();
    assert_eq!(
        err(&s),
        "machine: only q35 machine types are supported (q35 or pc-q35-<version>)"
    );
    s.machine = "q35,accel=tcg".into();
    assert!(err(&s).starts_with("machine: must be"), "{}", err(&s));

    let mut s = minimal();
    s.cpu.model = "host,-vmx".into();
    assert!(err(&s).starts_with("cpu.model: "), "{}", err(&s));

    let mut s = minimal();
    s.memory = Quantity::mib(8);
    assert_eq!(err(&s), "memory: 8Mi is below the minimum of 16Mi");
    s.memory = Quantity((64 << 20) + 4096);
    assert!(err(&s).starts_with("memory: "), "{}", err(&s));

    let mut s = minimal();
    s.vcpus = 0;
    assert_eq!(err(&s), "vcpus: 0 is out of range 1..=255");

    let mut s = minimal();
    s.boot.kernel = Some("vmlinuz".into());
    assert_eq!(err(&s), "boot.kernel: must be an absolute path");

    let mut s = minimal();
    s.boot.cmdline = Some("console=ttyS0\n-device x".into());
    assert_eq!(err(&s), "boot.cmdline: must not contain control characters");
}

#[test]
fn boot_needs_a_kernel_or_a_disk() {
    let mut s = minimal();
    s.boot = BootSpec::default();
    assert_eq!(err(&s), "boot: no kernel and no disk to boot from");
    s.boot.initrd = Some("/boot/initrd".into());
    assert_eq!(err(&s), "boot.initrd: needs boot.kernel");
    s.boot.initrd = None;
    s.disks.push(disk("/images/a.raw"));
    s.validate().unwrap();
    assert_eq!(s.boot.mode(), BootMode::FirstDisk);
    s.boot.cmdline = Some("quiet".into());
    assert_eq!(err(&s), "boot.cmdline: needs boot.kernel");
}

fn disk(path: &str) -> DiskSpec {
    DiskSpec {
        path: path.into(),
        format: DiskFormat::Raw,
        bus: DiskBus::Virtio,
        shared: false,
        read_only: false,
    }
}

#[test]
fn disk_paths_are_checked_with_their_index() {
    let mut s = minimal();
    s.disks = vec![disk("/images/a.raw"), disk("relative.raw")];
    assert_eq!(err(&s), "disks[1].path: must be an absolute path");
    s.disks[1] = disk("/images/a.raw");
    assert_eq!(err(&s), "disks[1].path: the same image as disks[0].path");
    s.disks[1] = disk("/images/b\u{7}.raw");
    assert_eq!(
        err(&s),
        "disks[1].path: must not contain control characters"
    );
    use std::os::unix::ffi::OsStrExt;
    s.disks[1].path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/images/\xff.raw"));
    assert_eq!(err(&s), "disks[1].path: must be valid UTF-8");
    s.disks = (0..7)
        .map(|i| DiskSpec {
            bus: DiskBus::Ide,
            ..disk(&format!("/images/{i}.raw"))
        })
        .collect();
    assert_eq!(err(&s), "disks: more than 6 entries");
}

#[test]
fn nics_are_checked() {
    let mut s = minimal();
    s.nics.push(NicSpec {
        bridge: "br0,script=/tmp/x".into(),
        mac: None,
        model: NicModel::Virtio,
    });
    assert!(err(&s).starts_with("nics[0].bridge: "), "{}", err(&s));
    s.nics[0].bridge = "a-very-long-bridge".into();
    assert!(err(&s).starts_with("nics[0].bridge: "), "{}", err(&s));
    s.nics[0].bridge = "br0".into();
    s.nics[0].mac = Some("01:00:5e:00:00:01".parse().unwrap());
    assert_eq!(
        err(&s),
        "nics[0].mac: 01:00:5e:00:00:01 is a group address, not a NIC's own"
    );
    s.nics[0].mac = Some("52:54:00:00:00:01".parse().unwrap());
    s.nics.push(s.nics[0].clone());
    assert_eq!(
        err(&s),
        "nics[1].mac: 52:54:00:00:00:01 is used by nics[0] too"
    );
    s.nics[1].mac = None;
    s.validate().unwrap();
}

#[test]
fn derived_macs_are_stable_local_unicast_and_distinct() {
    let a = MacAddress::derived("vm1", 0);
    assert_eq!(a, MacAddress::derived("vm1", 0));
    assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
    assert!(a.is_unicast());
    assert_ne!(a, MacAddress::derived("vm1", 1));
    assert_ne!(a, MacAddress::derived("vm2", 0));
    assert_eq!(a.to_string().parse::<MacAddress>().unwrap(), a);
}

#[test]
fn mac_parsing() {
    for bad in [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "5:54:00:12:34:56",
        "52-54-00-12-34-56",
        "52:54:00:12:34:+5",
    ] {
        assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
    }
    assert_eq!(
        "52:54:00:AB:cd:ef"
            .parse::<MacAddress>()
            .unwrap()
            .to_string(),
        "52:54:00:ab:cd:ef"
    );
}

#[test]
fn local_disks_block_migration_only_without_block_migration() {
    let mut s = minimal();
    s.disks = vec![
        DiskSpec {
            shared: true,
            ..disk("/nfs/root.raw")
        },
        disk("/local/data.raw"),
    ];
    assert!(live_migration_blockers(&s, true, &[]).is_empty());
    let b = live_migration_blockers(&s, false, &[]);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].reason, NotMigratableReason::DisksNotLiveMigratable);
    assert!(
        b[0].message.contains("disks[1] (/local/data.raw)"),
        "{}",
        b[0].message
    );
    assert!(!b[0].message.contains("nfs"), "{}", b[0].message);
    let b = live_migration_blockers(&s, true, &["non-migratable device: x".into()]);
    assert_eq!(b[0].reason, NotMigratableReason::MigrationBlocked);
    assert_eq!(b[0].message, "non-migratable device: x");
    s.disks[1].shared = true;
    assert!(live_migration_blockers(&s, false, &[]).is_empty());
}
