//! Server-Sent Events: a session's event log as an SSE response.
//!
//! The first item is a `retry:` hint; heartbeats are comments every 15 s; a
//! replay gap is a `stream.gap` event whose `id` is the last missing sequence
//! id, so a reconnecting client does not ask for it again. Every stream ends
//! when the gateway shuts down (warp's graceful shutdown would otherwise wait
//! for it forever).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde_json::json;
use uuid::Uuid;
use warp::reply::Response;
use warp::sse::Event;
use warp::Reply;

use crate::session::{Item, Subscription};

/// Reconnect delay suggested to EventSource clients.
const RETRY: Duration = Duration::from_secs(2);

/// Which events a stream carries and when it ends.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Everything, until the log closes.
    All,
    /// One message's events, until its `message.completed` / `message.failed`.
    Message(Uuid),
}

fn to_event(item: &Item) -> Event {
    match item {
        Item::Event(e) => Event::default()
            .id(e.seq.to_string())
            .event(e.name)
            .data(e.data.as_str()),
        Item::Gap { from, to } => Event::default()
            .id(to.to_string())
            .event("stream.gap")
            .data(json!({"from": from, "to": to}).to_string()),
    }
}

/// The SSE response for `sub`, limited to `scope`, ending at `shutdown`.
pub fn response(
    sub: Subscription,
    scope: Scope,
    heartbeat: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    guard: Option<Arc<dyn Send + Sync>>,
) -> Response {
    let retry = futures::stream::once(async { Ok::<_, Infallible>(Event::default().retry(RETRY)) });
    let items = futures::stream::unfold((sub, false, guard), move |(mut sub, ended, guard)| {
        let shutdown = shutdown.clone();
        async move {
            if ended {
                return None;
            }
            loop {
                // At shutdown, deliver what is already there, then end: an
                // event is never cut off, and no stream keeps the server up.
                let item = tokio::select! {
                    biased;
                    item = sub.next() => item?,
                    _ = shutdown.cancelled() => sub.next().now_or_never().flatten()?,
                };
                let (wanted, last) = match (&item, scope) {
                    (_, Scope::All) => (true, false),
                    (Item::Gap { .. }, Scope::Message(_)) => (true, false),
                    (Item::Event(e), Scope::Message(id)) => {
                        let mine = e.message_id == Some(id);
                        (mine, mine && e.ends_message())
                    }
                };
                if wanted {
                    return Some((Ok::<_, Infallible>(to_event(&item)), (sub, last, guard)));
                }
            }
        }
    });
    let stream = retry.chain(items);
    warp::sse::reply(warp::sse::keep_alive().interval(heartbeat).stream(stream)).into_response()
}
