//! The request header buffer parser (`header_map::parse`): any bytes parse or are
//! refused without a panic, and any header list the host could serialize comes back
//! exactly (lossily only where a name or value is not UTF-8).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate_filter::header_map::parse;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Pairs(Vec<(Vec<u8>, Vec<u8>)>),
}

/// The host's serialization (proxy-wasm ABI), written independently of the parser.
fn serialize(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k);
        out.push(0);
        out.extend(v);
        out.push(0);
    }
    out
}

fuzz_target!(|input: Input| match input {
    Input::Raw(bytes) => {
        let _ = parse(&bytes);
    }
    Input::Pairs(pairs) => {
        let buf = serialize(&pairs);
        let got = parse(&buf).expect("a well-formed map is refused");
        assert_eq!(got.len(), pairs.len());
        for ((k, v), (gk, gv)) in pairs.iter().zip(&got) {
            assert_eq!(gk.as_ref(), String::from_utf8_lossy(k));
            assert_eq!(gv.as_ref(), String::from_utf8_lossy(v));
        }
    }
});
