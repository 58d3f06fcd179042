//! Binary framing (`herald_protocol::binary`): splitting any bytes never panics, and `split` and
//! `join` are inverses: a frame that splits is rebuilt byte for byte by joining its parts, and
//! any header and payload come back unchanged from their joined frame.
#![no_main]

use bytes::Bytes;
use herald_protocol::binary::{PREFIX_BYTES, join, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok((header, payload)) = split(&frame) {
        assert_eq!(PREFIX_BYTES + header.len() + payload.len(), frame.len());
        assert_eq!(join(header, &payload), frame);
    } else {
        assert!(frame.len() < PREFIX_BYTES || declared_header_len(&frame) > frame.len() - PREFIX_BYTES);
    }

    // The first byte picks where the rest is cut into a header and a payload.
    if let Some((&cut, rest)) = data.split_first() {
        let cut = usize::from(cut).min(rest.len());
        let (header, payload) = rest.split_at(cut);
        let joined = join(header, payload);
        let (header_back, payload_back) = split(&joined).expect("a joined frame splits");
        assert_eq!(header_back, header);
        assert_eq!(&payload_back[..], payload);
    }
});

fn declared_header_len(frame: &[u8]) -> usize {
    let mut prefix = [0u8; PREFIX_BYTES];
    prefix.copy_from_slice(&frame[..PREFIX_BYTES]);
    u32::from_be_bytes(prefix) as usize
}
