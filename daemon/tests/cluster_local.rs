//! The local cluster store's slots: the same FIFO/limit behaviour the etcd
//! store must have (see `cluster_common`).

mod cluster_common;

use std::collections::BTreeMap;

use migrated::cluster::{ClusterStore, Limits, LocalStore};

fn store(dir: &std::path::Path, limits: Limits) -> LocalStore {
    LocalStore::open(dir, "host-a", &BTreeMap::new(), limits).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_two_five_acquirers_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        Limits {
            cluster: 2,
            outbound_per_host: 5,
        },
    );
    cluster_common::fifo_and_bounded(std::slice::from_ref(&s), 2, 5, "local").await;
    assert_eq!(s.slots_held(), 0);
}

#[tokio::test]
async fn dropped_waiter_gives_its_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        Limits {
            cluster: 1,
            outbound_per_host: 5,
        },
    );
    cluster_common::dropped_waiter_gives_its_place_back(&s, "local").await;
}

/// The outbound limit is taken first: with 1 outbound slot, a second
/// migration of this host waits before it even joins the cluster queue.
#[tokio::test]
async fn outbound_limit_gates_the_cluster_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        Limits {
            cluster: 5,
            outbound_per_host: 1,
        },
    );
    let p = s.acquire(cluster_common::req("a")).await.unwrap();
    let mut second = Box::pin(s.enqueue(cluster_common::req("b")));
    tokio::select! {
        biased;
        _ = &mut second => panic!("second outbound migration admitted over the limit"),
        () = std::future::ready(()) => {}
    }
    assert_eq!(s.slots_held(), 1);
    drop(p);
    let t = tokio::time::timeout(cluster_common::STUCK, second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.ahead_at_enqueue(), 0);
}
