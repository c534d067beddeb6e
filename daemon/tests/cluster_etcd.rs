//! The etcd cluster store against a real single-member etcd on loopback
//! (started per test, killed at the end): two stores play two hosts. The
//! tests skip without an etcd binary, and fail under
//! `MIGRATED_REQUIRE_ETCD=1`.

mod cluster_common;

use std::time::Duration;

use cluster_common::{req, STUCK};
use migrated::cluster::testing::{EtcdServer, EtcdTls};
use migrated::cluster::{
    parse_policy, ClusterError, ClusterStore, EtcdConfig, EtcdOptions, EtcdStore, Health,
    HostStatus, Limits, MigrationIndexEntry,
};
use migrated::model::{MigrationPhase, Timestamp};
use migrated::quantity::Quantity;

fn limits(cluster: u32) -> Limits {
    Limits {
        cluster,
        outbound_per_host: 10,
    }
}

fn config(etcd: &EtcdServer) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ..Default::default()
    }
}

async fn store(etcd: &EtcdServer, host: &str, limits: Limits) -> EtcdStore {
    store_with(etcd, EtcdOptions::new(host, limits)).await
}

async fn store_with(etcd: &EtcdServer, opts: EtcdOptions) -> EtcdStore {
    let s = EtcdStore::connect(&config(etcd), opts).await.unwrap();
    assert!(s.health().is_ok(), "{}", s.health());
    s
}

/// Waits (bounded) until a watched value satisfies `f`.
async fn eventually<T>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    what: &str,
    f: impl FnMut(&T) -> bool,
) {
    tokio::time::timeout(STUCK, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_two_five_acquirers_on_two_hosts_fifo() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let a = store(&etcd, "host-a", limits(2)).await;
    let b = store(&etcd, "host-b", limits(2)).await;
    cluster_common::fifo_and_bounded(&[a.clone(), b.clone()], 2, 5, "etcd").await;
    assert!(a.queue().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiter_gives_its_place_back() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let a = store(&etcd, "host-a", limits(1)).await;
    cluster_common::dropped_waiter_gives_its_place_back(&a, "etcd").await;
}

/// A host that dies holding a slot (no release, keepalive stopped) loses
/// it when its lease expires; the other host's waiter then gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_holders_slot_frees_when_its_lease_expires() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let mut opts = EtcdOptions::new("host-a", limits(1));
    opts.lease_ttl = Duration::from_secs(2);
    let a = store_with(&etcd, opts).await;
    let b = store(&etcd, "host-b", limits(1)).await;
    let held = a.acquire(req("crash-holder")).await.unwrap();
    let waiter = b.enqueue(req("crash-waiter")).await.unwrap();
    assert_eq!(waiter.ahead_at_enqueue(), 1);
    // "Crash": the permit is never released and host a's tasks stop.
    std::mem::forget(held);
    drop(a);
    let p = tokio::time::timeout(STUCK, waiter.granted())
        .await
        .expect("slot not freed by the lease expiry")
        .unwrap();
    let queue = b.queue().await.unwrap();
    assert_eq!(queue, [("crash-waiter".to_string(), "host-b".to_string())]);
    p.release().await.unwrap();
}

/// A shutdown revokes the lease: the slot frees at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_frees_the_slot() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let a = store(&etcd, "host-a", limits(1)).await;
    let b = store(&etcd, "host-b", limits(1)).await;
    let held = a.acquire(req("revoke-holder")).await.unwrap();
    let waiter = b.enqueue(req("revoke-waiter")).await.unwrap();
    std::mem::forget(held);
    a.shutdown().await;
    let p = tokio::time::timeout(STUCK, waiter.granted())
        .await
        .expect("slot not freed by the revoke")
        .unwrap();
    p.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_queues_once() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let a = store(&etcd, "host-a", limits(2)).await;
    let _p = a.acquire(req("same")).await.unwrap();
    let e = a.acquire(req("same")).await.unwrap_err();
    assert!(matches!(e, ClusterError::AlreadyQueued { .. }), "{e}");
    // The refused attempt did not take the first one's key with it.
    assert_eq!(a.queue().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_cordons_hosts_and_index_are_shared() {
    let Some(etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let a = store(&etcd, "host-a", limits(2)).await;
    let b = store(&etcd, "host-b", limits(2)).await;

    // Policies: written by a, seen by b's watch.
    let mut b_policies = b.policies();
    let p =
        parse_policy("name: db\nvmSelector: {tier: db}\nbandwidthPerMigration: 64Mi\n").unwrap();
    a.put_policy(p.clone()).await.unwrap();
    assert_eq!(
        a.policies().borrow().get("db"),
        Some(&p),
        "own write not in own cache"
    );
    eventually(&mut b_policies, "policy on b", |ps| {
        ps.get("db") == Some(&p)
    })
    .await;
    assert!(a.delete_policy("db").await.unwrap());
    assert!(!a.delete_policy("db").await.unwrap());
    eventually(&mut b_policies, "policy removal on b", |ps| ps.is_empty()).await;

    // Cordon: set by a for b, seen by b.
    let mut b_cordons = b.cordons();
    a.set_cordon("host-b", true).await.unwrap();
    eventually(&mut b_cordons, "cordon on b", |c| c.contains("host-b")).await;

    // Registration: both hosts, with labels, and b shown cordoned.
    let status = |zone: &str, vms| HostStatus {
        labels: [("zone".to_string(), zone.to_string())].into(),
        address: format!("198.18.0.{vms}:7878"),
        free_memory: Quantity::mib(512),
        capacity: Quantity::mib(1024),
        vms,
    };
    a.update_host(status("z1", 1)).await.unwrap();
    b.update_host(status("z2", 2)).await.unwrap();
    let hosts = a.hosts().await.unwrap();
    let names: Vec<_> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["host-a", "host-b"]);
    assert_eq!(hosts[0].labels["zone"], "z1");
    assert_eq!(hosts[1].labels["zone"], "z2");
    assert_eq!(hosts[1].vms, Some(2));
    assert!(hosts[0].schedulable() && !hosts[1].schedulable());
    a.set_cordon("host-b", false).await.unwrap();
    eventually(&mut b_cordons, "uncordon on b", |c| c.is_empty()).await;

    // Index: written by a, listed by b.
    let entry = MigrationIndexEntry {
        uid: "u1".into(),
        name: "vm1-abcde".into(),
        vm: "vm1".into(),
        source_host: "host-a".into(),
        target_host: "host-b".into(),
        phase: MigrationPhase::Running,
        updated: Timestamp::now(),
    };
    a.record_migration(entry.clone()).await.unwrap();
    assert_eq!(b.migrations().await.unwrap(), [entry]);
    assert!(b.forget_migration("u1").await.unwrap());
    assert!(a.migrations().await.unwrap().is_empty());

    // A host that shuts down deregisters (its lease is revoked).
    b.shutdown().await;
    let hosts = a.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
}

/// etcd dies: running migrations keep their permits, health says why, new
/// admissions fail at once. etcd comes back: health recovers, watches
/// resume, admission works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_loss_and_recovery() {
    let Some(mut etcd) = EtcdServer::start_or_skip(None) else {
        return;
    };
    let mut opts = EtcdOptions::new("host-a", limits(1));
    opts.request_timeout = Duration::from_secs(2);
    let a = store_with(&etcd, opts).await;
    let running = a.acquire(req("running")).await.unwrap();
    let waiter = a.enqueue(req("waiting")).await.unwrap();
    let waiting = tokio::spawn(waiter.granted());

    etcd.kill();
    // A waiter fails instead of waiting on a dead etcd.
    let e = tokio::time::timeout(STUCK, waiting)
        .await
        .expect("the waiter noticed etcd's loss")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ClusterError::Unavailable { .. }), "{e}");
    let e = a.acquire(req("new")).await.unwrap_err();
    let chain = migrated::error_chain(&e);
    assert!(matches!(e, ClusterError::Unavailable { .. }), "{chain}");
    assert!(chain.starts_with("etcd unreachable since "), "{chain}");
    let health = a.health();
    assert!(!health.is_ok());
    let shown = health.to_string();
    assert!(
        shown.starts_with("etcd unreachable since ") && shown.contains("127.0.0.1"),
        "{shown}"
    );
    // Refused from the recorded state, without another network round.
    assert!(matches!(
        a.enqueue(req("new2")).await,
        Err(ClusterError::Unavailable { .. })
    ));

    etcd.restart();
    let mut health = a.health_watch();
    eventually(&mut health, "health to recover", Health::is_ok).await;
    // The watch resumed: a policy written by another host shows up.
    let b = store(&etcd, "host-b", limits(2)).await;
    let mut a_policies = a.policies();
    b.put_policy(parse_policy("name: after\n").unwrap())
        .await
        .unwrap();
    eventually(&mut a_policies, "policy after the restart", |p| {
        p.contains_key("after")
    })
    .await;
    // The running migration's slot survived (its lease did); admission works.
    running.release().await.unwrap();
    let p = tokio::time::timeout(STUCK, a.acquire(req("after-restart")))
        .await
        .unwrap()
        .unwrap();
    p.release().await.unwrap();
}

/// TLS to etcd with client certificates (etcd `--client-cert-auth`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    use transport::identity::{ClusterCa, HostName, Validity};
    if migrated::cluster::testing::etcd_binary().is_none() {
        let _ = EtcdServer::start_or_skip(None);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ca = ClusterCa::generate("etcd-test-ca").unwrap();
    ca.write_pem(&p("ca.pem"), &p("ca.key")).unwrap();
    let validity = Validity::for_duration(Duration::from_secs(3600));
    ca.issue_host(&HostName::new("localhost").unwrap(), validity)
        .unwrap()
        .write_pem(&p("server.pem"), &p("server.key"))
        .unwrap();
    ca.issue_host(&HostName::new("host-a").unwrap(), validity)
        .unwrap()
        .write_pem(&p("client.pem"), &p("client.key"))
        .unwrap();
    let etcd = EtcdServer::start_or_skip(Some(EtcdTls {
        ca: p("ca.pem"),
        cert: p("server.pem"),
        key: p("server.key"),
    }))
    .unwrap();
    let mut cfg = EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        ca: Some(p("ca.pem")),
        cert: Some(p("client.pem")),
        key: Some(p("client.key")),
    };
    let a = EtcdStore::connect(&cfg, EtcdOptions::new("host-a", limits(1)))
        .await
        .unwrap();
    assert!(a.health().is_ok(), "{}", a.health());
    a.put_policy(parse_policy("name: tls\n").unwrap())
        .await
        .unwrap();
    assert!(a.policies().borrow().contains_key("tls"));
    a.acquire(req("tls"))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // Without a client certificate etcd refuses the connection.
    cfg.cert = None;
    cfg.key = None;
    let anon = EtcdStore::connect(&cfg, EtcdOptions::new("host-x", limits(1)))
        .await
        .unwrap();
    assert!(!anon.health().is_ok());
    // A client cert without its key is a config error.
    cfg.cert = Some(p("client.pem"));
    assert!(
        EtcdStore::connect(&cfg, EtcdOptions::new("host-y", limits(1)))
            .await
            .is_err()
    );
}
