//! Chunk lanes: long-lived QUIC streams that carry chunk requests one way and chunks the other.
//!
//! # What this module decides
//! - **One stream per (peer, class), not one per chunk.** A requester opens a lane to a peer the
//!   first time it asks that peer for a chunk of a class ([`LaneClass::Demand`] or
//!   [`LaneClass::Background`]) and keeps it while the connection lives. Requests and cancels go
//!   one way as frames of `vmswarm_protocol::codec` (the same frames as on `/vmswarm/msg/1`),
//!   chunks and rejections come back the other way, in the order the server's serve queue picks,
//!   each naming its chunk id. A request-response stream per chunk cost a stream set-up, a protocol
//!   negotiation, a timer and several task hand-offs per 256 KiB (BENCHMARKS.md, "Node pull
//!   throughput"); a lane costs a frame.
//! - **Two classes, so a Demand read never queues behind Background bytes.** A lane is a byte
//!   stream: a chunk written into it waits for every chunk written before it. Demand requests
//!   travel on their own lane and are answered on it; quinn shares the connection between
//!   streams round robin, so a Demand chunk gets its share of the link at once even while the
//!   Background lane's send buffer is full. A request upgraded to Demand is answered on the lane
//!   of the upgrade.
//! - **Lanes run in their own tasks.** Reading a chunk from the stream, and on the serving side
//!   reading it from the store and writing it into the stream, happen in the lane's task (store
//!   reads on the blocking pool), not in the daemon task or the libp2p connection task. The daemon
//!   sees one event per request batch and one per chunk; it still makes every decision: the fetch
//!   scheduler which chunk to ask whom for, the serve queue which chunk to send next.
//! - **The vocabulary is checked here.** A requester may send only `Request` and `Cancel`, a server
//!   only `Chunk` and `Reject`. Anything else, bytes that are not a frame, or an oversized frame
//!   ends the lane as hostile ([`LaneError::is_hostile`]); the daemon bans the peer.
//! - **Backpressure is QUIC's.** A server lane writes one chunk at a time; while the stream's
//!   flow-control window is full the write waits, the chunk's upload slot stays taken, and the
//!   serve queue hands out nothing more.
//! - **A slow chunk is reported while it arrives.** If a chunk's bytes are still coming
//!   `ARRIVING_REPORT_AFTER` (500 ms) after its head was read, the lane tells the daemon
//!   ([`LaneEvent::Arriving`]) so that the fetch scheduler does not fetch the chunk a second time
//!   (hedge, or time out a request to another site) while the first copy is on its way.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use vmswarm_protocol::wire::{Message, RejectReason};
use vmswarm_protocol::{ChunkId, Priority};

use super::buffers;
use super::codec::{read_frame_reporting, write_frame};
use crate::store::ChunkStore;

/// The protocol name negotiated on each lane.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/vmswarm/chunks/1");

/// How long opening a lane may take before its requests count as failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Identifies one lane within the daemon (outbound and inbound lanes are numbered apart).
pub type LaneId = u64;

/// Which requests a lane carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneClass {
    /// Chunks a VM is blocked on.
    Demand,
    /// Everything else.
    Background,
}

impl From<Priority> for LaneClass {
    fn from(p: Priority) -> Self {
        match p {
            Priority::Demand => LaneClass::Demand,
            Priority::Background => LaneClass::Background,
        }
    }
}

/// Why a lane ended.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The stream could not be opened.
    #[error("opening a chunk lane: {0}")]
    Open(String),
    /// The peer sent bytes that are not a message, or an oversized frame.
    #[error("the peer sent bytes that are not a message: {0}")]
    Malformed(io::Error),
    /// The peer sent a message that has no place on its side of a lane.
    #[error("the peer sent {0} on a chunk lane")]
    Unexpected(&'static str),
    /// The stream failed or was reset (the connection closed, the peer went away).
    #[error("chunk lane: {0}")]
    Io(io::Error),
    /// The peer closed the lane while we had not.
    #[error("the peer closed the chunk lane")]
    Closed,
}

impl LaneError {
    /// Whether the peer broke the protocol (as opposed to going away): grounds for a ban.
    pub fn is_hostile(&self) -> bool {
        matches!(self, LaneError::Malformed(_) | LaneError::Unexpected(_))
    }

    fn from_read(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::InvalidData {
            LaneError::Malformed(e)
        } else {
            LaneError::Io(e)
        }
    }
}

/// What lanes tell the daemon.
#[derive(Debug)]
pub enum LaneEvent {
    /// An answer (`Chunk` or `Reject`) arrived on one of our lanes.
    Answer {
        /// The server.
        peer: PeerId,
        /// The answer.
        msg: Message,
    },
    /// A chunk's bytes have been arriving on one of our lanes for `ARRIVING_REPORT_AFTER` and
    /// it is not complete yet.
    Arriving {
        /// The server.
        peer: PeerId,
        /// The chunk.
        id: ChunkId,
    },
    /// One of our lanes ended; requests that went out on it will not be answered.
    OutboundClosed {
        /// The server.
        peer: PeerId,
        /// The lane's class.
        class: LaneClass,
        /// The lane.
        lane: LaneId,
        /// Why.
        error: LaneError,
    },
    /// A peer opened a lane to us; `serve` reaches its writer.
    InboundOpened {
        /// The requester.
        peer: PeerId,
        /// The lane.
        lane: LaneId,
        /// Commands for the lane's writer.
        serve: mpsc::UnboundedSender<ServeCmd>,
    },
    /// A `Request` or `Cancel` arrived on a lane a peer opened.
    Request {
        /// The requester.
        peer: PeerId,
        /// The lane it came on.
        lane: LaneId,
        /// The message.
        msg: Message,
    },
    /// A [`ServeCmd::Chunk`] was carried out: the chunk was handed to QUIC (`bytes`), or we do not
    /// hold it and a `NotFound` went out instead (`None`), or the stream had failed.
    Served {
        /// The requester.
        peer: PeerId,
        /// The lane.
        lane: LaneId,
        /// The chunk.
        id: ChunkId,
        /// Bytes handed to QUIC, if the chunk was sent.
        bytes: Option<u64>,
    },
    /// A lane a peer opened ended (`None`: we closed it).
    InboundClosed {
        /// The requester.
        peer: PeerId,
        /// The lane.
        lane: LaneId,
        /// Why, if the peer or the stream ended it.
        error: Option<LaneError>,
    },
}

/// What the daemon tells a serving lane.
#[derive(Debug)]
pub enum ServeCmd {
    /// Read this chunk from the store and send it (a `NotFound` rejection if it is gone).
    Chunk(ChunkId),
    /// Send this message (a rejection).
    Send(Message),
}

/// Starts an outbound lane to `peer`: opens the stream, then writes the `Request` and `Cancel`
/// messages that arrive on `requests` and reports answers until either side ends it.
pub fn spawn_outbound(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    class: LaneClass,
    lane: LaneId,
    mut requests: mpsc::UnboundedReceiver<Message>,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    tokio::spawn(async move {
        let result = async {
            let stream = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL))
                .await
                .map_err(|_| LaneError::Open(format!("no stream within {OPEN_TIMEOUT:?}")))?
                .map_err(|e| LaneError::Open(e.to_string()))?;
            let (mut rd, mut wr) = stream.split();
            let writer = async {
                while let Some(msg) = requests.recv().await {
                    write_frame(&mut wr, msg).await.map_err(LaneError::Io)?;
                }
                // The daemon dropped the lane: finish our side; the server sees a clean end.
                wr.close().await.map_err(LaneError::Io)
            };
            let reader = async {
                let mut slow = |id| {
                    let _ = events.send(LaneEvent::Arriving { peer, id });
                };
                loop {
                    let msg = next_frame(
                        &mut rd,
                        |m| matches!(m, Message::Chunk { .. } | Message::Reject { .. }),
                        Some(&mut slow),
                    )
                    .await?;
                    if events.send(LaneEvent::Answer { peer, msg }).is_err() {
                        return Ok(()); // the daemon is shutting down
                    }
                }
            };
            tokio::select! {
                r = writer => r,
                r = reader => r,
            }
        }
        .await;
        if let Err(error) = result {
            let _ = events.send(LaneEvent::OutboundClosed {
                peer,
                class,
                lane,
                error,
            });
        }
    });
}

/// Accepts the lanes peers open to us, numbering them and starting a serving task for each.
pub fn spawn_accept(
    mut incoming: libp2p_stream::IncomingStreams,
    store: Arc<ChunkStore>,
    corrupt_served_chunks: bool,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    tokio::spawn(async move {
        let mut next: LaneId = 0;
        while let Some((peer, stream)) = incoming.next().await {
            next += 1;
            let lane = next;
            let (serve, cmds) = mpsc::unbounded_channel();
            // Sent before the lane's task starts, so the daemon knows the lane before its requests.
            if events
                .send(LaneEvent::InboundOpened { peer, lane, serve })
                .is_err()
            {
                return;
            }
            tokio::spawn(serve_lane(
                peer,
                lane,
                stream,
                cmds,
                store.clone(),
                corrupt_served_chunks,
                events.clone(),
            ));
        }
    });
}

/// Runs one lane a peer opened: requests in, chunks and rejections out.
async fn serve_lane(
    peer: PeerId,
    lane: LaneId,
    stream: libp2p::Stream,
    mut cmds: mpsc::UnboundedReceiver<ServeCmd>,
    store: Arc<ChunkStore>,
    corrupt: bool,
    events: mpsc::UnboundedSender<LaneEvent>,
) {
    let (mut rd, mut wr) = stream.split();
    let result = {
        let writer = async {
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    ServeCmd::Send(msg) => {
                        write_frame(&mut wr, msg).await.map_err(LaneError::Io)?
                    }
                    ServeCmd::Chunk(id) => {
                        let (msg, bytes) = read_chunk(&store, id, corrupt).await;
                        let written = write_frame(&mut wr, msg).await;
                        // Reported whether or not the write worked: the upload slot is free.
                        let _ = events.send(LaneEvent::Served {
                            peer,
                            lane,
                            id,
                            bytes: bytes.filter(|_| written.is_ok()),
                        });
                        written.map_err(LaneError::Io)?;
                    }
                }
            }
            // The daemon dropped the lane (the peer was banned or went away).
            let _ = wr.close().await;
            Ok(())
        };
        let reader = async {
            loop {
                let msg = next_frame(
                    &mut rd,
                    |m| matches!(m, Message::Request { .. } | Message::Cancel { .. }),
                    None,
                )
                .await?;
                if events.send(LaneEvent::Request { peer, lane, msg }).is_err() {
                    return Ok(());
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
        }
    };
    // Commands still queued are never carried out; the daemon counts them and frees their slots
    // when it hears of the end. Closing the receiver first makes its later sends fail instead.
    drop(cmds);
    let _ = events.send(LaneEvent::InboundClosed {
        peer,
        lane,
        error: result.err(),
    });
}

/// Reads the next frame of a lane whose peer may send only the messages `allowed` accepts;
/// `slow` hears of a chunk still arriving after `ARRIVING_REPORT_AFTER`.
async fn next_frame<R: futures::AsyncRead + Unpin + Send>(
    rd: &mut R,
    allowed: fn(&Message) -> bool,
    slow: Option<&mut (dyn FnMut(ChunkId) + Send)>,
) -> Result<Message, LaneError> {
    match read_frame_reporting(rd, slow).await {
        Ok(Some(msg)) if allowed(&msg) => Ok(msg),
        Ok(Some(msg)) => Err(LaneError::Unexpected(msg.kind())),
        Ok(None) => Err(LaneError::Closed),
        Err(e) => Err(LaneError::from_read(e)),
    }
}

/// Reads a chunk to serve (on the blocking pool; the store re-checks its hash) and makes the
/// message that answers its request, with the byte count if it is a chunk.
async fn read_chunk(store: &Arc<ChunkStore>, id: ChunkId, corrupt: bool) -> (Message, Option<u64>) {
    let store = store.clone();
    let read = tokio::task::spawn_blocking(move || {
        // A recycled buffer: it goes back to the pool once the frame is written.
        let mut buf = buffers::take(store.chunk_len(&id).unwrap_or(0) as usize);
        store
            .get_into(&id, &mut buf)
            .map(|held| held.then_some(buf))
    })
    .await;
    let not_found = Message::Reject {
        chunk: id,
        reason: RejectReason::NotFound,
    };
    match read {
        Ok(Ok(Some(mut data))) => {
            if corrupt {
                if let Some(b) = data.first_mut() {
                    *b ^= 0xff;
                }
            }
            let len = data.len() as u64;
            (Message::Chunk { id, data }, Some(len))
        }
        Ok(Ok(None)) => (not_found, None),
        Ok(Err(e)) => {
            tracing::error!(chunk = %id, "reading chunk to serve: {e}");
            (not_found, None)
        }
        Err(e) => {
            tracing::error!(chunk = %id, "reading chunk to serve: task failed: {e}");
            (not_found, None)
        }
    }
}
