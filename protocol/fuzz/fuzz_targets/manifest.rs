//! Fuzzes the manifest decoder: peers send manifests, so `Manifest::decode` sees hostile bytes.
//! Whatever decodes must validate and re-encode to exactly the input (the canonical form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmswarm_protocol::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert!(m.validate().is_ok(), "decoded manifest must be valid");
        assert_eq!(m.encode_canonical(), data, "decoded manifest must be canonical");
        let id = m.id();
        assert!(Manifest::decode_verified(data, &id).is_ok());
    }
});
