//! Generators of hostile client input for the property tests of every parser
//! of it: arbitrary strings and bytes, and strings built from the pieces a
//! parser looks for (so that generated inputs reach past its first check).
//!
//! Each parser's test runs [`CASES`] inputs: over ten parsers, well over
//! 10^5 in all.

use proptest::prelude::*;

/// Inputs per parser.
pub const CASES: u32 = 12_000;

pub fn config() -> ProptestConfig {
    ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() }
}

/// A segment a REAPI name or route might hold, valid or nearly so.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("blobs".to_string()),
        Just("uploads".to_string()),
        Just("compressed-blobs".to_string()),
        Just("zstd".to_string()),
        Just("deflate".to_string()),
        Just("sha256".to_string()),
        Just("blake3".to_string()),
        Just("md5".to_string()),
        Just("actionResults".to_string()),
        Just("cas".to_string()),
        Just("ac".to_string()),
        Just(String::new()),
        "[0-9a-f]{0,130}",
        "-?[0-9]{0,21}",
        "[0-9a-f]{8}-[0-9a-f]{4}",
        "[a-zA-Z0-9%:.+-]{0,12}",
        ".{0,6}",
    ]
}

/// Slash-separated segments: resource names, paths, instance names.
pub fn path() -> impl Strategy<Value = String> {
    prop_oneof![prop::collection::vec(segment(), 0..10).prop_map(|s| s.join("/")), any::<String>(),]
}

/// Short text built from characters parsers treat specially.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,40}", "[0-9.eE+-]{0,24}[a-zA-Z ]{0,5}", "[%&=+:;,{}a-f0-9]{0,40}", any::<String>()]
}

/// Bytes, arbitrary or near protobuf's wire format.
pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(
            prop_oneof![Just(0x0a), Just(0x12), Just(0x00), Just(0x80), Just(0xff), any::<u8>()],
            0..256
        ),
    ]
}
