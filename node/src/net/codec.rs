//! The vmswarm wire protocol's frames on libp2p streams.
//!
//! Control messages (Hello, Have, manifests, ...) travel over request-response: each on its own QUIC
//! stream as one frame of `vmswarm_protocol::codec` (4-byte length prefix, bincode payload, hard
//! size limit); the request is written and the stream's write side closed, the answer comes back
//! the same way. Chunk lanes ([`super::lane`]) carry many frames each way on one stream
//! ([`read_frame`], [`write_frame`]). The frame limit is checked from the prefix alone,
//! before anything is buffered, so a hostile peer cannot make us allocate past it. Decoding and
//! validation are the protocol crate's; this module only moves bytes.
//!
//! Chunk messages take a shorter path (see `vmswarm_protocol::codec`, "Chunk messages without
//! copying their bytes"): a received chunk's bytes are read from the stream straight into a
//! recycled buffer ([`super::buffers`]), and a chunk being sent is written as its head followed by
//! the bytes from the buffer they were read into, which then goes back to the pool. Each saves a
//! copy of every chunk and an allocation.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use vmswarm_protocol::ChunkId;
use vmswarm_protocol::codec::{self, MAX_CHUNK_HEAD_LEN, MAX_FRAME_LEN};
use vmswarm_protocol::fetch::ARRIVING_REPORT_AFTER;
use vmswarm_protocol::wire::Message;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/vmswarm/msg/1");

/// Request-response codec for [`Message`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCodec;

async fn read_message<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Message> {
    read_frame(io)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}

/// Reads one frame as a [`Message`]; `None` if the stream ended cleanly before the frame began
/// (the peer closed its side between messages). An end inside a frame is an error.
pub(crate) async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<Option<Message>> {
    read_frame_reporting(io, None).await
}

/// [`read_frame`], calling `slow` with a chunk message's id if its bytes are still arriving
/// [`ARRIVING_REPORT_AFTER`] after its head was read (the fetch scheduler's
/// `handle_chunk_arriving`).
pub(crate) async fn read_frame_reporting<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    slow: Option<&mut (dyn FnMut(ChunkId) + Send)>,
) -> io::Result<Option<Message>> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        let n = io.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (limit {MAX_FRAME_LEN})"),
        ));
    }
    let mut head = [0u8; MAX_CHUNK_HEAD_LEN];
    let head_len = len.min(MAX_CHUNK_HEAD_LEN);
    io.read_exact(&mut head[..head_len]).await?;
    if let Some(h) = codec::decode_chunk_head(&head[..head_len]) {
        if h.head_len + h.data_len == len {
            // Exactly a chunk message: its bytes go straight into their own buffer.
            let mut data = super::buffers::take(h.data_len);
            let early = head_len - h.head_len;
            data[..early].copy_from_slice(&head[h.head_len..head_len]);
            let mut rest = io.read_exact(&mut data[early..]);
            match slow {
                None => rest.await?,
                Some(slow) => match tokio::time::timeout(ARRIVING_REPORT_AFTER, &mut rest).await {
                    Ok(done) => done?,
                    Err(_) => {
                        slow(h.id);
                        rest.await?;
                    }
                },
            }
            let msg = Message::Chunk { id: h.id, data };
            msg.validate()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return Ok(Some(msg));
        }
    }
    let mut payload = vec![0u8; len];
    payload[..head_len].copy_from_slice(&head[..head_len]);
    io.read_exact(&mut payload[head_len..]).await?;
    codec::decode(&payload)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_message<T: AsyncWrite + Unpin + Send>(io: &mut T, msg: Message) -> io::Result<()> {
    write_frame(io, msg).await?;
    io.close().await
}

/// Writes `msg` as one frame, leaving the stream open (a chunk's buffer goes back to the pool).
pub(crate) async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: Message,
) -> io::Result<()> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    if let Message::Chunk { id, data } = msg {
        let head = codec::chunk_payload_head(&id, data.len()).map_err(invalid)?;
        // chunk_payload_head bounds data.len() by MAX_CHUNK_BYTES, far below u32::MAX.
        let len = u32::try_from(head.len() + data.len()).unwrap_or(u32::MAX);
        let mut start = Vec::with_capacity(4 + head.len());
        start.extend_from_slice(&len.to_be_bytes());
        start.extend_from_slice(&head);
        io.write_all(&start).await?;
        let written = io.write_all(&data).await;
        super::buffers::give(data);
        return written;
    }
    let mut frame = Vec::new();
    codec::encode_frame(&msg, &mut frame).map_err(invalid)?;
    io.write_all(&frame).await
}

impl libp2p::request_response::Codec for WireCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn round_trip_and_limits() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_message(&mut buf, Message::Ack).await.unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(read_message(&mut rd).await.unwrap(), Message::Ack);

            let mut huge = Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let err = read_message(&mut huge).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);

            let mut garbage = Cursor::new(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]);
            assert!(read_message(&mut garbage).await.is_err());

            // Chunks take the copy-free path both ways and arrive equal; so do small ones.
            for len in [1usize, 40, 100_000, 262_144] {
                let msg = Message::Chunk {
                    id: vmswarm_protocol::ChunkId([3; 32]),
                    data: (0..len).map(|i| i as u8).collect(),
                };
                let mut framed = Vec::new();
                codec::encode_frame(&msg, &mut framed).unwrap();
                let mut buf = Cursor::new(Vec::new());
                write_message(&mut buf, msg.clone()).await.unwrap();
                assert_eq!(buf.get_ref(), &framed, "same bytes as encode_frame");
                let mut rd = Cursor::new(buf.into_inner());
                assert_eq!(read_message(&mut rd).await.unwrap(), msg);
            }
            // A chunk frame whose announced data is longer than the frame: refused, not read.
            let msg = Message::Chunk {
                id: vmswarm_protocol::ChunkId([3; 32]),
                data: vec![5; 1000],
            };
            let mut framed = Vec::new();
            codec::encode_frame(&msg, &mut framed).unwrap();
            let short = (framed.len() as u32 - 4 - 10).to_be_bytes();
            framed[..4].copy_from_slice(&short);
            framed.truncate(framed.len() - 10);
            assert!(read_message(&mut Cursor::new(framed)).await.is_err());
        });
    }

    /// A chunk whose bytes stall after its head is reported once, by id, and still read whole;
    /// one that is all there is not reported.
    #[tokio::test]
    async fn a_slow_chunk_is_reported_as_arriving() {
        use futures::TryStreamExt;
        let id = vmswarm_protocol::ChunkId([9; 32]);
        let msg = Message::Chunk {
            id,
            data: vec![7; 100_000],
        };
        let mut framed = Vec::new();
        codec::encode_frame(&msg, &mut framed).unwrap();

        let mut reported = Vec::new();
        let mut note = |id| reported.push(id);
        let mut fast = Cursor::new(framed.clone());
        let got = read_frame_reporting(&mut fast, Some(&mut note)).await;
        assert_eq!(got.unwrap(), Some(msg.clone()));
        assert!(
            reported.is_empty(),
            "a chunk that is all there: {reported:?}"
        );

        let (tx, rx) = futures::channel::mpsc::unbounded::<io::Result<Vec<u8>>>();
        let rest = framed.split_off(1000);
        tx.unbounded_send(Ok(framed)).unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(ARRIVING_REPORT_AFTER * 2).await;
            let _ = tx.unbounded_send(Ok(rest));
        });
        let mut slow = rx.into_async_read();
        let mut note = |id| reported.push(id);
        let got = read_frame_reporting(&mut slow, Some(&mut note)).await;
        assert_eq!(got.unwrap(), Some(msg));
        assert_eq!(reported, vec![id]);
    }
}
