//! Against a scripted fake QMP server on a unix socket.
use super::*;
use serde_json::json;
use tokio::net::UnixListener;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "test"}, "capabilities": ["oob"]}}"#;

/// The server side of one connection: reads commands, writes lines.
struct Peer {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Peer {
    async fn recv(&mut self) -> Value {
        let mut line = Vec::new();
        read_message(&mut self.read, &mut line, 1 << 20)
            .await
            .expect("a command")
    }

    /// Reads until the client hangs up, answering nothing.
    async fn until_closed(&mut self) {
        let mut line = Vec::new();
        while read_message(&mut self.read, &mut line, 1 << 20)
            .await
            .is_ok()
        {}
    }

    async fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.write.write_all(&line).await.unwrap();
    }

    /// Answers `qmp_capabilities` as QEMU does.
    async fn negotiate(&mut self) {
        let cmd = self.recv().await;
        assert_eq!(cmd["execute"], "qmp_capabilities");
        assert!(cmd.get("arguments").is_none(), "no capabilities enabled");
        self.send(json!({"return": {}, "id": cmd["id"]})).await;
    }
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data,
           "timestamp": {"seconds": 1_700_000_000, "microseconds": 5}})
}

/// A listener and a task that accepts one connection, greets and runs
/// `script` on it.
async fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, write) = stream.into_split();
        let mut peer = Peer {
            read: BufReader::new(read),
            write,
        };
        peer.write
            .write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        peer.negotiate().await;
        script(peer).await;
    });
    (dir, path, task)
}

/// Guards against a hang without asserting on speed.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("hung")
}

#[tokio::test]
async fn replies_match_ids_out_of_order_and_events_go_to_subscribers() {
    let (_dir, path, server) = serve(|mut peer| async move {
        let a = peer.recv().await;
        let b = peer.recv().await;
        assert_eq!(a["execute"], "query-a");
        assert_eq!(a["arguments"], json!({"x": 1}));
        assert_eq!(b["execute"], "query-b");
        assert_ne!(a["id"], b["id"]);
        // The second first, an event in between.
        peer.send(json!({"return": "B", "id": b["id"]})).await;
        peer.send(event("STOP", Value::Null)).await;
        peer.send(json!({"return": "A", "id": a["id"]})).await;
        peer.send(event("RESUME", json!({"k": "v"}))).await;
        // Keep the socket open until the client is done.
        peer.until_closed().await;
    })
    .await;
    let qmp = within(QmpClient::connect(&path, &QmpOptions::default()))
        .await
        .unwrap();
    assert_eq!(qmp.greeting().version.minor, 2);
    assert_eq!(qmp.greeting().capabilities, vec!["oob".to_string()]);
    let mut events = qmp.subscribe();
    let (a, b) = within(async {
        tokio::join!(
            qmp.execute("query-a", Some(json!({"x": 1}))),
            qmp.execute("query-b", None)
        )
    })
    .await;
    assert_eq!(a.unwrap(), "A");
    assert_eq!(b.unwrap(), "B");
    let stop = within(events.recv()).await.unwrap();
    assert_eq!(stop.event, "STOP");
    assert_eq!(stop.timestamp.seconds, 1_700_000_000);
    let resume = within(events.recv()).await.unwrap();
    assert_eq!(
        (resume.event.as_str(), &resume.data),
        ("RESUME", &json!({"k": "v"}))
    );
    assert_eq!(qmp.stray_replies(), 0);
    drop(qmp);
    within(server).await.unwrap();
}

#[tokio::test]
async fn a_refused_command_is_a_typed_error() {
    let (_dir, path, _server) = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        peer.send(json!({"error": {"class": "CommandNotFound",
            "desc": "The command nope has not been found"}, "id": cmd["id"]}))
            .await;
        peer.until_closed().await;
    })
    .await;
    let qmp = within(QmpClient::connect(&path, &QmpOptions::default()))
        .await
        .unwrap();
    let err = within(qmp.execute("nope", None)).await.unwrap_err();
    match &err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "nope");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("nope"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.class(), Some("CommandNotFound"));
}

#[tokio::test]
async fn qemu_closing_the_socket_fails_pending_and_later_calls() {
    let (_dir, path, server) = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        assert_eq!(cmd["execute"], "quit");
        peer.send(event("SHUTDOWN", json!({"guest": false}))).await;
        // Close without answering, as a crashing QEMU would.
    })
    .await;
    // A call timeout far beyond the test guard: only the close can
    // end the call.
    let options = QmpOptions {
        call_timeout: Duration::from_secs(3600),
        ..QmpOptions::default()
    };
    let qmp = within(QmpClient::connect(&path, &options)).await.unwrap();
    let mut events = qmp.subscribe();
    let err = within(qmp.execute("quit", None)).await.unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
    within(server).await.unwrap();
    assert!(matches!(*within(qmp.closed()).await, ConnectionLost::Eof));
    assert!(qmp.is_closed());
    // The event sent before the close is still delivered, then Closed.
    assert_eq!(within(events.recv()).await.unwrap().event, "SHUTDOWN");
    assert!(matches!(
        within(events.recv()).await,
        Err(broadcast::error::RecvError::Closed)
    ));
    let later = within(qmp.execute("query-status", None)).await.unwrap_err();
    assert!(later.is_disconnected(), "{later:?}");
    assert!(matches!(
        qmp.subscribe().try_recv(),
        Err(broadcast::error::TryRecvError::Closed)
    ));
}

#[tokio::test]
async fn a_timed_out_call_is_forgotten_and_its_late_reply_ignored() {
    let (_dir, path, _server) = serve(|mut peer| async move {
        let slow = peer.recv().await;
        let next = peer.recv().await;
        // The late answer to the call that timed out, then the next.
        peer.send(json!({"return": "late", "id": slow["id"]})).await;
        peer.send(json!({"return": "next", "id": next["id"]})).await;
        peer.until_closed().await;
    })
    .await;
    let qmp = within(QmpClient::connect(&path, &QmpOptions::default()))
        .await
        .unwrap();
    let err = within(qmp.execute_timeout("slow", None, Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout { command, .. } if command == "slow"),
        "{err:?}"
    );
    assert!(qmp.shared.lock().pending.is_empty());
    assert_eq!(within(qmp.execute("next", None)).await.unwrap(), "next");
    assert_eq!(qmp.stray_replies(), 1);
}

#[tokio::test]
async fn a_silent_monitor_times_out_at_the_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    // Bound but never accepted: the kernel queues the connection and
    // nothing is ever said, as with a monitor busy with another client.
    let _listener = UnixListener::bind(&path).unwrap();
    let options = QmpOptions {
        greeting_timeout: Duration::from_millis(100),
        ..QmpOptions::default()
    };
    let err = within(QmpClient::connect(&path, &options))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::GreetingTimeout { .. }), "{err:?}");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = QmpClient::connect(&path, &QmpOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Connect { path: p, .. } if *p == path),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_oversized_message_ends_the_connection() {
    let (_dir, path, _server) = serve(|mut peer| async move {
        let cmd = peer.recv().await;
        let big = "x".repeat(4096);
        peer.send(json!({"return": big, "id": cmd["id"]})).await;
        peer.until_closed().await;
    })
    .await;
    let options = QmpOptions {
        max_message: 1024,
        ..QmpOptions::default()
    };
    let qmp = within(QmpClient::connect(&path, &options)).await.unwrap();
    let err = within(qmp.execute("big", None)).await.unwrap_err();
    match err {
        QmpError::Disconnected { cause, .. } => {
            assert!(matches!(*cause, ConnectionLost::TooLong { limit: 1024 }))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_dropped_call_leaves_no_pending_entry() {
    let (_dir, path, _server) = serve(|mut peer| async move {
        let _ignored = peer.recv().await;
        peer.until_closed().await;
    })
    .await;
    let qmp = within(QmpClient::connect(&path, &QmpOptions::default()))
        .await
        .unwrap();
    {
        let call = qmp.execute("never-answered", None);
        tokio::pin!(call);
        // Poll once so the call registers, then drop it.
        let _ = futures_poll_once(call.as_mut()).await;
        let st = qmp.shared.lock();
        assert_eq!(
            st.pending
                .values()
                .map(|p| p.command.as_str())
                .collect::<Vec<_>>(),
            vec!["never-answered"]
        );
    }
    assert!(qmp.shared.lock().pending.is_empty());
}

/// Polls a future once; true if it completed.
async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> bool {
    let mut f = f;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut f).poll(cx).is_ready())
    })
    .await
}
