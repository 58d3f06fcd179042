//! Masked client frames, as a peer writes them, for the unit tests of the guard and the socket.

/// A masked client frame with `payload_len` bytes of payload.
pub(super) fn client_frame(first: u8, payload_len: usize) -> Vec<u8> {
    let mut frame = vec![first];
    match payload_len {
        0..=125 => frame.push(0x80 | payload_len as u8),
        126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.resize(frame.len() + payload_len, b'*');
    frame
}

pub(super) const TEXT: u8 = 0x81;
pub(super) const CLOSE: u8 = 0x88;
pub(super) const PONG: u8 = 0x8A;
