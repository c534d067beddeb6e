//! The default cluster store: no service to run. The cluster is this host
//! and its `[peers]`; both limits are in-process FIFO semaphores, so the
//! cluster limit only counts migrations this host starts (see `mod.rs`).
//! Policies and cordon flags persist under the state directory:
//!
//! ```text
//! <state_dir>/policies/<name>.json   one MigrationPolicy (native JSON form)
//! <state_dir>/cluster/cordoned.json  ["host-a", ...]
//! ```
//!
//! Files are written atomically (temp, fsync, rename, dir fsync). The
//! migration index is in memory: the host's own migration records are
//! the durable copy and the service re-adds them at start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::warn;

use crate::model::{check_name, Timestamp};
use crate::store::write_json_atomic;

use super::fifo::Fifo;
use super::{
    ClusterError, ClusterStore, CordonSet, Health, HostInfo, HostStatus, Limits,
    MigrationIndexEntry, MigrationPolicy, Place, PolicySet, SlotRequest, Ticket,
};

/// Largest policy or cordon file read back.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// See the module docs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: String,
    policies_dir: PathBuf,
    cordon_file: PathBuf,
    peers: BTreeMap<String, String>,
    me: Mutex<Option<(HostStatus, Timestamp)>>,
    outbound: Arc<Fifo>,
    cluster: Arc<Fifo>,
    policies: watch::Sender<PolicySet>,
    cordons: watch::Sender<CordonSet>,
    index: Mutex<BTreeMap<String, MigrationIndexEntry>>,
    /// Serializes file updates so the cache and the files change in the
    /// same order.
    writes: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single assignment or map operation.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file too large"));
    }
    Ok(buf)
}

impl LocalStore {
    /// Opens the store under `state_dir`, loading policies and cordon
    /// flags. A policy file that does not parse is skipped with a warning
    /// (one bad file must not stop the daemon).
    pub fn open(
        state_dir: &Path,
        host: &str,
        peers: &BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<Self, ClusterError> {
        let policies_dir = state_dir.join("policies");
        let cluster_dir = state_dir.join("cluster");
        for dir in [&policies_dir, &cluster_dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let policies = load_policies(&policies_dir)?;
        let cordon_file = cluster_dir.join("cordoned.json");
        let cordoned: BTreeSet<String> = match read_small(&cordon_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ClusterError::Decode {
                key: cordon_file.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(io_err(&cordon_file)(e)),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                host: host.to_owned(),
                policies_dir,
                cordon_file,
                peers: peers.clone(),
                me: Mutex::new(None),
                outbound: Fifo::new(limits.outbound_per_host),
                cluster: Fifo::new(limits.cluster),
                policies: watch::channel(Arc::new(policies)).0,
                cordons: watch::channel(Arc::new(cordoned)).0,
                index: Mutex::new(BTreeMap::new()),
                writes: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Cluster slots held now (running migrations of this host).
    pub fn slots_held(&self) -> usize {
        self.inner.cluster.held()
    }
}

fn load_policies(dir: &Path) -> Result<BTreeMap<String, MigrationPolicy>, ClusterError> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue; // temp files and strays
        };
        if name.starts_with('.') {
            continue;
        }
        let parsed = read_small(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<MigrationPolicy>(&b).map_err(|e| e.to_string()))
            .and_then(|p| p.validate().map(|()| p).map_err(|e| e.to_string()));
        match parsed {
            Ok(p) if p.name == name => {
                out.insert(p.name.clone(), p);
            }
            Ok(p) => {
                warn!(path = %path.display(), found = %p.name, "policy file name does not match the policy; skipped")
            }
            Err(error) => warn!(path = %path.display(), %error, "policy file skipped"),
        }
    }
    Ok(out)
}

/// Writes on a blocking thread: fsync can take milliseconds.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClusterError> + Send + 'static,
) -> Result<T, ClusterError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(ClusterError::Closed))
}

impl ClusterStore for LocalStore {
    fn host_name(&self) -> &str {
        &self.inner.host
    }

    fn health(&self) -> Health {
        Health::Ok
    }

    async fn update_host(&self, status: HostStatus) -> Result<(), ClusterError> {
        *lock(&self.inner.me) = Some((status, Timestamp::now()));
        Ok(())
    }

    async fn hosts(&self) -> Result<Vec<HostInfo>, ClusterError> {
        let cordons = self.inner.cordons.borrow().clone();
        let me = lock(&self.inner.me).clone();
        let mut out: Vec<HostInfo> = self
            .inner
            .peers
            .iter()
            .filter(|(name, _)| **name != self.inner.host)
            .map(|(name, addr)| HostInfo {
                name: name.clone(),
                labels: Default::default(),
                address: addr.clone(),
                free_memory: None,
                capacity: None,
                vms: None,
                cordoned: cordons.contains(name),
                updated: None,
            })
            .collect();
        let (status, updated) = match me {
            Some((s, t)) => (s, Some(t)),
            None => (HostStatus::default(), None),
        };
        out.push(HostInfo {
            name: self.inner.host.clone(),
            labels: status.labels,
            address: status.address,
            free_memory: updated.map(|_| status.free_memory),
            capacity: updated.map(|_| status.capacity),
            vms: updated.map(|_| status.vms),
            cordoned: cordons.contains(&self.inner.host),
            updated,
        });
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn set_cordon(&self, host: &str, cordoned: bool) -> Result<(), ClusterError> {
        check_name("host name", host)?;
        let _w = self.inner.writes.lock().await;
        let mut set = (**self.inner.cordons.borrow()).clone();
        let changed = if cordoned {
            set.insert(host.to_owned())
        } else {
            set.remove(host)
        };
        if !changed {
            return Ok(());
        }
        let path = self.inner.cordon_file.clone();
        let to_write = set.clone();
        blocking(move || write_json_atomic(&path, &to_write).map_err(ClusterError::Save)).await?;
        self.inner.cordons.send_replace(Arc::new(set));
        Ok(())
    }

    fn cordons(&self) -> watch::Receiver<CordonSet> {
        self.inner.cordons.subscribe()
    }

    async fn put_policy(&self, policy: MigrationPolicy) -> Result<(), ClusterError> {
        policy.validate().map_err(ClusterError::InvalidPolicy)?;
        let _w = self.inner.writes.lock().await;
        let path = self
            .inner
            .policies_dir
            .join(format!("{}.json", policy.name));
        let p = policy.clone();
        blocking(move || write_json_atomic(&path, &p).map_err(ClusterError::Save)).await?;
        self.inner.policies.send_modify(|all| {
            Arc::make_mut(all).insert(policy.name.clone(), policy);
        });
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, ClusterError> {
        check_name("policy name", name)?;
        let _w = self.inner.writes.lock().await;
        let dir = self.inner.policies_dir.clone();
        let path = dir.join(format!("{name}.json"));
        let existed = blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_err(&path)(e)),
            }
            // Make the removal durable, like a write.
            fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
            Ok(true)
        })
        .await?;
        self.inner
            .policies
            .send_if_modified(|all| Arc::make_mut(all).remove(name).is_some());
        Ok(existed)
    }

    fn policies(&self) -> watch::Receiver<PolicySet> {
        self.inner.policies.subscribe()
    }

    async fn enqueue(&self, req: SlotRequest) -> Result<Ticket, ClusterError> {
        let outbound = self.inner.outbound.enqueue().wait().await;
        let place = self.inner.cluster.enqueue();
        Ok(Ticket {
            uid: req.uid,
            ahead: place.ahead(),
            _outbound: outbound,
            place: Place::Local(place),
        })
    }

    async fn record_migration(&self, entry: MigrationIndexEntry) -> Result<(), ClusterError> {
        lock(&self.inner.index).insert(entry.uid.clone(), entry);
        Ok(())
    }

    async fn forget_migration(&self, uid: &str) -> Result<bool, ClusterError> {
        Ok(lock(&self.inner.index).remove(uid).is_some())
    }

    async fn migrations(&self) -> Result<Vec<MigrationIndexEntry>, ClusterError> {
        Ok(lock(&self.inner.index).values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::policy::parse_policy;

    fn limits() -> Limits {
        Limits {
            cluster: 2,
            outbound_per_host: 2,
        }
    }

    #[tokio::test]
    async fn policies_and_cordons_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let peers = BTreeMap::from([("b".to_string(), "198.18.0.2:7878".to_string())]);
        let s = LocalStore::open(dir.path(), "a", &peers, limits()).unwrap();
        let mut rx = s.policies();
        s.put_policy(
            parse_policy("name: db\nvmSelector: {tier: db}\nallowPostCopy: true\n").unwrap(),
        )
        .await
        .unwrap();
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().contains_key("db"));
        s.put_policy(parse_policy("name: web\n").unwrap())
            .await
            .unwrap();
        assert!(s.delete_policy("web").await.unwrap());
        assert!(!s.delete_policy("web").await.unwrap());
        s.set_cordon("b", true).await.unwrap();
        // Stray and broken files are skipped, not fatal.
        fs::write(dir.path().join("policies/broken.json"), "{").unwrap();
        drop(s);

        let s = LocalStore::open(dir.path(), "a", &peers, limits()).unwrap();
        let policies = s.policies().borrow().clone();
        assert_eq!(policies.keys().collect::<Vec<_>>(), ["db"]);
        assert_eq!(policies["db"].allow_post_copy, Some(true));
        assert!(s.cordons().borrow().contains("b"));
        let hosts = s.hosts().await.unwrap();
        assert_eq!(hosts.len(), 2);
        assert!(hosts[1].cordoned && !hosts[1].schedulable());
        assert_eq!(hosts[1].address, "198.18.0.2:7878");
        assert!(hosts[0].schedulable() && hosts[0].updated.is_none());
        s.set_cordon("b", false).await.unwrap();
        assert!(s.cordons().borrow().is_empty());
        assert!(s.set_cordon("Not A Host", true).await.is_err());
    }

    #[tokio::test]
    async fn an_invalid_policy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path(), "a", &BTreeMap::new(), limits()).unwrap();
        let bad = MigrationPolicy {
            name: "x".into(),
            vm_selector: [("bad key".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        assert!(matches!(
            s.put_policy(bad).await,
            Err(ClusterError::InvalidPolicy(_))
        ));
        assert!(s.policies().borrow().is_empty());
    }

    #[tokio::test]
    async fn this_host_reports_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path(), "a", &BTreeMap::new(), limits()).unwrap();
        let status = HostStatus {
            labels: [("zone".to_string(), "z1".to_string())].into(),
            address: "198.18.0.1:7878".into(),
            free_memory: crate::quantity::Quantity::mib(512),
            capacity: crate::quantity::Quantity::mib(1024),
            vms: 3,
        };
        s.update_host(status.clone()).await.unwrap();
        let hosts = s.hosts().await.unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].labels, status.labels);
        assert_eq!(hosts[0].vms, Some(3));
        assert_eq!(hosts[0].free_memory, Some(status.free_memory));
    }
}
