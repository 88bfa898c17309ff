//! Writing a session's events to the store: each durable session has one
//! writer task that takes the events its log publishes (in id order) and
//! appends them in batches, so a burst of deltas costs one transaction.
//!
//! Event ids are reserved in the store ahead of use (`seq_ceiling`): a
//! gateway killed before its last batch was written leaves a gap that the
//! next gateway reports as `stream.gap`, but never hands out an id a client
//! may already have seen.

use std::sync::Arc;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::events::{EventLog, StoredEvent};
use crate::store::{EventRecord, Store};

/// Ids reserved at a time.
pub(super) const RESERVE: u64 = 10_000;
/// Most events written in one transaction.
const BATCH: usize = 512;

/// Starts the writer of session `id`'s `log`; `ceiling` is the highest id
/// reserved so far.
pub(super) fn spawn_writer(store: Arc<Store>, id: Uuid, log: &Arc<EventLog>, mut ceiling: u64) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Arc<StoredEvent>>();
    log.set_sink(tx);
    let log = Arc::downgrade(log);
    tokio::spawn(async move {
        // Grown on the first batch: an idle session's writer holds nothing.
        let mut batch = Vec::new();
        let mut writes = 0u64;
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let last = batch.last().map_or(0, |e| e.seq);
            if last + RESERVE / 2 > ceiling {
                ceiling = last + RESERVE;
                if let Err(e) = Box::pin(store.reserve_events(id, ceiling)).await {
                    tracing::error!(session_id = %id, error = %e, "cannot reserve event ids");
                }
            }
            let records: Vec<EventRecord> = batch
                .drain(..)
                .map(|e| EventRecord {
                    seq: e.seq,
                    name: e.name.to_string(),
                    message_id: e.message_id,
                    data: e.data().to_string(),
                })
                .collect();
            // Boxed, like the prune below: the store's futures would size the
            // task of every session, an idle one too.
            if let Err(e) = Box::pin(store.append_events(id, &records)).await {
                tracing::error!(session_id = %id, events = records.len(), error = %e, "cannot store events; they are lost on a restart (reported as stream.gap)");
            }
            writes += 1;
            // Keep the stored log within the replay limits, now and then.
            if writes % 16 == 1 {
                if let Some(first) = log.upgrade().map(|l| l.first_seq()) {
                    let _ = Box::pin(store.prune_events(id, first)).await;
                }
            }
        }
    });
}
