//! Admission overhead: one uncontended acquire + release of a migration
//! slot, with the local store and with etcd (a single member on loopback,
//! started by the bench; skipped without an etcd binary). Reports numbers,
//! asserts nothing. Run: `cargo bench -p migrated --bench cluster_bench`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use migrated::cluster::testing::EtcdServer;
use migrated::cluster::{
    ClusterStore, EtcdConfig, EtcdOptions, EtcdStore, Limits, LocalStore, SlotRequest,
};

const LIMITS: Limits = Limits {
    cluster: 5,
    outbound_per_host: 2,
};

fn req(i: usize) -> SlotRequest {
    SlotRequest {
        uid: format!("bench-{i}"),
        vm: "vm".into(),
        target_host: "host-b".into(),
    }
}

/// Times `iters` acquire+release cycles after `warmup` untimed ones.
async fn measure<S: ClusterStore>(store: &S, warmup: usize, iters: usize) -> Vec<Duration> {
    for i in 0..warmup {
        store
            .acquire(req(i))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let mut out = Vec::with_capacity(iters);
    for i in warmup..warmup + iters {
        let t = Instant::now();
        let permit = store.acquire(req(i)).await.unwrap();
        permit.release().await.unwrap();
        out.push(t.elapsed());
    }
    out
}

/// Same, split: time to acquire alone, and to release alone.
async fn split<S: ClusterStore>(
    store: &S,
    base: usize,
    iters: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    for i in base..base + iters {
        let t = Instant::now();
        let permit = store.acquire(req(i)).await.unwrap();
        acq.push(t.elapsed());
        let t = Instant::now();
        permit.release().await.unwrap();
        rel.push(t.elapsed());
    }
    (acq, rel)
}

fn report(what: &str, mut d: Vec<Duration>) {
    d.sort_unstable();
    let n = d.len();
    let mean = d.iter().sum::<Duration>() / n as u32;
    let pct = |p: f64| d[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "{what:<32} n={n:<6} mean={mean:>10.1?} p50={:>10.1?} p99={:>10.1?} max={:>10.1?}",
        pct(0.50),
        pct(0.99),
        d[n - 1]
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path(), "host-a", &BTreeMap::new(), LIMITS).unwrap();
        report(
            "local acquire+release",
            measure(&local, 1000, 100_000).await,
        );

        let Some(etcd) = EtcdServer::start_or_skip(None) else {
            return;
        };
        let cfg = EtcdConfig {
            endpoints: vec![etcd.endpoint()],
            ..Default::default()
        };
        let store = EtcdStore::connect(&cfg, EtcdOptions::new("host-a", LIMITS))
            .await
            .unwrap();
        report("etcd acquire+release", measure(&store, 50, 1000).await);
        let (acq, rel) = split(&store, 10_000, 1000).await;
        report("etcd acquire", acq);
        report("etcd release", rel);
        store.shutdown().await;
    });
}
