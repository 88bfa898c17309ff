//! A session's event log: sequence ids, a bounded replay ring, and any number
//! of subscribers.
//!
//! Each event is serialised once, when it is published, straight into its
//! whole SSE frame (`event:`, `data:`, `id:`), and every subscriber sends
//! those same bytes: delivering an event to one more subscriber costs a
//! reference count, not a copy or a format. Subscribers are cursors into the ring woken by a
//! `watch` of the last sequence id, so a slow subscriber never holds up the
//! session or anyone else: if it falls behind the ring it is told so with a
//! [`Item::Gap`] (never a silent loss) and goes on from the oldest event kept.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

/// Every event a session (or a one-shot run) publishes. The SSE `event:`
/// name is [`Event::name`]; the `data:` JSON is the variant's fields, as
/// `openapi.yaml` describes each event (fields in alphabetical order, as
/// they always were; absent ones left out where the spec says optional).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Event<'a> {
    /// `session.state`.
    SessionState {
        /// The child's pid, if one runs.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Why (`idle`, `restarted`, `shutdown`, `max_children`, …).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        /// The new state.
        state: crate::model::SessionState,
    },
    /// `message.queued`.
    MessageQueued {
        /// The message.
        message_id: Uuid,
        /// Messages ahead of it (the running one included).
        position: usize,
    },
    /// `message.started`.
    MessageStarted {
        /// Present (true) when the message runs through the one-shot command.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        fallback: bool,
        /// The message.
        message_id: Uuid,
    },
    /// `message.delta`.
    MessageDelta {
        /// The message.
        message_id: Uuid,
        /// Reply text as it arrived.
        text: &'a str,
    },
    /// `message.agent_event`.
    MessageAgentEvent {
        /// The agent's own event, as it sent it.
        event: &'a serde_json::Value,
        /// The running message, if any.
        message_id: Option<Uuid>,
    },
    /// `message.permission_request`.
    MessagePermissionRequest {
        /// What the tool would do.
        input: &'a serde_json::Value,
        /// The running message, if any.
        message_id: Option<Uuid>,
        /// The agent's own choices (ACP), when it gives some.
        #[serde(skip_serializing_if = "Option::is_none")]
        options: Option<&'a serde_json::Value>,
        /// The id to answer.
        request_id: &'a str,
        /// The tool asking.
        tool_name: &'a str,
    },
    /// `message.completed`.
    MessageCompleted {
        /// How long the reply took.
        duration_ms: u64,
        /// One-shot runs (`POST /oneshot`) only: the command's exit code
        /// (null when a signal ended it).
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<Option<i32>>,
        /// Whether the message ran through the one-shot command.
        fallback: bool,
        /// The message.
        message_id: Uuid,
        /// The whole reply.
        output: &'a str,
        /// Token usage and cost: a session's message has it when the agent
        /// reported some; a one-shot run always (null without a report).
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<Option<&'a serde_json::Value>>,
    },
    /// `message.failed`.
    MessageFailed {
        /// Why.
        error: &'a crate::model::MessageError,
        /// The message.
        message_id: Uuid,
    },
    /// `session.closed`.
    SessionClosed {
        /// Why.
        reason: super::CloseReason,
    },
}

impl Event<'_> {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionState { .. } => "session.state",
            Event::MessageQueued { .. } => "message.queued",
            Event::MessageStarted { .. } => "message.started",
            Event::MessageDelta { .. } => "message.delta",
            Event::MessageAgentEvent { .. } => "message.agent_event",
            Event::MessagePermissionRequest { .. } => "message.permission_request",
            Event::MessageCompleted { .. } => "message.completed",
            Event::MessageFailed { .. } => "message.failed",
            Event::SessionClosed { .. } => "session.closed",
        }
    }

    /// The message it belongs to.
    pub fn message_id(&self) -> Option<Uuid> {
        match self {
            Event::SessionState { .. } | Event::SessionClosed { .. } => None,
            Event::MessageQueued { message_id, .. }
            | Event::MessageStarted { message_id, .. }
            | Event::MessageDelta { message_id, .. }
            | Event::MessageCompleted { message_id, .. }
            | Event::MessageFailed { message_id, .. } => Some(*message_id),
            Event::MessageAgentEvent { message_id, .. }
            | Event::MessagePermissionRequest { message_id, .. } => *message_id,
        }
    }
}

/// One published event.
#[derive(Debug)]
pub struct StoredEvent {
    /// Per-session sequence id (1, 2, 3 …).
    pub seq: u64,
    /// SSE `event:` name, e.g. `message.delta`.
    pub name: &'static str,
    /// The message the event belongs to, if any.
    pub message_id: Option<Uuid>,
    /// The whole SSE frame, `event:NAME\ndata:JSON\nid:SEQ\n\n`, built once.
    /// The JSON is compact, so it holds no newline and fits one `data:` line.
    pub frame: Bytes,
    /// Where the `data:` JSON lies in `frame`.
    data: Range<usize>,
}

impl StoredEvent {
    /// The `data:` JSON.
    pub fn data(&self) -> &str {
        std::str::from_utf8(&self.frame[self.data.clone()]).expect("serde_json writes UTF-8")
    }

    /// An event read back from the store, framed as it was sent.
    pub fn read_back(seq: u64, name: &str, message_id: Option<Uuid>, data: &str) -> StoredEvent {
        let mut frame = Vec::with_capacity(data.len() + 40);
        frame.extend_from_slice(b"event:");
        frame.extend_from_slice(name.as_bytes());
        frame.extend_from_slice(b"\ndata:");
        let start = frame.len();
        frame.extend_from_slice(data.as_bytes());
        let range = start..frame.len();
        frame.extend_from_slice(b"\nid:");
        push_decimal(&mut frame, seq);
        frame.extend_from_slice(b"\n\n");
        StoredEvent {
            seq,
            name: static_name(name),
            message_id,
            frame: Bytes::from(frame),
            data: range,
        }
    }

    /// Whether this event ends its message (`message.completed` / `message.failed`).
    pub fn ends_message(&self) -> bool {
        self.name == "message.completed" || self.name == "message.failed"
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Item {
    /// An event.
    Event(Arc<StoredEvent>),
    /// Events `from..=to` are no longer in the replay ring.
    Gap {
        /// First missing sequence id.
        from: u64,
        /// Last missing sequence id.
        to: u64,
    },
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<StoredEvent>>,
    bytes: usize,
    next_seq: u64,
    closed: bool,
    /// Events below this id are in the store and not yet here (0: none).
    unloaded_below: u64,
    /// After a lazy restore: the last stored id and the first new one. Ids
    /// between them were never stored, and a reader who has seen the last
    /// stored one (or any of them) has missed nothing stored: it goes on
    /// with the new ones, no `stream.gap`.
    restored: Option<(u64, u64)>,
}

/// The log of one session (or of one one-shot run).
#[derive(Debug)]
pub struct EventLog {
    ring: Mutex<Ring>,
    last: watch::Sender<u64>,
    max_events: usize,
    max_bytes: usize,
    /// Where every published event also goes (the store's writer).
    sink: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Arc<StoredEvent>>>,
}

impl EventLog {
    /// A log keeping at most `max_events` events and `max_bytes` bytes of data for replay.
    pub fn new(max_events: usize, max_bytes: usize) -> Arc<EventLog> {
        Arc::new(EventLog {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
                closed: false,
                unloaded_below: 0,
                restored: None,
            }),
            last: watch::channel(0).0,
            max_events: max_events.max(1),
            max_bytes,
            sink: std::sync::OnceLock::new(),
        })
    }

    /// A log that continues a stored one: `events` (oldest first) are
    /// replayed as they were, and new events get ids from `next_seq` on (ids
    /// between the last stored one and `next_seq` were lost with the previous
    /// gateway: a reader asking for them gets `stream.gap`).
    pub fn restore(
        max_events: usize,
        max_bytes: usize,
        events: Vec<(u64, String, Option<Uuid>, String)>,
        next_seq: u64,
    ) -> Arc<EventLog> {
        let log = EventLog::new(max_events, max_bytes);
        {
            let mut ring = log.ring.lock().expect("event ring poisoned");
            for (seq, name, message_id, data) in events {
                let event = StoredEvent::read_back(seq, &name, message_id, &data);
                ring.bytes += event.data.len();
                ring.events.push_back(Arc::new(event));
            }
            ring.next_seq = next_seq.max(ring.events.back().map_or(1, |e| e.seq + 1));
        }
        let last = log.last_seq();
        log.last.send_replace(last);
        log
    }

    /// A log that continues a stored one whose events (ids up to
    /// `last_stored`) stay in the store until a reader needs them
    /// ([`EventLog::needs_stored`], [`EventLog::load_stored`]): a restart
    /// reads no session's events. New events get ids from `next_seq` on.
    pub fn restore_lazy(
        max_events: usize,
        max_bytes: usize,
        last_stored: u64,
        next_seq: u64,
    ) -> Arc<EventLog> {
        let log = EventLog::new(max_events, max_bytes);
        {
            let mut ring = log.ring.lock().expect("event ring poisoned");
            ring.next_seq = next_seq.max(last_stored + 1);
            ring.unloaded_below = if last_stored > 0 { last_stored + 1 } else { 0 };
            ring.restored = (last_stored > 0).then_some((last_stored, ring.next_seq));
        }
        let last = log.last_seq();
        log.last.send_replace(last);
        log
    }

    /// Whether a reader that has seen up to `after` needs events that are
    /// still in the store only.
    pub fn needs_stored(&self, after: u64) -> bool {
        let ring = self.ring.lock().expect("event ring poisoned");
        ring.unloaded_below > 0 && after + 1 < ring.unloaded_below
    }

    /// Puts the stored events (oldest first) before those published since
    /// the log was restored, within the replay limits (the newest are
    /// kept). Once only: a second call, or one on a log that was never
    /// lazy, changes nothing.
    pub fn load_stored(&self, events: Vec<(u64, String, Option<Uuid>, String)>) {
        let mut ring = self.ring.lock().expect("event ring poisoned");
        let below = std::mem::take(&mut ring.unloaded_below);
        if below == 0 {
            return;
        }
        let mut older: VecDeque<Arc<StoredEvent>> = events
            .into_iter()
            .filter(|e| e.0 < below)
            .map(|(seq, name, message_id, data)| {
                Arc::new(StoredEvent::read_back(seq, &name, message_id, &data))
            })
            .collect();
        let mut bytes: usize = older.iter().map(|e| e.data.len()).sum();
        while !older.is_empty()
            && (older.len() + ring.events.len() > self.max_events
                || (bytes + ring.bytes > self.max_bytes && older.len() + ring.events.len() > 1))
        {
            let old = older.pop_front().expect("non-empty");
            bytes -= old.data.len();
        }
        ring.bytes += bytes;
        while let Some(e) = older.pop_back() {
            ring.events.push_front(e);
        }
    }

    /// The events held in memory, as the store keeps them.
    pub fn held_events(&self) -> Vec<crate::store::EventRecord> {
        let ring = self.ring.lock().expect("event ring poisoned");
        ring.events
            .iter()
            .map(|e| crate::store::EventRecord {
                seq: e.seq,
                name: e.name.to_string(),
                message_id: e.message_id,
                data: e.data().to_string(),
            })
            .collect()
    }

    /// Sends every event published from now on to `sink` as well.
    pub fn set_sink(&self, sink: tokio::sync::mpsc::UnboundedSender<Arc<StoredEvent>>) {
        let _ = self.sink.set(sink);
    }

    /// The id of the oldest event still kept (the next id when none is;
    /// 0 while older events are in the store only: the store keeps them).
    pub fn first_seq(&self) -> u64 {
        let ring = self.ring.lock().expect("event ring poisoned");
        if ring.unloaded_below > 0 {
            return 0;
        }
        ring.events.front().map_or(ring.next_seq, |e| e.seq)
    }

    /// Appends an event and wakes subscribers; returns its sequence id.
    pub fn publish(&self, event: &Event) -> u64 {
        self.publish_as(event.name(), event.message_id(), event)
    }

    /// Publishes `data` as an event named `name` (the log's own tests use
    /// any name; the gateway publishes [`Event`]s only).
    fn publish_as(
        &self,
        name: &'static str,
        message_id: Option<Uuid>,
        data: &impl Serialize,
    ) -> u64 {
        // Serialise outside the lock, straight into the frame; only the id,
        // known under the lock, is appended there (capacity is reserved).
        let mut frame = Vec::with_capacity(160);
        frame.extend_from_slice(b"event:");
        frame.extend_from_slice(name.as_bytes());
        frame.extend_from_slice(b"\ndata:");
        let start = frame.len();
        serde_json::to_writer(&mut frame, data).expect("event data serialises");
        let data = start..frame.len();
        frame.reserve(ID_SUFFIX_MAX);
        let seq = {
            // A std Mutex: held for a few pointer moves, never across an await.
            let mut ring = self.ring.lock().expect("event ring poisoned");
            if ring.closed {
                return ring.next_seq - 1;
            }
            let seq = ring.next_seq;
            ring.next_seq += 1;
            frame.extend_from_slice(b"\nid:");
            push_decimal(&mut frame, seq);
            frame.extend_from_slice(b"\n\n");
            // The ring keeps frames for replay: no spare capacity (in place).
            frame.shrink_to_fit();
            ring.bytes += data.len();
            let event = Arc::new(StoredEvent {
                seq,
                name,
                message_id,
                frame: Bytes::from(frame),
                data,
            });
            if let Some(sink) = self.sink.get() {
                // Under the lock: the writer receives events in id order.
                let _ = sink.send(event.clone());
            }
            ring.events.push_back(event);
            while ring.events.len() > self.max_events
                || (ring.bytes > self.max_bytes && ring.events.len() > 1)
            {
                let old = ring.events.pop_front().expect("non-empty");
                ring.bytes -= old.data.len();
            }
            seq
        };
        self.last.send_replace(seq);
        seq
    }

    /// The sequence id of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.ring.lock().expect("event ring poisoned").next_seq - 1
    }

    /// Ends the log: subscribers get what is left, then the end.
    pub fn close(&self) {
        self.ring.lock().expect("event ring poisoned").closed = true;
        self.last.send_modify(|_| {});
    }

    /// Number of live subscribers.
    pub fn subscribers(&self) -> usize {
        self.last.receiver_count()
    }

    /// A subscriber that receives every event after `after`.
    pub fn subscribe(self: &Arc<Self>, after: u64) -> Subscription {
        Subscription {
            log: self.clone(),
            cursor: after,
            rx: self.last.subscribe(),
            pending: VecDeque::new(),
        }
    }

    /// Fills `into` with what follows `cursor`; returns the new cursor and
    /// whether the log is closed.
    fn read_after(&self, cursor: u64, into: &mut VecDeque<Item>) -> (u64, bool) {
        let ring = self.ring.lock().expect("event ring poisoned");
        // A cursor ahead of the log stays where it is: ids at or below the
        // one a client asked to skip are never sent, even if the log has
        // not reached it yet (the stream then waits for later ids).
        let mut cursor = cursor;
        if let Some((last_stored, next)) = ring.restored {
            if (last_stored..next).contains(&cursor) {
                cursor = next - 1;
            }
        }
        if let Some(first) = ring.events.front().map(|e| e.seq) {
            if cursor + 1 < first {
                into.push_back(Item::Gap {
                    from: cursor + 1,
                    to: first - 1,
                });
                cursor = first - 1;
            }
            // Ids are not contiguous after a restart (the previous gateway's
            // reserved ids were never handed out): find the place by id.
            let skip = ring.events.partition_point(|e| e.seq <= cursor);
            for event in ring.events.iter().skip(skip).take(256) {
                into.push_back(Item::Event(event.clone()));
                cursor = event.seq;
            }
        } else if cursor + 1 < ring.next_seq {
            into.push_back(Item::Gap {
                from: cursor + 1,
                to: ring.next_seq - 1,
            });
            cursor = ring.next_seq - 1;
        }
        (cursor, ring.closed)
    }
}

/// Longest `\nid:SEQ\n\n`: 4 + 20 digits + 2.
const ID_SUFFIX_MAX: usize = 26;

/// Appends `n` in decimal without going through `fmt`.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A cursor into an [`EventLog`].
#[derive(Debug)]
pub struct Subscription {
    log: Arc<EventLog>,
    cursor: u64,
    rx: watch::Receiver<u64>,
    pending: VecDeque<Item>,
}

impl Subscription {
    /// The next item; `None` once the log is closed and everything was delivered.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            // Mark the current value seen before reading, so a publish after
            // the read wakes `changed()`.
            self.rx.borrow_and_update();
            let (cursor, closed) = self.log.read_after(self.cursor, &mut self.pending);
            self.cursor = cursor;
            if !self.pending.is_empty() {
                continue;
            }
            if closed || self.rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// The sequence id of the last item handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

/// Every event name the gateway publishes, as the `&'static str` a
/// [`StoredEvent`] holds (names read back from the store map onto these).
fn static_name(name: &str) -> &'static str {
    const NAMES: [&str; 10] = [
        "session.state",
        "message.queued",
        "message.started",
        "message.delta",
        "message.permission_request",
        "message.agent_event",
        "message.completed",
        "message.failed",
        "stream.gap",
        "session.closed",
    ];
    NAMES
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("message.agent_event")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn replays_then_follows_live() {
        let log = EventLog::new(100, 1 << 20);
        log.publish_as("a", None, &json!({"n": 1}));
        let mut sub = log.subscribe(0);
        let Some(Item::Event(e)) = sub.next().await else {
            panic!()
        };
        assert_eq!((e.seq, e.name), (1, "a"));
        let log2 = log.clone();
        tokio::spawn(async move { log2.publish_as("b", None, &json!({})) });
        let Some(Item::Event(e)) = sub.next().await else {
            panic!()
        };
        assert_eq!(e.seq, 2);
        log.close();
        assert!(sub.next().await.is_none());
    }

    #[test]
    fn the_frame_is_built_once_in_sse_form() {
        let log = EventLog::new(100, 1 << 20);
        log.publish_as("message.delta", None, &json!({"text": "a\nb"}));
        let mut sub = log.subscribe(0);
        let Some(Some(Item::Event(e))) = futures::FutureExt::now_or_never(sub.next()) else {
            panic!()
        };
        assert_eq!(e.data(), r#"{"text":"a\nb"}"#);
        assert_eq!(
            &e.frame[..],
            b"event:message.delta\ndata:{\"text\":\"a\\nb\"}\nid:1\n\n"
        );
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[tokio::test]
    async fn overflow_is_reported_as_a_gap() {
        let log = EventLog::new(3, 1 << 20);
        for i in 0..10 {
            log.publish_as("e", None, &json!({"i": i}));
        }
        let mut sub = log.subscribe(2);
        match sub.next().await {
            Some(Item::Gap { from, to }) => assert_eq!((from, to), (3, 7)),
            other => panic!("{other:?}"),
        }
        let Some(Item::Event(e)) = sub.next().await else {
            panic!()
        };
        assert_eq!(e.seq, 8);
    }

    #[tokio::test]
    async fn a_reader_past_a_restart_jump_gets_what_follows() {
        // Bounded: the defect this guards against was a reader waiting for ever.
        async fn next(sub: &mut Subscription) -> Option<Item> {
            tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
                .await
                .expect("the reader got nothing")
        }
        // Restored: ids 1 and 2, then the next gateway goes on at 10001.
        let stored = (1..=2)
            .map(|seq| (seq, "e".to_string(), None, "{}".to_string()))
            .collect();
        let log = EventLog::restore(100, 1 << 20, stored, 10_001);
        log.publish_as("e", None, &json!({}));
        log.publish_as("e", None, &json!({}));
        // A reader that has seen 10001 (past the jump) gets 10002, then live ones.
        let mut sub = log.subscribe(10_001);
        let Some(Item::Event(e)) = next(&mut sub).await else {
            panic!()
        };
        assert_eq!(e.seq, 10_002);
        log.publish_as("e", None, &json!({}));
        let Some(Item::Event(e)) = next(&mut sub).await else {
            panic!()
        };
        assert_eq!(e.seq, 10_003);
        // One that has seen 2 goes on at the jump.
        let mut sub = log.subscribe(2);
        let Some(Item::Event(e)) = next(&mut sub).await else {
            panic!()
        };
        assert_eq!(e.seq, 10_001);
    }

    #[tokio::test]
    async fn byte_budget_bounds_the_ring() {
        let log = EventLog::new(1000, 100);
        for _ in 0..50 {
            log.publish_as("e", None, &"x".repeat(30));
        }
        let mut sub = log.subscribe(0);
        assert!(matches!(sub.next().await, Some(Item::Gap { from: 1, .. })));
        let ring = log.ring.lock().unwrap();
        assert!(ring.bytes <= 100 && ring.events.len() <= 3);
    }

    #[tokio::test]
    async fn a_lazy_log_takes_its_stored_events_once_and_within_its_limits() {
        let stored = |seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(|n| (n, "session.state".to_string(), None, format!("{n}")))
                .collect::<Vec<_>>()
        };
        // Ids 1..=10 stored; the previous gateway could have used up to 20.
        let log = EventLog::restore_lazy(8, usize::MAX, 10, 21);
        assert_eq!(log.first_seq(), 0, "nothing may be pruned yet");
        assert!(log.needs_stored(0) && log.needs_stored(9));
        assert!(
            !log.needs_stored(10),
            "a reader at the last stored id needs none"
        );
        assert_eq!(log.publish_as("e", None, &"new"), 21);
        assert_eq!(log.publish_as("e", None, &"new"), 22);
        // A reader who saw the last stored id missed nothing: no gap.
        let mut seen = log.subscribe(10);
        assert!(matches!(seen.next().await, Some(Item::Event(e)) if e.seq == 21));
        log.load_stored(stored(1..=10));
        // A second load changes nothing.
        log.load_stored(stored(1..=10));
        assert!(!log.needs_stored(0));
        // Eight at most, the newest kept: 5..=10, then 21 and 22.
        let mut sub = log.subscribe(0);
        assert!(matches!(
            sub.next().await,
            Some(Item::Gap { from: 1, to: 4 })
        ));
        let mut ids = Vec::new();
        for _ in 0..8 {
            match sub.next().await {
                Some(Item::Event(e)) => ids.push(e.seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(ids, [5, 6, 7, 8, 9, 10, 21, 22]);
        assert_eq!(log.first_seq(), 5);
    }
}
