//! The NBD wire format, sans I/O: the fixed-newstyle handshake, option parsing, request decoding,
//! request validation and reply encoding (NetworkBlockDevice `doc/proto.md`).
//!
//! This module decides what a byte sequence from a client *means* and what bytes answer it. It never
//! reads a socket: [`super::server`] reads exactly the lengths this module names ([`OPTION_HEADER_LEN`],
//! [`REQUEST_HEADER_LEN`], an option's declared length after [`parse_option_header`] accepted it) and
//! writes what it encodes. Everything a hostile client controls is bounded here: option data is at
//! most [`MAX_OPTION_DATA`] bytes, a READ/WRITE payload at most [`MAX_PAYLOAD`], and a malformed
//! request becomes an error reply (or, where the protocol leaves the server no way to stay in sync,
//! an error that closes the connection) — never a panic.
//!
//! It depends on `std` and `thiserror` only, so the fuzz target (`node/fuzz`) compiles it alone.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic (server greeting) and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Bytes of the server greeting (magic, magic, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Largest option payload accepted (the spec caps names and strings at 4096 bytes; `NBD_OPT_GO`
/// adds a length, a count and a few info requests).
pub const MAX_OPTION_DATA: u32 = 8192;
/// Largest READ or WRITE payload, and the advertised maximum block size (the spec's 32 MiB
/// "never a denial of service" bound).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Most options one connection may send before it must pick an export.
pub const MAX_OPTIONS: u32 = 64;
/// Longest export name accepted.
pub const MAX_NAME_LEN: usize = 4096;

// Handshake flags (server) and client flags.
/// Server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
/// Always set: the flags field is meaningful.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// The FUA request flag is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections to one export see one consistent state (flush on one covers all).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// Info types.
/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
/// Force unit access: the write is durable when answered.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must write, not punch.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flags this server understands.
const KNOWN_CMD_FLAGS: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF;

// Structured reply.
/// Last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// NBD error numbers (the spec's, which match Linux errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// I/O error (a chunk could not be fetched in time, a disk error).
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument (out of range, bad flags).
    Inval = 22,
    /// No space left.
    NoSpc = 28,
    /// Value too large (request longer than the maximum payload).
    Overflow = 75,
    /// Not supported (unknown command).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

/// A request the client sent that cannot be followed: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client flags have unknown bits or ask for something the server did not offer.
    #[error("client flags {0:#x} are not supported (only fixed newstyle and no-zeroes are)")]
    BadClientFlags(u32),
    /// The client does not speak fixed newstyle.
    #[error("client does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// An option header does not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option carries more data than any option may.
    #[error("option {option} declares {len} bytes of data (at most {MAX_OPTION_DATA} accepted)")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// The declared length.
        len: u32,
    },
    /// A request header does not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A WRITE declares a payload that cannot be accepted; its bytes cannot be skipped safely.
    #[error("write of {0} bytes exceeds the maximum payload of {MAX_PAYLOAD} bytes")]
    WriteTooLong(u32),
    /// The client sent more options than a handshake needs.
    #[error("more than {MAX_OPTIONS} options during the handshake")]
    TooManyOptions,
}

/// The client's flags, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client asked for no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Validates the client's 32-bit flags.
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::BadClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number.
    pub option: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

/// Decodes an option header; the caller then reads exactly `len` more bytes.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(field(b, 0));
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(field(b, 8));
    let len = u32::from_be_bytes(field(b, 12));
    if len > MAX_OPTION_DATA {
        return Err(ProtoError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: pick an export, no error reply possible.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        /// Whether this is `NBD_OPT_GO`.
        go: bool,
        /// The export name ("" = default export).
        name: String,
        /// Information types the client asked for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// An option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// A well-framed option whose contents are wrong: answered with an error reply, the handshake goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRejection {
    /// The option to reply to.
    pub option: u32,
    /// The `NBD_REP_ERR_*` type.
    pub reply: u32,
    /// A message for the client's user.
    pub message: String,
}

fn reject(option: u32, reply: u32, message: impl Into<String>) -> OptionRejection {
    OptionRejection {
        option,
        reply,
        message: message.into(),
    }
}

/// Decodes an option's data. `data.len()` is the length from the header.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionRejection> {
    match option {
        OPT_EXPORT_NAME => {
            if data.len() > MAX_NAME_LEN {
                return Err(reject(option, REP_ERR_TOO_BIG, "export name too long"));
            }
            let name = std::str::from_utf8(data)
                .map_err(|_| reject(option, REP_ERR_INVALID, "export name is not UTF-8"))?;
            Ok(ClientOption::ExportName(name.to_owned()))
        }
        // The spec: a server SHOULD ignore data sent with NBD_OPT_ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST | OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return Err(reject(option, REP_ERR_INVALID, "this option takes no data"));
            }
            Ok(if option == OPT_LIST {
                ClientOption::List
            } else {
                ClientOption::StructuredReply
            })
        }
        OPT_INFO | OPT_GO => {
            let bad = |m: &str| reject(option, REP_ERR_INVALID, m);
            if data.len() < 6 {
                return Err(bad("NBD_OPT_INFO/GO data shorter than 6 bytes"));
            }
            let name_len = u32::from_be_bytes(field(data, 0)) as usize;
            if name_len > data.len() - 6 {
                return Err(bad("export name length exceeds the option data"));
            }
            if name_len > MAX_NAME_LEN {
                return Err(reject(option, REP_ERR_TOO_BIG, "export name too long"));
            }
            let name = std::str::from_utf8(&data[4..4 + name_len])
                .map_err(|_| bad("export name is not UTF-8"))?
                .to_owned();
            let rest = &data[4 + name_len..];
            let count = usize::from(u16::from_be_bytes(field(rest, 0)));
            let list = &rest[2..];
            if list.len() != count * 2 {
                return Err(bad(
                    "information request count does not match the option length",
                ));
            }
            let requests = list
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Ok(ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Reads an `N`-byte big-endian field at `at`; callers checked the length (missing bytes read as 0).
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

/// Appends an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Our replies are built from bounded fields (names <= 4096 bytes, messages we write).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error option reply carrying `message`.
pub fn encode_option_error(out: &mut Vec<u8>, r: &OptionRejection) {
    encode_option_reply(out, r.option, r.reply, r.message.as_bytes());
}

/// Appends an `NBD_REP_SERVER` entry for `name`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// What the server tells a client about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether WRITE, TRIM and WRITE_ZEROES are allowed.
    pub writable: bool,
    /// A description for the client's user.
    pub description: String,
    /// Preferred block size (a power of two).
    pub preferred_block: u32,
}

impl ExportInfo {
    /// The transmission flags for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.writable {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        f
    }
}

/// Appends the `NBD_REP_INFO` replies for `NBD_OPT_INFO`/`GO` (export info always; name,
/// description and block sizes when asked) and the final `NBD_REP_ACK`.
pub fn encode_info_replies(out: &mut Vec<u8>, option: u32, e: &ExportInfo, requests: &[u16]) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&e.size.to_be_bytes());
    d.extend_from_slice(&e.transmission_flags().to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(e.description.as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
    // Block sizes are sent always: the minimum is 1 (any alignment is served), so a client that
    // did not ask loses nothing by ignoring them.
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&e.preferred_block.to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Appends the answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client
/// negotiated no-zeroes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, e: &ExportInfo, no_zeroes: bool) {
    out.extend_from_slice(&e.size.to_be_bytes());
    out.extend_from_slice(&e.transmission_flags().to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (followed by `length` bytes of data).
    Write,
    /// `NBD_CMD_DISC`: soft disconnect.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (answered `NBD_EINVAL`; no payload is assumed).
    Other(u16),
}

impl Command {
    fn from_u16(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            o => Command::Other(o),
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Payload bytes that follow this header on the wire (WRITE data), which the caller must read
    /// (or the stream is out of sync) even if the request is then refused.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Decodes a request header. A WRITE longer than [`MAX_PAYLOAD`] is a [`ProtoError`]: its payload
/// would have to be read to stay in sync, which is what the bound refuses to do.
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes(field(b, 0));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    let r = Request {
        flags: u16::from_be_bytes(field(b, 4)),
        command: Command::from_u16(u16::from_be_bytes(field(b, 6))),
        cookie: u64::from_be_bytes(field(b, 8)),
        offset: u64::from_be_bytes(field(b, 16)),
        length: u32::from_be_bytes(field(b, 24)),
    };
    if r.command == Command::Write && r.length > MAX_PAYLOAD {
        return Err(ProtoError::WriteTooLong(r.length));
    }
    Ok(r)
}

/// Why a well-framed request is refused (answered with an error; the connection stays up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error number.
    pub errno: Errno,
    /// A message for the client's user (sent in structured error replies).
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.errno, self.message)
    }
}

fn refuse(errno: Errno, message: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

/// Checks a request against the export: known command and flags, range inside the export, payload
/// bound, writes only to writable exports.
pub fn validate(r: &Request, e: &ExportInfo) -> Result<(), Refusal> {
    if r.flags & !KNOWN_CMD_FLAGS != 0 {
        return Err(refuse(
            Errno::Inval,
            format!("unknown command flags {:#x}", r.flags),
        ));
    }
    let ranged = match r.command {
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => true,
        Command::Flush | Command::Disc => false,
        Command::Other(c) => {
            return Err(refuse(
                Errno::Inval,
                format!("command {c} is not supported"),
            ));
        }
    };
    let writes = matches!(
        r.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && !e.writable {
        return Err(refuse(
            Errno::Perm,
            "the export is read-only (mount a clone to write)",
        ));
    }
    if r.flags & CMD_FLAG_NO_HOLE != 0 && r.command != Command::WriteZeroes {
        return Err(refuse(
            Errno::Inval,
            "NO_HOLE is only valid for WRITE_ZEROES",
        ));
    }
    if r.flags & CMD_FLAG_DF != 0 && r.command != Command::Read {
        return Err(refuse(Errno::Inval, "DF is only valid for READ"));
    }
    if ranged {
        if r.command == Command::Read && r.length > MAX_PAYLOAD {
            return Err(refuse(
                Errno::Overflow,
                format!(
                    "read of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
                    r.length
                ),
            ));
        }
        let end = r.offset.checked_add(u64::from(r.length));
        if end.is_none_or(|end| end > e.size) {
            return Err(refuse(
                Errno::Inval,
                format!(
                    "range {}+{} is past the end of the export ({} bytes)",
                    r.offset, r.length, e.size
                ),
            ));
        }
    }
    Ok(())
}

/// Appends a simple reply header (READ data, if any, follows).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn encode_structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk for `data_len` bytes at
/// `offset`; the data follows.
pub fn encode_offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32) {
    encode_structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_NONE` chunk (success without payload).
pub fn encode_structured_done(out: &mut Vec<u8>, cookie: u64) {
    encode_structured_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk with a message (truncated to 4096 bytes).
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, errno: Errno, message: &str) {
    let mut msg = message.as_bytes();
    if msg.len() > MAX_NAME_LEN {
        let mut end = MAX_NAME_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        msg = &msg[..end];
    }
    encode_structured_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&(errno as u32).to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends the reply to a request without a data payload: success or `refusal`, structured or
/// simple as negotiated.
pub fn encode_status_reply(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    result: Result<(), &Refusal>,
) {
    match (structured, result) {
        (true, Ok(())) => encode_structured_done(out, cookie),
        (true, Err(r)) => encode_structured_error(out, cookie, r.errno, &r.message),
        (false, Ok(())) => encode_simple_reply(out, cookie, 0),
        (false, Err(r)) => encode_simple_reply(out, cookie, r.errno as u32),
    }
}

/// Appends the header of a successful READ reply of `len` bytes (the data follows).
pub fn encode_read_header(out: &mut Vec<u8>, structured: bool, cookie: u64, offset: u64, len: u32) {
    if structured {
        encode_offset_data_header(out, cookie, offset, len);
    } else {
        encode_simple_reply(out, cookie, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export(writable: bool) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            size: 1 << 20,
            writable,
            description: "test".into(),
            preferred_block: 4096,
        }
    }

    fn header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_and_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(
            parse_client_flags(3u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            parse_client_flags(0u32.to_be_bytes()),
            Err(ProtoError::NotFixedNewstyle)
        );
        assert_eq!(
            parse_client_flags(5u32.to_be_bytes()),
            Err(ProtoError::BadClientFlags(5))
        );
    }

    #[test]
    fn option_headers() {
        assert_eq!(
            parse_option_header(&header(OPT_GO, 10)),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 10
            })
        );
        assert!(matches!(
            parse_option_header(&header(OPT_GO, MAX_OPTION_DATA + 1)),
            Err(ProtoError::OptionTooLong { .. })
        ));
        let mut bad = header(OPT_GO, 0);
        bad[0] ^= 1;
        assert!(matches!(
            parse_option_header(&bad),
            Err(ProtoError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_option(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME])),
            Ok(ClientOption::Info {
                go: true,
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // Name length past the data, count not matching, too short.
        let mut d = go_data("disk", &[]);
        d[3] = 200;
        assert_eq!(
            parse_option(OPT_INFO, &d).unwrap_err().reply,
            REP_ERR_INVALID
        );
        let mut d = go_data("disk", &[1]);
        d.push(0);
        assert_eq!(parse_option(OPT_GO, &d).unwrap_err().reply, REP_ERR_INVALID);
        assert_eq!(
            parse_option(OPT_GO, &[0, 0]).unwrap_err().reply,
            REP_ERR_INVALID
        );
        assert_eq!(parse_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert_eq!(
            parse_option(OPT_LIST, &[1]).unwrap_err().reply,
            REP_ERR_INVALID
        );
        assert_eq!(parse_option(OPT_ABORT, &[1, 2]), Ok(ClientOption::Abort));
        assert_eq!(
            parse_option(OPT_STARTTLS, &[]),
            Ok(ClientOption::Unsupported(OPT_STARTTLS))
        );
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, &[0xff]).unwrap_err().reply,
            REP_ERR_INVALID
        );
    }

    #[test]
    fn requests_and_validation() {
        let e = export(false);
        let r = parse_request(&request(0, 0, 9, 4096, 512)).unwrap();
        assert_eq!(r.command, Command::Read);
        assert_eq!(r.cookie, 9);
        assert_eq!(validate(&r, &e), Ok(()));
        let past = parse_request(&request(0, 0, 1, (1 << 20) - 1, 2)).unwrap();
        assert_eq!(validate(&past, &e).unwrap_err().errno, Errno::Inval);
        let wrap = parse_request(&request(0, 0, 1, u64::MAX, 2)).unwrap();
        assert_eq!(validate(&wrap, &e).unwrap_err().errno, Errno::Inval);
        let big = parse_request(&request(0, 0, 1, 0, MAX_PAYLOAD + 1)).unwrap();
        assert_eq!(validate(&big, &e).unwrap_err().errno, Errno::Overflow);
        let w = parse_request(&request(0, 1, 1, 0, 512)).unwrap();
        assert_eq!(w.payload_len(), 512);
        assert_eq!(validate(&w, &e).unwrap_err().errno, Errno::Perm);
        assert_eq!(validate(&w, &export(true)), Ok(()));
        assert_eq!(
            parse_request(&request(0, 1, 1, 0, MAX_PAYLOAD + 1)),
            Err(ProtoError::WriteTooLong(MAX_PAYLOAD + 1))
        );
        let unknown = parse_request(&request(0, 42, 1, 0, 0)).unwrap();
        assert_eq!(validate(&unknown, &e).unwrap_err().errno, Errno::Inval);
        let flags = parse_request(&request(1 << 9, 0, 1, 0, 1)).unwrap();
        assert_eq!(validate(&flags, &e).unwrap_err().errno, Errno::Inval);
        let mut bad = request(0, 0, 1, 0, 1);
        bad[3] = 0;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn replies() {
        let mut out = Vec::new();
        encode_read_header(&mut out, true, 7, 4096, 100);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u64::from_be_bytes(out[8..16].try_into().unwrap()), 7);
        assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 108);
        assert_eq!(u64::from_be_bytes(out[20..28].try_into().unwrap()), 4096);
        out.clear();
        let r = refuse(Errno::Io, "x".repeat(5000));
        encode_status_reply(&mut out, true, 1, Err(&r));
        assert_eq!(out.len(), 20 + 6 + MAX_NAME_LEN);
        assert_eq!(u32::from_be_bytes(out[20..24].try_into().unwrap()), 5);
        out.clear();
        encode_status_reply(&mut out, false, 3, Err(&r));
        assert_eq!(out.len(), 16);
        assert_eq!(u32::from_be_bytes(out[4..8].try_into().unwrap()), 5);
        out.clear();
        encode_info_replies(&mut out, OPT_GO, &export(true), &[INFO_NAME]);
        // export info (20+12), name (20+2+4), block size (20+14), ack (20).
        assert_eq!(out.len(), 32 + 26 + 34 + 20);
        out.clear();
        encode_export_name_reply(&mut out, &export(false), false);
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    proptest! {
        #[test]
        fn option_parsing_never_panics_and_bounds_hold(option in 0u32..12, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(ClientOption::Info { name, requests, .. }) = parse_option(option, &data) {
                prop_assert_eq!(4 + name.len() + 2 + 2 * requests.len(), data.len());
            }
        }

        #[test]
        fn go_roundtrip(name in "[a-z0-9._-]{0,64}", reqs in proptest::collection::vec(0u16..8, 0..10)) {
            let parsed = parse_option(OPT_GO, &go_data(&name, &reqs)).unwrap();
            prop_assert_eq!(parsed, ClientOption::Info { go: true, name, requests: reqs });
        }

        #[test]
        fn request_roundtrip(flags in any::<u16>(), cmd in 0u16..10, cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
            match parse_request(&request(flags, cmd, cookie, offset, len)) {
                Ok(r) => {
                    prop_assert_eq!((r.flags, r.cookie, r.offset, r.length), (flags, cookie, offset, len));
                    let e = export(true);
                    if validate(&r, &e).is_ok() && matches!(r.command, Command::Read | Command::Write) {
                        prop_assert!(r.offset + u64::from(r.length) <= e.size);
                        prop_assert!(r.length <= MAX_PAYLOAD);
                    }
                }
                Err(ProtoError::WriteTooLong(l)) => prop_assert!(cmd == 1 && l > MAX_PAYLOAD),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn option_header_bounds(bytes in proptest::array::uniform16(any::<u8>())) {
            if let Ok(h) = parse_option_header(&bytes) {
                prop_assert!(h.len <= MAX_OPTION_DATA);
            }
        }
    }
}
