//! Any bytes: the decoders return Ok or Err, never panic; whatever decodes re-encodes to the
//! very same bytes (the encoding is canonical), and the stream decoder agrees with the
//! one-frame decoder. The same bytes are then decoded once more with the header's length and
//! checksum fixed up, so that mutations reach the payload decoders instead of stopping at
//! the checksum.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use toma_wire::{decode_frame, decode_from, decode_header, WireError, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= HEADER_LEN {
        let mut fixed = data.to_vec();
        let len = (fixed.len() - HEADER_LEN) as u32;
        fixed[40..44].copy_from_slice(&len.to_le_bytes());
        fixed[44..48].fill(0);
        let crc = crc32c::crc32c(&fixed);
        fixed[44..48].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let one = decode_frame(data);
    if let Ok(frame) = &one {
        let again = frame.to_bytes().expect("a decoded frame encodes");
        assert_eq!(&again[..], data, "re-encoding changed the bytes");
    }
    // The stream decoder looks at the first frame only: compare with that frame alone.
    let expected = match decode_header(data) {
        Ok(h) if h.frame_len() < data.len() => decode_frame(&data[..h.frame_len()]),
        _ => one,
    };
    let mut buf = BytesMut::from(data);
    match decode_from(&mut buf) {
        Ok(Some(frame)) => assert_eq!(expected, Ok(frame)),
        Ok(None) => assert!(
            matches!(expected, Err(WireError::Truncated { .. })),
            "the stream decoder wants more bytes, the frame decoder said {expected:?}"
        ),
        Err(e) => assert_eq!(expected, Err(e)),
    }
}
