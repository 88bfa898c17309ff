//! Durable sessions with the real binary: `kill -9` of the gateway
//! mid-conversation, then a restart on the same store (a SQLite file, and
//! the throwaway PostgreSQL the test command starts), then a clean SIGTERM
//! restart. Acknowledged messages, history and event ids survive; what was
//! running fails `gateway_lost`; a reader resuming with `Last-Event-ID` gets
//! only later ids.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

const PROFILES: &str = r#"
[agents.sed]
command = ["sed", "-u", "a __END__"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "1s"

[agents.forker]
command = ["sh", "-c", "sleep 1000 & exec cat"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"

[agents.crasher]
command = ["sh", "-c", "exit 3"]
protocol = "lines"
end_marker = "^__END__$"
restart_budget = 0

[agents.silent]
command = ["python3", "-u", "-c", "import sys\nfor line in sys.stdin:\n    pass"]
protocol = "lines"
end_marker = "^__END__$"
stop_grace = "300ms"
"#;

fn start(home: &std::path::Path, store: &str) -> Node {
    start_with(home, store, &[])
}

/// [`start`] through `wrapper` (an argv put in front of the binary's).
fn start_with(home: &std::path::Path, store: &str, wrapper: &[&str]) -> Node {
    start_full(home, store, wrapper, &[])
}

/// [`start`] with more flags.
fn start_flags(home: &std::path::Path, store: &str, flags: &[&str]) -> Node {
    start_full(home, store, &[], flags)
}

fn start_full(home: &std::path::Path, store: &str, wrapper: &[&str], flags: &[&str]) -> Node {
    let config = home.join("agents.toml");
    std::fs::write(&config, PROFILES).unwrap();
    let sealed = sealed_command(home);
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(sealed.get_program());
            for (key, value) in sealed.get_envs() {
                match value {
                    Some(v) => c.env(key, v),
                    None => c.env_remove(key),
                };
            }
            c
        }
        None => sealed,
    };
    cmd.args(["--listen", "127.0.0.1:0", "--store", store, "--config"])
        .arg(&config);
    // On PostgreSQL a gateway is a cluster node: one that comes back under
    // the same name takes back at once what it held (the default name has
    // the port in it, which changes here at every start).
    let node = home.file_name().unwrap().to_string_lossy().into_owned();
    cmd.args(["--node-id", &node]).args(flags);
    Node::spawn(cmd)
}

use common::{ask_at as ask, get_ok as get};

async fn restart_loses_nothing(store: &str) {
    let home = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let mut node = start(home.path(), store);
    let base = node.base.clone();
    let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(ask(&http, &base, &id, "one").await["output"], "one\n");
    // (On PostgreSQL, a cluster node, the child starts with the first message.)
    let first_pid = get(&http, format!("{base}/sessions/{id}")).await["pid"]
        .as_u64()
        .expect("a child") as u32;
    assert_eq!(ask(&http, &base, &id, "two").await["output"], "two\n");
    let quiet = post_json(
        &http,
        format!("{base}/sessions"),
        json!({"agent": "silent"}),
    )
    .await;
    let quiet_id = quiet["id"].as_str().unwrap().to_string();
    let res = http
        .post(format!("{base}/sessions/{quiet_id}/messages"))
        .json(&json!({"content": "never answered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let lost: Value = res.json().await.unwrap();
    let lost_id = lost["id"].as_str().unwrap().to_string();
    // Every event so far, as a reader saw it live.
    let seen = read_sse(
        http.get(format!("{base}/sessions/{id}/events"))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.event.as_deref() == Some("message.completed") && i.data["output"] == "two\n",
    )
    .await;
    let last_seen = seen.iter().filter_map(|i| i.id).max().unwrap();

    // kill -9: no shutdown at all.
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    eventually(T, || async { !alive(first_pid) }).await;

    let node = start(home.path(), store);
    let base = node.base.clone();
    let view = get(&http, format!("{base}/sessions/{id}")).await;
    assert_eq!(view["state"], "suspended");
    assert_eq!(view["message_count"], 2);
    let history = get(&http, format!("{base}/sessions/{id}/messages")).await;
    let outputs: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["output"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["one\n", "two\n"]);
    let m = get(
        &http,
        format!("{base}/sessions/{quiet_id}/messages/{lost_id}"),
    )
    .await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "gateway_lost");
    // Resuming after the last id seen: only later ids, the restart said.
    let res = http
        .get(format!("{base}/sessions/{id}/events"))
        .header("last-event-id", last_seen.to_string())
        .send()
        .await
        .unwrap();
    let resumed = read_sse(res, T, |i| i.data["reason"] == "restarted").await;
    assert!(resumed.iter().filter_map(|i| i.id).all(|n| n > last_seen));
    // The conversation goes on, with ids that continue.
    assert_eq!(ask(&http, &base, &id, "three").await["output"], "three\n");
    let after = read_sse(
        http.get(format!("{base}/sessions/{id}/events?after={last_seen}"))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.event.as_deref() == Some("message.completed"),
    )
    .await;
    let ids: Vec<u64> = after.iter().filter_map(|i| i.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids.iter().all(|n| *n > last_seen), "{ids:?}");

    // A clean SIGTERM restart loses nothing either.
    node.terminate();
    let node = start(home.path(), store);
    let view = get(&http, format!("{}/sessions/{id}", node.base)).await;
    assert_eq!(view["state"], "suspended");
    assert_eq!(view["message_count"], 3);
    assert_eq!(
        ask(&http, &node.base, &id, "four").await["output"],
        "four\n"
    );
    // DELETE removes it from the store too.
    let res = http
        .delete(format!("{}/sessions/{id}", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    drop(node);
    let node = start(home.path(), store);
    let res = http
        .get(format!("{}/sessions/{id}", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn a_killed_gateway_comes_back_on_its_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("agentgate.db").display());
    restart_loses_nothing(&store).await;
}

#[tokio::test]
async fn a_killed_gateway_comes_back_on_postgres() {
    restart_loses_nothing(&fresh_postgres_db().await).await;
}

#[test]
fn a_second_gateway_on_the_same_sqlite_file_exits_2() {
    let home = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", home.path().join("agentgate.db").display());
    let _first = start(home.path(), &store);
    let out = sealed_command(home.path())
        .args(["--listen", "127.0.0.1:0", "--store", &store])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another agentgate"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// How many children the store at `path` (SQLite) has recorded, read beside
/// the running gateway (WAL lets a reader in).
async fn recorded_children(path: &std::path::Path) -> i64 {
    use sqlx::Connection;
    let url = format!("sqlite://{}?mode=ro", path.display());
    let Ok(mut db) = sqlx::SqliteConnection::connect(&url).await else {
        return 0;
    };
    sqlx::query_scalar("SELECT count(*) FROM children")
        .fetch_one(&mut db)
        .await
        .unwrap_or(0)
}

#[tokio::test]
async fn the_next_gateway_ends_what_a_killed_one_left_running() {
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join("agentgate.db");
    let store = format!("sqlite:{}", db.display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let mut node = start(home.path(), &store);
    // The child is `cat`, with a `sleep` grandchild in its process group.
    let s = post_json(
        &http,
        format!("{}/sessions", node.base),
        json!({"agent": "forker"}),
    )
    .await;
    let pgid = s["pid"].as_u64().expect("a child") as u32;
    eventually(T, || async { group_members(pgid).len() == 2 }).await;
    eventually(T, || async { recorded_children(&db).await == 1 }).await;

    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // The leader dies with the gateway; the grandchild does not.
    eventually(T, || async { !alive(pgid) }).await;
    let left = group_members(pgid);
    assert_eq!(left.len(), 1, "the grandchild outlives a kill -9: {left:?}");

    let node = start(home.path(), &store);
    // Ended before anything is served.
    let health = http
        .get(format!("{}/healthz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(group_members(pgid), Vec::<u32>::new());
    assert_eq!(recorded_children(&db).await, 0);
    // The session itself is back and starts a new child.
    let view = get(
        &http,
        format!("{}/sessions/{}", node.base, s["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(view["state"], "suspended");
}

#[tokio::test]
async fn a_gateway_that_still_runs_keeps_its_children() {
    // Two gateways on one PostgreSQL on one machine: the second one to start
    // must not take the first one's children for leftovers.
    let url = fresh_postgres_db().await;
    let home = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let first = start(home.path(), &url);
    let s = post_json(
        &http,
        format!("{}/sessions", first.base),
        json!({"agent": "forker"}),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_string();
    // A cluster node starts a session's child with its first message.
    let res = http
        .post(format!("{}/sessions/{id}/messages", first.base))
        .json(&json!({"content": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let pgid = get(&http, format!("{}/sessions/{id}", first.base)).await["pid"]
        .as_u64()
        .expect("a child") as u32;
    eventually(T, || async { group_members(pgid).len() == 2 }).await;
    eventually(T, || async {
        use sqlx::Connection;
        let Ok(mut db) = sqlx::PgConnection::connect(&url).await else {
            return false;
        };
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM children WHERE session_id = $1")
            .bind(&id)
            .fetch_one(&mut db)
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    let other = tempfile::tempdir().unwrap();
    let second = start(other.path(), &url);
    let health = http
        .get(format!("{}/healthz", second.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        group_members(pgid).len(),
        2,
        "the second gateway ended a live gateway's child"
    );
    let res = http
        .delete(format!(
            "{}/sessions/{}",
            first.base,
            s["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
}

#[tokio::test]
async fn a_full_disk_answers_503_and_loses_nothing_acknowledged() {
    // The disk fills up: the gateway runs with a file-size limit
    // (RLIMIT_FSIZE, set by util-linux's `prlimit`), so its store's writes
    // fail once the files reach 1 MiB, as they do on a full disk.
    let home = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", home.path().join("agentgate.db").display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let limit = 1 << 20;
    let fsize = format!("--fsize={limit}:{limit}");
    let mut node = start_with(home.path(), &store, &["prlimit", &fsize, "--"]);
    let base = node.base.clone();
    let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    let filler = "x".repeat(8 * 1024);
    let mut acknowledged = Vec::new();
    let mut refused = None;
    // Far more than fits: ~2,000 × 16 KiB (input and output).
    for n in 0..2000 {
        let content = format!("{n} {filler}");
        let res = http
            .post(format!("{base}/sessions/{id}/messages?wait=true"))
            .json(&json!({ "content": content }))
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            let problem = assert_problem(res, 503).await;
            assert!(
                problem["detail"].as_str().unwrap().contains("store"),
                "{problem}"
            );
            refused = Some(n);
            break;
        }
        assert_eq!(res.status(), 200, "message {n}");
        acknowledged.push(n);
    }
    let refused = refused.expect("the store never ran out of space");
    assert!(!acknowledged.is_empty());
    // The gateway still answers: reads are served, the refused message is
    // in no history.
    let history = get(&http, format!("{base}/sessions/{id}/messages")).await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        acknowledged.len()
    );

    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // Space again (no limit): every acknowledged message is there, in order.
    let node = start(home.path(), &store);
    let history = get(&http, format!("{}/sessions/{id}/messages", node.base)).await;
    let stored: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text = m["input"].as_str().unwrap_or_default();
            text.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(stored, acknowledged, "refused: {refused}");
}

#[tokio::test]
async fn a_database_that_goes_away_answers_503_not_a_hang() {
    use sqlx::Connection;
    // A database of its own in the throwaway server, dropped under the gateway.
    let own = fresh_postgres_db().await;
    let name = own.rsplit('/').next().unwrap().to_string();
    let server = std::env::var("AGENTGATE_TEST_POSTGRES").unwrap();
    let mut admin = sqlx::PgConnection::connect(&server).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let node = start(home.path(), &own);
    let base = node.base.clone();
    let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(ask(&http, &base, &id, "one").await["output"], "one\n");

    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let res = http
        .post(format!("{base}/sessions/{id}/messages"))
        .json(&json!({"content": "refused"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 503).await;
    let res = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_problem(res, 503).await;
    // What was acknowledged is still readable (memory holds it while the
    // database is away); nothing refused slipped in.
    let history = get(&http, format!("{base}/sessions/{id}/messages")).await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_session_the_gateway_closed_stays_closed_and_readable_across_a_restart() {
    let home = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", home.path().join("agentgate.db").display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let mut node = start(home.path(), &store);
    let s = post_json(
        &http,
        format!("{}/sessions", node.base),
        json!({"agent": "crasher"}),
    )
    .await;
    let id = s["id"].as_str().unwrap().to_string();
    let url = format!("{}/sessions/{id}", node.base);
    eventually(T, || async {
        get(&http, url.clone()).await["state"] == "closed"
    })
    .await;
    // Events are written in batches: wait for the last one to be stored.
    let db = home.path().join("agentgate.db");
    wait_stored(&db, &id, "name = 'session.closed'").await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();

    let node = start(home.path(), &store);
    let view = get(&http, format!("{}/sessions/{id}", node.base)).await;
    assert_eq!(view["state"], "closed", "{view}");
    let res = http
        .post(format!("{}/sessions/{id}/messages", node.base))
        .json(&json!({"content": "hello?"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 410).await;
    let replay = read_sse(
        http.get(format!("{}/sessions/{id}/events", node.base))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.event.as_deref() == Some("session.closed"),
    )
    .await;
    assert_eq!(replay.last().unwrap().data["reason"], "failed");
    drop(node);

    // Its session_ttl is up at the next start: gone, from the store too.
    let node = start_with(home.path(), &store, &["env", "AGENTGATE_SESSION_TTL=1ms"]);
    let res = http
        .get(format!("{}/sessions/{id}", node.base))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
    drop(node);
    let node = start(home.path(), &store);
    let res = http
        .get(format!("{}/sessions/{id}", node.base))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
}

#[tokio::test]
async fn old_history_is_read_from_the_store_and_memory_keeps_the_newest() {
    // Memory keeps 2 finished messages (4 at most before it trims); the
    // rest of the history is read from the store.
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join("agentgate.db");
    let store = format!("sqlite:{}", db.display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let node = start_flags(home.path(), &store, &["--history-in-memory", "2"]);
    let base = node.base.clone();
    let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    let mut ids = Vec::new();
    for n in 0..12 {
        let m = ask(&http, &base, &id, &format!("m{n}")).await;
        assert_eq!(m["output"], format!("m{n}\n"));
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    // Change the stored copies behind the gateway's back: what memory no
    // longer holds comes back as the store has it, the newest as memory has it.
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE messages SET body = replace(body, '\"output\":\"m', '\"output\":\"stored m') WHERE session_id = $1")
            .bind(&id)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let outputs = |v: &Value| -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["output"].as_str().unwrap().to_string())
            .collect()
    };
    let all = get(&http, format!("{base}/sessions/{id}/messages")).await;
    let all = outputs(&all);
    assert_eq!(all.len(), 12, "{all:?}");
    assert_eq!(
        all[0], "stored m0\n",
        "the oldest come from the store: {all:?}"
    );
    assert_eq!(all[11], "m11\n", "the newest from memory: {all:?}");
    for (n, out) in all.iter().enumerate() {
        assert!(out.ends_with(&format!("m{n}\n")), "in order: {all:?}");
    }
    // A page after an old message, across the edge of what memory holds.
    let page = get(
        &http,
        format!("{base}/sessions/{id}/messages?after={}&limit=9", ids[2]),
    )
    .await;
    let page = outputs(&page);
    assert_eq!(page.len(), 9, "{page:?}");
    assert_eq!(page[0], "stored m3\n");
    assert_eq!(page[8], "m11\n");
    // One old message; the session's count is the whole history.
    let old = get(&http, format!("{base}/sessions/{id}/messages/{}", ids[0])).await;
    assert_eq!(old["output"], "stored m0\n");
    assert_eq!(old["status"], "completed");
    let view = get(&http, format!("{base}/sessions/{id}")).await;
    assert_eq!(view["message_count"], 12, "{view}");
    // An id that is no message of the session is still 404.
    let res = http
        .get(format!(
            "{base}/sessions/{id}/messages?after=00000000-0000-4000-8000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404).await;
}

/// Waits until the SQLite store at `db` holds one event of session `id`
/// matching `condition` (events are written in batches).
async fn wait_stored(db: &std::path::Path, id: &str, condition: &str) {
    eventually(T, || async {
        use sqlx::Connection;
        let url = format!("sqlite://{}?mode=ro", db.display());
        let Ok(mut conn) = sqlx::SqliteConnection::connect(&url).await else {
            return false;
        };
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT count(*) FROM events WHERE session_id = $1 AND {condition}"
        ))
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .is_ok_and(|n| n == 1)
    })
    .await;
}

/// Runs `sql` on the SQLite store at `db`, behind the gateway's back.
async fn sql(db: &std::path::Path, sql: &str, id: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(sql).bind(id).execute(&mut conn).await.unwrap();
}

#[tokio::test]
async fn a_restarted_gateway_reads_a_sessions_history_and_events_on_demand() {
    let home = tempfile::tempdir().unwrap();
    let db = home.path().join("agentgate.db");
    let store = format!("sqlite:{}", db.display());
    let http = reqwest::Client::builder().timeout(T).build().unwrap();
    let node = start(home.path(), &store);
    let base = node.base.clone();
    let s = post_json(&http, format!("{base}/sessions"), json!({"agent": "sed"})).await;
    let id = s["id"].as_str().unwrap().to_string();
    for n in 0..3 {
        assert_eq!(
            ask(&http, &base, &id, &format!("m{n}")).await["output"],
            format!("m{n}\n")
        );
    }
    let before = read_sse(
        http.get(format!("{base}/sessions/{id}/events"))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.event.as_deref() == Some("message.completed") && i.data["output"] == "m2\n",
    )
    .await;
    let before_ids: Vec<u64> = before.iter().filter_map(|i| i.id).collect();
    // Events are written in batches: wait until the last one is stored.
    let last = *before_ids.last().unwrap();
    wait_stored(&db, &id, &format!("seq = {last}")).await;
    node.terminate();
    // An old store's session has no usage sum (store version 4): give this
    // one usage in its messages only, as such a store would have it.
    let other = {
        let node = start(home.path(), &store);
        let s = post_json(
            &http,
            format!("{}/sessions", node.base),
            json!({"agent": "sed"}),
        )
        .await;
        let other = s["id"].as_str().unwrap().to_string();
        assert_eq!(ask(&http, &node.base, &other, "x").await["output"], "x\n");
        node.terminate();
        other
    };
    sql(&db, "UPDATE messages SET body = replace(body, '\"usage\":null', '\"usage\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2},\"cost_usd\":0.25}') WHERE session_id = $1", &other).await;
    sql(
        &db,
        "UPDATE sessions SET usage = NULL, usage_version = 0 WHERE id = $1",
        &other,
    )
    .await;
    // And this one a usage sum of its own, which the restart takes as it is.
    sql(&db, "UPDATE sessions SET usage = '{\"input_tokens\":7,\"output_tokens\":3,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"cost_usd\":0.5}' WHERE id = $1", &id).await;

    // The newest stored event, before this start adds its own.
    let last_stored: i64 = {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE session_id = $1")
            .bind(&id)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let node = start(home.path(), &store);
    let base = node.base.clone();
    // Changed behind the gateway's back after it started: a session's
    // history and events are read when asked for, not at start-up.
    sql(&db, "UPDATE messages SET body = replace(body, '\"output\":\"m', '\"output\":\"stored m') WHERE session_id = $1", &id).await;
    sql(&db, "UPDATE events SET data = replace(data, '\"output\":\"m', '\"output\":\"stored m') WHERE session_id = $1", &id).await;
    let view = get(&http, format!("{base}/sessions/{id}")).await;
    assert_eq!(view["message_count"], 3, "{view}");
    assert_eq!(view["usage"]["input_tokens"], 7, "the stored sum: {view}");
    assert_eq!(view["usage"]["cost_usd"], 0.5, "{view}");
    let history = get(&http, format!("{base}/sessions/{id}/messages")).await;
    let outputs: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["output"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["stored m0\n", "stored m1\n", "stored m2\n"]);
    // A reader who saw the last stored event (the shutdown's) missed
    // nothing: the restart's event follows, no gap.
    let resumed = read_sse(
        http.get(format!("{base}/sessions/{id}/events"))
            .header("last-event-id", last_stored.to_string())
            .send()
            .await
            .unwrap(),
        T,
        |i| i.data["reason"] == "restarted",
    )
    .await;
    let names: Vec<&str> = resumed.iter().filter_map(|i| i.event.as_deref()).collect();
    assert_eq!(names, ["session.state"], "{resumed:?}");
    // The whole log from the start: the stored events once, in order, then the restart's.
    let replay = read_sse(
        http.get(format!("{base}/sessions/{id}/events"))
            .send()
            .await
            .unwrap(),
        T,
        |i| i.data["reason"] == "restarted",
    )
    .await;
    let ids: Vec<u64> = replay.iter().filter_map(|i| i.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(&ids[..before_ids.len()], &before_ids[..], "{ids:?}");
    let completed: Vec<&str> = replay
        .iter()
        .filter(|i| i.event.as_deref() == Some("message.completed"))
        .map(|i| i.data["output"].as_str().unwrap())
        .collect();
    assert_eq!(completed, ["stored m0\n", "stored m1\n", "stored m2\n"]);
    // A session of an older store: its messages are read at start-up, and its sum with them.
    let view = get(&http, format!("{base}/sessions/{other}")).await;
    assert_eq!(view["message_count"], 1, "{view}");
    assert_eq!(view["usage"]["input_tokens"], 5, "{view}");
    assert_eq!(view["usage"]["output_tokens"], 2, "{view}");
    // New messages go on from the stored count, and new events after the old ones.
    assert_eq!(ask(&http, &base, &id, "m3").await["output"], "m3\n");
    let view = get(&http, format!("{base}/sessions/{id}")).await;
    assert_eq!(view["message_count"], 4, "{view}");
    let history = get(&http, format!("{base}/sessions/{id}/messages")).await;
    assert_eq!(history["messages"][3]["output"], "m3\n", "{history}");
    assert_eq!(history["messages"][2]["output"], "stored m2\n", "{history}");
}
