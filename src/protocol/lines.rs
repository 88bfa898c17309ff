//! The `lines` protocol: text in, text out.
//!
//! Input is the content plus `\n`. The end of a reply is a marker line
//! (`end_marker`, a regex matched against a whole stdout line, which is not
//! output), a prompt (a string printed with no newline after it, on stdout or
//! stderr; one printed at start-up means "ready"), or silence (`quiet_ms`,
//! timed by the session task).
//!
//! Framing of multi-line content: a program that answers line by line ends
//! its answer to *each input line* with a marker or a prompt, so a message of
//! N lines ends with the N-th marker or prompt; the ones before it are not
//! output (they separate the answers to each line). A profile may name a
//! `continuation_prompt` (Python's `... `) that ends a line inside a block
//! just as the prompt does. Silence ends the whole message at once.
//!
//! A prompt counts where a prompt can stand: at the start of a line (or
//! right after the previous prompt), or as the last thing printed so far.
//! Output that contains the prompt text at a line start is ambiguous for any
//! unframed protocol and is taken as a prompt.
//!
//! With `end_marker`, a partial line is held back only while it could still
//! become the marker line (a lazy DFA of the anchored marker says when it no
//! longer can), so replies stream word by word. A marker without a leading
//! `^` can match anywhere, so with such a marker output streams line by line.
//! With a prompt, only a tail that could be the start of a prompt is held.
//!
//! Output printed while no reply runs belongs to no message: it is reported
//! as [`Signal::Unattributed`] (logged and counted by the session), never
//! given to the next message.

use std::time::Duration;

use bytes::Bytes;

use super::utf8::Utf8Decoder;
use super::{Adapter, Outcome, Signal};
use crate::config::LineEnding;

/// Adapter for a persistent `lines` child.
#[derive(Debug)]
pub struct Lines {
    ending: LineEnding,
    /// The prompt, then the continuation prompt if the profile names one.
    prompts: Vec<Vec<u8>>,
    in_reply: bool,
    /// Markers or prompts still to come before the reply ends (one per input line).
    pending_ends: usize,
    /// Stdout bytes not yet emitted (a partial line, or a possible prompt start).
    held: Vec<u8>,
    /// Whether `held` starts at the start of a line (or right after a prompt).
    held_at_line_start: bool,
    /// The last stderr bytes, to find a prompt printed there.
    stderr_tail: Vec<u8>,
    stderr_at_line_start: bool,
    decoder: Utf8Decoder,
    /// Emitted bytes of the current partial stdout line (they are no longer in `held`).
    line_emitted: bool,
    marker: Option<MarkerPrefix>,
}

/// Tells whether a partial line can still grow into a marker line.
struct MarkerPrefix {
    dfa: regex_automata::hybrid::dfa::DFA,
    cache: regex_automata::hybrid::dfa::Cache,
}

impl std::fmt::Debug for MarkerPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MarkerPrefix")
    }
}

impl MarkerPrefix {
    fn new(re: &regex::Regex) -> Option<MarkerPrefix> {
        let dfa = regex_automata::hybrid::dfa::DFA::new(re.as_str()).ok()?;
        let cache = dfa.create_cache();
        Some(MarkerPrefix { dfa, cache })
    }

    /// False only when no continuation of `partial` can match (conservative: true on doubt).
    fn may_match(&mut self, partial: &[u8]) -> bool {
        use regex_automata::{Anchored, Input};
        // A trailing CR may be the start of a CRLF line end, which is not part of the line.
        let partial = partial.strip_suffix(b"\r").unwrap_or(partial);
        let input = Input::new(partial).anchored(Anchored::Yes);
        let Ok(mut sid) = self.dfa.start_state_forward(&mut self.cache, &input) else {
            return true;
        };
        for &b in partial {
            match self.dfa.next_state(&mut self.cache, sid, b) {
                Ok(next) if next.is_dead() => return false,
                Ok(next) => sid = next,
                Err(_) => return true,
            }
        }
        true
    }
}

/// The first prompt in `data` that stands where a prompt can: at a line
/// start (`at_line_start` for index 0), or ending `data`. Returns its start
/// and length.
fn find_prompt(data: &[u8], prompts: &[Vec<u8>], at_line_start: bool) -> Option<(usize, usize)> {
    (0..data.len()).find_map(|i| {
        let line_start = if i == 0 {
            at_line_start
        } else {
            data[i - 1] == b'\n'
        };
        prompts.iter().find_map(|p| {
            let here = data[i..].starts_with(p);
            (here && (line_start || i + p.len() == data.len())).then_some((i, p.len()))
        })
    })
}

impl Lines {
    /// A new adapter ending replies by `ending`.
    pub fn new(ending: LineEnding) -> Lines {
        Lines {
            prompts: match &ending {
                LineEnding::Prompt(p) => vec![p.as_bytes().to_vec()],
                _ => vec![],
            },
            in_reply: false,
            pending_ends: 0,
            held: Vec::new(),
            held_at_line_start: true,
            stderr_tail: Vec::new(),
            stderr_at_line_start: true,
            decoder: Utf8Decoder::default(),
            line_emitted: false,
            marker: match &ending {
                LineEnding::EndMarker(re) if re.as_str().starts_with('^') => MarkerPrefix::new(re),
                _ => None,
            },
            ending,
        }
    }

    /// Also ends a line at `prompt`, the one printed inside a block.
    pub fn with_continuation(mut self, prompt: Option<String>) -> Lines {
        if let (Some(p), LineEnding::Prompt(_)) = (prompt, &self.ending) {
            self.prompts.push(p.into_bytes());
        }
        self
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<Signal>) {
        if bytes.is_empty() {
            return;
        }
        if !self.in_reply {
            out.push(Signal::Unattributed(bytes.len()));
            return;
        }
        let text = self.decoder.decode(bytes);
        if !text.is_empty() {
            out.push(Signal::Delta(text));
        }
    }

    /// One marker or prompt: the end of one input line's answer.
    fn end(&mut self, out: &mut Vec<Signal>) {
        if !self.in_reply {
            out.push(Signal::Ready);
            return;
        }
        self.pending_ends = self.pending_ends.saturating_sub(1);
        if self.pending_ends > 0 {
            return;
        }
        let rest = self.decoder.finish();
        if !rest.is_empty() {
            out.push(Signal::Delta(rest));
        }
        self.in_reply = false;
        out.push(Signal::Done(Outcome::streamed()));
    }

    fn stdout_marker(&mut self, re: &regex::Regex, chunk: &[u8], out: &mut Vec<Signal>) {
        let scan_from = self.held.len();
        self.held.extend_from_slice(chunk);
        let mut start = 0;
        let mut emit_to = 0;
        let mut search = scan_from;
        while let Some(pos) = self.held[search..].iter().position(|b| *b == b'\n') {
            let end = search + pos;
            // A line whose start was already emitted cannot be the marker.
            let candidate = !(start == 0 && self.line_emitted);
            let line = &self.held[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if candidate && re.is_match(&String::from_utf8_lossy(line)) {
                let before = self.held[emit_to..start].to_vec();
                self.emit(&before, out);
                self.end(out);
                emit_to = end + 1;
            }
            start = end + 1;
            search = start;
            if start > 0 {
                self.line_emitted = false;
            }
        }
        let mut ready_to = start;
        // The partial last line: emit it now unless it could become the marker.
        if start < self.held.len() {
            let partial_is_fresh = !(start == 0 && self.line_emitted);
            let may_be_marker = partial_is_fresh
                && self
                    .marker
                    .as_mut()
                    .is_none_or(|m| m.may_match(&self.held[start..]));
            if !may_be_marker {
                ready_to = self.held.len();
                self.line_emitted = true;
            }
        }
        let ready = self.held[emit_to..ready_to].to_vec();
        self.emit(&ready, out);
        self.held.drain(..ready_to);
    }

    fn stdout_prompt(&mut self, chunk: &[u8], out: &mut Vec<Signal>) {
        self.held.extend_from_slice(chunk);
        while let Some((at, len)) = find_prompt(&self.held, &self.prompts, self.held_at_line_start)
        {
            let body: Vec<u8> = self.held.drain(..at + len).take(at).collect();
            self.emit(&body, out);
            self.end(out);
            self.held_at_line_start = true;
        }
        let keep = self
            .prompts
            .iter()
            .map(|p| partial_suffix(&self.held, p))
            .max()
            .unwrap_or(0);
        let body: Vec<u8> = self.held.drain(..self.held.len() - keep).collect();
        if let Some(last) = body.last() {
            self.held_at_line_start = *last == b'\n';
        }
        self.emit(&body, out);
    }
}

/// Length of the longest proper suffix of `data` that is a prefix of `pat`.
fn partial_suffix(data: &[u8], pat: &[u8]) -> usize {
    let max = (pat.len() - 1).min(data.len());
    (1..=max)
        .rev()
        .find(|&n| data.ends_with(&pat[..n]))
        .unwrap_or(0)
}

impl Adapter for Lines {
    fn frame(&mut self, content: &str) -> Bytes {
        self.in_reply = true;
        let mut input = content.as_bytes().to_vec();
        if !input.ends_with(b"\n") {
            input.push(b'\n');
        }
        // One marker or prompt per input line (see the module docs).
        self.pending_ends = input.iter().filter(|b| **b == b'\n').count();
        Bytes::from(input)
    }

    fn stdout(&mut self, chunk: &[u8], out: &mut Vec<Signal>) {
        match self.ending.clone() {
            LineEnding::EndMarker(re) => self.stdout_marker(&re, chunk, out),
            LineEnding::Prompt(_) => self.stdout_prompt(chunk, out),
            LineEnding::Quiet(_) => self.emit(chunk, out),
        }
    }

    fn stderr(&mut self, chunk: &[u8], out: &mut Vec<Signal>) {
        if self.prompts.is_empty() {
            return;
        }
        self.stderr_tail.extend_from_slice(chunk);
        while let Some((at, len)) =
            find_prompt(&self.stderr_tail, &self.prompts, self.stderr_at_line_start)
        {
            self.stderr_tail.drain(..at + len);
            self.stderr_at_line_start = true;
            // A prompt on stderr: what stdout held back is output after all.
            let held = std::mem::take(&mut self.held);
            if let Some(last) = held.last() {
                self.held_at_line_start = *last == b'\n';
            }
            self.emit(&held, out);
            self.end(out);
        }
        // Keep only what may still become a prompt (and whether it starts a line).
        let longest = self.prompts.iter().map(Vec::len).max().unwrap_or(0);
        let keep = self.stderr_tail.len().min(longest);
        let cut = self.stderr_tail.len() - keep;
        if cut > 0 {
            self.stderr_at_line_start = self.stderr_tail[cut - 1] == b'\n';
            self.stderr_tail.drain(..cut);
        }
    }

    fn needs_ready(&self) -> bool {
        matches!(self.ending, LineEnding::Prompt(_))
    }

    fn quiet_after(&self) -> Option<Duration> {
        match self.ending {
            LineEnding::Quiet(d) => Some(d),
            _ => None,
        }
    }

    fn quiet(&mut self, out: &mut Vec<Signal>) {
        if self.in_reply {
            // Silence ends the whole message, however many lines it had.
            self.pending_ends = 1;
            self.end(out);
        }
    }

    fn eof(&mut self, out: &mut Vec<Signal>) {
        let held = std::mem::take(&mut self.held);
        self.emit(&held, out);
        let rest = self.decoder.finish();
        if self.in_reply && !rest.is_empty() {
            out.push(Signal::Delta(rest));
        }
    }
}

/// Adapter for a one-shot `lines` run: all stdout is reply text; the reply
/// ends when the process exits.
#[derive(Debug, Default)]
pub struct Passthrough {
    decoder: Utf8Decoder,
}

impl Adapter for Passthrough {
    fn frame(&mut self, content: &str) -> Bytes {
        let mut input = content.as_bytes().to_vec();
        if !input.ends_with(b"\n") {
            input.push(b'\n');
        }
        Bytes::from(input)
    }

    fn stdout(&mut self, chunk: &[u8], out: &mut Vec<Signal>) {
        let text = self.decoder.decode(chunk);
        if !text.is_empty() {
            out.push(Signal::Delta(text));
        }
    }

    fn stderr(&mut self, _chunk: &[u8], _out: &mut Vec<Signal>) {}

    fn eof(&mut self, out: &mut Vec<Signal>) {
        let rest = self.decoder.finish();
        if !rest.is_empty() {
            out.push(Signal::Delta(rest));
        }
        out.push(Signal::Done(Outcome::streamed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn text(signals: &[Signal]) -> String {
        signals
            .iter()
            .filter_map(|s| match s {
                Signal::Delta(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    fn done(signals: &[Signal]) -> usize {
        signals
            .iter()
            .filter(|s| matches!(s, Signal::Done(_)))
            .count()
    }

    #[test]
    fn end_marker_line_ends_the_reply_and_is_not_output() {
        let mut a = Lines::new(LineEnding::EndMarker(Regex::new("^__END__$").unwrap()));
        let mut out = vec![];
        a.frame("hi");
        a.stdout(b"hello\nwor", &mut out);
        assert_eq!(text(&out), "hello\nwor");
        a.stdout(b"ld\n__EN", &mut out);
        assert_eq!(done(&out), 0);
        a.stdout(b"D__\n", &mut out);
        assert_eq!(text(&out), "hello\nworld\n");
        assert_eq!(done(&out), 1);
    }

    #[test]
    fn partial_lines_stream_unless_they_may_be_the_marker() {
        let mut a = Lines::new(LineEnding::EndMarker(Regex::new("^__END__$").unwrap()));
        let mut out = vec![];
        a.frame("hi");
        a.stdout(b"Hello", &mut out);
        assert_eq!(
            text(&out),
            "Hello",
            "a partial line that cannot be the marker streams"
        );
        a.stdout(b" wor", &mut out);
        a.stdout(b"ld\n__", &mut out);
        assert_eq!(
            text(&out),
            "Hello world\n",
            "`__` may start the marker: held"
        );
        a.stdout(b"END__x", &mut out);
        assert_eq!(text(&out), "Hello world\n__END__x");
        a.stdout(b"\n__END__\n", &mut out);
        assert_eq!(text(&out), "Hello world\n__END__x\n");
        assert_eq!(done(&out), 1);
    }

    #[test]
    fn marker_split_byte_by_byte_with_crlf() {
        let mut a = Lines::new(LineEnding::EndMarker(Regex::new("^END$").unwrap()));
        let mut out = vec![];
        a.frame("x");
        for b in "안녕\r\nEND\r\n".as_bytes() {
            a.stdout(&[*b], &mut out);
        }
        assert_eq!(text(&out), "안녕\r\n");
        assert_eq!(done(&out), 1);
    }

    #[test]
    fn startup_prompt_means_ready_and_reply_prompt_means_done() {
        let mut a = Lines::new(LineEnding::Prompt(">>> ".into()));
        let mut out = vec![];
        a.stderr(b">>> ", &mut out);
        assert_eq!(out, vec![Signal::Ready]);
        out.clear();
        a.frame("print(42)");
        a.stdout(b"42\n>", &mut out);
        assert_eq!(text(&out), "42\n");
        a.stdout(b">> ", &mut out);
        assert_eq!(done(&out), 1);
        assert_eq!(text(&out), "42\n");
    }

    #[test]
    fn prompt_on_stderr_releases_held_stdout() {
        let mut a = Lines::new(LineEnding::Prompt(">>> ".into()));
        let mut out = vec![];
        a.frame("print('a>>')");
        a.stdout(b"a>>", &mut out);
        assert_eq!(text(&out), "a");
        a.stderr(b">>", &mut out);
        a.stderr(b"> ", &mut out);
        assert_eq!(text(&out), "a>>");
        assert_eq!(done(&out), 1);
    }

    #[test]
    fn quiet_mode_streams_everything() {
        let mut a = Lines::new(LineEnding::Quiet(Duration::from_millis(10)));
        let mut out = vec![];
        a.frame("x");
        a.stdout(&"é".as_bytes()[..1], &mut out);
        a.stdout(&"é".as_bytes()[1..], &mut out);
        a.quiet(&mut out);
        assert_eq!(text(&out), "é");
        assert_eq!(done(&out), 1);
    }

    #[test]
    fn partial_suffix_finds_prompt_starts() {
        assert_eq!(partial_suffix(b"abc>>", b">>> "), 2);
        assert_eq!(partial_suffix(b"abc", b">>> "), 0);
        assert_eq!(partial_suffix(b">", b">>> "), 1);
    }
}
