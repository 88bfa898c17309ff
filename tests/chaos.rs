//! Chaos: 32 sessions send messages at once while a task SIGKILLs random
//! children. Every message must end `completed` or `failed` within its
//! timeout, no request may hang, every session's event ids must run 1..=n
//! without a hole or a `stream.gap`, and after shutdown no process of the test
//! may remain. Loopback only; bounded in count (32 × 10 messages, at most
//! 200 kills) and time (60 s).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SESSIONS: usize = 32;
const MESSAGES: usize = 10;
const TIMEOUT_MS: u64 = 10_000;
const MAX_KILLS: usize = 200;
/// Pace of the killer: one SIGKILL per tick at most.
const KILL_EVERY: Duration = Duration::from_millis(15);

/// A small xorshift generator: reproducible from the printed seed, no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Debug)]
struct Outcome {
    session: usize,
    status: String,
    code: Option<String>,
    duration_ms: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_never_lose_a_message_an_event_or_a_process() {
    let run = tokio::time::timeout(Duration::from_secs(60), chaos());
    run.await.expect("the chaos run finishes within 60 s");
}

async fn chaos() {
    let mut gw = Gateway::start(|c| {
        // The demo agent, streaming word by word, with room for many restarts.
        let mut p = (*c.profiles["demo"]).clone();
        p.name = "chaos".into();
        p.command
            .extend(["--delay-ms".to_string(), "10".to_string()]);
        p.restart_budget = 10_000;
        p.stop_grace = Duration::from_millis(500);
        c.profiles.insert("chaos".into(), Arc::new(p));
        c.replay_events = 100_000;
    })
    .await;
    // No request may hang: each one fails the test after 20 s.
    gw.http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let gw = Arc::new(gw);

    let created = futures::future::join_all((0..SESSIONS).map(|_| gw.create("chaos"))).await;
    let ids: Vec<String> = created
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let pids: Arc<Mutex<HashSet<u32>>> = Arc::new(Mutex::new(
        created
            .iter()
            .filter_map(|s| s["pid"].as_u64())
            .map(|p| p as u32)
            .collect(),
    ));

    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let killer = {
        let (gw, ids, pids, done, kills) = (
            gw.clone(),
            ids.clone(),
            pids.clone(),
            done.clone(),
            kills.clone(),
        );
        tokio::spawn(async move {
            let mut rng = Rng(seed);
            while !done.load(Ordering::SeqCst) && kills.load(Ordering::SeqCst) < MAX_KILLS {
                let id = &ids[(rng.next() % ids.len() as u64) as usize];
                let s = gw.session(id).await;
                if let Some(pid) = s["pid"].as_u64() {
                    pids.lock().unwrap().insert(pid as u32);
                    let killed = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    if killed.is_ok() {
                        kills.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(KILL_EVERY).await;
            }
        })
    };

    let senders = ids.iter().enumerate().map(|(n, id)| {
        let gw = gw.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut last = String::new();
            for i in 0..MESSAGES {
                let content = format!("chaos-{n}-{i}");
                let res = gw
                    .http
                    .post(gw.url(&format!("/sessions/{id}/messages?wait=true")))
                    .json(&json!({"content": content, "timeout_ms": TIMEOUT_MS}))
                    .send()
                    .await
                    .expect("no request hangs");
                assert_eq!(res.status(), 200, "session {n} message {i}");
                let m: Value = res.json().await.unwrap();
                let status = m["status"].as_str().unwrap().to_string();
                if status == "completed" {
                    let output = m["output"].as_str().unwrap();
                    assert!(
                        output.contains(&format!("\"{content}\"")),
                        "each reply answers its own message: {content} got {output:?}"
                    );
                }
                last = m["id"].as_str().unwrap().to_string();
                outcomes.push(Outcome {
                    session: n,
                    status,
                    code: m["error"]["code"].as_str().map(str::to_string),
                    duration_ms: m["duration_ms"].as_u64().unwrap_or(0),
                });
            }
            (outcomes, last)
        })
    });
    let results = futures::future::join_all(senders).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    killer.await.unwrap();

    let mut outcomes = Vec::new();
    let mut last_message = Vec::new();
    for r in results {
        let (o, last) = r.expect("a sender panicked");
        outcomes.extend(o);
        last_message.push(last);
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        let key = match &o.code {
            Some(code) => format!("{} ({code})", o.status),
            None => o.status.clone(),
        };
        *tally.entry(key).or_default() += 1;
    }
    let kills = kills.load(Ordering::SeqCst);
    eprintln!(
        "chaos: {} sessions, {} messages in {:.1} s, {kills} SIGKILLs (seed {seed:#x}); outcomes: {tally:?}",
        SESSIONS,
        outcomes.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(outcomes.len(), SESSIONS * MESSAGES);
    for o in &outcomes {
        assert!(
            o.status == "completed"
                || (o.status == "failed" && o.code.as_deref() == Some("process_exited")),
            "{o:?}"
        );
        assert!(o.duration_ms <= TIMEOUT_MS, "{o:?}");
    }
    assert!(kills > 0, "the killer killed nothing");
    let failed = outcomes.iter().filter(|o| o.status == "failed").count();
    assert!(
        failed > 0 || kills < 5,
        "kills but no failed message: {tally:?}"
    );
    let sessions_hit: HashSet<usize> = outcomes
        .iter()
        .filter(|o| o.status == "failed")
        .map(|o| o.session)
        .collect();
    eprintln!(
        "chaos: {} sessions lost at least one message",
        sessions_hit.len()
    );

    // Every session's log: ids 1..=n, no hole, no gap, one end per message.
    let mut events_total = 0;
    for (id, last) in ids.iter().zip(&last_message) {
        let res = gw
            .http
            .get(gw.url(&format!("/sessions/{id}/events")))
            .send()
            .await
            .unwrap();
        let items = read_sse(res, Duration::from_secs(20), |i| {
            i.data["message_id"] == last.as_str()
                && matches!(
                    i.event.as_deref(),
                    Some("message.completed") | Some("message.failed")
                )
        })
        .await;
        assert!(
            items
                .iter()
                .all(|i| i.event.as_deref() != Some("stream.gap")),
            "session {id}: a gap"
        );
        let got: Vec<u64> = items.iter().filter_map(|i| i.id).collect();
        let want: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(got, want, "session {id}: event ids have holes");
        let ends = items
            .iter()
            .filter(|i| {
                matches!(
                    i.event.as_deref(),
                    Some("message.completed") | Some("message.failed")
                )
            })
            .count();
        assert_eq!(ends, MESSAGES, "session {id}: one end per message");
        events_total += got.len();
    }
    eprintln!("chaos: {events_total} events checked, ids contiguous in every session");

    let gw = Arc::into_inner(gw).expect("every task let go of the gateway");
    gw.stop().await;
    let pids = pids.lock().unwrap().clone();
    eventually(Duration::from_secs(10), || async {
        children_of_this_process().is_empty() && zombies_of_this_process().is_empty()
    })
    .await;
    for pid in &pids {
        assert!(!alive(*pid), "child {pid} outlived the gateway");
    }
    eprintln!(
        "chaos: {} child pids seen, none left after shutdown",
        pids.len()
    );
}
