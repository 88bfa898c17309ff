//! Built-in profiles of ACP agents, added when their binaries are found:
//! `gemini` (gemini-cli's own `--acp` mode) and `codex` (Zed's `codex-acp`
//! adapter). Like `claude`, an `AGENTGATE_*_BIN` variable names the binary,
//! else it is looked up on `PATH`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{AgentProfile, ProtocolKind, DEFAULT_TIMEOUT};

/// The built-in ACP profiles whose binaries exist.
pub(super) fn find() -> Vec<(&'static str, AgentProfile)> {
    let mut found = Vec::new();
    if let Some(bin) = find_bin("AGENTGATE_GEMINI_BIN", "gemini") {
        found.push(("gemini", gemini_profile(&bin)));
    }
    if let Some(bin) = find_bin("AGENTGATE_CODEX_ACP_BIN", "codex-acp") {
        found.push(("codex", codex_profile(&bin)));
    }
    found
}

/// `$var` if it names a file, else `name` on `PATH`.
fn find_bin(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(var) {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn acp_profile(
    name: &str,
    description: &str,
    argv: Vec<String>,
    pass_env: &[&str],
) -> AgentProfile {
    AgentProfile {
        name: name.into(),
        description: description.into(),
        command: argv,
        oneshot_command: None,
        protocol: ProtocolKind::Acp,
        ending: None,
        merge_stderr: false,
        env: BTreeMap::new(),
        pass_env: pass_env.iter().map(|s| s.to_string()).collect(),
        cwd: None,
        cwd_roots: vec![],
        prewarm: 0,
        timeout: DEFAULT_TIMEOUT,
        persistent: true,
        // Agents write their session files as they go; stdin's end lets them finish.
        stop_grace: Duration::from_secs(3),
        interrupt_grace: Duration::from_secs(5),
        restart_budget: 5,
        restart_window: Duration::from_secs(600),
        permission_relay: true,
        permission_timeout: Duration::from_secs(300),
    }
}

/// gemini-cli in ACP mode (`--acp`, 0.61; `--experimental-acp` before).
pub fn gemini_profile(bin: &Path) -> AgentProfile {
    acp_profile(
        "gemini",
        "Gemini CLI (Agent Client Protocol)",
        vec![bin.display().to_string(), "--acp".into()],
        &["GEMINI_*", "GOOGLE_*"],
    )
}

/// Codex through Zed's `codex-acp` adapter.
pub fn codex_profile(bin: &Path) -> AgentProfile {
    acp_profile(
        "codex",
        "OpenAI Codex through codex-acp (Agent Client Protocol)",
        vec![bin.display().to_string()],
        &["OPENAI_*", "CODEX_*"],
    )
}
