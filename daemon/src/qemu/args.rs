//! QEMU's argv, built from a validated [`QemuVmSpec`] and the VM's state
//! directory, never from text a user passes through.
//!
//! Whatever QEMU would parse in its `key=value,...` syntax comes from the
//! spec's restricted names (machine, CPU model, VM name) or from daemon
//! paths with commas doubled (QEMU's escape); user paths travel inside the
//! JSON forms of `-object`, `-blockdev`, `-device` and `-netdev` (accepted
//! since 7.1/6.0), where a comma is just a character. Before the argv is
//! built every file is checked (exists, right type, readable/writable) and
//! every bridge exists, so a bad spec fails here with the field named and
//! not later in QEMU's log.
//!
//! QEMU runs with `-daemonize`: the launching process exits once the VM is
//! set up (its exit status says whether that worked), and the VM process is
//! in its own session, reparented away from the daemon, so a daemon
//! restart neither kills it nor leaves it as the daemon's child. `-D`
//! keeps QEMU's stderr going to `qemu.log` after daemonizing (without it
//! QEMU points stderr at /dev/null).
//!
//! NICs: a tap on a named bridge is created by QEMU's own
//! `qemu-bridge-helper` (`-netdev tap,br=...,helper=...`). The tap belongs
//! to the QEMU process and disappears with it, so no daemon crash can leak
//! one, and the target of a migration gets its own tap on the same bridge
//! when it starts. The helper obeys `/etc/qemu/bridge.conf` (`allow br0`),
//! which the host's operator writes. A guest without NICs needs none of it.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};
use serde_json::json;

use super::spec::{BootMode, DiskBus, InvalidQemuSpec, QemuVmSpec, SpecProblem};

/// Where Debian's qemu-system-common installs the bridge helper.
pub const DEFAULT_BRIDGE_HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";
/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// QEMU's id of the guest RAM backend (also named by `-machine`).
pub const RAM_BACKEND_ID: &str = "ram0";

/// The files of one QEMU guest in its state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuPaths {
    pub dir: PathBuf,
    pub qmp_socket: PathBuf,
    pub pidfile: PathBuf,
    /// The guest's serial console.
    pub serial_log: PathBuf,
    /// QEMU's own messages (stderr, `-D`).
    pub qemu_log: PathBuf,
}

impl QemuPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
        }
    }

    /// A unix socket in the state directory for migration streams or NBD.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How QEMU starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LaunchMode {
    /// A new guest; `paused` keeps the vCPUs stopped until `cont` (`-S`).
    Start { paused: bool },
    /// The target of a migration: waits for `migrate-incoming`
    /// (`-incoming defer`) and stays paused afterwards (`-S`), so only the
    /// daemon decides when it runs (after the switchover is settled).
    Incoming,
}

/// Host programs QEMU is told to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuTools {
    pub bridge_helper: PathBuf,
}

impl Default for QemuTools {
    fn default() -> Self {
        Self {
            bridge_helper: DEFAULT_BRIDGE_HELPER.into(),
        }
    }
}

/// The command line could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QemuCommandError {
    #[error(transparent)]
    Spec(#[from] InvalidQemuSpec),
    #[error("state directory {path} is not usable")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state directory {path} must be an absolute UTF-8 path without '%' or control characters"
    )]
    StateDirName { path: PathBuf },
    #[error("qmp socket path {path} is longer than {MAX_SOCKET_PATH} bytes")]
    SocketPathTooLong { path: PathBuf },
    #[error("bridge helper {path} is not executable")]
    BridgeHelper {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What a disk path turned out to be on this host.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
}

impl DiskKind {
    /// QEMU's protocol driver for it.
    fn driver(self) -> &'static str {
        match self {
            DiskKind::File => "file",
            DiskKind::BlockDevice => "host_device",
        }
    }
}

/// Validates `spec`, checks its files and the state directory, and returns
/// QEMU's arguments (without the binary).
pub fn qemu_command(
    spec: &QemuVmSpec,
    paths: &QemuPaths,
    mode: LaunchMode,
    tools: &QemuTools,
) -> Result<Vec<OsString>, QemuCommandError> {
    spec.validate()?;
    check_state_dir(paths)?;
    let disks = check_host(spec, tools)?;
    Ok(build_args(spec, paths, mode, tools, &disks))
}

fn check_state_dir(paths: &QemuPaths) -> Result<(), QemuCommandError> {
    let dir = &paths.dir;
    let name_ok = dir.is_absolute()
        && dir
            .to_str()
            .is_some_and(|s| !s.contains('%') && !s.chars().any(char::is_control));
    if !name_ok {
        return Err(QemuCommandError::StateDirName { path: dir.clone() });
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(QemuCommandError::StateDir {
                path: dir.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            })
        }
        Err(source) => {
            return Err(QemuCommandError::StateDir {
                path: dir.clone(),
                source,
            })
        }
    }
    if paths.qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(QemuCommandError::SocketPathTooLong {
            path: paths.qmp_socket.clone(),
        });
    }
    Ok(())
}

/// Checks every file and bridge the spec names; returns each disk's kind.
pub fn check_host(spec: &QemuVmSpec, tools: &QemuTools) -> Result<Vec<DiskKind>, QemuCommandError> {
    if let BootMode::Kernel { kernel, initrd, .. } = spec.boot.mode() {
        check_regular_file("boot.kernel", kernel)?;
        if let Some(initrd) = initrd {
            check_regular_file("boot.initrd", initrd)?;
        }
    }
    let mut kinds = Vec::with_capacity(spec.disks.len());
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("disks[{i}].path");
        let meta = metadata(&field, &disk.path)?;
        let kind = if meta.is_file() {
            DiskKind::File
        } else if meta.file_type().is_block_device() {
            DiskKind::BlockDevice
        } else {
            return Err(InvalidQemuSpec::new(
                field,
                SpecProblem::NotFileOrBlockDevice {
                    path: disk.path.clone(),
                },
            )
            .into());
        };
        check_access(&field, &disk.path, AccessFlags::R_OK, "readable")?;
        if !disk.read_only {
            check_access(&field, &disk.path, AccessFlags::W_OK, "writable")?;
        }
        kinds.push(kind);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        // A bridge has a `bridge` directory in sysfs; other links do not.
        if !Path::new("/sys/class/net")
            .join(&nic.bridge)
            .join("bridge")
            .is_dir()
        {
            return Err(InvalidQemuSpec::new(
                format!("nics[{i}].bridge"),
                SpecProblem::NoSuchBridge {
                    bridge: nic.bridge.clone(),
                },
            )
            .into());
        }
    }
    if !spec.nics.is_empty() {
        access(&tools.bridge_helper, AccessFlags::X_OK).map_err(|source| {
            QemuCommandError::BridgeHelper {
                path: tools.bridge_helper.clone(),
                source,
            }
        })?;
    }
    Ok(kinds)
}

fn metadata(field: &str, path: &Path) -> Result<std::fs::Metadata, InvalidQemuSpec> {
    std::fs::metadata(path).map_err(|e| {
        InvalidQemuSpec::new(
            field,
            SpecProblem::Inaccessible {
                path: path.to_owned(),
                kind: e.kind(),
            },
        )
    })
}

fn check_regular_file(field: &str, path: &Path) -> Result<(), InvalidQemuSpec> {
    if !metadata(field, path)?.is_file() {
        return Err(InvalidQemuSpec::new(
            field,
            SpecProblem::NotRegularFile {
                path: path.to_owned(),
            },
        ));
    }
    check_access(field, path, AccessFlags::R_OK, "readable")
}

/// access(2) checks as the daemon; QEMU runs as the daemon's user.
fn check_access(
    field: &str,
    path: &Path,
    mode: AccessFlags,
    what: &'static str,
) -> Result<(), InvalidQemuSpec> {
    access(path, mode).map_err(|_| {
        InvalidQemuSpec::new(
            field,
            SpecProblem::Access {
                path: path.to_owned(),
                access: what,
            },
        )
    })
}

/// A path as a value in QEMU's `key=value,...` syntax: commas doubled.
pub(crate) fn opts_path(path: &Path) -> OsString {
    let mut out = Vec::with_capacity(path.as_os_str().len());
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn concat(prefix: &str, middle: OsString, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(middle);
    s.push(suffix);
    s
}

/// The argv for an already checked spec; `disks` from [`check_host`].
pub fn build_args(
    spec: &QemuVmSpec,
    paths: &QemuPaths,
    mode: LaunchMode,
    tools: &QemuTools,
    disks: &[DiskKind],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(64);
    let mut arg = |flag: &str, value: OsString| {
        a.push(flag.into());
        a.push(value);
    };
    arg(
        "-name",
        format!("guest={},debug-threads=on", spec.name).into(),
    );
    arg(
        "-machine",
        format!("{},memory-backend={RAM_BACKEND_ID}", spec.machine).into(),
    );
    arg("-accel", "kvm".into());
    arg("-cpu", spec.cpu.model.clone().into());
    arg("-smp", spec.vcpus.to_string().into());
    arg("-m", format!("{}M", spec.memory.bytes() >> 20).into());
    // memfd, shared: what post-copy needs and what a host can inspect.
    let ram = json!({"qom-type": "memory-backend-memfd", "id": RAM_BACKEND_ID,
                     "size": spec.memory.bytes(), "share": true});
    arg("-object", ram.to_string().into());
    arg("-pidfile", paths.pidfile.clone().into());
    arg("-D", paths.qemu_log.clone().into());
    arg("-msg", "timestamp=on".into());
    arg(
        "-chardev",
        concat(
            "socket,id=qmp,path=",
            opts_path(&paths.qmp_socket),
            ",server=on,wait=off",
        ),
    );
    arg("-mon", "chardev=qmp,mode=control".into());
    arg(
        "-chardev",
        concat(
            "file,id=serial0,path=",
            opts_path(&paths.serial_log),
            ",append=on",
        ),
    );
    arg("-serial", "chardev:serial0".into());
    arg("-display", "none".into());

    let disk_boot = spec.boot.mode() == BootMode::FirstDisk;
    if let BootMode::Kernel {
        kernel,
        initrd,
        cmdline,
    } = spec.boot.mode()
    {
        // These three take their value verbatim (no option syntax).
        arg("-kernel", kernel.into());
        if let Some(initrd) = initrd {
            arg("-initrd", initrd.into());
        }
        if let Some(cmdline) = cmdline {
            arg("-append", cmdline.into());
        }
    }

    let mut ide_port = 0;
    for (i, (disk, kind)) in spec.disks.iter().zip(disks).enumerate() {
        let file_node = format!("disk{i}-file");
        let node = format!("disk{i}");
        // Paths were checked to be UTF-8 by validate().
        let path = disk.path.to_string_lossy();
        let file = json!({"driver": kind.driver(), "node-name": file_node,
                          "filename": path, "read-only": disk.read_only});
        let format = json!({"driver": disk.format.driver(), "node-name": node,
                            "file": file_node, "read-only": disk.read_only});
        arg("-blockdev", file.to_string().into());
        arg("-blockdev", format.to_string().into());
        let mut device = match disk.bus {
            DiskBus::Virtio => json!({"driver": "virtio-blk-pci"}),
            DiskBus::Ide => {
                let port = ide_port;
                ide_port += 1;
                // ide-hd refuses a read-only node; a read-only IDE disk is
                // a CD-ROM to the guest.
                let driver = if disk.read_only { "ide-cd" } else { "ide-hd" };
                json!({"driver": driver, "bus": format!("ide.{port}")})
            }
        };
        device["id"] = format!("disk{i}-dev").into();
        device["drive"] = node.into();
        if disk_boot && i == 0 {
            device["bootindex"] = 1.into();
        }
        arg("-device", device.to_string().into());
    }

    for (i, nic) in spec.nics.iter().enumerate() {
        let netdev = format!("net{i}");
        let helper = tools.bridge_helper.to_string_lossy();
        let tap = json!({"type": "tap", "id": netdev, "br": nic.bridge, "helper": helper});
        arg("-netdev", tap.to_string().into());
        let device = json!({"driver": nic.model.device(), "id": format!("net{i}-dev"),
                            "netdev": netdev,
                            "mac": nic.effective_mac(&spec.name, i).to_string()});
        arg("-device", device.to_string().into());
    }

    let paused = match mode {
        LaunchMode::Start { paused } => paused,
        LaunchMode::Incoming => true,
    };
    a.extend(
        ["-nodefaults", "-no-user-config", "-daemonize"]
            .into_iter()
            .map(OsString::from),
    );
    if paused {
        a.push("-S".into());
    }
    if mode == LaunchMode::Incoming {
        a.extend(["-incoming", "defer"].into_iter().map(OsString::from));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::spec::{DiskFormat, DiskSpec, NicModel, NicSpec};
    use serde_json::Value;

    fn spec(json: &str) -> QemuVmSpec {
        let s: QemuVmSpec = serde_json::from_str(json).unwrap();
        s.validate().unwrap();
        s
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_str().expect("utf-8 argv in tests").to_owned())
            .collect()
    }

    /// The values following each occurrence of `flag`.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn json_values(args: &[String], flag: &str) -> Vec<Value> {
        values(args, flag)
            .into_iter()
            .map(|v| serde_json::from_str(v).unwrap())
            .collect()
    }

    fn build(s: &QemuVmSpec, mode: LaunchMode, kinds: &[DiskKind]) -> Vec<String> {
        let paths = QemuPaths::in_dir(Path::new("/run/migrated/vms/vm1"));
        strings(&build_args(s, &paths, mode, &QemuTools::default(), kinds))
    }

    #[test]
    fn kernel_boot_without_nics() {
        let s = spec(
            r#"{"name": "vm1", "memory": "64Mi", "vcpus": 2,
                "boot": {"kernel": "/k/vmlinuz", "initrd": "/k/initrd", "cmdline": "console=ttyS0 quiet"}}"#,
        );
        let a = build(&s, LaunchMode::Start { paused: false }, &[]);
        assert_eq!(values(&a, "-name"), ["guest=vm1,debug-threads=on"]);
        assert_eq!(values(&a, "-machine"), ["q35,memory-backend=ram0"]);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["64M"]);
        assert_eq!(
            json_values(&a, "-object"),
            [
                serde_json::json!({"qom-type": "memory-backend-memfd", "id": "ram0",
                                "size": 64 << 20, "share": true})
            ]
        );
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/k/initrd"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=qmp,path=/run/migrated/vms/vm1/qmp.sock,server=on,wait=off",
                "file,id=serial0,path=/run/migrated/vms/vm1/serial.log,append=on"
            ]
        );
        assert_eq!(values(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
        assert_eq!(values(&a, "-pidfile"), ["/run/migrated/vms/vm1/qemu.pid"]);
        assert_eq!(values(&a, "-D"), ["/run/migrated/vms/vm1/qemu.log"]);
        for flag in ["-nodefaults", "-no-user-config", "-daemonize"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing");
        }
        for absent in ["-S", "-incoming", "-netdev", "-blockdev", "-device"] {
            assert!(!a.iter().any(|x| x == absent), "{absent} present: {a:?}");
        }
    }

    #[test]
    fn disk_boot_marks_the_first_disk_and_places_ide_disks() {
        let s = spec(
            r#"{"name": "vm1", "memory": "1Gi", "disks": [
                {"path": "/img/root.qcow2", "format": "qcow2"},
                {"path": "/dev/sdb", "bus": "ide"},
                {"path": "/img/tools.iso", "bus": "ide", "readOnly": true}]}"#,
        );
        let a = build(
            &s,
            LaunchMode::Start { paused: true },
            &[DiskKind::File, DiskKind::BlockDevice, DiskKind::File],
        );
        assert!(a.iter().any(|x| x == "-S"));
        assert!(!a.iter().any(|x| x == "-kernel"));
        let nodes = json_values(&a, "-blockdev");
        assert_eq!(nodes.len(), 6);
        assert_eq!(
            nodes[0],
            serde_json::json!({"driver": "file", "node-name": "disk0-file",
                               "filename": "/img/root.qcow2", "read-only": false})
        );
        assert_eq!(
            nodes[1],
            serde_json::json!({"driver": "qcow2", "node-name": "disk0",
                               "file": "disk0-file", "read-only": false})
        );
        assert_eq!(nodes[2]["driver"], "host_device");
        assert_eq!(nodes[3]["driver"], "raw");
        assert_eq!(nodes[5]["read-only"], true);
        let devs = json_values(&a, "-device");
        assert_eq!(
            devs[0],
            serde_json::json!({"driver": "virtio-blk-pci", "id": "disk0-dev",
                               "drive": "disk0", "bootindex": 1})
        );
        assert_eq!(
            devs[1],
            serde_json::json!({"driver": "ide-hd", "id": "disk1-dev",
                               "drive": "disk1", "bus": "ide.0"})
        );
        assert_eq!(devs[2]["driver"], "ide-cd");
        assert_eq!(devs[2]["bus"], "ide.1");
        assert!(devs[2].get("bootindex").is_none());
    }

    #[test]
    fn nics_are_taps_made_by_the_bridge_helper() {
        let mut s = spec(r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k"}}"#);
        s.nics = vec![
            NicSpec {
                bridge: "br0".into(),
                mac: Some("52:54:00:aa:bb:cc".parse().unwrap()),
                model: NicModel::Virtio,
            },
            NicSpec {
                bridge: "br-mig".into(),
                mac: None,
                model: NicModel::E1000e,
            },
        ];
        s.validate().unwrap();
        let a = build(&s, LaunchMode::Start { paused: false }, &[]);
        let netdevs = json_values(&a, "-netdev");
        assert_eq!(
            netdevs[0],
            serde_json::json!({"type": "tap", "id": "net0", "br": "br0",
                               "helper": DEFAULT_BRIDGE_HELPER})
        );
        assert_eq!(netdevs[1]["br"], "br-mig");
        let devs = json_values(&a, "-device");
        assert_eq!(
            devs[0],
            serde_json::json!({"driver": "virtio-net-pci", "id": "net0-dev",
                               "netdev": "net0", "mac": "52:54:00:aa:bb:cc"})
        );
        assert_eq!(devs[1]["driver"], "e1000e");
        assert_eq!(
            devs[1]["mac"],
            s.nics[1].effective_mac("vm1", 1).to_string().as_str()
        );
    }

    #[test]
    fn incoming_waits_for_migrate_incoming_and_stays_paused() {
        let s = spec(r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k"}}"#);
        let start = build(&s, LaunchMode::Start { paused: false }, &[]);
        let incoming = build(&s, LaunchMode::Incoming, &[]);
        assert_eq!(values(&incoming, "-incoming"), ["defer"]);
        assert!(incoming.iter().any(|x| x == "-S"));
        // Otherwise the same machine: migration needs identical devices.
        let strip = |a: &[String]| -> Vec<String> {
            a.iter()
                .filter(|x| !["-S", "-incoming", "defer"].contains(&x.as_str()))
                .cloned()
                .collect()
        };
        assert_eq!(strip(&incoming), strip(&start));
    }

    #[test]
    fn injection_through_paths_stays_inside_json_strings() {
        let evil = "/img/a.raw,file.driver=ssh,x=\"}";
        let mut s = spec(
            r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k,initrd=/etc/shadow"}}"#,
        );
        s.boot.cmdline = Some("quiet -device foo,x=1".into());
        s.disks.push(DiskSpec {
            path: evil.into(),
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            shared: false,
            read_only: false,
        });
        s.validate().unwrap();
        let a = build(&s, LaunchMode::Start { paused: false }, &[DiskKind::File]);
        let nodes = json_values(&a, "-blockdev");
        assert_eq!(nodes[0]["filename"], evil);
        assert_eq!(nodes[0].as_object().unwrap().len(), 4, "{:?}", nodes[0]);
        // Verbatim options: a single argv element each.
        assert_eq!(values(&a, "-kernel"), ["/k,initrd=/etc/shadow"]);
        assert_eq!(values(&a, "-append"), ["quiet -device foo,x=1"]);
        assert_eq!(values(&a, "-device").len(), 1);
        assert!(!a.iter().any(|x| x == "-initrd"));
    }

    #[test]
    fn commas_in_the_state_dir_are_doubled_where_qemu_parses_options() {
        let s = spec(r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k"}}"#);
        let paths = QemuPaths::in_dir(Path::new("/run/a,server=off,path=/x"));
        let a = strings(&build_args(
            &s,
            &paths,
            LaunchMode::Start { paused: false },
            &QemuTools::default(),
            &[],
        ));
        assert_eq!(
            values(&a, "-chardev")[0],
            "socket,id=qmp,path=/run/a,,server=off,,path=/x/qmp.sock,server=on,wait=off"
        );
        // -pidfile and -D take the path verbatim.
        assert_eq!(
            values(&a, "-pidfile"),
            ["/run/a,server=off,path=/x/qemu.pid"]
        );
    }

    #[test]
    fn files_are_checked_before_qemu_starts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let paths = QemuPaths::in_dir(&state);
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let tools = QemuTools::default();
        let start = LaunchMode::Start { paused: true };
        let mut s = spec(r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k"}}"#);
        s.boot.kernel = Some(kernel.clone());
        s.disks.push(DiskSpec {
            path: image.clone(),
            format: DiskFormat::Raw,
            bus: DiskBus::Virtio,
            shared: false,
            read_only: false,
        });
        let args = qemu_command(&s, &paths, start, &tools).unwrap();
        assert!(strings(&args).contains(&kernel.display().to_string()));

        let field = |e: QemuCommandError| match e {
            QemuCommandError::Spec(e) => (e.field.clone(), e.to_string()),
            other => panic!("{other:?}"),
        };
        let mut bad = s.clone();
        bad.disks[0].path = dir.path().join("missing.raw");
        let (f, msg) = field(qemu_command(&bad, &paths, start, &tools).unwrap_err());
        assert_eq!(f, "disks[0].path");
        assert!(
            msg.ends_with("is not accessible (entity not found)"),
            "{msg}"
        );

        bad.disks[0].path = "/dev/null".into();
        let (f, msg) = field(qemu_command(&bad, &paths, start, &tools).unwrap_err());
        assert_eq!(f, "disks[0].path");
        assert!(
            msg.contains("neither a regular file nor a block device"),
            "{msg}"
        );

        let mut bad = s.clone();
        bad.boot.initrd = Some(dir.path().to_owned());
        let (f, msg) = field(qemu_command(&bad, &paths, start, &tools).unwrap_err());
        assert_eq!(f, "boot.initrd");
        assert!(msg.ends_with("is not a regular file"), "{msg}");

        let mut bad = s.clone();
        bad.nics.push(NicSpec {
            bridge: "nosuchbr0".into(),
            mac: None,
            model: NicModel::Virtio,
        });
        let (f, msg) = field(qemu_command(&bad, &paths, start, &tools).unwrap_err());
        assert_eq!(f, "nics[0].bridge");
        assert_eq!(msg, "nics[0].bridge: no bridge nosuchbr0 on this host");

        // Validation runs first.
        let mut bad = s.clone();
        bad.vcpus = 1000;
        assert_eq!(
            field(qemu_command(&bad, &paths, start, &tools).unwrap_err()).0,
            "vcpus"
        );
    }

    #[test]
    fn state_dir_problems() {
        let s = spec(r#"{"name": "vm1", "memory": "64Mi", "boot": {"kernel": "/k"}}"#);
        let start = LaunchMode::Start { paused: true };
        let tools = QemuTools::default();
        let dir = tempfile::tempdir().unwrap();
        let missing = QemuPaths::in_dir(&dir.path().join("nope"));
        assert!(matches!(
            qemu_command(&s, &missing, start, &tools),
            Err(QemuCommandError::StateDir { .. })
        ));
        let percent = QemuPaths::in_dir(&dir.path().join("a%d"));
        assert!(matches!(
            qemu_command(&s, &percent, start, &tools),
            Err(QemuCommandError::StateDirName { .. })
        ));
        let long = dir.path().join("x".repeat(120));
        std::fs::create_dir(&long).unwrap();
        assert!(matches!(
            qemu_command(&s, &QemuPaths::in_dir(&long), start, &tools),
            Err(QemuCommandError::SocketPathTooLong { .. })
        ));
    }
}
