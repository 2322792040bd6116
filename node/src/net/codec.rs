//! The vmswarm wire protocol over libp2p request-response streams.
//!
//! Every message travels on its own QUIC stream as one frame of `vmswarm_protocol::codec` (4-byte
//! length prefix, bincode payload, hard size limit): the request is written and the stream's write
//! side closed, the answer comes back the same way. The frame limit is checked from the prefix alone,
//! before anything is buffered, so a hostile peer cannot make us allocate past it. Decoding and
//! validation are the protocol crate's; this module only moves bytes.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use vmswarm_protocol::codec::{self, MAX_FRAME_LEN};
use vmswarm_protocol::wire::Message;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/vmswarm/msg/1");

/// Request-response codec for [`Message`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCodec;

async fn read_message<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Message> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (limit {MAX_FRAME_LEN})"),
        ));
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    codec::decode(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_message<T: AsyncWrite + Unpin + Send>(io: &mut T, msg: &Message) -> io::Result<()> {
    let mut frame = Vec::new();
    codec::encode_frame(msg, &mut frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&frame).await?;
    io.close().await
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
        write_message(io, &req).await
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
        write_message(io, &res).await
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
            write_message(&mut buf, &Message::Ack).await.unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(read_message(&mut rd).await.unwrap(), Message::Ack);

            let mut huge = Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let err = read_message(&mut huge).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);

            let mut garbage = Cursor::new(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]);
            assert!(read_message(&mut garbage).await.is_err());
        });
    }
}
