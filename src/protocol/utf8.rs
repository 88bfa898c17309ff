//! Incremental UTF-8 decoding for text that arrives in pipe-sized pieces.
//!
//! A character whose bytes are split across two reads is held back until its
//! last byte arrives instead of becoming U+FFFD. Bytes that are invalid
//! whatever follows them still become U+FFFD, so bad output cannot stall a
//! reply.

/// Decodes a byte stream into UTF-8 text piece by piece.
#[derive(Debug, Default, Clone)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `bytes`, keeping an incomplete trailing character for later.
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        if self.pending.is_empty() {
            // Fast path: nothing carried over, and the common case is valid text.
            if let Ok(s) = std::str::from_utf8(bytes) {
                return s.to_owned();
            }
            return self.decode_slow(bytes.to_vec());
        }
        let mut data = std::mem::take(&mut self.pending);
        data.extend_from_slice(bytes);
        self.decode_slow(data)
    }

    fn decode_slow(&mut self, data: Vec<u8>) -> String {
        let mut out = String::with_capacity(data.len());
        let mut rest = &data[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // SAFETY-free: `valid_up_to` marks a valid prefix.
                    out.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Flushes what is held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_survive_every_cut() {
        let text = "가나 😀 é";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut d = Utf8Decoder::default();
            let mut s = d.decode(&bytes[..cut]);
            s.push_str(&d.decode(&bytes[cut..]));
            s.push_str(&d.finish());
            assert_eq!(s, text, "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let text = "🎉 한국어";
        let mut d = Utf8Decoder::default();
        let s: String = text.as_bytes().iter().map(|b| d.decode(&[*b])).collect();
        assert_eq!(s, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_and_do_not_stall() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.decode(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(d.decode(b"\xe2\x82"), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
