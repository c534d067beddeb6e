//! Persistence under the state directory, one JSON file per object:
//!
//! ```text
//! <state_dir>/vms/<vm>/vm.json          VmRecord (spec + what the daemon last knew)
//! <state_dir>/vms/<vm>/control.sock     the VMM's control socket
//! <state_dir>/vms/<vm>/{serial,vmm}.log guest serial output, VMM stderr
//! <state_dir>/migrations/<name>.json    MigrationRecord
//! ```
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the directory), so
//! a crash leaves either the old or the new version, never a torn file.
//! Loading skips leftover temp files and reports files that do not parse
//! instead of refusing to start: one bad record must not take every VM's
//! supervision down with it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{check_name, MigrationRecord, Timestamp, VmSpec};

/// Largest record file read back; records are a few KiB.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;
const TMP_PREFIX: &str = ".tmp-";

/// What the daemon wants a VM to be doing; decides what a restart does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    Running,
    Stopped,
}

/// A VM as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: DesiredState,
    /// The VMM's pid when last started by this host (for display only: a
    /// pid can be reused, so the control socket is what identifies a VMM).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Why the VM last failed, if it did.
    #[serde(default)]
    pub failure: Option<String>,
    pub created: Timestamp,
}

/// Files of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub record: PathBuf,
    pub control_socket: PathBuf,
    pub serial_log: PathBuf,
    pub vmm_log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SaveRecordError {
    #[error("cannot serialize record {path}")]
    Serialize {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadRecordError {
    #[error("cannot read record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("record {path} does not parse")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {path} is for {found:?}, not {expected:?}")]
    NameMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ListRecordsError {
    #[error("cannot list {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteRecordError {
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a load found: the good records and the files that were skipped.
#[derive(Debug)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    pub skipped: Vec<LoadRecordError>,
}

/// The state directory. Cheap to clone: it is just paths.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating with mode 0700) the state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, OpenStoreError> {
        let root = root.into();
        for dir in [root.clone(), root.join("vms"), root.join("migrations")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| OpenStoreError::CreateDir { path: dir, source })?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Paths of VM `name` (which must already be a checked DNS label).
    pub fn vm_paths(&self, name: &str) -> VmPaths {
        let dir = self.root.join("vms").join(name);
        VmPaths {
            record: dir.join("vm.json"),
            control_socket: dir.join("control.sock"),
            serial_log: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
            dir,
        }
    }

    fn migration_path(&self, name: &str) -> PathBuf {
        self.root.join("migrations").join(format!("{name}.json"))
    }

    pub fn save_vm(&self, rec: &VmRecord) -> Result<(), SaveRecordError> {
        let paths = self.vm_paths(&rec.spec.name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.dir)
            .map_err(|source| SaveRecordError::Write {
                path: paths.dir.clone(),
                source,
            })?;
        write_json_atomic(&paths.record, rec)
    }

    /// Every VM record; a VM directory without a readable record is skipped
    /// and reported.
    pub fn load_vms(&self) -> Result<Loaded<VmRecord>, ListRecordsError> {
        let dir = self.root.join("vms");
        let mut out = Loaded {
            records: Vec::new(),
            skipped: Vec::new(),
        };
        for name in list_dir(&dir)? {
            if check_name("vm name", &name).is_err() {
                continue;
            }
            let path = dir.join(&name).join("vm.json");
            match read_json::<VmRecord>(&path) {
                Ok(rec) if rec.spec.name == name => out.records.push(rec),
                Ok(rec) => out.skipped.push(LoadRecordError::NameMismatch {
                    path,
                    expected: name,
                    found: rec.spec.name,
                }),
                Err(e) => out.skipped.push(e),
            }
        }
        Ok(out)
    }

    /// Removes the VM's directory with everything in it.
    pub fn delete_vm(&self, name: &str) -> Result<(), DeleteRecordError> {
        let dir = self.vm_paths(name).dir;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DeleteRecordError::Remove { path: dir, source }),
        }
    }

    pub fn save_migration(&self, rec: &MigrationRecord) -> Result<(), SaveRecordError> {
        write_json_atomic(&self.migration_path(&rec.name), rec)
    }

    pub fn load_migrations(&self) -> Result<Loaded<MigrationRecord>, ListRecordsError> {
        let dir = self.root.join("migrations");
        let mut out = Loaded {
            records: Vec::new(),
            skipped: Vec::new(),
        };
        for file in list_dir(&dir)? {
            let Some(stem) = file.strip_suffix(".json") else {
                continue;
            };
            let path = dir.join(&file);
            match read_json::<MigrationRecord>(&path) {
                Ok(rec) if rec.name == stem => out.records.push(rec),
                Ok(rec) => out.skipped.push(LoadRecordError::NameMismatch {
                    path,
                    expected: stem.into(),
                    found: rec.name,
                }),
                Err(e) => out.skipped.push(e),
            }
        }
        out.records.sort_by_key(|r| r.creation_timestamp);
        Ok(out)
    }
}

/// Entry names in `dir`, sorted; leftover temp files are removed, since
/// they are writes that never reached their rename.
fn list_dir(dir: &Path) -> Result<Vec<String>, ListRecordsError> {
    let err = |source| ListRecordsError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with(TMP_PREFIX) {
            let _ = fs::remove_file(entry.path());
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadRecordError> {
    let read_err = |source| LoadRecordError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut buf = Vec::new();
    // Read at most one byte past the cap, so an oversized file is detected
    // without reading (or allocating) all of it.
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(LoadRecordError::TooLarge {
            path: path.to_owned(),
            max: MAX_RECORD_BYTES,
        });
    }
    serde_json::from_slice(&buf).map_err(|source| LoadRecordError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Distinguishes temp files of concurrent writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `value` to `path` so that readers (and a crash) see either the
/// old file or the complete new one.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), SaveRecordError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| SaveRecordError::Serialize {
            path: path.to_owned(),
            source,
        })?;
    bytes.push(b'\n');
    let write_err = |source| SaveRecordError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}-{}-{file_name}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        // Data must be on disk before the rename makes it visible, or a
        // crash could leave the new name pointing at an empty file.
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // And the rename itself must be durable.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MigrationPhase, Quantity, WorkloadSpec};
    use std::collections::BTreeMap;

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                labels: BTreeMap::from([("tier".into(), "db".into())]),
                memory: Quantity(256 << 20),
                vcpus: 2,
                workload: WorkloadSpec::default(),
            },
            desired: DesiredState::Running,
            pid: Some(1234),
            failure: None,
            created: Timestamp::now(),
        }
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn vm_records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("state")).unwrap();
        let a = vm("a");
        let mut b = vm("b");
        b.desired = DesiredState::Stopped;
        b.failure = Some("vmm exited".into());
        store.save_vm(&a).unwrap();
        store.save_vm(&b).unwrap();
        // A fresh store over the same directory sees the same records, the
        // way a restarted daemon does.
        let loaded = Store::open(tmp.path().join("state"))
            .unwrap()
            .load_vms()
            .unwrap();
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.records, vec![a, b.clone()]);
        store.delete_vm("a").unwrap();
        assert_eq!(store.load_vms().unwrap().records, vec![b]);
        // Deleting twice is fine.
        store.delete_vm("a").unwrap();
    }

    #[test]
    fn migration_records_round_trip_and_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let mut r = MigrationRecord::new_pending("a", "h1", "h2", "h2:7878");
        store.save_migration(&r).unwrap();
        r.phase = MigrationPhase::Running;
        r.bytes_sent = 42;
        store.save_migration(&r).unwrap();
        let loaded = store.load_migrations().unwrap();
        assert_eq!(loaded.records, vec![r]);
        // Only the record itself is left: no temp files.
        assert_eq!(dir_entries(&tmp.path().join("migrations")).len(), 1);
    }

    #[test]
    fn interrupted_write_leaves_the_old_version() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let a = vm("a");
        store.save_vm(&a).unwrap();
        // What a crash between create and rename leaves behind: a partial
        // temp file next to the record.
        let dir = store.vm_paths("a").dir;
        fs::write(dir.join(format!("{TMP_PREFIX}99-0-vm.json")), b"{\"spec\":").unwrap();
        let mig_dir = tmp.path().join("migrations");
        fs::write(mig_dir.join(format!("{TMP_PREFIX}99-1-x.json")), b"{").unwrap();
        let loaded = store.load_vms().unwrap();
        assert_eq!(loaded.records, vec![a]);
        assert!(loaded.skipped.is_empty());
        let migs = store.load_migrations().unwrap();
        assert!(migs.records.is_empty() && migs.skipped.is_empty());
        // The leftover in the migrations directory was cleaned up.
        assert!(dir_entries(&mig_dir).is_empty());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let a = vm("a");
        store.save_vm(&a).unwrap();
        let before = fs::read(store.vm_paths("a").record).unwrap();
        // Make the rename target a non-empty directory: the write fails
        // after the temp file is written, like a full disk at rename time.
        let target = tmp.path().join("blocked.json");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(matches!(
            write_json_atomic(&target, &a),
            Err(SaveRecordError::Write { .. })
        ));
        assert_eq!(
            dir_entries(tmp.path()),
            vec!["blocked.json", "migrations", "vms"]
        );
        // The original record is untouched by the failed write elsewhere.
        assert_eq!(fs::read(store.vm_paths("a").record).unwrap(), before);
    }

    #[test]
    fn bad_files_are_skipped_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.save_vm(&vm("good")).unwrap();
        let bad = store.vm_paths("bad");
        fs::create_dir_all(&bad.dir).unwrap();
        fs::write(&bad.record, b"not json").unwrap();
        let big = store.vm_paths("big");
        fs::create_dir_all(&big.dir).unwrap();
        fs::write(&big.record, vec![b' '; (MAX_RECORD_BYTES + 1) as usize]).unwrap();
        let other = store.vm_paths("other");
        fs::create_dir_all(&other.dir).unwrap();
        write_json_atomic(&other.record, &vm("good")).unwrap();
        let loaded = store.load_vms().unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.records[0].spec.name, "good");
        assert_eq!(loaded.skipped.len(), 3);
        assert!(matches!(loaded.skipped[0], LoadRecordError::Parse { .. }));
        assert!(matches!(
            loaded.skipped[1],
            LoadRecordError::TooLarge { .. }
        ));
        assert!(matches!(
            loaded.skipped[2],
            LoadRecordError::NameMismatch { .. }
        ));
    }
}
