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
        continuation_prompt: None,
        merge_stderr: false,
        env: BTreeMap::new(),
        pass_env: pass_env.iter().map(|s| s.to_string()).collect(),
        cwd: None,
        cwd_roots: vec![],
        cwd_template: None,
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
        client_options: Default::default(),
        stall_timeout: None,
        warm_up: true,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_profiles_parse_as_acp() {
        for (file, text) in [
            (
                "gemini.toml",
                include_str!("../../examples/profiles/gemini.toml"),
            ),
            (
                "codex.toml",
                include_str!("../../examples/profiles/codex.toml"),
            ),
        ] {
            let (profiles, _) = super::super::parse_profiles(file, text).unwrap();
            let p = profiles.values().next().unwrap();
            assert_eq!(p.protocol, ProtocolKind::Acp, "{file}");
            assert!(p.ending.is_none());
        }
        let e = super::super::parse_profiles(
            "t.toml",
            "[agents.x]\ncommand=[\"a\"]\nprotocol=\"acp\"\nquiet_ms=5\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("agents.x.protocol"), "{e}");
    }

    #[test]
    fn built_in_profiles_speak_acp_without_a_shell() {
        let g = gemini_profile(Path::new("/opt/gemini"));
        assert_eq!(g.command, ["/opt/gemini", "--acp"]);
        assert_eq!(g.protocol, ProtocolKind::Acp);
        let c = codex_profile(Path::new("/opt/codex-acp"));
        assert_eq!(c.command, ["/opt/codex-acp"]);
        // A restart continues through session/load, not through argv.
        assert_eq!(c.persistent_argv(Some("s-1")), c.command);
    }
}
