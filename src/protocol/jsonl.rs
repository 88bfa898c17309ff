//! Splitting stdout into lines for the JSON-lines protocols (claude
//! stream-json, ACP): no cap on a line's length (a claude line may be many
//! MiB), and each byte is searched for a newline once, however the reads cut
//! a long line.

/// Bytes of the current partial line and where the newline search resumes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    scanned: usize,
}

impl LineSplitter {
    /// Adds `chunk`; returns every line it completed, without the `\n`.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        let mut start = 0;
        let mut search = self.scanned;
        while let Some(pos) = self.buf[search..].iter().position(|b| *b == b'\n') {
            let end = search + pos;
            lines.push(self.buf[start..end].to_vec());
            start = end + 1;
            search = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        lines
    }

    /// The unterminated last line, at the end of the stream.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        self.scanned = 0;
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_however_the_reads_cut_them() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"{\"a\"").is_empty());
        assert_eq!(
            s.push(b":1}\n{\"b\":2}\n{\"c"),
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(s.finish(), Some(b"{\"c".to_vec()));
        assert_eq!(s.finish(), None);
    }
}
