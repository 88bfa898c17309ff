//! Prewarm: a warm child is handed to a new session and replaced. (The
//! claude warm-up request is tested in `tests/claude.rs`: this file's test
//! wants no other children in the process.)

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_prewarmed_child_is_handed_to_a_new_session_and_replaced() {
    let gw = Gateway::start(|c| {
        c.add_profiles_toml(
            "warm",
            r#"
            [agents.warm]
            command = ["python3", "-i", "-q", "-u"]
            protocol = "lines"
            prompt = ">>> "
            prewarm = 1
            stop_grace = "1s"
            "#,
        )
        .unwrap();
    })
    .await;
    let warm = || async {
        let agents = gw.get_json("/agents").await;
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "warm")
            .unwrap()["warm"]
            .as_u64()
            .unwrap()
    };
    eventually(T, || async { warm().await == 1 }).await;
    let before = children_of_this_process();
    let s = gw.create("warm").await;
    let pid = s["pid"].as_u64().unwrap() as u32;
    assert!(
        before.contains(&pid),
        "the session got the warm child {before:?}, not a new one ({pid})"
    );
    assert_eq!(
        gw.ask(s["id"].as_str().unwrap(), "print('warm')").await["output"],
        "warm\n"
    );
    eventually(T, || async { warm().await == 1 }).await;
    gw.stop().await;
    assert!(
        children_of_this_process().is_empty(),
        "warm and session children are stopped at shutdown"
    );
}
