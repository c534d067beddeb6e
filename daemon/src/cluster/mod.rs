//! Cluster-wide state behind one interface, [`ClusterStore`]: the hosts
//! (labels, capacity, cordon), migration policies, the migration slots that
//! enforce the cluster limit, and an index of migrations across hosts.
//!
//! Two implementations, picked by `[cluster]` in the config:
//!
//! * [`LocalStore`] (default, no extra service): the cluster is this host
//!   and its `[peers]`. Policies and cordon flags persist under the state
//!   directory. The per-host outbound limit is exact; the cluster limit is
//!   enforced *as this host sees it*, i.e. over the migrations this host
//!   starts, so H hosts may together run up to H times the limit. A fleet
//!   that needs a true cluster-wide limit uses etcd.
//! * [`EtcdStore`] (`[cluster] etcd = {...}`): the same state in etcd
//!   through its v3 JSON gateway; the cluster limit is a lease-backed FIFO
//!   semaphore (see `etcd.rs`), so a crashed host's slots free themselves.
//!
//! Admission takes two slots in order: this host's outbound slot, then a
//! cluster slot. Both queues grant first in, first out. [`ClusterStore::enqueue`]
//! returns once a migration has its place in the cluster queue (so its
//! position can be shown while it is Pending); [`Ticket::granted`] waits for
//! the slot. Dropping a ticket or a permit gives the place back.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::MigrationDefaults;
use crate::model::{InvalidNameError, MigrationPhase, Timestamp};
use crate::quantity::Quantity;

mod etcd;
mod fifo;
mod local;
pub mod policy;
pub mod testing;

pub use etcd::gateway::GatewayError;
pub use etcd::{EtcdConfig, EtcdOptions, EtcdStore};
pub use local::LocalStore;
pub use policy::{effective, parse_policies, parse_policy, select_policy, MigrationPolicy};

use fifo::{FifoPermit, FifoTicket};

/// Label key -> value, on VMs, hosts and in selectors.
pub type Labels = BTreeMap<String, String>;

/// Policies by name, as a store's cache holds them.
pub type PolicySet = Arc<BTreeMap<String, MigrationPolicy>>;

/// Names of cordoned hosts.
pub type CordonSet = Arc<BTreeSet<String>>;

/// `[cluster]` in the config file. Empty (the default) = [`LocalStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub etcd: Option<EtcdConfig>,
}

/// The two slot limits (KubeVirt's `parallelMigrationsPerCluster` and
/// `parallelOutboundMigrationsPerNode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub cluster: u32,
    pub outbound_per_host: u32,
}

impl Limits {
    pub fn from_defaults(d: &MigrationDefaults) -> Self {
        Self {
            cluster: d.parallel_migrations_per_cluster,
            outbound_per_host: d.parallel_outbound_migrations_per_node,
        }
    }
}

/// What this host reports about itself (re-sent whenever it changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    #[serde(default)]
    pub labels: Labels,
    /// Where peers reach its migration listener ("host:port").
    pub address: String,
    pub free_memory: Quantity,
    pub capacity: Quantity,
    pub vms: u32,
}

/// One host as the cluster knows it. The `Option` fields are `None` for a
/// host that never reported (a `[peers]` entry of the local store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    pub name: String,
    pub labels: Labels,
    pub address: String,
    pub free_memory: Option<Quantity>,
    pub capacity: Option<Quantity>,
    pub vms: Option<u32>,
    /// Cordoned hosts take no new migrations (their VMs can still leave).
    pub cordoned: bool,
    pub updated: Option<Timestamp>,
}

impl HostInfo {
    pub fn schedulable(&self) -> bool {
        !self.cordoned
    }
}

/// One migration in the cluster-wide index (the full record stays on the
/// hosts that ran it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationIndexEntry {
    pub uid: String,
    pub name: String,
    pub vm: String,
    pub source_host: String,
    pub target_host: String,
    pub phase: MigrationPhase,
    pub updated: Timestamp,
}

/// A migration asking for a slot; this host is its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotRequest {
    pub uid: String,
    pub vm: String,
    pub target_host: String,
}

/// Whether the store can admit migrations now.
#[derive(Clone, Debug)]
pub enum Health {
    Ok,
    /// etcd has not answered since `since`; running migrations go on, new
    /// ones are refused.
    Unavailable {
        since: Timestamp,
        error: Arc<GatewayError>,
    },
}

impl Health {
    pub fn is_ok(&self) -> bool {
        matches!(self, Health::Ok)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Ok => f.write_str("ok"),
            Health::Unavailable { since, error } => write!(
                f,
                "etcd unreachable since {since}: {}",
                crate::error_chain(error.as_ref())
            ),
        }
    }
}

/// A cluster store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd is (or was just found) unreachable: nothing new is admitted.
    #[error("etcd unreachable since {since}")]
    Unavailable {
        since: Timestamp,
        #[source]
        source: Arc<GatewayError>,
    },
    #[error("etcd {op} failed")]
    Etcd {
        op: &'static str,
        #[source]
        source: GatewayError,
    },
    /// The host's lease expired (etcd lost it or it was revoked), taking
    /// its queue places with it.
    #[error("this host's etcd lease expired while migration {uid} was queued")]
    LeaseLost { uid: String },
    #[error("migration {uid} already has a place in the queue")]
    AlreadyQueued { uid: String },
    #[error("stored value {key} does not parse")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot save cluster state")]
    Save(#[source] crate::store::SaveRecordError),
    #[error("cannot update {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy refused")]
    InvalidPolicy(#[source] policy::InvalidPolicyError),
    #[error(transparent)]
    InvalidName(#[from] InvalidNameError),
    #[error("the cluster store was shut down")]
    Closed,
}

/// The cluster-wide state, whichever store keeps it. Reads of policies and
/// cordon flags come from a cache kept current by the store (a watch on
/// etcd, or the local files), so admission does not wait on the network.
pub trait ClusterStore: Send + Sync {
    /// This host's name.
    fn host_name(&self) -> &str;

    /// Whether new migrations can be admitted; says why not.
    fn health(&self) -> Health;

    /// Publishes this host's labels, address, capacity and VM count.
    fn update_host(
        &self,
        status: HostStatus,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Every known host, by name.
    fn hosts(&self) -> impl Future<Output = Result<Vec<HostInfo>, ClusterError>> + Send;

    /// Cordons (`true`) or uncordons a host; persists.
    fn set_cordon(
        &self,
        host: &str,
        cordoned: bool,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Cordoned hosts, kept current; `changed()` fires on every change.
    fn cordons(&self) -> watch::Receiver<CordonSet>;

    /// Adds or replaces a policy (it is validated first).
    fn put_policy(
        &self,
        policy: MigrationPolicy,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Removes a policy; `false` if there was none by that name.
    fn delete_policy(&self, name: &str) -> impl Future<Output = Result<bool, ClusterError>> + Send;

    /// Policies, kept current; `changed()` fires on every change.
    fn policies(&self) -> watch::Receiver<PolicySet>;

    /// Takes this host's outbound slot (waiting FIFO behind this host's
    /// earlier migrations) and then a place in the cluster queue. Refused
    /// at once if the store is unhealthy. Cancel-safe.
    fn enqueue(
        &self,
        req: SlotRequest,
    ) -> impl Future<Output = Result<Ticket, ClusterError>> + Send;

    /// [`enqueue`](Self::enqueue), then waits for the cluster slot.
    fn acquire(
        &self,
        req: SlotRequest,
    ) -> impl Future<Output = Result<Permit, ClusterError>> + Send {
        async move { self.enqueue(req).await?.granted().await }
    }

    /// Adds or updates a migration in the index.
    fn record_migration(
        &self,
        entry: MigrationIndexEntry,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;

    /// Removes a migration from the index; `false` if it was not there.
    fn forget_migration(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<bool, ClusterError>> + Send;

    /// The whole index.
    fn migrations(
        &self,
    ) -> impl Future<Output = Result<Vec<MigrationIndexEntry>, ClusterError>> + Send;
}

/// A place in the cluster queue (this host's outbound slot is held).
/// Dropping it gives the place back.
#[derive(Debug)]
pub struct Ticket {
    uid: String,
    ahead: usize,
    _outbound: FifoPermit,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Local(FifoTicket),
    Etcd(etcd::QueueKey),
}

impl Ticket {
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Migrations (running or queued) that were ahead in the cluster queue
    /// when this one joined it.
    pub fn ahead_at_enqueue(&self) -> usize {
        self.ahead
    }

    /// Waits for the cluster slot. Cancel-safe: dropping the future drops
    /// the ticket.
    pub async fn granted(self) -> Result<Permit, ClusterError> {
        let Ticket {
            uid,
            _outbound,
            place,
            ..
        } = self;
        let slot = match place {
            Place::Local(t) => Slot::Local {
                _held: t.wait().await,
            },
            Place::Etcd(key) => Slot::Etcd(etcd::wait_for_slot(key, &uid).await?),
        };
        Ok(Permit {
            uid,
            _outbound,
            slot,
        })
    }
}

/// A held migration slot (outbound and cluster). Dropping it releases both;
/// [`Permit::release`] does the same and reports whether etcd took it.
#[derive(Debug)]
pub struct Permit {
    uid: String,
    _outbound: FifoPermit,
    slot: Slot,
}

#[derive(Debug)]
enum Slot {
    /// Held for its `Drop`, which frees the slot.
    Local {
        _held: FifoPermit,
    },
    Etcd(etcd::QueueKey),
}

impl Permit {
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Releases the slot now. If etcd cannot be reached the key is deleted
    /// later (or expires with the lease); the error says so.
    pub async fn release(self) -> Result<(), ClusterError> {
        match self.slot {
            Slot::Local { .. } => Ok(()),
            Slot::Etcd(key) => key.release().await,
        }
    }
}

/// The store this daemon runs with: what the service holds.
#[derive(Clone, Debug)]
pub enum Cluster {
    Local(LocalStore),
    Etcd(EtcdStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Cluster::Local($s) => $e,
            Cluster::Etcd($s) => $e,
        }
    };
}

impl ClusterStore for Cluster {
    fn host_name(&self) -> &str {
        delegate!(self, s => s.host_name())
    }
    fn health(&self) -> Health {
        delegate!(self, s => s.health())
    }
    async fn update_host(&self, status: HostStatus) -> Result<(), ClusterError> {
        delegate!(self, s => s.update_host(status).await)
    }
    async fn hosts(&self) -> Result<Vec<HostInfo>, ClusterError> {
        delegate!(self, s => s.hosts().await)
    }
    async fn set_cordon(&self, host: &str, cordoned: bool) -> Result<(), ClusterError> {
        delegate!(self, s => s.set_cordon(host, cordoned).await)
    }
    fn cordons(&self) -> watch::Receiver<CordonSet> {
        delegate!(self, s => s.cordons())
    }
    async fn put_policy(&self, policy: MigrationPolicy) -> Result<(), ClusterError> {
        delegate!(self, s => s.put_policy(policy).await)
    }
    async fn delete_policy(&self, name: &str) -> Result<bool, ClusterError> {
        delegate!(self, s => s.delete_policy(name).await)
    }
    fn policies(&self) -> watch::Receiver<PolicySet> {
        delegate!(self, s => s.policies())
    }
    async fn enqueue(&self, req: SlotRequest) -> Result<Ticket, ClusterError> {
        delegate!(self, s => s.enqueue(req).await)
    }
    async fn record_migration(&self, entry: MigrationIndexEntry) -> Result<(), ClusterError> {
        delegate!(self, s => s.record_migration(entry).await)
    }
    async fn forget_migration(&self, uid: &str) -> Result<bool, ClusterError> {
        delegate!(self, s => s.forget_migration(uid).await)
    }
    async fn migrations(&self) -> Result<Vec<MigrationIndexEntry>, ClusterError> {
        delegate!(self, s => s.migrations().await)
    }
}

impl Cluster {
    /// Opens the store `config` asks for. The etcd store starts even if
    /// etcd is down (it reports that in [`ClusterStore::health`] and keeps
    /// trying); only a bad config (endpoints, certificates) fails here.
    pub async fn open(
        config: &ClusterConfig,
        state_dir: &std::path::Path,
        host: &str,
        peers: &BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<Self, ClusterError> {
        match &config.etcd {
            None => Ok(Cluster::Local(LocalStore::open(
                state_dir, host, peers, limits,
            )?)),
            Some(etcd) => Ok(Cluster::Etcd(
                EtcdStore::connect(etcd, EtcdOptions::new(host, limits)).await?,
            )),
        }
    }

    /// Gives this host's slots and registration back (etcd: revokes the
    /// lease) and stops background work.
    pub async fn shutdown(self) {
        if let Cluster::Etcd(s) = self {
            s.shutdown().await;
        }
    }
}
