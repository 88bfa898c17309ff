//! The store against real databases: a SQLite file in a temporary directory
//! (and PostgreSQL when the test command started one, see
//! `scripts/pg-throwaway.sh`): what is written is read back after the store
//! is closed and opened again, files are private, a second gateway cannot
//! share a SQLite file, and a newer schema stops start-up.

use agentgate::model::{Message, MessageStatus};
use agentgate::store::{ChildRecord, EventRecord, SessionRecord, Store, StoreError, StoreSpec};
use time::OffsetDateTime;
use uuid::Uuid;

fn session() -> SessionRecord {
    let now = OffsetDateTime::now_utc();
    SessionRecord {
        id: Uuid::new_v4(),
        agent: "demo".into(),
        created_at: now,
        last_activity_at: now,
        title: Some("t".into()),
        metadata: Some(serde_json::json!({"k": 1})),
        cwd: None,
        agent_session_id: Some("abc".into()),
        closed: None,
        options: serde_json::json!({"model": "haiku"}),
        forked_from: None,
        owner: Some("alice@example.com".into()),
    }
}

fn message(session: Uuid, input: &str) -> Message {
    serde_json::from_value(serde_json::json!({
        "id": Uuid::new_v4(), "session_id": session, "input": input, "output": "",
        "status": "queued", "error": null, "created_at": "2026-12-02T00:00:00Z",
        "started_at": null, "finished_at": null, "duration_ms": null, "usage": null,
        "fallback": false
    }))
    .unwrap()
}

async fn round_trip(spec: StoreSpec) {
    let s = session();
    let mut m1 = message(s.id, "one");
    let m2 = message(s.id, "two");
    {
        let store = Store::open(&spec).await.unwrap();
        assert!(store.is_durable());
        store.save_session(&s).await.unwrap();
        store.save_message(0, &m1, None).await.unwrap();
        store.save_message(1, &m2, None).await.unwrap();
        m1.status = MessageStatus::Completed;
        m1.output = "hello".into();
        store.save_message(0, &m1, None).await.unwrap();
        store.reserve_events(s.id, 1024).await.unwrap();
        let events: Vec<EventRecord> = (1..=5)
            .map(|seq| EventRecord {
                seq,
                name: "message.delta".into(),
                message_id: Some(m1.id),
                data: format!("{{\"n\":{seq}}}"),
            })
            .collect();
        store.append_events(s.id, &events).await.unwrap();
        store.prune_events(s.id, 3).await.unwrap();
        store
            .save_child(&ChildRecord {
                session_id: s.id,
                pid: 4242,
                start_time: 99,
                host: "h".into(),
                gateway_pid: 7,
                gateway_start: 8,
            })
            .await
            .unwrap();
    }
    let store = Store::open(&spec).await.unwrap();
    let sessions = store.load_sessions().await.unwrap();
    let (back, ceiling) = sessions.iter().find(|(r, _)| r.id == s.id).unwrap();
    assert_eq!(back, &s);
    assert_eq!(*ceiling, 1024);
    let messages = store.load_messages(s.id).await.unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].output, "hello");
    assert_eq!(messages[0].status, MessageStatus::Completed);
    assert_eq!(messages[1].input.text(), "two");
    let events = store.load_events(s.id).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(events[0].data, "{\"n\":3}");
    let children = store.load_children().await.unwrap();
    assert!(children
        .iter()
        .any(|c| c.session_id == s.id && c.pid == 4242 && c.host == "h" && c.gateway_start == 8));
    store.delete_session(s.id).await.unwrap();
    assert!(store.load_messages(s.id).await.unwrap().is_empty());
    assert!(!store
        .load_sessions()
        .await
        .unwrap()
        .iter()
        .any(|(r, _)| r.id == s.id));
}

#[tokio::test]
async fn sqlite_keeps_what_was_written_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/agentgate.db");
    round_trip(StoreSpec::Sqlite(path.clone())).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the store holds conversation text");
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
}

#[tokio::test]
async fn postgres_keeps_what_was_written_across_a_reopen() {
    // The test command starts a throwaway server and names it here; a run
    // without one fails rather than passing silently.
    let url = std::env::var("AGENTGATE_TEST_POSTGRES")
        .expect("AGENTGATE_TEST_POSTGRES: run through scripts/test.sh, which starts PostgreSQL");
    round_trip(StoreSpec::Postgres(url)).await;
}

#[tokio::test]
async fn a_second_gateway_cannot_share_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::Sqlite(dir.path().join("agentgate.db"));
    let _first = Store::open(&spec).await.unwrap();
    match Store::open(&spec).await {
        Err(StoreError::Open { detail, .. }) => {
            assert!(detail.contains("another agentgate"), "{detail}")
        }
        other => panic!("second open: {other:?}"),
    }
}

#[tokio::test]
async fn a_newer_or_corrupt_store_stops_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::Sqlite(dir.path().join("agentgate.db"));
    drop(Store::open(&spec).await.unwrap());
    // A migration from the future, as a newer agentgate would have left it.
    {
        use rusqlite_free::insert_future_migration;
        insert_future_migration(&dir.path().join("agentgate.db")).await;
    }
    let err = Store::open(&spec).await.unwrap_err().to_string();
    assert!(err.contains("newer"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"this is not a database, just text ".repeat(200)).unwrap();
    let err = Store::open(&StoreSpec::Sqlite(garbage))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("store sqlite:"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

/// Writes a `_sqlx_migrations` row for a version this binary does not have,
/// through sqlx itself (no second SQLite library).
mod rusqlite_free {
    use sqlx::Connection;

    pub async fn insert_future_migration(path: &std::path::Path) {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from the future', TRUE, X'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

/// Cluster mode's fencing, on the real PostgreSQL: a node whose lease was
/// taken (it stopped renewing past the TTL) gets every write for that
/// session refused, and nothing it tried reaches the store.
#[tokio::test]
async fn a_node_whose_lease_was_taken_writes_nothing_more() {
    use std::time::Duration;
    let url = std::env::var("AGENTGATE_TEST_POSTGRES")
        .expect("AGENTGATE_TEST_POSTGRES: run through scripts/test.sh, which starts PostgreSQL");
    let spec = StoreSpec::Postgres(url);
    let a = Store::open(&spec).await.unwrap();
    a.enable_fence("a");
    let b = Store::open(&spec).await.unwrap();
    b.enable_fence("b");
    let s = session();
    let long = Duration::from_secs(60);
    // A node writes nothing for a session whose lease it does not hold.
    assert!(matches!(
        a.save_session(&s).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(a.acquire(s.id, long).await.unwrap(), Some(1));
    a.save_session(&s).await.unwrap();
    let mut m = message(s.id, "one");
    a.save_message(0, &m, None).await.unwrap();
    // Held and live: nobody else takes it.
    assert_eq!(b.acquire(s.id, long).await.unwrap(), None);
    // a stops renewing (a renewal of zero: its lease expires now); b takes it.
    assert_eq!(a.renew(Duration::ZERO).await.unwrap(), vec![s.id]);
    assert_eq!(b.acquire(s.id, long).await.unwrap(), Some(2));
    // a, continued, still believes it holds the session: its writes fail.
    assert!(a.holds(s.id));
    m.status = MessageStatus::Completed;
    m.output = "late".into();
    assert!(matches!(
        a.save_message(0, &m, None).await,
        Err(StoreError::Fenced(id)) if id == s.id
    ));
    assert!(!a.holds(s.id), "a refused write forgets the lease");
    assert!(a.renew(long).await.unwrap().is_empty());
    let stored = b.load_messages(s.id).await.unwrap();
    assert_eq!(stored[0].status, MessageStatus::Queued);
    assert_eq!(stored[0].output, "");
    // The holder writes as before.
    b.save_message(0, &m, None).await.unwrap();
    assert_eq!(b.load_messages(s.id).await.unwrap()[0].output, "late");
    b.delete_session(s.id).await.unwrap();
}

#[tokio::test]
async fn writes_that_share_a_sqlite_commit_fail_only_by_themselves() {
    // A current-thread runtime: every write below is queued before the
    // store's writer runs, so they go to the database as one transaction.
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::Sqlite(dir.path().join("agentgate.db"));
    let store = Store::open(&spec).await.unwrap();
    let s = session();
    store.save_session(&s).await.unwrap();
    let taken = message(s.id, "first");
    store.save_message(0, &taken, None).await.unwrap();
    let good: Vec<Message> = (0..8)
        .map(|n| message(s.id, &format!("good {n}")))
        .collect();
    // A message id is unique: this one, at another place, is refused.
    let mut bad = message(s.id, "a copy");
    bad.id = taken.id;
    let mut writes = Vec::new();
    for (n, m) in good.iter().enumerate() {
        writes.push(store.save_message(1 + n as u64, m, None));
        if n == 3 {
            writes.push(store.save_message(100, &bad, None));
        }
    }
    let results = futures::future::join_all(writes).await;
    let failed: Vec<usize> = (0..results.len())
        .filter(|i| results[*i].is_err())
        .collect();
    assert_eq!(failed, [4], "only the bad write fails: {results:?}");
    drop(store);
    let store = Store::open(&spec).await.unwrap();
    let inputs: Vec<String> = store
        .load_messages(s.id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| serde_json::to_string(&m.input).unwrap())
        .collect();
    assert_eq!(inputs.len(), 9, "{inputs:?}");
    assert!(inputs.iter().all(|i| !i.contains("a copy")), "{inputs:?}");
}
