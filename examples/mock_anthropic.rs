//! The test suite's mock of the Anthropic Messages API
//! (`tests/support/mock_anthropic.rs`) as a standalone server, for tests
//! outside cargo that run the real Claude Code CLI offline (the browser
//! console test in `scripts/contract/run.sh`).
//!
//! ```sh
//! cargo run --example mock_anthropic -- --bash-on-touch
//! # mock listening on http://127.0.0.1:PORT
//! ```
//!
//! Listens on `127.0.0.1` with an ephemeral port, prints one line
//! `mock listening on http://ADDR` to stdout and serves until killed. Give
//! the CLI `ANTHROPIC_BASE_URL=http://ADDR` (plus the rest of
//! `MockAnthropic::env`). Flags:
//! - `--bash-on-touch`: a message starting with `touch ` makes the model ask
//!   for a `Bash` tool call running that text (a tool permission prompt in
//!   the gateway); the tool's result gets the default text reply
//!   (`MockAnthropic::set_bash_on_touch`).

#[path = "../tests/support/mock_anthropic.rs"]
mod mock_anthropic;

use std::io::Write;

use mock_anthropic::MockAnthropic;

#[tokio::main]
async fn main() {
    let mut bash_on_touch = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bash-on-touch" => bash_on_touch = true,
            other => {
                eprintln!("mock_anthropic: unknown argument {other:?} (known: --bash-on-touch)");
                std::process::exit(2);
            }
        }
    }
    let mock = MockAnthropic::start().await;
    mock.set_bash_on_touch(bash_on_touch);
    let mut out = std::io::stdout().lock();
    writeln!(out, "mock listening on {}", mock.base_url()).expect("write stdout");
    out.flush().expect("flush stdout");
    drop(out);
    // Serve until killed.
    std::future::pending::<()>().await;
}
