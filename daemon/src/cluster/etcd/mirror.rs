//! Local caches of etcd prefixes (policies, cordon flags), kept current
//! by a watch: load once, then apply events; on a broken stream resume
//! from the last applied revision, reload only after a compaction.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::gateway::{EventType, RangeRequest};
use super::wire::WatchCreateRequest;
use super::Inner;
use crate::cluster::{ClusterError, Health, MigrationPolicy};

/// The two prefixes mirrored into a local cache by a watch.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Policies,
    Cordons,
}

impl Kind {
    fn sub(self) -> &'static str {
        match self {
            Kind::Policies => "policies",
            Kind::Cordons => "cordon",
        }
    }

    pub(super) fn seen(self, inner: &Inner) -> &watch::Sender<i64> {
        match self {
            Kind::Policies => &inner.policies_rev,
            Kind::Cordons => &inner.cordons_rev,
        }
    }

    fn publish(self, inner: &Inner, raw: &BTreeMap<String, Vec<u8>>) {
        match self {
            Kind::Policies => {
                let mut set = BTreeMap::new();
                for (name, value) in raw {
                    let p = serde_json::from_slice::<MigrationPolicy>(value)
                        .map_err(|e| e.to_string())
                        .and_then(|p| p.validate().map(|()| p).map_err(|e| e.to_string()));
                    match p {
                        Ok(p) if p.name == *name => {
                            set.insert(name.clone(), p);
                        }
                        Ok(_) => warn!(%name, "policy key and name differ; ignored"),
                        Err(error) => warn!(%name, %error, "stored policy ignored"),
                    }
                }
                inner
                    .policies
                    .send_if_modified(|cur| replace_if_new(cur, set));
            }
            Kind::Cordons => {
                let set: BTreeSet<String> = raw.keys().cloned().collect();
                inner
                    .cordons
                    .send_if_modified(|cur| replace_if_new(cur, set));
            }
        }
    }
}

fn replace_if_new<T: PartialEq>(cur: &mut Arc<T>, new: T) -> bool {
    if **cur == new {
        return false;
    }
    *cur = Arc::new(new);
    true
}

/// A full read of a mirrored prefix; returns the revision to watch from
/// and the raw map.
pub(super) async fn load(
    inner: &Inner,
    kind: Kind,
) -> Result<(i64, BTreeMap<String, Vec<u8>>), ClusterError> {
    let (key, range_end) = inner.range_of(kind.sub());
    let r = inner
        .range(&RangeRequest {
            key: key.clone(),
            range_end,
            ..Default::default()
        })
        .await?;
    let raw: BTreeMap<String, Vec<u8>> = r
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let name = String::from_utf8(kv.key.get(key.len()..)?.to_vec()).ok()?;
            Some((name, kv.value))
        })
        .collect();
    kind.publish(inner, &raw);
    kind.seen(inner).send_replace(r.header.revision);
    Ok((r.header.revision + 1, raw))
}

/// Keeps a mirrored prefix's cache current: load, then watch from the
/// next revision; on a broken stream resume from the last applied
/// revision; reload only if etcd compacted past it. While etcd is
/// unreachable (as the keepalive task sees it) the watch is dropped,
/// since a half-open connection would never report the loss, and
/// re-opened once etcd answers again.
pub(super) async fn mirror_loop(
    inner: Arc<Inner>,
    kind: Kind,
    start: Option<(i64, BTreeMap<String, Vec<u8>>)>,
) {
    let (key, range_end) = inner.range_of(kind.sub());
    let (mut next, mut raw) = start.unwrap_or_default();
    let mut health = inner.health.subscribe();
    let mut backoff = Duration::from_millis(100);
    loop {
        if health.wait_for(Health::is_ok).await.is_err() {
            return; // the store is gone
        }
        if next == 0 {
            match load(&inner, kind).await {
                Ok(loaded) => (next, raw) = loaded,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let req = WatchCreateRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            start_revision: next,
        };
        match inner.gw.watch(&req).await {
            Ok(mut stream) => loop {
                let msg = tokio::select! {
                    msg = stream.next() => msg,
                    _ = health.wait_for(|h| !h.is_ok()) => {
                        debug!(kind = kind.sub(), "etcd unreachable; watch dropped");
                        break;
                    }
                };
                match msg {
                    Ok(Some(resp)) if resp.canceled => {
                        if resp.compact_revision > 0 {
                            info!(
                                kind = kind.sub(),
                                "etcd compacted past our watch; reloading"
                            );
                            next = 0;
                        }
                        break;
                    }
                    Ok(Some(resp)) => {
                        backoff = Duration::from_millis(100);
                        if resp.events.is_empty() {
                            continue;
                        }
                        for ev in resp.events {
                            let Some(name) = ev
                                .kv
                                .key
                                .get(key.len()..)
                                .and_then(|n| String::from_utf8(n.to_vec()).ok())
                            else {
                                continue;
                            };
                            match ev.kind {
                                EventType::Put => raw.insert(name, ev.kv.value),
                                EventType::Delete => raw.remove(&name),
                            };
                            next = next.max(ev.kv.mod_revision + 1);
                        }
                        kind.publish(&inner, &raw);
                        kind.seen(&inner).send_replace(next - 1);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!(kind = kind.sub(), error = %crate::error_chain(&e), "watch broken; resuming");
                        break;
                    }
                }
            },
            Err(e) => {
                let _ = inner.fail("watch", e);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
