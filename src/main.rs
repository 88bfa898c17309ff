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
    let exe = std::env::current_exe()?;
    let config = agentgate::Config::from_cli(&cli, &exe)
        .map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    if !config.listen.ip().is_loopback() && config.token.is_none() && !config.insecure {
        anyhow::bail!(
            "refusing to listen on {} without a token: an agent CLI runs tools, so an open port is remote code execution. \
             Set --token (AGENTGATE_TOKEN), or pass --insecure if you really mean it",
            config.listen
        );
    }
    let (listener, addr) = agentgate::bind(&config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let agents: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
    tracing::info!(%addr, default_agent = %config.default_agent, agents = ?agents, "listening");
    println!(
        "agentgate listening on http://{addr} (default agent: {})",
        config.default_agent
    );
    agentgate::serve(config, listener, shutdown_signal()).await;
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
