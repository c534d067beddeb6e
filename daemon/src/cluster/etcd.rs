//! The cluster store in etcd (v3 API, through its JSON gateway: see
//! `etcd/gateway.rs`). Keys, under a prefix (default `/migrated/`):
//!
//! ```text
//! hosts/<host>        HostRecord (JSON), attached to the host's lease
//! cordon/<host>       present = cordoned (operator intent: no lease)
//! policies/<name>     MigrationPolicy (native JSON form)
//! queue/<uid>         QueueEntry, attached to the source host's lease
//! migrations/<uid>    MigrationIndexEntry
//! ```
//!
//! **The cluster limit** is a FIFO semaphore made of a revision-ordered
//! queue. A migration joins by creating `queue/<uid>` (txn: only if absent)
//! with its host's lease; etcd gives the key a `create_revision`, which is
//! its place in line. It holds a slot while fewer than N queue keys have a
//! smaller `create_revision`; it keeps the key while it runs and deletes it
//! to release. So grants follow arrival order exactly: a later arrival can
//! never pass an earlier one, and a holder is just the head of the line. A
//! waiter re-checks only when a queue key is deleted, which it learns from
//! a watch started at the revision of its last check (no polling, no
//! missed release). N fixed slot keys (`slots/0..N-1`, taken with a
//! `create_revision == 0` compare) were the alternative; they give no
//! order among waiters (whoever retries first wins), hence the queue.
//! Joining is one txn (the put plus a range of the queue sorted by create
//! revision), so an uncontended acquire is one round trip and one raft
//! write, and a release one more. N is each host's own configured limit:
//! hosts must agree on it (a host with a larger N lets its own waiters in
//! earlier, never others').
//!
//! **Crashes**: the host lease (TTL 10 s, kept alive every TTL/3) carries
//! the host's registration and its queue keys, so a dead host's slots and
//! registration vanish when the lease expires. Dropping a ticket or permit
//! deletes its key in the background (retried until etcd takes it).
//!
//! **etcd unreachable**: running migrations keep their permits and go on;
//! [`ClusterStore::health`] says `etcd unreachable since ...: <error>` and
//! new admissions fail at once with that error. When etcd answers again
//! the keepalive task re-grants a lease if the old one expired and
//! re-registers the host; the watches resume from their last revision.
//! Permits whose keys expired meanwhile are gone from the queue, so for a
//! while the cluster can run more than N migrations: correctness of the
//! migrations does not depend on the limit, only load does.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::model::{check_name, Timestamp};

use super::fifo::Fifo;
use super::{
    ClusterError, ClusterStore, CordonSet, Health, HostInfo, HostStatus, Limits,
    MigrationIndexEntry, MigrationPolicy, Place, PolicySet, SlotRequest, Ticket,
};

pub(crate) mod gateway;
mod mirror;
mod wire;

use mirror::{load, mirror_loop, Kind};

use gateway::{
    prefix_end, Compare, DeleteRangeRequest, EventType, Gateway, GatewayError, PutRequest,
    RangeRequest, RequestOp, TlsFiles, TxnRequest, WatchCreateRequest, WatchStream,
};

/// `[cluster] etcd = { endpoints = [...], ca = ..., cert = ..., key = ... }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port` (bare `host:port` is
    /// https when `ca` is set).
    pub endpoints: Vec<String>,
    /// CA that signed etcd's server certificate (PEM); enables TLS.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// How this host uses etcd (not in the config file: tests tune them).
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub host: String,
    pub limits: Limits,
    /// Lease TTL; a crashed host's slots free this long after it died.
    pub lease_ttl: Duration,
    /// Bound on connecting and on each request.
    pub request_timeout: Duration,
    /// Key prefix, ending in '/': several clusters can share one etcd.
    pub prefix: String,
}

impl EtcdOptions {
    pub fn new(host: &str, limits: Limits) -> Self {
        Self {
            host: host.into(),
            limits,
            lease_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            prefix: "/migrated/".into(),
        }
    }
}

/// What `hosts/<host>` holds.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HostRecord {
    #[serde(flatten)]
    status: HostStatus,
    updated: Timestamp,
}

/// What `queue/<uid>` holds (for people reading etcd, and the API later).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueueEntry {
    uid: String,
    vm: String,
    source_host: String,
    target_host: String,
    queued: Timestamp,
}

/// See the module docs. Cheap to clone; background tasks stop when the
/// last clone is dropped (the lease then expires) or at [`Self::shutdown`].
#[derive(Clone, Debug)]
pub struct EtcdStore {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

#[derive(Debug)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    gw: Gateway,
    host: String,
    prefix: String,
    limits: Limits,
    lease_ttl: Duration,
    outbound: Arc<Fifo>,
    /// Current lease id; 0 = none (never granted, or expired).
    lease: Mutex<i64>,
    health: watch::Sender<Health>,
    /// Last status this host reported; re-put under every new lease.
    status: Mutex<Option<HostStatus>>,
    policies: watch::Sender<PolicySet>,
    cordons: watch::Sender<CordonSet>,
    /// Highest revision each mirror has applied (read-your-writes).
    policies_rev: watch::Sender<i64>,
    cordons_rev: watch::Sender<i64>,
    /// Queue keys whose deletion is owed (dropped tickets and permits).
    releases: Mutex<Vec<Vec<u8>>>,
    release_wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is one read or assignment: never half-done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn key(&self, kind: &str, name: &str) -> Vec<u8> {
        format!("{}{kind}/{name}", self.prefix).into_bytes()
    }

    fn range_of(&self, kind: &str) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(kind, "");
        let end = prefix_end(&start);
        (start, end)
    }

    fn mark_down(&self, error: Arc<GatewayError>) -> Timestamp {
        let mut since = Timestamp::now();
        self.health.send_modify(|h| {
            match &*h {
                Health::Unavailable { since: s, .. } => since = *s,
                Health::Ok => {
                    warn!(error = %crate::error_chain(error.as_ref()), "etcd unreachable; admitting no new migrations");
                }
            }
            *h = Health::Unavailable { since, error };
        });
        since
    }

    fn mark_up(&self) {
        self.health.send_if_modified(|h| {
            if h.is_ok() {
                return false;
            }
            info!("etcd reachable again");
            *h = Health::Ok;
            true
        });
    }

    /// Turns a gateway failure into a store error; an unreachable etcd
    /// also marks the store unhealthy.
    fn fail(&self, op: &'static str, e: GatewayError) -> ClusterError {
        if e.is_unreachable() {
            let source = Arc::new(e);
            let since = self.mark_down(source.clone());
            ClusterError::Unavailable { since, source }
        } else {
            ClusterError::Etcd { op, source: e }
        }
    }

    fn check_up(&self) -> Result<(), ClusterError> {
        match &*self.health.borrow() {
            Health::Ok => Ok(()),
            Health::Unavailable { since, error } => Err(ClusterError::Unavailable {
                since: *since,
                source: error.clone(),
            }),
        }
    }

    async fn range(&self, r: &RangeRequest) -> Result<gateway::RangeResponse, ClusterError> {
        self.gw.range(r).await.map_err(|e| self.fail("range", e))
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Result<i64, ClusterError> {
        let r = self.gw.put(&PutRequest { key, value, lease }).await;
        Ok(r.map_err(|e| self.fail("put", e))?.header.revision)
    }

    /// Deletes `key`; the revision of the delete if there was a key.
    async fn delete(&self, key: Vec<u8>) -> Result<Option<i64>, ClusterError> {
        let r = self
            .gw
            .delete_range(&DeleteRangeRequest {
                key,
                range_end: Vec::new(),
            })
            .await
            .map_err(|e| self.fail("delete", e))?;
        Ok((r.deleted > 0).then_some(r.header.revision))
    }

    async fn put_host_record(&self) -> Result<(), ClusterError> {
        let Some(status) = lock(&self.status).clone() else {
            return Ok(());
        };
        let lease = *lock(&self.lease);
        let record = HostRecord {
            status,
            updated: Timestamp::now(),
        };
        let value = serde_json::to_vec(&record).expect("host records serialize");
        self.put(self.key("hosts", &self.host), value, lease)
            .await?;
        Ok(())
    }

    /// One keepalive round: renew the lease, or get a new one (and
    /// re-register) if it is gone.
    async fn tick(&self) -> Result<(), ClusterError> {
        let lease = *lock(&self.lease);
        if lease != 0 {
            let ttl = self
                .gw
                .lease_keepalive(lease)
                .await
                .map_err(|e| self.fail("lease keepalive", e))?;
            if ttl > 0 {
                return Ok(());
            }
            warn!(
                lease,
                "etcd lease expired; this host's queue places are gone"
            );
            *lock(&self.lease) = 0;
        }
        let (id, ttl) = self
            .gw
            .lease_grant(self.lease_ttl.as_secs().max(1) as i64)
            .await
            .map_err(|e| self.fail("lease grant", e))?;
        debug!(lease = id, ttl, "etcd lease granted");
        *lock(&self.lease) = id;
        self.put_host_record().await
    }

    /// [`Self::tick`], with its outcome recorded in the health: any
    /// failure to keep the lease means admission must stop.
    async fn tick_noted(&self) -> bool {
        match self.tick().await {
            Ok(()) => {
                self.mark_up();
                true
            }
            Err(ClusterError::Etcd { source, .. }) => {
                self.mark_down(Arc::new(source));
                false
            }
            Err(_) => false,
        }
    }

    fn release_later(&self, key: Vec<u8>) {
        lock(&self.releases).push(key);
        self.release_wake.notify_one();
    }

    /// Waits until the `kind` mirror has applied revision `rev`, so a
    /// write is visible in this store's own cache when the call returns.
    /// Bounded: a disconnected mirror catches up on its own later.
    async fn await_mirror(&self, kind: Kind, rev: i64) {
        let mut rx = kind.seen(self).subscribe();
        let wait = rx.wait_for(|seen| *seen >= rev);
        if tokio::time::timeout(self.gw_timeout(), wait).await.is_err() {
            debug!(rev, "mirror has not caught up with our own write yet");
        }
    }

    fn gw_timeout(&self) -> Duration {
        self.lease_ttl.min(Duration::from_secs(5))
    }
}

impl EtcdStore {
    /// Sets up the client and the background tasks. Fails only on a bad
    /// config; if etcd is down the store starts unhealthy and keeps trying.
    pub async fn connect(config: &EtcdConfig, opts: EtcdOptions) -> Result<Self, ClusterError> {
        let tls = TlsFiles {
            ca: config.ca.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
        };
        let gw = Gateway::new(&config.endpoints, &tls, opts.request_timeout).map_err(|source| {
            ClusterError::Etcd {
                op: "setup",
                source,
            }
        })?;
        let mut prefix = opts.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let inner = Arc::new(Inner {
            gw,
            host: opts.host.clone(),
            prefix,
            limits: opts.limits,
            lease_ttl: opts.lease_ttl,
            outbound: Fifo::new(opts.limits.outbound_per_host),
            lease: Mutex::new(0),
            health: watch::channel(Health::Ok).0,
            status: Mutex::new(None),
            policies: watch::channel(PolicySet::default()).0,
            cordons: watch::channel(CordonSet::default()).0,
            policies_rev: watch::channel(0).0,
            cordons_rev: watch::channel(0).0,
            releases: Mutex::new(Vec::new()),
            release_wake: Notify::new(),
        });
        let healthy = inner.tick_noted().await;
        let mut tasks = vec![
            tokio::spawn(keepalive_loop(inner.clone())),
            tokio::spawn(release_loop(inner.clone())),
        ];
        for kind in [Kind::Policies, Kind::Cordons] {
            // Load before returning, so the first admission sees them.
            let start = if healthy {
                load(&inner, kind).await.ok()
            } else {
                None
            };
            tasks.push(tokio::spawn(mirror_loop(inner.clone(), kind, start)));
        }
        Ok(Self {
            inner,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Revokes the lease (freeing this host's slots and registration at
    /// once) and stops the background tasks.
    pub async fn shutdown(self) {
        for t in &self._tasks.0 {
            t.abort();
        }
        let lease = std::mem::take(&mut *lock(&self.inner.lease));
        if lease != 0 {
            if let Err(e) = self.inner.gw.lease_revoke(lease).await {
                warn!(error = %crate::error_chain(&e), "cannot revoke the etcd lease; it will expire");
            }
        }
    }

    /// Health, with a notification on every change (`wait_for(is_ok)`).
    pub fn health_watch(&self) -> watch::Receiver<Health> {
        self.inner.health.subscribe()
    }

    /// The lease this host's keys are attached to (0 = none now).
    pub fn lease_id(&self) -> i64 {
        *lock(&self.inner.lease)
    }

    /// Queue keys (holders first, then waiters) in order, as `(uid, host)`.
    pub async fn queue(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let r = self.inner.range(&queue_range(&self.inner, false)).await?;
        Ok(r.kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<QueueEntry>(&kv.value).ok())
            .map(|e| (e.uid, e.source_host))
            .collect())
    }
}

async fn keepalive_loop(inner: Arc<Inner>) {
    let period = inner.lease_ttl / 3;
    let retry = period.min(Duration::from_secs(1));
    loop {
        let wait = if inner.tick_noted().await {
            if !lock(&inner.releases).is_empty() {
                inner.release_wake.notify_one();
            }
            period
        } else {
            retry
        };
        tokio::time::sleep(wait).await;
    }
}

/// Deletes the queue keys of dropped tickets and permits; what fails is
/// retried after the next successful keepalive.
async fn release_loop(inner: Arc<Inner>) {
    loop {
        inner.release_wake.notified().await;
        let keys = std::mem::take(&mut *lock(&inner.releases));
        for key in keys {
            if let Err(e) = inner.delete(key.clone()).await {
                debug!(error = %crate::error_chain(&e), "queue key release deferred");
                lock(&inner.releases).push(key);
            }
        }
    }
}

fn queue_range(inner: &Inner, keys_only: bool) -> RangeRequest {
    let (key, range_end) = inner.range_of("queue");
    RangeRequest {
        key,
        range_end,
        sort_order: Some("ASCEND"),
        sort_target: Some("CREATE"),
        keys_only,
        ..Default::default()
    }
}

/// This host's queue key. Dropping it (armed) deletes the key in the
/// background.
#[derive(Debug)]
pub(crate) struct QueueKey {
    inner: Arc<Inner>,
    key: Vec<u8>,
    armed: bool,
    /// Queue keys ahead of this one at revision `checked_at` (from the
    /// enqueue txn), so an uncontended grant needs no second round trip.
    ahead: usize,
    checked_at: i64,
}

impl QueueKey {
    pub(crate) async fn release(mut self) -> Result<(), ClusterError> {
        self.armed = false;
        let key = std::mem::take(&mut self.key);
        match self.inner.delete(key.clone()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.inner.release_later(key);
                Err(e)
            }
        }
    }
}

impl Drop for QueueKey {
    fn drop(&mut self) {
        if self.armed {
            self.inner.release_later(std::mem::take(&mut self.key));
        }
    }
}

/// Position of `key` in a queue listing sorted by create revision.
fn position(kvs: &[gateway::KeyValue], key: &[u8]) -> Option<usize> {
    kvs.iter().position(|kv| kv.key == key)
}

/// Waits until `key` is among the first N queue keys by create revision.
/// Starts from the enqueue txn's view; after that re-checks (one range)
/// on every deletion the watch reports.
pub(crate) async fn wait_for_slot(key: QueueKey, uid: &str) -> Result<QueueKey, ClusterError> {
    let inner = key.inner.clone();
    let n = inner.limits.cluster.max(1) as usize;
    if key.ahead < n {
        return Ok(key);
    }
    let mut checked_at = key.checked_at;
    let mut stream: Option<WatchStream> = None;
    // A half-open connection would never end the watch: give up when the
    // keepalive task finds etcd unreachable.
    let mut health = inner.health.subscribe();
    loop {
        if stream.is_none() {
            let (k, range_end) = inner.range_of("queue");
            let req = WatchCreateRequest {
                key: k,
                range_end,
                start_revision: checked_at + 1,
            };
            stream = Some(
                inner
                    .gw
                    .watch(&req)
                    .await
                    .map_err(|e| inner.fail("watch", e))?,
            );
        }
        let s = stream.as_mut().expect("just opened");
        // Wait for a deletion; a closed stream is re-opened after the
        // re-check (whose range fails fast if etcd is gone).
        loop {
            let msg = tokio::select! {
                msg = s.next() => msg,
                _ = health.wait_for(|h| !h.is_ok()) => {
                    inner.check_up()?;
                    continue;
                }
            };
            match msg {
                Ok(Some(resp)) if resp.canceled => {
                    stream = None;
                    break;
                }
                Ok(Some(resp)) => {
                    if resp.events.iter().any(|e| e.kind == EventType::Delete) {
                        break;
                    }
                }
                Ok(None) => {
                    stream = None;
                    break;
                }
                Err(e) => return Err(inner.fail("watch", e)),
            }
        }
        let r = inner.range(&queue_range(&inner, true)).await?;
        checked_at = r.header.revision;
        match position(&r.kvs, &key.key) {
            None => return Err(ClusterError::LeaseLost { uid: uid.into() }),
            Some(i) if i < n => return Ok(key),
            Some(_) => {}
        }
    }
}

impl ClusterStore for EtcdStore {
    fn host_name(&self) -> &str {
        &self.inner.host
    }

    fn health(&self) -> Health {
        self.inner.health.borrow().clone()
    }

    async fn update_host(&self, status: HostStatus) -> Result<(), ClusterError> {
        *lock(&self.inner.status) = Some(status);
        self.inner.put_host_record().await
    }

    async fn hosts(&self) -> Result<Vec<HostInfo>, ClusterError> {
        let (key, range_end) = self.inner.range_of("hosts");
        let r = self
            .inner
            .range(&RangeRequest {
                key: key.clone(),
                range_end,
                ..Default::default()
            })
            .await?;
        let cordons = self.inner.cordons.borrow().clone();
        let mut out = Vec::new();
        for kv in r.kvs {
            let name = String::from_utf8_lossy(&kv.key[key.len()..]).into_owned();
            let rec: HostRecord =
                serde_json::from_slice(&kv.value).map_err(|source| ClusterError::Decode {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    source,
                })?;
            out.push(HostInfo {
                cordoned: cordons.contains(&name),
                name,
                labels: rec.status.labels,
                address: rec.status.address,
                free_memory: Some(rec.status.free_memory),
                capacity: Some(rec.status.capacity),
                vms: Some(rec.status.vms),
                updated: Some(rec.updated),
            });
        }
        Ok(out)
    }

    async fn set_cordon(&self, host: &str, cordoned: bool) -> Result<(), ClusterError> {
        check_name("host name", host)?;
        let key = self.inner.key("cordon", host);
        let rev = if cordoned {
            let value = serde_json::to_vec(&serde_json::json!({ "since": Timestamp::now() }))
                .expect("json serializes");
            Some(self.inner.put(key, value, 0).await?)
        } else {
            self.inner.delete(key).await?
        };
        if let Some(rev) = rev {
            self.inner.await_mirror(Kind::Cordons, rev).await;
        }
        Ok(())
    }

    fn cordons(&self) -> watch::Receiver<CordonSet> {
        self.inner.cordons.subscribe()
    }

    async fn put_policy(&self, policy: MigrationPolicy) -> Result<(), ClusterError> {
        policy.validate().map_err(ClusterError::InvalidPolicy)?;
        let value = serde_json::to_vec(&policy).expect("policies serialize");
        let rev = self
            .inner
            .put(self.inner.key("policies", &policy.name), value, 0)
            .await?;
        self.inner.await_mirror(Kind::Policies, rev).await;
        Ok(())
    }

    async fn delete_policy(&self, name: &str) -> Result<bool, ClusterError> {
        check_name("policy name", name)?;
        let rev = self.inner.delete(self.inner.key("policies", name)).await?;
        if let Some(rev) = rev {
            self.inner.await_mirror(Kind::Policies, rev).await;
        }
        Ok(rev.is_some())
    }

    fn policies(&self) -> watch::Receiver<PolicySet> {
        self.inner.policies.subscribe()
    }

    async fn enqueue(&self, req: SlotRequest) -> Result<Ticket, ClusterError> {
        let inner = &self.inner;
        inner.check_up()?;
        let outbound = inner.outbound.enqueue().wait().await;
        // The outbound wait can be long; etcd may have gone meanwhile.
        inner.check_up()?;
        let lease = *lock(&inner.lease);
        if lease == 0 {
            // Between an expiry and the re-grant: a key without a lease
            // would never free itself.
            return Err(ClusterError::LeaseLost { uid: req.uid });
        }
        let key = inner.key("queue", &req.uid);
        let entry = QueueEntry {
            uid: req.uid.clone(),
            vm: req.vm,
            source_host: inner.host.clone(),
            target_host: req.target_host,
            queued: Timestamp::now(),
        };
        // Armed before the txn is sent: if this future is dropped while the
        // txn is in flight, the key it may have created is still removed.
        let mut place = QueueKey {
            inner: inner.clone(),
            key: key.clone(),
            armed: true,
            ahead: usize::MAX,
            checked_at: 0,
        };
        // One round trip: join the queue and read it, atomically.
        let txn = TxnRequest {
            compare: vec![Compare::absent(&key)],
            success: vec![
                RequestOp::RequestPut(PutRequest {
                    key: key.clone(),
                    value: serde_json::to_vec(&entry).expect("queue entries serialize"),
                    lease,
                }),
                RequestOp::RequestRange(queue_range(inner, true)),
            ],
            failure: vec![],
        };
        let r = inner.gw.txn(&txn).await.map_err(|e| inner.fail("txn", e))?;
        if !r.succeeded {
            place.armed = false;
            return Err(ClusterError::AlreadyQueued { uid: req.uid });
        }
        let queue = r
            .responses
            .iter()
            .find_map(|op| op.response_range.as_ref())
            .map(|q| q.kvs.as_slice())
            .unwrap_or_default();
        let ahead = position(queue, &key).ok_or(ClusterError::LeaseLost {
            uid: req.uid.clone(),
        })?;
        place.ahead = ahead;
        place.checked_at = r.header.revision;
        Ok(Ticket {
            uid: req.uid,
            ahead,
            _outbound: outbound,
            place: Place::Etcd(place),
        })
    }

    async fn record_migration(&self, entry: MigrationIndexEntry) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(&entry).expect("index entries serialize");
        self.inner
            .put(self.inner.key("migrations", &entry.uid), value, 0)
            .await?;
        Ok(())
    }

    async fn forget_migration(&self, uid: &str) -> Result<bool, ClusterError> {
        Ok(self
            .inner
            .delete(self.inner.key("migrations", uid))
            .await?
            .is_some())
    }

    async fn migrations(&self) -> Result<Vec<MigrationIndexEntry>, ClusterError> {
        let (key, range_end) = self.inner.range_of("migrations");
        let r = self
            .inner
            .range(&RangeRequest {
                key,
                range_end,
                ..Default::default()
            })
            .await?;
        r.kvs
            .iter()
            .map(|kv| {
                serde_json::from_slice(&kv.value).map_err(|source| ClusterError::Decode {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    source,
                })
            })
            .collect()
    }
}
