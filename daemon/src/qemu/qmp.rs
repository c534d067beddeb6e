//! A small asynchronous QMP client over a unix socket.
//!
//! QMP is line-delimited JSON: QEMU greets, the client negotiates with
//! `qmp_capabilities`, then sends `{"execute", "arguments", "id"}` and gets
//! `{"return" | "error", "id"}` back, interleaved with asynchronous
//! `{"event", "data", "timestamp"}` messages. One reader task routes replies
//! to their callers by `id` and events to a broadcast channel; one writer
//! task owns the write half, so a caller that gives up (timeout, dropped
//! future) can never leave half a command on the wire.
//!
//! When the socket closes (QEMU quit or crashed) every pending call fails
//! with [`QmpError::Disconnected`], later calls fail at once, event
//! receivers see the channel close and [`QmpClient::closed`] resolves.
//!
//! Why not the `qapi` crate: it is passively maintained, its types are
//! generated from one newer QEMU schema (fields QEMU 7.2 does not send would
//! not deserialize), it has no call timeout, and its event stream must be
//! polled by the caller for replies to arrive. The protocol subset the
//! daemon needs is small, so it is written here against `serde_json`.
//!
//! OOB is not negotiated: QEMU runs commands one at a time in order, so a
//! command that timed out still delays the ones queued behind it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Events kept for a subscriber that falls behind; older ones are dropped
/// and the subscriber sees `RecvError::Lagged`.
pub const EVENT_BUFFER: usize = 256;

/// Timeouts and limits of one connection.
#[derive(Clone, Debug)]
pub struct QmpOptions {
    /// How long to wait for QEMU's greeting after connecting. A monitor
    /// that already serves another client accepts the connection but stays
    /// silent, so this is also how a busy monitor shows up.
    pub greeting_timeout: Duration,
    /// Default time a command may take to answer.
    pub call_timeout: Duration,
    /// Longest message accepted; a longer one closes the connection.
    pub max_message: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(10),
            // query-cpu-model-expansion answers are ~30 KB; leave room.
            max_message: 16 << 20,
        }
    }
}

/// Why a QMP connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionLost {
    #[error("qemu closed the qmp socket")]
    Eof,
    #[error("qmp socket i/o failed")]
    Io(#[source] io::Error),
    #[error("qemu sent a message that is not json")]
    Json(#[source] serde_json::Error),
    #[error("qemu sent a message longer than {limit} bytes")]
    TooLong { limit: usize },
}

/// A QMP call or connection failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to qmp socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no qmp greeting within {after:?} (is another client connected?)")]
    GreetingTimeout { after: Duration },
    #[error("qmp connection lost before the greeting")]
    GreetingLost(#[source] ConnectionLost),
    #[error("malformed qmp greeting")]
    Greeting(#[source] serde_json::Error),
    #[error("qmp connection lost before {command} was answered")]
    Disconnected {
        command: String,
        #[source]
        cause: Arc<ConnectionLost>,
    },
    /// QEMU ran the command and refused it.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("qmp command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("cannot encode the arguments of qmp command {command}")]
    Encode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected reply to qmp command {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// QEMU's error class for a refused command (`GenericError`,
    /// `CommandNotFound`, `DeviceNotActive`, ...).
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when the connection is gone (QEMU exited or closed it).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }
}

/// When QEMU emitted an event (host wall clock).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// An asynchronous message from QEMU (`STOP`, `RESUME`, `MIGRATION`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    pub timestamp: QmpTimestamp,
}

/// QEMU's version as its greeting states it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// What QEMU announced when the client connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpGreeting {
    pub version: QemuVersion,
    /// Distribution build string, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
    /// Protocol capabilities offered (`oob`); none are enabled.
    pub capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawGreeting {
    #[serde(rename = "QMP")]
    qmp: RawGreetingBody,
}

#[derive(Deserialize)]
struct RawGreetingBody {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

/// A refusal as QEMU words it.
#[derive(Debug, Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

type Reply = Result<Value, RawError>;

struct Pending {
    command: String,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Set once, when the connection ends; later calls fail with it.
    lost: Option<Arc<ConnectionLost>>,
    /// Taken (dropped) when the connection ends, so receivers see Closed.
    events: Option<broadcast::Sender<QmpEvent>>,
}

/// What the reader, the writer and the client handles share.
struct Shared {
    state: Mutex<State>,
    closed: watch::Sender<bool>,
    /// Lines received but matching no pending call (late or unknown ids).
    stray_replies: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection: the first cause wins, pending calls fail
    /// (their senders are dropped; callers read the cause from `lost`).
    fn lose(&self, cause: ConnectionLost) {
        let mut st = self.lock();
        if st.lost.is_some() {
            return;
        }
        debug!(cause = %cause, pending = st.pending.len(), "qmp connection lost");
        st.lost = Some(Arc::new(cause));
        st.pending.clear();
        st.events = None;
        drop(st);
        self.closed.send_replace(true);
    }

    fn lost(&self) -> Option<Arc<ConnectionLost>> {
        self.lock().lost.clone()
    }
}

struct Tasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    /// The last handle gone closes the socket, freeing the monitor for the
    /// next client (a daemon restart, a re-attach).
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A connected, negotiated QMP client. Clones share the connection.
#[derive(Clone)]
pub struct QmpClient {
    shared: Arc<Shared>,
    lines: mpsc::Sender<Vec<u8>>,
    greeting: Arc<QmpGreeting>,
    call_timeout: Duration,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.greeting.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl QmpClient {
    /// Connects to a QMP socket, reads the greeting and leaves negotiation
    /// mode (`qmp_capabilities`, no optional capabilities).
    pub async fn connect(path: &Path, options: &QmpOptions) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::from_stream(stream, options).await
    }

    /// As [`connect`](Self::connect), on an already connected socket.
    pub async fn from_stream(stream: UnixStream, options: &QmpOptions) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        let greeting = tokio::time::timeout(
            options.greeting_timeout,
            read_message(&mut read, &mut line, options.max_message),
        )
        .await
        .map_err(|_| QmpError::GreetingTimeout {
            after: options.greeting_timeout,
        })?
        .map_err(QmpError::GreetingLost)?;
        let raw: RawGreeting = serde_json::from_value(greeting).map_err(QmpError::Greeting)?;
        let greeting = QmpGreeting {
            version: raw.qmp.version.qemu,
            package: raw.qmp.version.package,
            capabilities: raw.qmp.capabilities,
        };

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                events: Some(events),
                ..State::default()
            }),
            closed: watch::Sender::new(false),
            stray_replies: AtomicU64::new(0),
        });
        // A few lines in flight are plenty: callers wait for replies.
        let (lines, rx) = mpsc::channel(16);
        let reader = tokio::spawn(read_loop(
            read,
            line,
            options.max_message,
            Arc::clone(&shared),
        ));
        let writer = tokio::spawn(write_loop(write, rx, Arc::clone(&shared)));
        let client = Self {
            shared,
            lines,
            greeting: Arc::new(greeting),
            call_timeout: options.call_timeout,
            _tasks: Arc::new(Tasks { reader, writer }),
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    pub fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    /// A receiver of every event from now on. It reports `Closed` once the
    /// connection is gone, and `Lagged` if it fell [`EVENT_BUFFER`] behind.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.shared.lock().events {
            Some(tx) => tx.subscribe(),
            // Already closed: a receiver whose sender is gone.
            None => broadcast::channel(1).1,
        }
    }

    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> Arc<ConnectionLost> {
        let mut rx = self.shared.closed.subscribe();
        // The sender lives in `shared`, which we hold: wait_for cannot fail.
        let _ = rx.wait_for(|closed| *closed).await;
        self.shared
            .lost()
            .unwrap_or_else(|| Arc::new(ConnectionLost::Eof))
    }

    /// Replies that matched no pending call (answers that arrived after
    /// their caller timed out).
    pub fn stray_replies(&self) -> u64 {
        self.shared.stray_replies.load(Ordering::Relaxed)
    }

    /// Runs `command` with the default timeout; `arguments` must be a JSON
    /// object when given.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.call_timeout)
            .await
    }

    /// Runs `command`, failing with [`QmpError::Timeout`] after `timeout`.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let disconnected = |cause| QmpError::Disconnected {
            command: command.into(),
            cause,
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.shared.lock();
            if let Some(cause) = &st.lost {
                return Err(disconnected(Arc::clone(cause)));
            }
            st.next_id += 1;
            let id = st.next_id;
            st.pending.insert(
                id,
                Pending {
                    command: command.into(),
                    reply: tx,
                },
            );
            id
        };
        // Whatever happens from here (timeout, the caller dropping this
        // future), the entry must not outlive the call.
        let _forget = ForgetOnDrop {
            shared: &self.shared,
            id,
        };
        let mut message = serde_json::Map::new();
        message.insert("execute".into(), command.into());
        if let Some(arguments) = arguments {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), id.into());
        let mut line = serde_json::to_vec(&message).map_err(|source| QmpError::Encode {
            command: command.into(),
            source,
        })?;
        line.push(b'\n');
        debug!(command, id, "qmp execute");

        let exchange = async {
            if self.lines.send(line).await.is_err() {
                return None;
            }
            rx.await.ok()
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.into(),
                after: timeout,
            }),
            Ok(Some(Ok(value))) => Ok(value),
            Ok(Some(Err(e))) => Err(QmpError::Command {
                command: command.into(),
                class: e.class,
                desc: e.desc,
            }),
            // The writer or reader ended, which only happens through lose().
            Ok(None) => Err(disconnected(
                self.shared
                    .lost()
                    .unwrap_or_else(|| Arc::new(ConnectionLost::Eof)),
            )),
        }
    }

    /// Runs `command` with typed arguments and decodes its `return` value.
    pub async fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: &A,
    ) -> Result<R, QmpError> {
        let arguments = serde_json::to_value(arguments).map_err(|source| QmpError::Encode {
            command: command.into(),
            source,
        })?;
        let value = self.execute(command, Some(arguments)).await?;
        decode(command, value)
    }

    /// Runs an argument-less `command` and decodes its `return` value.
    pub async fn query<R: DeserializeOwned>(&self, command: &str) -> Result<R, QmpError> {
        let value = self.execute(command, None).await?;
        decode(command, value)
    }
}

/// Decodes a `return` value into the type a helper promises.
pub(crate) fn decode<R: DeserializeOwned>(command: &str, value: Value) -> Result<R, QmpError> {
    serde_json::from_value(value).map_err(|source| QmpError::Decode {
        command: command.into(),
        source,
    })
}

struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// Reads one newline-terminated JSON message of at most `limit` bytes.
async fn read_message(
    read: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    limit: usize,
) -> Result<Value, ConnectionLost> {
    loop {
        line.clear();
        let n = (&mut *read)
            .take(limit as u64 + 1)
            .read_until(b'\n', line)
            .await
            .map_err(ConnectionLost::Io)?;
        if n == 0 {
            return Err(ConnectionLost::Eof);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() > limit {
                ConnectionLost::TooLong { limit }
            } else {
                ConnectionLost::Eof
            });
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(line).map_err(ConnectionLost::Json);
    }
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    mut line: Vec<u8>,
    limit: usize,
    shared: Arc<Shared>,
) {
    loop {
        match read_message(&mut read, &mut line, limit).await {
            Ok(message) => route(&shared, message),
            Err(cause) => {
                shared.lose(cause);
                return;
            }
        }
    }
}

/// Hands a message to its caller or to the event subscribers.
fn route(shared: &Shared, mut message: Value) {
    let Some(obj) = message.as_object_mut() else {
        warn!("qmp message is not an object; ignored");
        return;
    };
    if obj.contains_key("event") {
        match serde_json::from_value::<QmpEvent>(message) {
            Ok(event) => {
                debug!(event = %event.event, "qmp event");
                if let Some(tx) = &shared.lock().events {
                    // No subscribers is fine: nobody is listening.
                    let _ = tx.send(event);
                }
            }
            Err(e) => warn!(error = %e, "malformed qmp event; ignored"),
        }
        return;
    }
    let reply = if let Some(value) = obj.remove("return") {
        Ok(value)
    } else if let Some(error) = obj.remove("error") {
        match serde_json::from_value::<RawError>(error) {
            Ok(e) => Err(e),
            Err(e) => {
                warn!(error = %e, "malformed qmp error reply; ignored");
                return;
            }
        }
    } else {
        warn!("qmp message is neither a reply nor an event; ignored");
        return;
    };
    let pending = obj
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|id| shared.lock().pending.remove(&id));
    match pending {
        Some(p) => {
            debug!(command = %p.command, ok = reply.is_ok(), "qmp reply");
            // The caller may have just given up; then nobody wants it.
            let _ = p.reply.send(reply);
        }
        None => {
            shared.stray_replies.fetch_add(1, Ordering::Relaxed);
            debug!(id = ?obj.get("id"), "qmp reply for no pending call (late or unknown id)");
        }
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut lines: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = write.write_all(&line).await {
            shared.lose(ConnectionLost::Io(e));
            return;
        }
    }
}

#[cfg(test)]
mod tests;
