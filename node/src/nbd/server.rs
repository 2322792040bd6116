//! The NBD server's I/O: listeners (unix socket or TCP), the handshake and the transmission phase
//! of each connection, driven by the sans-IO [`super::proto`].
//!
//! This module decides how connections are run: one task per connection; requests are decoded in
//! order, each is executed in its own task (at most [`MAX_IN_FLIGHT`] per connection, so a slow
//! on-demand fetch does not block reads of local chunks behind it), and replies are written whole by
//! one writer task, so they never interleave. The payload bytes of one connection (READ lengths,
//! WRITE data) are bounded by [`MAX_IN_FLIGHT_BYTES`] from the moment a request is read until its
//! reply has been written to the socket: a client that queues many large READs and never reads the
//! replies makes the server stop reading its requests, not allocate gigabytes. A protocol violation (bad magic, unknown client flags,
//! an oversized WRITE, a handshake that takes longer than [`HANDSHAKE_TIMEOUT`]) closes that one
//! connection; nothing is shared between connections but the export table, so a hostile client
//! cannot disturb other clients or exports. What a request *does* is the [`Backend`]'s business.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::proto::{self, ClientOption, Command, ExportInfo, ProtoError, Refusal};

/// Requests of one connection executed at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes (READ lengths and WRITE data) of one connection in flight at once, counted from the
/// request until its reply is written out, so that a client queueing many maximal reads and not
/// reading the replies cannot make the node allocate gigabytes. When the budget is spent the server
/// reads no further requests until replies drain. A request larger than the budget still runs (it
/// takes the whole budget). 64 MiB is two maximal ([`proto::MAX_PAYLOAD`]) requests, and four times
/// what the usual clients keep in flight (`qemu-img convert`: 8 coroutines x 2 MiB; `nbdcopy`: 64 x
/// 256 KiB; the kernel's `nbd` client: at most 128 x 128 KiB per queue), so they never wait on it.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Accounting unit of [`MAX_IN_FLIGHT_BYTES`].
const BYTE_UNIT: u64 = 64 << 10;
/// [`MAX_IN_FLIGHT_BYTES`] in [`BYTE_UNIT`]s.
const BUDGET_UNITS: u64 = MAX_IN_FLIGHT_BYTES / BYTE_UNIT;
/// The whole handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What an export does with requests. Offsets and lengths were validated against
/// [`Backend::info`] (inside the export, at most [`proto::MAX_PAYLOAD`] for READ and WRITE).
pub trait Backend: Send + Sync + 'static {
    /// Name, size, writability.
    fn info(&self) -> &ExportInfo;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<u8>, Refusal>> + Send;
    /// Writes `data` at `offset`; durable before returning if `fua`.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// The client no longer needs these bytes.
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// A request of one of this export's connections waits because the connection's
    /// [`MAX_IN_FLIGHT_BYTES`] are spent (for counters; nothing to do by default).
    fn budget_wait(&self) {}
    /// Makes these bytes read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;
}

/// One export in a table: its backend and the switch that closes its connections.
#[derive(Debug)]
struct Entry<B> {
    backend: Arc<B>,
    closed: watch::Sender<bool>,
}

/// The exports served on one listener, by name. Cloning shares the table.
#[derive(Debug)]
pub struct ExportTable<B> {
    inner: Arc<RwLock<BTreeMap<String, Entry<B>>>>,
}

impl<B> Clone for ExportTable<B> {
    fn clone(&self) -> Self {
        ExportTable {
            inner: self.inner.clone(),
        }
    }
}

impl<B> Default for ExportTable<B> {
    fn default() -> Self {
        ExportTable {
            inner: Arc::new(RwLock::new(BTreeMap::new())),
        }
    }
}

impl<B: Backend> ExportTable<B> {
    /// Adds an export; false if the name is taken.
    pub fn insert(&self, backend: Arc<B>) -> bool {
        let name = backend.info().name.clone();
        let mut t = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if t.contains_key(&name) {
            return false;
        }
        let (closed, _) = watch::channel(false);
        t.insert(name, Entry { backend, closed });
        true
    }

    /// Removes an export and closes its connections (in-flight requests finish; no new ones are
    /// read). Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut t = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match t.remove(name) {
            Some(e) => {
                let _ = e.closed.send(true);
                true
            }
            None => false,
        }
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The export called `name`; "" means the only export, if there is exactly one.
    fn lookup(&self, name: &str) -> Option<(Arc<B>, watch::Receiver<bool>)> {
        let t = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let e = if name.is_empty() && t.len() == 1 {
            t.values().next()
        } else {
            t.get(name)
        }?;
        Some((e.backend.clone(), e.closed.subscribe()))
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The client broke the protocol.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// Reading or writing the socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake took too long.
    #[error("handshake not finished within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    /// The client picked an export that does not exist with `NBD_OPT_EXPORT_NAME`.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
}

/// Serves one client connection until it disconnects, breaks the protocol, or its export is removed.
pub async fn serve_connection<S, B>(stream: S, table: ExportTable<B>) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let chosen = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &table))
        .await
        .map_err(|_| ConnError::HandshakeTimeout)??;
    let Some((backend, closed, structured)) = chosen else {
        return Ok(());
    };
    transmission(rd, wr, backend, closed, structured).await
}

type Chosen<B> = Option<(Arc<B>, watch::Receiver<bool>, bool)>;

async fn handshake<R, W, B>(
    rd: &mut R,
    wr: &mut W,
    table: &ExportTable<B>,
) -> Result<Chosen<B>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    wr.write_all(&proto::greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(flags)?;
    let mut structured = false;
    let mut out = Vec::new();
    for _ in 0..proto::MAX_OPTIONS {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let header = proto::parse_option_header(&h)?;
        // Bounded by MAX_OPTION_DATA.
        let mut data = vec![0u8; header.len as usize];
        rd.read_exact(&mut data).await?;
        out.clear();
        let mut done = None;
        match proto::parse_option(header.option, &data) {
            Err(rejection) => proto::encode_option_error(&mut out, &rejection),
            Ok(ClientOption::ExportName(name)) => {
                let Some((backend, closed)) = table.lookup(&name) else {
                    // The protocol allows no error reply here: the session ends.
                    return Err(ConnError::UnknownExport(name));
                };
                proto::encode_export_name_reply(&mut out, backend.info(), client.no_zeroes);
                done = Some((backend, closed, structured));
            }
            Ok(ClientOption::Abort) => {
                proto::encode_option_reply(&mut out, header.option, proto::REP_ACK, &[]);
                // The client may already have closed; either way the session is over.
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            Ok(ClientOption::List) => {
                for name in table.names() {
                    proto::encode_rep_server(&mut out, &name);
                }
                proto::encode_option_reply(&mut out, header.option, proto::REP_ACK, &[]);
            }
            Ok(ClientOption::Info { go, name, requests }) => match table.lookup(&name) {
                Some((backend, closed)) => {
                    proto::encode_info_replies(&mut out, header.option, backend.info(), &requests);
                    if go {
                        done = Some((backend, closed, structured));
                    }
                }
                None => {
                    let msg = format!("no export named {name:?} (NBD_OPT_LIST lists them)");
                    proto::encode_option_reply(
                        &mut out,
                        header.option,
                        proto::REP_ERR_UNKNOWN,
                        msg.as_bytes(),
                    );
                }
            },
            Ok(ClientOption::StructuredReply) => {
                if structured {
                    proto::encode_option_reply(
                        &mut out,
                        header.option,
                        proto::REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    proto::encode_option_reply(&mut out, header.option, proto::REP_ACK, &[]);
                }
            }
            Ok(ClientOption::Unsupported(option)) => {
                proto::encode_option_reply(
                    &mut out,
                    option,
                    proto::REP_ERR_UNSUP,
                    b"option not supported",
                );
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        if done.is_some() {
            return Ok(done);
        }
    }
    Err(ProtoError::TooManyOptions.into())
}

async fn transmission<R, W, B>(
    mut rd: R,
    mut wr: W,
    backend: Arc<B>,
    mut closed: watch::Receiver<bool>,
    structured: bool,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    // Each reply is a header and (for READ) its data, written back to back without copying the data.
    // The byte budget a request holds travels with its reply and is released once the reply is
    // written to the socket (or dropped with it).
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, Vec<u8>, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((head, data, bytes_permit)) = rx.recv().await {
            if wr.write_all(&head).await.is_err() || wr.write_all(&data).await.is_err() {
                return;
            }
            crate::net::buffers::give(data);
            drop(bytes_permit);
            // Coalesce replies that are already queued before flushing.
            while let Ok((head, data, bytes_permit)) = rx.try_recv() {
                if wr.write_all(&head).await.is_err() || wr.write_all(&data).await.is_err() {
                    return;
                }
                crate::net::buffers::give(data);
                drop(bytes_permit);
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let result = loop {
        let mut h = [0u8; proto::REQUEST_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut h) => {
                if let Err(e) = r {
                    // EOF between requests is a hard disconnect by the client: fine.
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e.into()) };
                }
            }
            _ = closed.wait_for(|c| *c) => break Ok(()),
        }
        let req = match proto::parse_request(&h) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let mut payload = Vec::new();
        if req.payload_len() > 0 {
            // Bounded by MAX_PAYLOAD (parse_request refused longer writes).
            payload = vec![0u8; req.payload_len() as usize];
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        if req.command == Command::Disc {
            // Soft disconnect: finish what is in flight, then close.
            let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
            break Ok(());
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        // Reads and writes hold their payload size of the byte budget until their reply is written
        // (at least one unit, at most the whole budget; a read longer than MAX_PAYLOAD is refused
        // before it allocates anything). While the budget is spent no further request is read.
        let bytes = match req.command {
            Command::Read => u64::from(req.length.min(proto::MAX_PAYLOAD)),
            _ => u64::from(req.payload_len()),
        };
        let units = bytes.div_ceil(BYTE_UNIT).clamp(1, BUDGET_UNITS) as u32;
        let bytes_permit = match budget.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                backend.budget_wait();
                tokio::select! {
                    p = budget.clone().acquire_many_owned(units) => match p {
                        Ok(p) => p,
                        Err(_) => break Ok(()),
                    },
                    _ = closed.wait_for(|c| *c) => break Ok(()),
                }
            }
        };
        let tx = tx.clone();
        let backend = backend.clone();
        tokio::spawn(async move {
            let (head, data) = execute(&*backend, req, payload, structured).await;
            let _ = tx.send((head, data, bytes_permit)).await;
            drop(permit);
        });
    };
    drop(tx);
    // Let in-flight requests answer, then the writer drains and closes.
    let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
    let _ = writer.await;
    result
}

/// Runs one validated-or-not request and encodes its whole reply.
async fn execute<B: Backend>(
    backend: &B,
    req: proto::Request,
    payload: Vec<u8>,
    structured: bool,
) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    if let Err(r) = proto::validate(&req, backend.info()) {
        proto::encode_status_reply(&mut out, structured, req.cookie, Err(&r));
        return (out, Vec::new());
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let result = match req.command {
        Command::Read => match backend.read(req.offset, req.length).await {
            Ok(data) if data.len() == req.length as usize => {
                proto::encode_read_header(&mut out, structured, req.cookie, req.offset, req.length);
                return (out, data);
            }
            Ok(data) => Err(Refusal {
                errno: proto::Errno::Io,
                message: format!(
                    "internal error: read returned {} of {} bytes",
                    data.len(),
                    req.length
                ),
            }),
            Err(r) => Err(r),
        },
        Command::Write => backend.write(req.offset, payload, fua).await,
        Command::Flush => backend.flush().await,
        Command::Trim => backend.trim(req.offset, req.length).await,
        Command::WriteZeroes => backend.write_zeroes(req.offset, req.length, fua).await,
        // validate() refused these.
        Command::Disc | Command::Other(_) => Ok(()),
    };
    if let Err(r) = &result {
        tracing::debug!(export = %backend.info().name, ?req, "request failed: {r}");
    }
    proto::encode_status_reply(
        &mut out,
        structured,
        req.cookie,
        result.as_ref().map(|_| ()),
    );
    (out, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory writable export.
    #[derive(Debug)]
    struct Mem {
        info: ExportInfo,
        data: Mutex<Vec<u8>>,
    }

    impl Backend for Mem {
        fn info(&self) -> &ExportInfo {
            &self.info
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Refusal> {
            let d = self.data.lock().unwrap();
            Ok(d[offset as usize..offset as usize + len as usize].to_vec())
        }
        async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), Refusal> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), Refusal> {
            Ok(())
        }
        async fn trim(&self, _offset: u64, _len: u32) -> Result<(), Refusal> {
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), Refusal> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + len as usize].fill(0);
            Ok(())
        }
    }

    fn table(names: &[&str]) -> ExportTable<Mem> {
        let t = ExportTable::default();
        for n in names {
            assert!(t.insert(Arc::new(Mem {
                info: ExportInfo {
                    name: (*n).into(),
                    size: 65536,
                    writable: true,
                    description: String::new(),
                    preferred_block: 4096,
                },
                data: Mutex::new(vec![0u8; 65536]),
            })));
        }
        t
    }

    async fn option(c: &mut tokio::io::DuplexStream, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).await.unwrap();
    }

    /// Reads one option reply: (option, type, data).
    async fn reply(c: &mut tokio::io::DuplexStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).await.unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    async fn start(
        t: ExportTable<Mem>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<(), ConnError>>,
    ) {
        let (mut c, s) = tokio::io::duplex(1 << 20);
        let h = tokio::spawn(serve_connection(s, t));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(g, proto::greeting());
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
        (c, h)
    }

    fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[tokio::test]
    async fn list_go_write_read_structured() {
        let (mut c, h) = start(table(&["a", "b"])).await;
        option(&mut c, proto::OPT_LIST, &[]).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_SERVER);
        assert_eq!(reply(&mut c).await.1, proto::REP_SERVER);
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        option(&mut c, proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        // "" is ambiguous with two exports.
        option(&mut c, proto::OPT_GO, &[0, 0, 0, 0, 0, 0]).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_UNKNOWN);
        option(&mut c, proto::OPT_GO, &[0, 0, 0, 1, b'b', 0, 0]).await;
        let (_, t, d) = reply(&mut c).await;
        assert_eq!(t, proto::REP_INFO);
        assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 65536);
        assert_eq!(reply(&mut c).await.1, proto::REP_INFO); // block size
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);

        let mut w = request(1, 1, 4096, 4);
        w.extend_from_slice(b"abcd");
        c.write_all(&w).await.unwrap();
        let mut r = [0u8; 20];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        c.write_all(&request(0, 2, 4094, 8)).await.unwrap();
        let mut r = [0u8; 20 + 8 + 8];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 2);
        assert_eq!(&r[28..], b"\0\0abcd\0\0");
        // Out of range: a structured error, the connection stays.
        c.write_all(&request(0, 3, 65535, 2)).await.unwrap();
        let mut r = [0u8; 20];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), proto::REPLY_TYPE_ERROR);
        let len = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
        let mut e = vec![0u8; len];
        c.read_exact(&mut e).await.unwrap();
        assert_eq!(u32::from_be_bytes(e[..4].try_into().unwrap()), 22);
        c.write_all(&request(2, 4, 0, 0)).await.unwrap();
        h.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn garbage_and_oversized_writes_close_only_that_connection() {
        let t = table(&["a"]);
        let (mut c, h) = start(t.clone()).await;
        c.write_all(b"this is not an NBD option header")
            .await
            .unwrap();
        assert!(matches!(h.await.unwrap(), Err(ConnError::Proto(_))));

        let (mut c, h) = start(t.clone()).await;
        option(&mut c, proto::OPT_GO, &[0, 0, 0, 0, 0, 0]).await;
        while reply(&mut c).await.1 != proto::REP_ACK {}
        c.write_all(&request(1, 1, 0, u32::MAX)).await.unwrap();
        assert!(matches!(
            h.await.unwrap(),
            Err(ConnError::Proto(ProtoError::WriteTooLong(_)))
        ));

        // Another client still works; simple replies without structured negotiation.
        let (mut c, h) = start(t).await;
        option(&mut c, proto::OPT_EXPORT_NAME, b"a").await;
        let mut r = [0u8; 10];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 65536);
        c.write_all(&request(0, 9, 0, 4)).await.unwrap();
        let mut r = [0u8; 16 + 4];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        c.write_all(&request(2, 4, 0, 0)).await.unwrap();
        h.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn removing_an_export_closes_its_connections() {
        let t = table(&["a"]);
        let (mut c, h) = start(t.clone()).await;
        option(&mut c, proto::OPT_GO, &[0, 0, 0, 1, b'a', 0, 0]).await;
        while reply(&mut c).await.1 != proto::REP_ACK {}
        assert!(t.remove("a"));
        h.await.unwrap().unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
