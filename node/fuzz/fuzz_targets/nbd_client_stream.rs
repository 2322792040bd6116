//! Feeds arbitrary bytes through the NBD wire decoder as a client's stream: client flags, then
//! option headers and their data (at the lengths the headers declare, as the server reads them),
//! then request headers with WRITE payloads. Checks the decoder's bounds: option data never beyond
//! `MAX_OPTION_DATA`, decoded `NBD_OPT_GO` fields account for every byte, a validated request lies
//! inside the export and within `MAX_PAYLOAD`, and every reply encodes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../src/nbd/proto.rs"]
mod proto;

use proto::{ClientOption, Command, ExportInfo};

fuzz_target!(|data: &[u8]| {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let _ = proto::parse_client_flags(*flags);
    let export = ExportInfo {
        name: "disk".into(),
        size: 1 << 30,
        writable: rest.first().is_some_and(|b| b & 1 == 1),
        description: "fuzz".into(),
        preferred_block: 4096,
    };
    let mut out = Vec::new();
    // Handshake: options until one picks an export (or the input breaks the protocol).
    let mut transmission = false;
    for _ in 0..proto::MAX_OPTIONS {
        let Some((h, r)) = rest.split_first_chunk::<{ proto::OPTION_HEADER_LEN }>() else {
            return;
        };
        let Ok(header) = proto::parse_option_header(h) else {
            break;
        };
        assert!(header.len <= proto::MAX_OPTION_DATA);
        let len = header.len as usize;
        if r.len() < len {
            return;
        }
        let (opt, r) = r.split_at(len);
        rest = r;
        out.clear();
        match proto::parse_option(header.option, opt) {
            Err(rej) => proto::encode_option_error(&mut out, &rej),
            Ok(ClientOption::Info { go, name, requests }) => {
                assert_eq!(4 + name.len() + 2 + 2 * requests.len(), opt.len());
                proto::encode_info_replies(&mut out, header.option, &export, &requests);
                if go {
                    transmission = true;
                    break;
                }
            }
            Ok(ClientOption::ExportName(name)) => {
                assert!(name.len() <= proto::MAX_NAME_LEN);
                proto::encode_export_name_reply(&mut out, &export, true);
                transmission = true;
                break;
            }
            Ok(ClientOption::List) => proto::encode_rep_server(&mut out, &export.name),
            Ok(ClientOption::Abort) => return,
            Ok(ClientOption::StructuredReply | ClientOption::Unsupported(_)) => {}
        }
    }
    if !transmission {
        return;
    }
    // Transmission: request headers, WRITE payloads skipped at their declared length.
    while let Some((h, r)) = rest.split_first_chunk::<{ proto::REQUEST_HEADER_LEN }>() {
        let Ok(req) = proto::parse_request(h) else {
            return;
        };
        let payload = req.payload_len() as usize;
        assert!(payload <= proto::MAX_PAYLOAD as usize);
        rest = r.get(payload..).unwrap_or_default();
        out.clear();
        match proto::validate(&req, &export) {
            Ok(()) => {
                if matches!(req.command, Command::Read | Command::Write) {
                    assert!(req.offset + u64::from(req.length) <= export.size);
                    assert!(req.length <= proto::MAX_PAYLOAD);
                }
                if req.command == Command::Write || req.command == Command::Trim {
                    assert!(export.writable);
                }
                proto::encode_read_header(&mut out, true, req.cookie, req.offset, req.length);
            }
            Err(r) => {
                proto::encode_status_reply(&mut out, true, req.cookie, Err(&r));
                proto::encode_status_reply(&mut out, false, req.cookie, Err(&r));
            }
        }
    }
});
