//! Semaphore checks shared by the local and the etcd cluster store tests:
//! the same behaviour is required of both.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use migrated::cluster::{ClusterStore, SlotRequest};
use tokio::sync::{mpsc, oneshot};

/// A bound on waits that should end; only a broken store reaches it.
pub const STUCK: Duration = Duration::from_secs(30);

pub fn req(uid: &str) -> SlotRequest {
    SlotRequest {
        uid: uid.into(),
        vm: format!("vm-{uid}"),
        target_host: "elsewhere".into(),
    }
}

/// `n` acquirers (spread over `stores` in turn) against a cluster limit of
/// `limit`: never more than `limit` held, grants in enqueue order, all
/// finish. Holders release in the order they were granted, one at a time.
pub async fn fifo_and_bounded<S: ClusterStore + Clone + 'static>(
    stores: &[S],
    limit: usize,
    n: usize,
    tag: &str,
) {
    let mut tickets = Vec::new();
    for i in 0..n {
        let t = stores[i % stores.len()]
            .enqueue(req(&format!("{tag}-{i}")))
            .await
            .expect("enqueue");
        assert_eq!(t.ahead_at_enqueue(), i, "queue position of acquirer {i}");
        tickets.push(t);
    }
    let held = Arc::new(AtomicUsize::new(0));
    let max_held = Arc::new(AtomicUsize::new(0));
    let (granted_tx, mut granted_rx) = mpsc::channel(n);
    let mut release = Vec::new();
    let mut tasks = Vec::new();
    for (i, t) in tickets.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel::<()>();
        release.push(Some(tx));
        let (held, max_held, granted_tx) = (held.clone(), max_held.clone(), granted_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = t.granted().await.expect("granted");
            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
            max_held.fetch_max(now, Ordering::SeqCst);
            granted_tx.send(i).await.unwrap();
            rx.await.unwrap();
            // Count down before the slot is visible as free.
            held.fetch_sub(1, Ordering::SeqCst);
            permit.release().await.expect("release");
        }));
    }
    // The first `limit` are granted together, so they may report in any
    // order; from then on each release lets exactly the next one in.
    let mut order = Vec::new();
    for _ in 0..limit.min(n) {
        order.push(recv(&mut granted_rx).await);
    }
    order.sort_unstable();
    for k in 0..n {
        release[order[k]].take().unwrap().send(()).unwrap();
        if order.len() < n {
            order.push(recv(&mut granted_rx).await);
        }
    }
    for t in tasks {
        tokio::time::timeout(STUCK, t)
            .await
            .expect("finish")
            .unwrap();
    }
    assert_eq!(
        order,
        (0..n).collect::<Vec<_>>(),
        "grants out of FIFO order"
    );
    assert!(
        max_held.load(Ordering::SeqCst) <= limit,
        "more than {limit} held at once"
    );
    assert_eq!(max_held.load(Ordering::SeqCst), limit.min(n));
}

async fn recv(rx: &mut mpsc::Receiver<usize>) -> usize {
    tokio::time::timeout(STUCK, rx.recv())
        .await
        .expect("a grant within the bound")
        .expect("grant")
}

/// A waiter whose wait is dropped gives its place back: the one behind it
/// gets the slot when the holder releases.
pub async fn dropped_waiter_gives_its_place_back<S: ClusterStore>(store: &S, tag: &str) {
    let holder = store.acquire(req(&format!("{tag}-holder"))).await.unwrap();
    let first = store.enqueue(req(&format!("{tag}-first"))).await.unwrap();
    let second = store.enqueue(req(&format!("{tag}-second"))).await.unwrap();
    assert_eq!(second.ahead_at_enqueue(), 2);
    let mut wait = Box::pin(first.granted());
    tokio::select! {
        biased;
        _ = &mut wait => panic!("granted while the slot was held"),
        () = std::future::ready(()) => {}
    }
    drop(wait);
    holder.release().await.unwrap();
    let p = tokio::time::timeout(STUCK, second.granted())
        .await
        .expect("the dropped waiter's place was not given back")
        .unwrap();
    p.release().await.unwrap();
}
