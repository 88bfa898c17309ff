//! The agentgate binary: parses flags, sets up logging, serves until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use agentgate::config::{Cli, LogFormat, SubCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(SubCommand::DemoAgent { oneshot, delay_ms }) = cli.command {
        return match agentgate::demo::run(oneshot, Duration::from_millis(delay_ms)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // A child runs as the same user: without this it could read the token and
    // every other secret from /proc/<gateway>/environ (or attach a debugger)
    // and approve its own permission requests. Not inherited across exec, so
    // children keep their own core dumps. Root can read /proc regardless.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the gateway non-dumpable; children may read its environment");
    }
    // A file-size limit (RLIMIT_FSIZE) reached by the store must be an
    // error like a full disk (the request gets 503), not SIGXFSZ killing
    // the gateway. Children get the default back before exec.
    // SAFETY: setting a signal to SIG_IGN installs no handler.
    if let Err(e) = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        )
    } {
        tracing::warn!(error = %e, "cannot ignore SIGXFSZ");
    }
    let exe = std::env::current_exe()?;
    let config = agentgate::Config::from_cli(&cli, &exe)
        .map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    refuse_unsafe(&config)?;
    // Before listening: a store that cannot be used stops start-up (exit 2).
    let store = agentgate::store::Store::open(&config.store).await?;
    let (listener, addr) = agentgate::bind(&config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let agents: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
    tracing::info!(%addr, default_agent = %config.default_agent, agents = ?agents, "listening");
    println!(
        "agentgate listening on http://{addr} (default agent: {})",
        config.default_agent
    );
    agentgate::serve_with_store(config, store, listener, shutdown_signal()).await?;
    Ok(())
}

/// Start-up refusals for configurations that would open the machine to
/// strangers; `--insecure` overrides all of them.
fn refuse_unsafe(config: &agentgate::Config) -> anyhow::Result<()> {
    if config.insecure {
        return Ok(());
    }
    let public = !config.listen.ip().is_loopback();
    // A JWT key is a credential too: every request then needs a valid token.
    let credential = config.token.is_some() || config.jwt.is_some();
    if public && !credential {
        anyhow::bail!(
            "refusing to listen on {} without a token: an agent CLI runs tools, so an open port is remote code execution. \
             Set --token (AGENTGATE_TOKEN) or a --jwt-* key, or pass --insecure if you really mean it",
            config.listen
        );
    }
    if public && config.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        anyhow::bail!(
            "refusing to listen on {} with a token shorter than 16 bytes: it can be guessed. \
             Use e.g. `openssl rand -hex 32`, or pass --insecure",
            config.listen
        );
    }
    let any_origin = config.allow_origin.iter().any(|o| o.trim() == "*");
    if any_origin && !credential {
        anyhow::bail!(
            "refusing --allow-origin '*' without a token: any web page could then start agents. \
             Set --token, name the origins, or pass --insecure"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AGENTGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,warp=warn,hyper=warn"));
    // Colours only on a terminal: escape codes in a log file or a journal
    // would split `session_id=…` for anyone who greps it.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Human => builder.init(),
    }
}
