//! Command-line flags, environment variables and agent profiles.
//!
//! Every flag has an `AGENTGATE_*` environment variable. Profiles come from a
//! TOML file (`--config`) plus built-ins: `demo` (this binary run as
//! `agentgate demo-agent`, so a fresh machine can try the gateway),
//! `claude`, `gemini` and `codex` (each when its binary is found). A bad file stops start-up with
//! one line naming the file, the profile and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod acp_agents;

pub use acp_agents::{codex_profile, gemini_profile};

use clap::{Parser, Subcommand, ValueEnum};
use regex::Regex;
use serde::Deserialize;

/// agentgate: conversational CLI agents behind HTTP REST + SSE.
#[derive(Debug, Clone, Parser)]
#[command(name = "agentgate", version, about)]
pub struct Cli {
    /// A subcommand; without one the gateway runs.
    #[command(subcommand)]
    pub command: Option<SubCommand>,
    /// Address to listen on. Non-loopback addresses need a token (or --insecure).
    #[arg(long, env = "AGENTGATE_LISTEN", default_value = "127.0.0.1:8700")]
    pub listen: SocketAddr,
    /// TOML file with `[agents.NAME]` profiles.
    #[arg(long, env = "AGENTGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The operator's bearer token (every route but /healthz and the console needs a credential).
    #[arg(long, env = "AGENTGATE_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// Accept HS256 JWTs signed with this secret (at least 32 bytes); `sub` is the owner.
    #[arg(long, env = "AGENTGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Accept JWTs signed by this PEM public key's private half (RSA: RS256, EC P-256: ES256, Ed25519: EdDSA).
    #[arg(long, env = "AGENTGATE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Accept JWTs signed by the keys of this JWKS file (a token's `kid` picks the key).
    #[arg(long, env = "AGENTGATE_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// A JWT's `iss` must be this.
    #[arg(long, env = "AGENTGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// A JWT's `aud` must hold this.
    #[arg(long, env = "AGENTGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Most open sessions per owner (JWT `sub`; 429 beyond). Operators are not limited.
    #[arg(long, env = "AGENTGATE_MAX_SESSIONS_PER_OWNER")]
    pub max_sessions_per_owner: Option<usize>,
    /// Profile used when a request names none.
    #[arg(long, env = "AGENTGATE_DEFAULT_AGENT")]
    pub default_agent: Option<String>,
    /// A session's child is stopped after this long with nothing running or queued.
    #[arg(long, env = "AGENTGATE_IDLE_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How often the reaper looks for idle children and expired sessions.
    #[arg(long, env = "AGENTGATE_REAP_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reap_interval: Duration,
    /// A session with no activity for this long is removed.
    #[arg(long, env = "AGENTGATE_SESSION_TTL", default_value = "24h", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Most sessions at once (503 beyond).
    #[arg(long, env = "AGENTGATE_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// Most live session children at once; the least recently used idle one is suspended to make room.
    #[arg(long, env = "AGENTGATE_MAX_CHILDREN", default_value_t = 64)]
    pub max_children: usize,
    /// Most messages waiting behind the running one, per session (429 beyond).
    #[arg(long, env = "AGENTGATE_MAX_QUEUE", default_value_t = 8)]
    pub max_queue: usize,
    /// Most `POST /oneshot` runs at once (503 beyond).
    #[arg(long, env = "AGENTGATE_MAX_ONESHOT", default_value_t = 16)]
    pub max_oneshot: usize,
    /// Where sessions are kept: `sqlite:PATH`, `postgres://…` or `memory`
    /// (nothing survives a restart). Default: `sqlite:` in --data-dir.
    #[arg(long, env = "AGENTGATE_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Keep sessions in `agentgate.db` here (SQLite) when --store is not
    /// given. Default: `$XDG_STATE_HOME/agentgate`, else
    /// `~/.local/state/agentgate`.
    #[arg(long, env = "AGENTGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This gateway's name among the nodes sharing a `postgres://` store
    /// (cluster mode). Default: hostname:port. Keep it stable across
    /// restarts: a node that comes back under its name takes back at once
    /// what it held.
    #[arg(long, env = "AGENTGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster mode: how long a session's lease lasts without renewal. A
    /// node that dies loses its sessions to the others after this long.
    #[arg(long, env = "AGENTGATE_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Most open client connections; beyond it a connection gets 503 (and
    /// `GET /healthz`) and is closed. Default: half the open-file limit, at most 4096.
    #[arg(long, env = "AGENTGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// A client must send a request's headers within this long of connecting or of
    /// the previous response; idle keep-alive connections close after it too.
    #[arg(long, env = "AGENTGATE_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Most open event streams at once, all credentials together (429 beyond).
    #[arg(long, env = "AGENTGATE_MAX_EVENT_STREAMS", default_value_t = 256)]
    pub max_event_streams: usize,
    /// Most open event streams of one JWT owner (429 beyond), so one user
    /// cannot take every stream place; operators count only toward
    /// `--max-event-streams`.
    #[arg(
        long,
        env = "AGENTGATE_MAX_EVENT_STREAMS_PER_OWNER",
        default_value_t = 16
    )]
    pub max_event_streams_per_owner: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "AGENTGATE_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body: u64,
    /// Largest image in a message, in bytes once decoded (413 beyond).
    #[arg(long, env = "AGENTGATE_MAX_IMAGE_BYTES", default_value_t = 5 << 20)]
    pub max_image_bytes: usize,
    /// Largest reply per message in bytes (the message fails with `output_limit` beyond).
    #[arg(long, env = "AGENTGATE_MAX_OUTPUT", default_value_t = 16 << 20)]
    pub max_output: usize,
    /// Events kept per session for replay.
    #[arg(long, env = "AGENTGATE_REPLAY_EVENTS", default_value_t = 4096)]
    pub replay_events: usize,
    /// Bytes of event data kept per session for replay.
    #[arg(long, env = "AGENTGATE_REPLAY_BYTES", default_value_t = 8 << 20)]
    pub replay_bytes: usize,
    /// Finished messages of a session kept in memory besides the store
    /// (durable stores only): older ones are read from the store.
    #[arg(long, env = "AGENTGATE_HISTORY_IN_MEMORY", default_value_t = 256)]
    pub history_in_memory: usize,
    /// Origins allowed by CORS (repeatable; default none). `*` needs a token.
    #[arg(long, env = "AGENTGATE_ALLOW_ORIGIN", value_delimiter = ',')]
    pub allow_origin: Vec<String>,
    /// Extra Host header names allowed besides localhost names and loopback addresses (repeatable).
    #[arg(long, env = "AGENTGATE_ALLOWED_HOST", value_delimiter = ',')]
    pub allowed_host: Vec<String>,
    /// Log format.
    #[arg(long, env = "AGENTGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Allow a non-loopback listen address without a token (or with a short
    /// one), and `--allow-origin '*'` without a token.
    #[arg(long, env = "AGENTGATE_INSECURE")]
    pub insecure: bool,
    /// Run every profile's messages through its one-shot command (`false` to force).
    #[arg(long, env = "AGENTGATE_PERSISTENT", default_value_t = true, action = clap::ArgAction::Set)]
    pub persistent: bool,
}

/// Subcommands of the binary.
#[derive(Debug, Clone, Subcommand)]
pub enum SubCommand {
    /// The built-in demo agent: reads a line, streams a reply word by word.
    DemoAgent {
        /// Answer all of stdin once and exit (the one-shot form).
        #[arg(long)]
        oneshot: bool,
        /// Milliseconds between streamed words.
        #[arg(long, default_value_t = 15)]
        delay_ms: u64,
    },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Parses `30m`, `2s`, `500ms`, `1h 30m` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (use e.g. 30m, 2s, 500ms)"))
}

/// How a profile's child talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolKind {
    /// Text in, text out; the end of a reply is a marker line, a prompt or silence.
    Lines,
    /// Claude Code's `--input-format/--output-format stream-json`.
    ClaudeStreamJson,
    /// The Agent Client Protocol (JSON-RPC 2.0 over stdio): gemini-cli, codex-acp, …
    Acp,
}

impl ProtocolKind {
    /// The name used in profiles and the API (`lines`, `claude-stream-json`, `acp`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolKind::Lines => "lines",
            ProtocolKind::ClaudeStreamJson => "claude-stream-json",
            ProtocolKind::Acp => "acp",
        }
    }

    /// Whether a message may carry images (as content blocks), so that a
    /// post with images is accepted rather than refused (400).
    ///
    /// ACP: accepted for every ACP profile, although an agent takes images
    /// only when its `initialize` answer advertises
    /// `agentCapabilities.promptCapabilities.image`. That answer is not known
    /// when the message is posted (the session's child may not have started
    /// yet, and a restarted child may be a different binary), so the check is
    /// made when the message is handed to the running child: an agent
    /// without image support fails the message with `unsupported_content`
    /// and the session goes on (`Acp::frame_content`).
    pub fn carries_images(self) -> bool {
        match self {
            ProtocolKind::Lines => false,
            ProtocolKind::ClaudeStreamJson | ProtocolKind::Acp => true,
        }
    }
}

/// How the `lines` protocol recognises the end of a reply.
#[derive(Debug, Clone)]
pub enum LineEnding {
    /// A whole stdout line matching this regex ends the reply (and is not output).
    EndMarker(Regex),
    /// The program prints this string, with no newline after it, when it waits for input.
    Prompt(String),
    /// No output for this long ends the reply.
    Quiet(Duration),
}

/// A resolved, validated agent profile.
#[derive(Debug, Clone)]
pub struct AgentProfile {
    /// The name clients use.
    pub name: String,
    /// One line for `GET /agents`.
    pub description: String,
    /// Persistent command (argv).
    pub command: Vec<String>,
    /// One-shot command (argv); `None` means the persistent command is used once.
    pub oneshot_command: Option<Vec<String>>,
    /// Protocol spoken by the child.
    pub protocol: ProtocolKind,
    /// For `lines`: how a reply ends. `None` for other protocols.
    pub ending: Option<LineEnding>,
    /// For `lines` with a `prompt`: the prompt the program prints instead
    /// while an input line continues a block (Python's `... `). Each input
    /// line ends with one prompt or the other.
    pub continuation_prompt: Option<String>,
    /// Send stderr through the stdout pipe (the kernel keeps their order).
    pub merge_stderr: bool,
    /// Extra environment variables for the child.
    pub env: BTreeMap<String, String>,
    /// Names or `NAME_*` patterns copied from the gateway's environment.
    pub pass_env: Vec<String>,
    /// Working directory; `None` is the gateway's.
    pub cwd: Option<PathBuf>,
    /// Directories under which a session may choose its own `cwd`.
    pub cwd_roots: Vec<PathBuf>,
    /// A working directory per owner: an absolute path with `{owner}` as one
    /// whole component (`/srv/work/{owner}`), created on demand.
    pub cwd_template: Option<String>,
    /// Children started ahead and handed to new sessions.
    pub prewarm: usize,
    /// Default per-message timeout.
    pub timeout: Duration,
    /// Keep one child per session (`false`: every message runs the one-shot command).
    pub persistent: bool,
    /// After closing stdin, how long the child may take to exit before SIGTERM, and again before SIGKILL.
    pub stop_grace: Duration,
    /// After an interrupt (or a timeout's interrupt), how long the reply may take to end before the child is killed.
    pub interrupt_grace: Duration,
    /// Unexpected exits allowed within `restart_window` before the session is closed.
    pub restart_budget: usize,
    /// The window of the restart budget.
    pub restart_window: Duration,
    /// claude: relay tool permission prompts to clients.
    pub permission_relay: bool,
    /// claude: deny a permission request nobody answered after this long.
    pub permission_timeout: Duration,
    /// Session options clients may choose (`[agents.NAME.client_options]`).
    pub client_options: crate::options::ClientOptions,
    /// A running message whose child prints nothing for this long fails
    /// with `stalled` and the child is ended; `None`: never.
    pub stall_timeout: Option<Duration>,
    /// claude: a prewarmed child gets the protocol's warm-up request as it
    /// starts (a local context breakdown, no model call), which takes part
    /// of the first turn's work off the first message.
    pub warm_up: bool,
}

/// Checks a profile's `cwd_template`: absolute, `{owner}` once and as one
/// whole path component, no `.` or `..` anywhere.
fn check_cwd_template(t: &str) -> Result<String, String> {
    if !t.starts_with('/') {
        return Err(format!("{t:?} must be an absolute path"));
    }
    let parts: Vec<&str> = t.split('/').collect();
    if parts.iter().filter(|p| p.contains("{owner}")).count() != 1 || !parts.contains(&"{owner}") {
        return Err(format!(
            "{t:?} must hold {{owner}} exactly once, as a whole path component (e.g. /srv/work/{{owner}})"
        ));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!("{t:?} must not contain . or .."));
    }
    Ok(t.to_string())
}

impl AgentProfile {
    /// The directory under which every owner's directory of `cwd_template`
    /// lies (the part before `{owner}`).
    pub fn cwd_template_base(&self) -> Option<PathBuf> {
        let t = self.cwd_template.as_deref()?;
        let base = &t[..t.find("{owner}")?];
        Some(PathBuf::from(if base == "/" {
            "/"
        } else {
            base.trim_end_matches('/')
        }))
    }

    /// Where a session's own cwd must still lie when its child starts:
    /// `cwd_roots`, and the base of `cwd_template` (owner directories).
    pub fn session_cwd_roots(&self) -> Vec<PathBuf> {
        let mut roots = self.cwd_roots.clone();
        roots.extend(self.cwd_template_base());
        roots
    }

    /// Whether a one-shot run of this profile writes its content as a
    /// stream-json user line (claude, with `--input-format stream-json` in
    /// the one-shot command) and so can carry content blocks, images too.
    pub fn oneshot_takes_blocks(&self) -> bool {
        if self.protocol != ProtocolKind::ClaudeStreamJson {
            return false;
        }
        let argv = self.oneshot_command.as_ref().unwrap_or(&self.command);
        argv.iter().enumerate().any(|(i, a)| {
            a == "--input-format=stream-json"
                || (a == "--input-format" && argv.get(i + 1).is_some_and(|v| v == "stream-json"))
        })
    }

    /// Whether a message with images can be delivered: by the persistent
    /// child, or by a one-shot run that takes blocks.
    pub fn takes_images(&self) -> bool {
        self.protocol.carries_images() && (self.persistent || self.oneshot_takes_blocks())
    }

    /// The argv of a persistent child; claude children resume `resume` and
    /// relay permission prompts when the profile says so.
    pub fn persistent_argv(&self, resume: Option<&str>) -> Vec<String> {
        let mut argv = self.command.clone();
        if self.protocol == ProtocolKind::ClaudeStreamJson {
            if let Some(id) = resume {
                argv.extend(["--resume".to_string(), id.to_string()]);
            }
            if self.permission_relay {
                argv.extend(["--permission-prompt-tool".to_string(), "stdio".to_string()]);
            }
        }
        argv
    }

    /// The argv of a one-shot run; claude runs resume `resume` (fallback mode keeps context so).
    pub fn oneshot_argv(&self, resume: Option<&str>) -> Vec<String> {
        let mut argv = self
            .oneshot_command
            .clone()
            .unwrap_or_else(|| self.command.clone());
        if self.protocol == ProtocolKind::ClaudeStreamJson {
            if let Some(id) = resume {
                argv.extend(["--resume".to_string(), id.to_string()]);
            }
        }
        argv
    }
}

/// The profile section of the TOML file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    #[serde(default)]
    agents: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    command: Vec<String>,
    protocol: ProtocolKind,
    description: Option<String>,
    prompt: Option<String>,
    continuation_prompt: Option<String>,
    end_marker: Option<String>,
    quiet_ms: Option<u64>,
    #[serde(default)]
    merge_stderr: bool,
    oneshot_command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pass_env: Vec<String>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    cwd_roots: Vec<PathBuf>,
    cwd_template: Option<String>,
    #[serde(default)]
    prewarm: usize,
    timeout: Option<String>,
    persistent: Option<bool>,
    #[serde(default)]
    default: bool,
    stop_grace: Option<String>,
    interrupt_grace: Option<String>,
    restart_budget: Option<usize>,
    restart_window: Option<String>,
    permission_relay: Option<bool>,
    permission_timeout: Option<String>,
    client_options: Option<crate::options::ClientOptions>,
    stall_timeout: Option<String>,
    warm_up: Option<bool>,
}

/// A configuration error: names the file, the profile and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {place}: {message}")]
pub struct ConfigError {
    file: String,
    place: String,
    message: String,
}

impl ConfigError {
    fn new(file: &str, place: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            place: place.into(),
            message: message.into(),
        }
    }
}

/// A secret such as the bearer token. Its `Debug` never shows the value, so
/// a `{:?}` of the flags or the configuration cannot put it in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Everything the gateway needs to run, resolved from flags and the profile file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The operator's bearer token, if any.
    pub token: Option<Secret>,
    /// JWT verification (`--jwt-*`), if any key was given.
    pub jwt: Option<Arc<crate::auth::JwtVerifier>>,
    /// See [`Cli::max_sessions_per_owner`].
    pub max_sessions_per_owner: Option<usize>,
    /// Profiles by name.
    pub profiles: BTreeMap<String, Arc<AgentProfile>>,
    /// The profile used when a request names none.
    pub default_agent: String,
    /// See [`Cli::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`Cli::reap_interval`].
    pub reap_interval: Duration,
    /// See [`Cli::session_ttl`].
    pub session_ttl: Duration,
    /// See [`Cli::max_sessions`].
    pub max_sessions: usize,
    /// See [`Cli::max_children`].
    pub max_children: usize,
    /// See [`Cli::max_queue`].
    pub max_queue: usize,
    /// See [`Cli::max_oneshot`].
    pub max_oneshot: usize,
    /// See [`Cli::max_connections`]; resolved against the open-file limit.
    pub max_connections: usize,
    /// See [`Cli::header_timeout`].
    pub header_timeout: Duration,
    /// See [`Cli::max_event_streams`].
    pub max_event_streams: usize,
    /// See [`Cli::max_event_streams_per_owner`].
    pub max_event_streams_per_owner: usize,
    /// See [`Cli::max_body`].
    pub max_body: u64,
    /// See [`Cli::max_output`].
    pub max_output: usize,
    /// See [`Cli::max_image_bytes`].
    pub max_image_bytes: usize,
    /// See [`Cli::replay_events`].
    pub replay_events: usize,
    /// See [`Cli::replay_bytes`].
    pub replay_bytes: usize,
    /// See [`Cli::history_in_memory`].
    pub history_in_memory: usize,
    /// See [`Cli::allow_origin`].
    pub allow_origin: Vec<String>,
    /// See [`Cli::allowed_host`].
    pub allowed_host: Vec<String>,
    /// See [`Cli::insecure`].
    pub insecure: bool,
    /// Interval of SSE heartbeat comments.
    pub heartbeat: Duration,
    /// Where sessions are kept.
    pub store: crate::store::StoreSpec,
    /// See [`Cli::node_id`].
    pub node_id: Option<String>,
    /// See [`Cli::lease_ttl`].
    pub lease_ttl: Duration,
}

/// The JWT verifier the `--jwt-*` flags describe, or `None` without a key.
fn jwt_verifier(cli: &Cli) -> Result<Option<crate::auth::JwtVerifier>, ConfigError> {
    let mut jwt = crate::auth::JwtVerifier::new(cli.jwt_issuer.clone(), cli.jwt_audience.clone());
    if let Some(secret) = cli.jwt_secret.as_ref().filter(|s| !s.expose().is_empty()) {
        jwt.add_secret(secret.expose().as_bytes())
            .map_err(|e| ConfigError::new("--jwt-secret", "value", e))?;
    }
    if let Some(path) = &cli.jwt_public_key {
        jwt.add_file(path, false)
            .map_err(|e| ConfigError::new(&path.display().to_string(), "--jwt-public-key", e))?;
    }
    if let Some(path) = &cli.jwt_jwks {
        jwt.add_file(path, true)
            .map_err(|e| ConfigError::new(&path.display().to_string(), "--jwt-jwks", e))?;
    }
    if jwt.is_empty() && (cli.jwt_issuer.is_some() || cli.jwt_audience.is_some()) {
        return Err(ConfigError::new(
            "--jwt-issuer/--jwt-audience",
            "value",
            "no JWT key: give --jwt-secret, --jwt-public-key or --jwt-jwks",
        ));
    }
    Ok((!jwt.is_empty()).then_some(jwt))
}

/// The default store: `agentgate.db` (SQLite) in the data directory:
/// `--data-dir`, else `$XDG_STATE_HOME/agentgate`, else
/// `~/.local/state/agentgate`.
fn default_store(data_dir: Option<&Path>) -> crate::store::StoreSpec {
    let dir = data_dir.map(Path::to_path_buf).unwrap_or_else(|| {
        match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(state) => PathBuf::from(state).join("agentgate"),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".local/state/agentgate"),
        }
    });
    crate::store::StoreSpec::Sqlite(dir.join("agentgate.db"))
}

/// Half the soft open-file limit, between 16 and 4096: the other half is
/// left for children's pipes, the listener and files, so a flood of
/// connections cannot starve `accept` or a spawn of descriptors.
fn default_max_connections() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    usize::try_from(soft / 2).unwrap_or(4096).clamp(16, 4096)
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// claude's default `stall_timeout`: long enough for a slow model's first
/// token, short enough that a silent child does not hold a session forever.
const CLAUDE_STALL_TIMEOUT: Duration = Duration::from_secs(300);

impl Config {
    /// Resolves flags and the profile file. `self_exe` is the agentgate binary
    /// that runs the built-in `demo` agent.
    pub fn from_cli(cli: &Cli, self_exe: &Path) -> Result<Config, ConfigError> {
        Config::resolve(cli, self_exe, find_claude(), acp_agents::find())
    }

    fn resolve(
        cli: &Cli,
        self_exe: &Path,
        claude: Option<PathBuf>,
        acp: Vec<(&'static str, AgentProfile)>,
    ) -> Result<Config, ConfigError> {
        let mut profiles = BTreeMap::new();
        profiles.insert("demo".to_string(), Arc::new(demo_profile(self_exe)));
        if let Some(claude) = claude {
            profiles.insert("claude".to_string(), Arc::new(claude_profile(&claude)));
        }
        for (name, profile) in acp {
            profiles.insert(name.to_string(), Arc::new(profile));
        }
        let mut file_default = None;
        if let Some(path) = &cli.config {
            let (loaded, default) = load_profiles(path)?;
            file_default = default;
            for (name, profile) in loaded {
                profiles.insert(name, Arc::new(profile));
            }
        }
        if !cli.persistent {
            for profile in profiles.values_mut() {
                Arc::make_mut(profile).persistent = false;
            }
        }
        let default_agent = match (&cli.default_agent, file_default) {
            (Some(name), _) => name.clone(),
            (None, Some(name)) => name,
            (None, None) if profiles.contains_key("claude") => "claude".to_string(),
            (None, None) => "demo".to_string(),
        };
        if !profiles.contains_key(&default_agent) {
            let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
            return Err(ConfigError::new(
                "--default-agent",
                default_agent,
                format!("no such profile (known: {})", known.join(", ")),
            ));
        }
        Ok(Config {
            listen: cli.listen,
            token: cli.token.clone().filter(|t| !t.expose().is_empty()),
            jwt: jwt_verifier(cli)?.map(Arc::new),
            max_sessions_per_owner: cli.max_sessions_per_owner,
            profiles,
            default_agent,
            idle_timeout: cli.idle_timeout,
            reap_interval: cli.reap_interval,
            session_ttl: cli.session_ttl,
            max_sessions: cli.max_sessions,
            max_children: cli.max_children.max(1),
            max_queue: cli.max_queue,
            max_oneshot: cli.max_oneshot.max(1),
            max_connections: cli
                .max_connections
                .unwrap_or_else(default_max_connections)
                .max(1),
            header_timeout: cli.header_timeout.max(Duration::from_millis(100)),
            max_event_streams: cli.max_event_streams.max(1),
            max_event_streams_per_owner: cli.max_event_streams_per_owner.max(1),
            max_body: cli.max_body,
            max_output: cli.max_output,
            max_image_bytes: cli.max_image_bytes,
            replay_events: cli.replay_events.max(1),
            replay_bytes: cli.replay_bytes.max(1024),
            history_in_memory: cli.history_in_memory.max(1),
            allow_origin: cli.allow_origin.clone(),
            allowed_host: cli.allowed_host.clone(),
            insecure: cli.insecure,
            heartbeat: Duration::from_secs(15),
            store: match &cli.store {
                Some(spec) => spec
                    .parse()
                    .map_err(|e: String| ConfigError::new("--store", "value", e))?,
                // SQLite under `--data-dir` or the state directory.
                None => default_store(cli.data_dir.as_deref()),
            },
            node_id: cli.node_id.clone().filter(|n| !n.is_empty()),
            lease_ttl: cli.lease_ttl.max(Duration::from_secs(1)),
        })
    }

    /// The defaults and the `demo` profile, for tests and embedding. Sealed
    /// from the machine: no `AGENTGATE_*` variable is read and no `claude`
    /// is looked for, so a test never starts a CLI it did not configure
    /// (with its own `HOME` and model API) because the runner has one.
    pub fn defaults(self_exe: &Path) -> Config {
        use clap::{CommandFactory, FromArgMatches};
        let command = Cli::command().mut_args(|arg| arg.env(None));
        let matches = command.get_matches_from(["agentgate", "--listen", "127.0.0.1:0"]);
        let cli = Cli::from_arg_matches(&matches).expect("the built-in defaults parse");
        // No agent found on this machine: defaults are the same everywhere.
        let mut config = Config::resolve(&cli, self_exe, None, Vec::new())
            .expect("the built-in defaults are valid");
        // Embedded and test gateways keep nothing unless told otherwise.
        config.store = crate::store::StoreSpec::Memory;
        config
    }

    /// Adds (or replaces) profiles from TOML text; for tests and embedding.
    pub fn add_profiles_toml(&mut self, origin: &str, text: &str) -> Result<(), ConfigError> {
        for (name, profile) in parse_profiles(origin, text)?.0 {
            self.profiles.insert(name, Arc::new(profile));
        }
        Ok(())
    }
}

fn load_profiles(
    path: &Path,
) -> Result<(BTreeMap<String, AgentProfile>, Option<String>), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, "file", format!("cannot read: {e}")))?;
    parse_profiles(&file, &text)
}

fn parse_profiles(
    file: &str,
    text: &str,
) -> Result<(BTreeMap<String, AgentProfile>, Option<String>), ConfigError> {
    let parsed: ProfileFile = toml::from_str(text).map_err(|e| {
        // toml's message names the key path and line; keep it on one line.
        let msg = e.message().trim().replace('\n', "; ");
        let place = e
            .span()
            .map(|s| {
                let before = text.get(..s.start).unwrap_or(text);
                format!("line {}", before.matches('\n').count() + 1)
            })
            .unwrap_or_else(|| "file".to_string());
        ConfigError::new(file, place, msg)
    })?;
    let mut out = BTreeMap::new();
    let mut default = None;
    for (name, raw) in parsed.agents {
        if raw.default {
            default = Some(name.clone());
        }
        let profile = resolve_profile(file, &name, raw)?;
        out.insert(name, profile);
    }
    Ok((out, default))
}

fn resolve_profile(file: &str, name: &str, raw: RawProfile) -> Result<AgentProfile, ConfigError> {
    let field = |f: &str| format!("agents.{name}.{f}");
    let err = |f: &str, m: String| ConfigError::new(file, field(f), m);
    let duration =
        |f: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                Some(s) => parse_duration(s).map_err(|e| err(f, e)),
                None => Ok(default),
            }
        };
    if raw.command.is_empty() || raw.command[0].is_empty() {
        return Err(err(
            "command",
            "must name a program (argv, not a shell string)".into(),
        ));
    }
    if let Some(cmd) = &raw.oneshot_command {
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(err("oneshot_command", "must name a program".into()));
        }
    }
    let ending = match raw.protocol {
        ProtocolKind::Lines => {
            let set = [
                raw.end_marker.is_some(),
                raw.prompt.is_some(),
                raw.quiet_ms.is_some(),
            ];
            match set.iter().filter(|b| **b).count() {
                1 => {}
                0 => {
                    return Err(err(
                        "protocol",
                        "`lines` needs one of end_marker, prompt or quiet_ms".into(),
                    ))
                }
                _ => {
                    return Err(err(
                        "protocol",
                        "give only one of end_marker, prompt and quiet_ms".into(),
                    ))
                }
            }
            if raw.continuation_prompt.is_some() && raw.prompt.is_none() {
                return Err(err(
                    "continuation_prompt",
                    "needs `prompt` (it is the prompt printed inside a block)".into(),
                ));
            }
            if raw.continuation_prompt.as_deref() == Some("") {
                return Err(err("continuation_prompt", "must not be empty".into()));
            }
            Some(if let Some(re) = &raw.end_marker {
                LineEnding::EndMarker(
                    Regex::new(re).map_err(|e| err("end_marker", format!("bad regex: {e}")))?,
                )
            } else if let Some(p) = &raw.prompt {
                if p.is_empty() {
                    return Err(err("prompt", "must not be empty".into()));
                }
                LineEnding::Prompt(p.clone())
            } else {
                let ms = raw.quiet_ms.unwrap_or_default();
                if ms == 0 {
                    return Err(err("quiet_ms", "must be at least 1".into()));
                }
                LineEnding::Quiet(Duration::from_millis(ms))
            })
        }
        ProtocolKind::ClaudeStreamJson | ProtocolKind::Acp => {
            if raw.end_marker.is_some()
                || raw.prompt.is_some()
                || raw.quiet_ms.is_some()
                || raw.continuation_prompt.is_some()
            {
                return Err(err(
                    "protocol",
                    "end_marker/prompt/continuation_prompt/quiet_ms apply to `lines` only".into(),
                ));
            }
            None
        }
    };
    for key in raw.env.keys() {
        if key.is_empty() || key.contains('=') {
            return Err(err("env", format!("bad variable name {key:?}")));
        }
    }
    let client_options = raw.client_options.unwrap_or_default();
    if client_options.any() && raw.protocol != ProtocolKind::ClaudeStreamJson {
        return Err(err(
            "client_options",
            "session options apply to `claude-stream-json` profiles only".into(),
        ));
    }
    // claude's stream-json can go silent and never exit: watch it by default.
    let stall_default = match raw.protocol {
        ProtocolKind::ClaudeStreamJson => Some(CLAUDE_STALL_TIMEOUT),
        ProtocolKind::Lines | ProtocolKind::Acp => None,
    };
    let stall_timeout = match &raw.stall_timeout {
        Some(s) => {
            Some(parse_duration(s).map_err(|e| err("stall_timeout", e))?).filter(|d| !d.is_zero())
        }
        None => stall_default,
    };
    if let Some(cwd) = &raw.cwd {
        if !cwd.is_dir() {
            return Err(err("cwd", format!("{} is not a directory", cwd.display())));
        }
    }
    Ok(AgentProfile {
        name: name.to_string(),
        description: raw
            .description
            .unwrap_or_else(|| format!("{} ({})", raw.command[0], raw.protocol.as_str())),
        command: raw.command,
        oneshot_command: raw.oneshot_command,
        protocol: raw.protocol,
        ending,
        continuation_prompt: raw.continuation_prompt.clone(),
        merge_stderr: raw.merge_stderr,
        env: raw.env,
        pass_env: raw.pass_env,
        cwd: raw.cwd,
        cwd_roots: raw.cwd_roots,
        cwd_template: match raw.cwd_template {
            Some(t) => Some(check_cwd_template(&t).map_err(|e| err("cwd_template", e))?),
            None => None,
        },
        prewarm: raw.prewarm,
        timeout: duration("timeout", &raw.timeout, DEFAULT_TIMEOUT)?,
        persistent: raw.persistent.unwrap_or(true),
        stop_grace: duration("stop_grace", &raw.stop_grace, Duration::from_secs(2))?,
        interrupt_grace: duration(
            "interrupt_grace",
            &raw.interrupt_grace,
            Duration::from_secs(3),
        )?,
        restart_budget: raw.restart_budget.unwrap_or(5),
        restart_window: duration(
            "restart_window",
            &raw.restart_window,
            Duration::from_secs(600),
        )?,
        permission_relay: raw.permission_relay.unwrap_or(true),
        permission_timeout: duration(
            "permission_timeout",
            &raw.permission_timeout,
            Duration::from_secs(300),
        )?,
        client_options,
        stall_timeout,
        warm_up: raw.warm_up.unwrap_or(true),
    })
}

/// The built-in `demo` profile: this binary's `demo-agent` subcommand.
pub fn demo_profile(self_exe: &Path) -> AgentProfile {
    let exe = self_exe.display().to_string();
    AgentProfile {
        name: "demo".into(),
        description:
            "Built-in demo agent: streams a reply word by word and remembers the conversation"
                .into(),
        command: vec![exe.clone(), "demo-agent".into()],
        oneshot_command: Some(vec![exe, "demo-agent".into(), "--oneshot".into()]),
        protocol: ProtocolKind::Lines,
        continuation_prompt: None,
        ending: Some(LineEnding::EndMarker(
            Regex::new(crate::demo::END_MARKER_REGEX).expect("constant regex"),
        )),
        merge_stderr: false,
        env: BTreeMap::new(),
        pass_env: vec![],
        cwd: None,
        cwd_roots: vec![],
        cwd_template: None,
        prewarm: 0,
        timeout: DEFAULT_TIMEOUT,
        persistent: true,
        stop_grace: Duration::from_secs(1),
        interrupt_grace: Duration::from_secs(2),
        restart_budget: 5,
        restart_window: Duration::from_secs(600),
        permission_relay: false,
        permission_timeout: Duration::from_secs(300),
        client_options: Default::default(),
        stall_timeout: None,
        warm_up: true,
    }
}

/// The built-in `claude` profile for the binary at `bin`.
pub fn claude_profile(bin: &Path) -> AgentProfile {
    let exe = bin.display().to_string();
    let argv = |rest: &[&str]| -> Vec<String> {
        std::iter::once(exe.clone())
            .chain(rest.iter().map(|s| s.to_string()))
            .collect()
    };
    AgentProfile {
        name: "claude".into(),
        description: "Claude Code CLI (stream-json)".into(),
        command: argv(&[
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--include-partial-messages",
        ]),
        // Stream-json input too: the content goes as one user line, so a
        // one-shot run carries image blocks like a persistent child.
        oneshot_command: Some(argv(&[
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
        ])),
        protocol: ProtocolKind::ClaudeStreamJson,
        ending: None,
        continuation_prompt: None,
        merge_stderr: false,
        env: BTreeMap::new(),
        pass_env: vec!["ANTHROPIC_*".into(), "CLAUDE_*".into(), "DISABLE_*".into()],
        cwd: None,
        cwd_roots: vec![],
        cwd_template: None,
        prewarm: 0,
        timeout: DEFAULT_TIMEOUT,
        persistent: true,
        // The CLI flushes its transcript after stdin closes; --resume needs it.
        stop_grace: Duration::from_secs(5),
        interrupt_grace: Duration::from_secs(5),
        restart_budget: 5,
        restart_window: Duration::from_secs(600),
        permission_relay: true,
        permission_timeout: Duration::from_secs(300),
        client_options: Default::default(),
        stall_timeout: Some(CLAUDE_STALL_TIMEOUT),
        warm_up: true,
    }
}

/// `AGENTGATE_CLAUDE_BIN`, else `claude` on `PATH`.
pub fn find_claude() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("AGENTGATE_CLAUDE_BIN") {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("claude"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BTreeMap<String, AgentProfile>, String> {
        parse_profiles("t.toml", text)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn spec_example_parses() {
        let p = parse(
            r#"
            [agents.python]
            command = ["python3", "-i", "-q", "-u"]
            protocol = "lines"
            prompt = ">>> "
            oneshot_command = ["python3", "-q", "-u", "-"]
            env = { PYTHONIOENCODING = "utf-8" }
            pass_env = ["LANG"]
            prewarm = 0
            timeout = "10m"
            "#,
        )
        .unwrap();
        let py = &p["python"];
        assert!(matches!(py.ending, Some(LineEnding::Prompt(ref s)) if s == ">>> "));
        assert_eq!(py.timeout, Duration::from_secs(600));
        assert_eq!(py.env["PYTHONIOENCODING"], "utf-8");
    }

    #[test]
    fn images_need_a_child_that_takes_blocks() {
        let mut p = claude_profile(Path::new("/bin/claude"));
        assert!(
            p.oneshot_takes_blocks(),
            "the built-in one-shot reads stream-json"
        );
        p.persistent = false;
        assert!(p.takes_images());
        p.oneshot_command = Some(vec!["claude".into(), "-p".into()]);
        assert!(!p.oneshot_takes_blocks());
        assert!(!p.takes_images());
        p.oneshot_command = Some(vec!["claude".into(), "--input-format=stream-json".into()]);
        assert!(p.takes_images());
        p.persistent = true;
        p.oneshot_command = None;
        assert!(p.takes_images(), "a persistent child takes them");
        let py =
            &parse("[agents.py]\ncommand=[\"python3\"]\nprotocol=\"lines\"\nprompt=\">>> \"\n")
                .unwrap()["py"];
        assert!(!py.oneshot_takes_blocks() && !py.takes_images());
    }

    #[test]
    fn errors_name_file_profile_and_field() {
        let e = parse("[agents.x]\ncommand=[\"a\"]\nprotocol=\"lines\"\nend_marker=\"(\"\n")
            .unwrap_err();
        assert!(
            e.starts_with("t.toml: agents.x.end_marker: bad regex"),
            "{e}"
        );
        let e = parse("[agents.x]\ncommand=[\"a\"]\nprotocol=\"lines\"\n").unwrap_err();
        assert!(e.contains("agents.x.protocol"), "{e}");
        let e = parse(
            "[agents.x]\ncommand=[\"a\"]\nprotocol=\"lines\"\nquiet_ms=5\ntimeout=\"soon\"\n",
        )
        .unwrap_err();
        assert!(e.contains("agents.x.timeout"), "{e}");
        let e = parse("[agents.x]\ncommand=[\"a\"]\nprotocol=\"lines\"\nquiet_ms=5\ncomand=1\n")
            .unwrap_err();
        assert!(e.contains("unknown field") && e.contains("line"), "{e}");
        let e = parse("[agents.x]\ncommand=[]\nprotocol=\"lines\"\nquiet_ms=5\n").unwrap_err();
        assert!(e.contains("agents.x.command"), "{e}");
    }

    #[test]
    fn client_options_and_stall_timeout() {
        let p = parse(
            r#"
            [agents.c]
            command = ["claude"]
            protocol = "claude-stream-json"
            stall_timeout = "2s"
            [agents.c.client_options]
            model = ["sonnet", "haiku"]
            permission_mode = ["default", "plan"]
            system_prompt = true
            max_turns = 50
            "#,
        )
        .unwrap();
        let c = &p["c"];
        assert_eq!(c.client_options.model, ["sonnet", "haiku"]);
        assert_eq!(c.client_options.max_turns, Some(50));
        assert!(!c.client_options.allowed_tools);
        assert_eq!(c.stall_timeout, Some(Duration::from_secs(2)));
        let e = parse("[agents.x]\ncommand=[\"a\"]\nprotocol=\"lines\"\nquiet_ms=5\n[agents.x.client_options]\nsystem_prompt=true\n").unwrap_err();
        assert!(e.contains("agents.x.client_options"), "{e}");
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("fast").is_err());
    }
}
