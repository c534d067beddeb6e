//! One authenticated connection to a peer host, shared by all migrations
//! between the two hosts, and the streams of each migration on it.
//!
//! The side that sends a guest (the source) opens a migration's streams:
//!
//! ```text
//! source                                   destination
//!   open_bi  control  [hdr kind=1 id n] ──▶  router ─┐
//!   open_bi  priority [hdr kind=2 id 0] ──▶  router ─┤ assembled per id
//!   open_uni bulk 0   [hdr kind=3 id 0] ──▶  router ─┤ until control,
//!   ...                                               │ priority and all n
//!   open_uni bulk n-1 [hdr kind=3 id n-1] ─▶ router ─┘ bulk streams are in
//!                                          accept_migration() ◀─ DestinationStreams
//! ```
//!
//! Every stream starts with a fixed 21-byte header so the receiving side can
//! route it without knowing the order in which QUIC delivers stream openings:
//! magic `b"MS"`, kind (u8), migration id (u128 BE), argument (u16 BE: the
//! bulk stream count on the control stream, the index on a bulk stream).
//! After the header the bytes belong to the page protocol (the codec).
//!
//! The priority stream carries post-copy page requests (destination→source)
//! and their replies; both directions are sent at a higher QUIC priority
//! than the bulk streams so a faulting vCPU does not queue behind a pass.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tracing::{debug, trace, warn};

use super::error::TransportError;
use super::window::{self, SendWindowTuner};
use crate::identity::HostName;

/// Sizes the connection's send window to the path until it closes (see
/// [`super::window`]).
async fn tune_send_window(conn: Connection, (floor, ceiling): (u64, u64), window: Arc<AtomicU64>) {
    if floor >= ceiling {
        return; // a fixed window
    }
    let mut tuner = SendWindowTuner::new(floor, ceiling);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(window::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            now = tick.tick() => {
                let sent = conn.stats().udp_tx.bytes;
                if let Some(w) = tuner.sample(now - start, sent, conn.rtt()) {
                    trace!(window = w, "send window");
                    conn.set_send_window(w);
                    window.store(w, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Largest number of bulk streams one migration may use.
pub const MAX_BULK_STREAMS: u16 = 64;

/// QUIC send priority of post-copy requests and replies.
pub const PRIORITY_POSTCOPY: i32 = 100;
/// QUIC send priority of the control stream: above bulk, so a pass-end or
/// abort is not stuck behind megabytes of pages.
pub const PRIORITY_CONTROL: i32 = 10;
/// QUIC send priority of bulk page streams.
pub const PRIORITY_BULK: i32 = 0;

/// A peer that opens a stream but never sends its header is cut off after
/// this long (it is authenticated, so this only guards against bugs).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const HEADER_LEN: usize = 21;
const MAGIC: [u8; 2] = *b"MS";

/// Identifies a migration on a connection (the migration record's uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(pub u128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Control = 1,
    Priority = 2,
    Bulk = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamHeader {
    kind: StreamKind,
    id: MigrationId,
    arg: u16,
}

impl StreamHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..2].copy_from_slice(&MAGIC);
        out[2] = self.kind as u8;
        out[3..19].copy_from_slice(&self.id.0.to_be_bytes());
        out[19..].copy_from_slice(&self.arg.to_be_bytes());
        out
    }

    fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, TransportError> {
        if buf[..2] != MAGIC {
            return Err(TransportError::BadStream {
                what: "bad stream magic",
            });
        }
        let kind = match buf[2] {
            1 => StreamKind::Control,
            2 => StreamKind::Priority,
            3 => StreamKind::Bulk,
            _ => {
                return Err(TransportError::BadStream {
                    what: "unknown stream kind",
                })
            }
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&buf[3..19]);
        let arg = u16::from_be_bytes([buf[19], buf[20]]);
        if arg >= MAX_BULK_STREAMS && kind == StreamKind::Bulk
            || arg > MAX_BULK_STREAMS && kind == StreamKind::Control
        {
            return Err(TransportError::BadStream {
                what: "too many bulk streams",
            });
        }
        Ok(Self {
            kind,
            id: MigrationId(u128::from_be_bytes(id)),
            arg,
        })
    }
}

/// The source side's streams of one migration.
#[derive(Debug)]
pub struct SourceStreams {
    /// The migration.
    pub id: MigrationId,
    /// Control frames to the destination.
    pub control_tx: SendStream,
    /// Control frames from the destination.
    pub control_rx: RecvStream,
    /// Post-copy replies to the destination (high priority).
    pub priority_tx: SendStream,
    /// Post-copy page requests from the destination.
    pub priority_rx: RecvStream,
    /// Page streams, in index order.
    pub bulk: Vec<SendStream>,
}

/// The destination side's streams of one migration.
#[derive(Debug)]
pub struct DestinationStreams {
    /// The migration.
    pub id: MigrationId,
    /// Control frames to the source.
    pub control_tx: SendStream,
    /// Control frames from the source.
    pub control_rx: RecvStream,
    /// Post-copy page requests to the source (high priority).
    pub priority_tx: SendStream,
    /// Post-copy replies from the source.
    pub priority_rx: RecvStream,
    /// Page streams, in index order.
    pub bulk: Vec<RecvStream>,
}

/// A mutually authenticated connection to one peer host. Cheap to clone;
/// keep one per peer and run every migration to or from that peer over it.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Connection,
    peer: HostName,
    incoming: Mutex<mpsc::Receiver<DestinationStreams>>,
    router: tokio::task::AbortHandle,
    tuner: tokio::task::AbortHandle,
    /// The send window the tuner last set.
    send_window: Arc<AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.router.abort();
        self.tuner.abort();
    }
}

impl PeerConnection {
    /// `send_window`: floor and ceiling of the connection's send window.
    pub(crate) fn new(conn: Connection, peer: HostName, send_window: (u64, u64)) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let router = tokio::spawn(route_streams(conn.clone(), tx)).abort_handle();
        let window = Arc::new(AtomicU64::new(send_window.1));
        let tuner = tokio::spawn(tune_send_window(conn.clone(), send_window, window.clone()))
            .abort_handle();
        Self {
            inner: Arc::new(Inner {
                conn,
                peer,
                incoming: Mutex::new(rx),
                router,
                tuner,
                send_window: window,
            }),
        }
    }

    /// The connection's send window now, in bytes (see
    /// [`super::window`]).
    pub fn send_window(&self) -> u64 {
        self.inner.send_window.load(Ordering::Relaxed)
    }

    /// The peer's verified host name (from its certificate).
    pub fn peer(&self) -> &HostName {
        &self.inner.peer
    }

    /// The peer's current UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.conn.remote_address()
    }

    /// Current smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.inner.conn.rtt()
    }

    /// quinn's counters (bytes, packets, lost packets, path MTU).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.inner.conn.stats()
    }

    /// As source, opens a migration's streams: control, priority and
    /// `bulk_streams` (1..=[`MAX_BULK_STREAMS`]) page streams. The peer gets
    /// them from [`PeerConnection::accept_migration`].
    pub async fn open_migration(
        &self,
        id: MigrationId,
        bulk_streams: u16,
    ) -> Result<SourceStreams, TransportError> {
        if bulk_streams == 0 || bulk_streams > MAX_BULK_STREAMS {
            return Err(TransportError::BadStream {
                what: "bulk stream count out of range",
            });
        }
        let conn = &self.inner.conn;
        let header = |kind, arg| StreamHeader { kind, id, arg }.encode();

        let (mut control_tx, control_rx) = conn.open_bi().await?;
        control_tx.set_priority(PRIORITY_CONTROL)?;
        control_tx
            .write_all(&header(StreamKind::Control, bulk_streams))
            .await?;
        let (mut priority_tx, priority_rx) = conn.open_bi().await?;
        priority_tx.set_priority(PRIORITY_POSTCOPY)?;
        priority_tx
            .write_all(&header(StreamKind::Priority, 0))
            .await?;
        let mut bulk = Vec::with_capacity(usize::from(bulk_streams));
        for index in 0..bulk_streams {
            let mut tx = conn.open_uni().await?;
            tx.set_priority(PRIORITY_BULK)?;
            tx.write_all(&header(StreamKind::Bulk, index)).await?;
            bulk.push(tx);
        }
        debug!(peer = %self.inner.peer, ?id, bulk_streams, "opened migration streams");
        Ok(SourceStreams {
            id,
            control_tx,
            control_rx,
            priority_tx,
            priority_rx,
            bulk,
        })
    }

    /// As destination, waits for the next migration the peer opens and
    /// returns once all of its streams have arrived.
    pub async fn accept_migration(&self) -> Result<DestinationStreams, TransportError> {
        let mut incoming = self.inner.incoming.lock().await;
        tokio::select! {
            streams = incoming.recv() => match streams {
                Some(streams) => Ok(streams),
                None => Err(self.closed().await),
            },
            e = self.inner.conn.closed() => Err(e.into()),
        }
    }

    /// Closes the connection: every stream of every migration on it fails.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner
            .conn
            .close(quinn::VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until the connection is gone and says why (for example
    /// [`TransportError::PeerLost`] after the keepalive window).
    pub async fn closed(&self) -> TransportError {
        self.inner.conn.closed().await.into()
    }

    /// The underlying quinn connection, for callers that need more.
    pub fn quinn(&self) -> &Connection {
        &self.inner.conn
    }
}

/// A stream whose header has been read.
enum Routed {
    Bi(StreamHeader, SendStream, RecvStream),
    Uni(StreamHeader, RecvStream),
}

/// Streams of a migration that has not fully arrived yet.
#[derive(Default)]
struct Pending {
    control: Option<(SendStream, RecvStream, u16)>,
    priority: Option<(SendStream, RecvStream)>,
    bulk: BTreeMap<u16, RecvStream>,
}

impl Pending {
    /// Hands the streams out once everything announced is there.
    fn take_if_complete(&mut self, id: MigrationId) -> Option<DestinationStreams> {
        let count = self.control.as_ref()?.2;
        if self.priority.is_none() || self.bulk.len() != usize::from(count) {
            return None;
        }
        let (control_tx, control_rx, _) = self.control.take()?;
        let (priority_tx, priority_rx) = self.priority.take()?;
        let bulk = std::mem::take(&mut self.bulk).into_values().collect();
        Some(DestinationStreams {
            id,
            control_tx,
            control_rx,
            priority_tx,
            priority_rx,
            bulk,
        })
    }
}

/// Accepts every stream the peer opens, reads its header (concurrently, so
/// one slow stream does not hold up the others) and hands complete
/// migrations to `out`. Streams that break the rules are stopped and logged;
/// the peer is authenticated, so that is a bug on its side, not an attack.
async fn route_streams(conn: Connection, out: mpsc::Sender<DestinationStreams>) {
    let mut headers: JoinSet<Result<Routed, TransportError>> = JoinSet::new();
    let mut pending: HashMap<MigrationId, Pending> = HashMap::new();
    loop {
        tokio::select! {
            bi = conn.accept_bi() => {
                let Ok((send, mut recv)) = bi else { return };
                headers.spawn(async move {
                    let h = read_header(&mut recv).await?;
                    Ok(Routed::Bi(h, send, recv))
                });
            }
            uni = conn.accept_uni() => {
                let Ok(mut recv) = uni else { return };
                headers.spawn(async move {
                    let h = read_header(&mut recv).await?;
                    Ok(Routed::Uni(h, recv))
                });
            }
            Some(joined) = headers.join_next(), if !headers.is_empty() => {
                let routed = match joined {
                    Ok(Ok(routed)) => routed,
                    Ok(Err(e)) => {
                        warn!(peer = %conn.remote_address(), error = %e, "dropped incoming stream");
                        continue;
                    }
                    Err(_) => continue, // header task aborted: router is shutting down
                };
                if let Some(streams) = place(&mut pending, routed) {
                    pending.remove(&streams.id);
                    if out.send(streams).await.is_err() {
                        return; // PeerConnection dropped
                    }
                }
            }
        }
    }
}

async fn read_header(recv: &mut RecvStream) -> Result<StreamHeader, TransportError> {
    let mut buf = [0u8; HEADER_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, recv.read_exact(&mut buf)).await {
        Ok(read) => read?,
        Err(_) => {
            return Err(TransportError::BadStream {
                what: "no stream header",
            })
        }
    }
    StreamHeader::decode(&buf)
}

/// Files a routed stream under its migration; returns the migration's
/// streams when this one completed it.
fn place(
    pending: &mut HashMap<MigrationId, Pending>,
    routed: Routed,
) -> Option<DestinationStreams> {
    let (header, slot_taken) = match routed {
        Routed::Bi(h, send, recv) => {
            let p = pending.entry(h.id).or_default();
            let taken = match h.kind {
                StreamKind::Control if p.control.is_none() => {
                    p.control = Some((send, recv, h.arg));
                    false
                }
                StreamKind::Priority if p.priority.is_none() => {
                    let _ = send.set_priority(PRIORITY_POSTCOPY);
                    p.priority = Some((send, recv));
                    false
                }
                _ => true,
            };
            (h, taken)
        }
        Routed::Uni(h, recv) => {
            let p = pending.entry(h.id).or_default();
            let taken = h.kind != StreamKind::Bulk || p.bulk.contains_key(&h.arg);
            if !taken {
                p.bulk.insert(h.arg, recv);
            }
            (h, taken)
        }
    };
    if slot_taken {
        // Dropping the stream halves tells the peer to stop sending on them.
        warn!(id = ?header.id, kind = ?header.kind, arg = header.arg, "duplicate or misdirected stream dropped");
        return None;
    }
    let p = pending.get_mut(&header.id)?;
    if let Some((_, _, count)) = &p.control {
        if p.bulk.keys().any(|&i| i >= *count) {
            warn!(id = ?header.id, "bulk stream index beyond announced count; migration dropped");
            pending.remove(&header.id);
            return None;
        }
    }
    p.take_if_complete(header.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        for (kind, arg) in [
            (StreamKind::Control, MAX_BULK_STREAMS),
            (StreamKind::Priority, 0),
            (StreamKind::Bulk, MAX_BULK_STREAMS - 1),
        ] {
            let h = StreamHeader {
                kind,
                id: MigrationId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
                arg,
            };
            assert_eq!(StreamHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = StreamHeader {
            kind: StreamKind::Bulk,
            id: MigrationId(7),
            arg: 1,
        }
        .encode();
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        let mut bad_kind = good;
        bad_kind[2] = 9;
        let mut bad_index = good;
        bad_index[19..].copy_from_slice(&MAX_BULK_STREAMS.to_be_bytes());
        for bad in [bad_magic, bad_kind, bad_index] {
            assert!(matches!(
                StreamHeader::decode(&bad),
                Err(TransportError::BadStream { .. })
            ));
        }
    }
}
