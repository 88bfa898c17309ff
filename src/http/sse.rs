//! Server-Sent Events: a session's event log as an SSE response.
//!
//! The first item is a `retry:` hint; heartbeats are comments after 15 s
//! without output; a replay gap is a `stream.gap` event whose `id` is the last
//! missing sequence id, so a reconnecting client does not ask for it again.
//! Every stream ends when the gateway shuts down (warp's graceful shutdown
//! would otherwise wait for it forever).
//!
//! Why not `warp::sse`: its `Event` owns `String`s, so every subscriber would
//! copy each event's data and format the frame again (the larger part of the
//! gateway's CPU with many subscribers, measured in `docs/BENCHMARKS.md`).
//! The event log builds each frame once ([`crate::session::StoredEvent::frame`]); this body
//! sends those bytes to every subscriber, in the exact wire form of
//! `warp::sse` (`event:`, `data:`, `id:` lines; `retry:`; `:` comments).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use warp::reply::Response;
use warp::Reply;

use crate::cluster::StoreFeed;
use crate::session::{Item, Subscription};

/// Where a stream's events come from: a session's log in this process, or
/// (cluster mode) the store.
pub enum Source {
    /// The in-process log.
    Log(Subscription),
    /// The store: a [`StoreFeed`] driven by its own task (its queries'
    /// futures are not `Sync`, which a response body must be), ended when
    /// the stream is dropped.
    Store(tokio::sync::mpsc::Receiver<Item>),
}

impl Source {
    async fn next(&mut self) -> Option<Item> {
        match self {
            Source::Log(sub) => sub.next().await,
            Source::Store(rx) => rx.recv().await,
        }
    }
}

impl From<Subscription> for Source {
    fn from(sub: Subscription) -> Source {
        Source::Log(sub)
    }
}

impl From<StoreFeed> for Source {
    fn from(mut feed: StoreFeed) -> Source {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = feed.next() => item,
                    _ = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Source::Store(rx)
    }
}

/// Reconnect delay suggested to EventSource clients (`retry:` in ms).
const RETRY: &[u8] = b"retry:2000\n\n";
/// A heartbeat: an empty comment.
const HEARTBEAT: &[u8] = b":\n\n";

/// Which events a stream carries and when it ends.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Everything, until the log closes.
    All,
    /// One message's events, until its `message.completed` / `message.failed`.
    Message(Uuid),
}

fn gap_frame(from: u64, to: u64) -> Bytes {
    Bytes::from(format!(
        "event:stream.gap\ndata:{{\"from\":{from},\"to\":{to}}}\nid:{to}\n\n"
    ))
}

/// One subscriber's stream state, carried from item to item.
struct Stream {
    sub: Source,
    scope: Scope,
    shutdown: CancellationToken,
    heartbeat: Duration,
    /// Fires `heartbeat` after the last output; moved on lazily (see `next`).
    tick: Pin<Box<Sleep>>,
    last_output: Instant,
    ended: bool,
    /// Kept alive as long as the stream (e.g. a one-shot run's task).
    _guard: Option<Arc<dyn Send + Sync>>,
}

impl Stream {
    /// The next frame, or `None` at the end.
    async fn next(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            // At shutdown, deliver what is already there, then end: an
            // event is never cut off, and no stream keeps the server up.
            let item = tokio::select! {
                biased;
                item = self.sub.next() => item?,
                _ = self.shutdown.cancelled() => self.sub.next().now_or_never().flatten()?,
                _ = &mut self.tick => {
                    // The timer is not reset per event (that would touch the
                    // timer wheel for every frame); it is moved on here instead.
                    let due = self.last_output + self.heartbeat;
                    if Instant::now() < due {
                        self.tick.as_mut().reset(due);
                        continue;
                    }
                    self.last_output = Instant::now();
                    self.tick.as_mut().reset(self.last_output + self.heartbeat);
                    return Some(Bytes::from_static(HEARTBEAT));
                }
            };
            match (&item, self.scope) {
                (Item::Event(e), Scope::All) => return Some(self.sent(e.frame.clone())),
                (Item::Event(e), Scope::Message(id)) => {
                    if e.message_id == Some(id) {
                        self.ended = e.ends_message();
                        return Some(self.sent(e.frame.clone()));
                    }
                }
                (Item::Gap { from, to }, _) => return Some(self.sent(gap_frame(*from, *to))),
            }
        }
    }

    fn sent(&mut self, frame: Bytes) -> Bytes {
        self.last_output = Instant::now();
        frame
    }
}

/// The SSE response for `sub`, limited to `scope`, ending at `shutdown`.
pub fn response(
    sub: impl Into<Source>,
    scope: Scope,
    heartbeat: Duration,
    shutdown: CancellationToken,
    guard: Option<Arc<dyn Send + Sync>>,
) -> Response {
    let now = Instant::now();
    let state = Stream {
        sub: sub.into(),
        scope,
        shutdown,
        heartbeat,
        tick: Box::pin(tokio::time::sleep_until(now + heartbeat)),
        last_output: now,
        ended: false,
        _guard: guard,
    };
    let retry = futures::stream::once(async { Ok::<_, Infallible>(Bytes::from_static(RETRY)) });
    let frames = futures::stream::unfold(state, |mut state| async move {
        let frame = state.next().await?;
        Some((Ok::<_, Infallible>(frame), state))
    });
    let mut res = warp::reply::stream(futures::StreamExt::chain(retry, frames)).into_response();
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Event as Published, EventLog};
    use serde_json::json;
    use warp::sse::Event;

    /// The frames are byte for byte what `warp::sse::Event` writes.
    #[test]
    fn frames_match_warp_sse() {
        let log = EventLog::new(10, 1 << 20);
        log.publish(&Published::MessageDelta {
            message_id: Uuid::nil(),
            text: "a\nb é",
        });
        let mut sub = log.subscribe(0);
        let Some(Some(Item::Event(e))) = sub.next().now_or_never() else {
            panic!()
        };
        let warp = Event::default()
            .id(e.seq.to_string())
            .event(e.name)
            .data(e.data());
        assert_eq!(&e.frame[..], warp.to_string().as_bytes());
        let gap = Event::default()
            .id("7")
            .event("stream.gap")
            .data(json!({"from": 3, "to": 7}).to_string());
        assert_eq!(&gap_frame(3, 7)[..], gap.to_string().as_bytes());
        let retry = Event::default().retry(Duration::from_secs(2));
        assert_eq!(RETRY, retry.to_string().as_bytes());
        let comment = Event::default().comment("");
        assert_eq!(HEARTBEAT, comment.to_string().as_bytes());
    }

    async fn next(s: &mut Stream) -> Option<Bytes> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a frame within 10 s")
    }

    /// A quiet stream gets heartbeats; events come through between them; a
    /// message-scoped stream ends after its message's last event.
    #[tokio::test]
    async fn heartbeats_events_and_the_end_of_a_message() {
        let log = EventLog::new(10, 1 << 20);
        let id = Uuid::new_v4();
        let heartbeat = Duration::from_millis(50);
        let now = Instant::now();
        let mut stream = Stream {
            sub: log.subscribe(0).into(),
            scope: Scope::Message(id),
            shutdown: CancellationToken::new(),
            heartbeat,
            tick: Box::pin(tokio::time::sleep_until(now + heartbeat)),
            last_output: now,
            ended: false,
            _guard: None,
        };
        assert_eq!(next(&mut stream).await.as_deref(), Some(HEARTBEAT));
        log.publish(&Published::SessionState {
            pid: None,
            reason: None,
            state: crate::model::SessionState::Busy,
        });
        log.publish(&Published::MessageDelta {
            message_id: id,
            text: "x",
        });
        let frame = next(&mut stream).await.expect("the delta");
        assert!(frame.starts_with(b"event:message.delta\n"), "{frame:?}");
        assert_eq!(next(&mut stream).await.as_deref(), Some(HEARTBEAT));
        log.publish(&Published::MessageCompleted {
            duration_ms: 1,
            exit_code: None,
            fallback: false,
            message_id: id,
            output: "x",
            usage: None,
        });
        let frame = next(&mut stream).await.expect("the completion");
        assert!(frame.starts_with(b"event:message.completed\n"));
        assert_eq!(next(&mut stream).await, None);
    }
}
