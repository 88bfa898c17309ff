//! The reader task: one per child, owning its stdout and stderr pipes.
//!
//! One task reads both pipes so that their order is kept where it matters: a
//! program that flushes stdout and then prints a prompt on stderr (Python's
//! `>>> `) must have its stdout delivered first. Before a stderr chunk is
//! forwarded, stdout is drained without blocking; whatever the child wrote to
//! stdout before that stderr write is in the pipe by then.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use tokio::net::unix::pipe::Receiver;
use tokio::sync::mpsc;

use super::ChildEvent;

const CHUNK: usize = 64 * 1024;

thread_local! {
    /// One read buffer per runtime thread, shared by the readers of every
    /// child: an idle session then holds no buffer at all (a buffer per
    /// reader was up to 64 KiB of RSS per session). Reads are synchronous
    /// (`try_read`) and the bytes are copied out before any `.await`, so the
    /// borrow never spans a suspension point.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
}

/// Reads until both pipes reach EOF or the receiver is gone.
pub(super) async fn read(stdout: Receiver, stderr: Option<Receiver>, tx: mpsc::Sender<ChildEvent>) {
    let mut out = Some(stdout);
    let mut err = stderr;
    while out.is_some() || err.is_some() {
        tokio::select! {
            biased;
            ready = readable(&out), if out.is_some() => {
                if ready.is_err() { out = None; continue; }
                if !drain(&mut out, &tx).await { return; }
            }
            ready = readable(&err), if err.is_some() => {
                if ready.is_err() { err = None; continue; }
                match try_read(err.as_ref().expect("guarded")) {
                    Read::Data(chunk) => {
                        if !drain(&mut out, &tx).await { return; }
                        if tx.send(ChildEvent::Stderr(chunk)).await.is_err() { return; }
                    }
                    Read::Eof => err = None,
                    Read::WouldBlock => {}
                }
            }
        }
    }
}

async fn readable(pipe: &Option<Receiver>) -> io::Result<()> {
    match pipe {
        Some(p) => p.readable().await,
        None => std::future::pending().await,
    }
}

enum Read {
    Data(Bytes),
    Eof,
    WouldBlock,
}

/// Reads what is there into this thread's buffer and copies it out, so a
/// small chunk does not pin a large buffer while it waits in the channel.
fn try_read(pipe: &Receiver) -> Read {
    BUF.with_borrow_mut(|buf| match pipe.try_read(buf) {
        Ok(0) => Read::Eof,
        Ok(n) => Read::Data(Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::WouldBlock,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Read::WouldBlock,
        Err(e) => {
            tracing::debug!(error = %e, "pipe read failed");
            Read::Eof
        }
    })
}

/// Forwards everything stdout holds right now. False when nobody listens.
async fn drain(out: &mut Option<Receiver>, tx: &mpsc::Sender<ChildEvent>) -> bool {
    while let Some(pipe) = out.as_ref() {
        match try_read(pipe) {
            Read::Data(chunk) => {
                if tx.send(ChildEvent::Stdout(chunk)).await.is_err() {
                    return false;
                }
            }
            Read::Eof => *out = None,
            Read::WouldBlock => break,
        }
    }
    true
}
