//! Per-session agent options (`POST /sessions {options}`, `PATCH
//! /sessions/{id}`) and the profile's allowlist for them
//! (`[agents.NAME.client_options]`).
//!
//! A client never adds arguments of its own: each option it may set is named
//! by the profile, checked here, and becomes exactly one `--flag=value` argv
//! element — with the `=` form a value that starts with `-` stays a value.

use serde::{Deserialize, Serialize};

use crate::config::{AgentProfile, ProtocolKind};
use crate::error::ApiError;

/// What clients of a profile may choose (`[agents.NAME.client_options]`).
/// Everything is refused unless listed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientOptions {
    /// Models a client may pick (`--model=`).
    #[serde(default)]
    pub model: Vec<String>,
    /// Permission modes a client may pick (`--permission-mode=`).
    #[serde(default)]
    pub permission_mode: Vec<String>,
    /// Whether a client may append to the system prompt (`--append-system-prompt=`).
    #[serde(default)]
    pub system_prompt: bool,
    /// Whether a client may list tools allowed without asking (`--allowed-tools=`).
    #[serde(default)]
    pub allowed_tools: bool,
    /// Whether a client may list tools to remove (`--disallowed-tools=`).
    #[serde(default)]
    pub disallowed_tools: bool,
    /// The highest `max_turns` a client may ask for (`--max-turns=`); none: not allowed.
    pub max_turns: Option<u32>,
}

impl ClientOptions {
    /// Whether the profile allows any option at all.
    pub fn any(&self) -> bool {
        *self != ClientOptions::default()
    }
}

/// Options a client chose for its session; shown in Session JSON.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionOptions {
    /// Model (`--model=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Text appended to the system prompt (`--append-system-prompt=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Permission mode (`--permission-mode=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<String>,
    /// Tools allowed without asking (`--allowed-tools=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_tools: Option<Vec<String>>,
    /// Tools removed (`--disallowed-tools=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disallowed_tools: Option<Vec<String>>,
    /// Most agent turns per message (`--max-turns=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
}

fn not_allowed(name: &str, profile: &AgentProfile) -> ApiError {
    ApiError::BadRequest(format!(
        "option {name:?} is not allowed by profile {:?} (its client_options)",
        profile.name
    ))
}

/// A value that can be one argv element: no NUL (argv cannot carry it).
fn plain(name: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "option {name:?} must not contain NUL"
        )));
    }
    Ok(())
}

/// One of `allowed`, else a 400 naming the option and the choices.
pub fn check_choice(
    name: &str,
    value: &str,
    allowed: &[String],
    profile: &AgentProfile,
) -> Result<(), ApiError> {
    if allowed.is_empty() {
        return Err(not_allowed(name, profile));
    }
    if !allowed.iter().any(|a| a == value) {
        return Err(ApiError::BadRequest(format!(
            "option {name:?}: {value:?} is not allowed by profile {:?} (allowed: {})",
            profile.name,
            allowed.join(", ")
        )));
    }
    Ok(())
}

fn check_tools(name: &str, tools: &[String]) -> Result<(), ApiError> {
    for t in tools {
        // Joined with commas into one element, so a comma would split a name.
        if t.trim().is_empty() || t.contains(',') {
            return Err(ApiError::BadRequest(format!(
                "option {name:?}: {t:?} is not a tool name (no commas, not empty)"
            )));
        }
        plain(name, t)?;
    }
    Ok(())
}

impl SessionOptions {
    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        *self == SessionOptions::default()
    }

    /// Refuses (400, naming the option) anything `profile` does not allow.
    pub fn check(&self, profile: &AgentProfile) -> Result<(), ApiError> {
        let allow = &profile.client_options;
        if !self.is_empty() && profile.protocol != ProtocolKind::ClaudeStreamJson {
            return Err(ApiError::BadRequest(format!(
                "profile {:?} takes no session options (protocol {})",
                profile.name,
                profile.protocol.as_str()
            )));
        }
        if let Some(m) = &self.model {
            check_choice("model", m, &allow.model, profile)?;
        }
        if let Some(m) = &self.permission_mode {
            check_choice("permission_mode", m, &allow.permission_mode, profile)?;
        }
        if let Some(p) = &self.system_prompt {
            if !allow.system_prompt {
                return Err(not_allowed("system_prompt", profile));
            }
            plain("system_prompt", p)?;
        }
        if let Some(t) = &self.allowed_tools {
            if !allow.allowed_tools {
                return Err(not_allowed("allowed_tools", profile));
            }
            check_tools("allowed_tools", t)?;
        }
        if let Some(t) = &self.disallowed_tools {
            if !allow.disallowed_tools {
                return Err(not_allowed("disallowed_tools", profile));
            }
            check_tools("disallowed_tools", t)?;
        }
        if let Some(n) = self.max_turns {
            let cap = allow
                .max_turns
                .ok_or_else(|| not_allowed("max_turns", profile))?;
            if n == 0 || n > cap {
                return Err(ApiError::BadRequest(format!(
                    "option \"max_turns\": {n} is not between 1 and {cap} (profile {:?})",
                    profile.name
                )));
            }
        }
        Ok(())
    }

    /// The argv elements, one `--flag=value` per option set.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if let Some(m) = &self.model {
            argv.push(format!("--model={m}"));
        }
        if let Some(p) = &self.system_prompt {
            argv.push(format!("--append-system-prompt={p}"));
        }
        if let Some(m) = &self.permission_mode {
            argv.push(format!("--permission-mode={m}"));
        }
        if let Some(t) = &self.allowed_tools {
            argv.push(format!("--allowed-tools={}", t.join(",")));
        }
        if let Some(t) = &self.disallowed_tools {
            argv.push(format!("--disallowed-tools={}", t.join(",")));
        }
        if let Some(n) = self.max_turns {
            argv.push(format!("--max-turns={n}"));
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> AgentProfile {
        let mut p = crate::config::claude_profile(std::path::Path::new("/bin/claude"));
        p.client_options = ClientOptions {
            model: vec!["sonnet".into(), "haiku".into()],
            permission_mode: vec!["default".into(), "plan".into()],
            system_prompt: true,
            allowed_tools: false,
            disallowed_tools: true,
            max_turns: Some(5),
        };
        p
    }

    #[test]
    fn allowed_options_become_one_element_each() {
        let o = SessionOptions {
            model: Some("haiku".into()),
            system_prompt: Some("-rm -rf / --model=opus".into()),
            disallowed_tools: Some(vec!["Bash(git *)".into(), "Write".into()]),
            max_turns: Some(5),
            ..Default::default()
        };
        o.check(&profile()).unwrap();
        assert_eq!(
            o.argv(),
            [
                "--model=haiku",
                "--append-system-prompt=-rm -rf / --model=opus",
                "--disallowed-tools=Bash(git *),Write",
                "--max-turns=5"
            ]
        );
    }

    #[test]
    fn refusals_name_the_option() {
        let p = profile();
        let err = |o: SessionOptions| o.check(&p).unwrap_err().to_string();
        assert!(err(SessionOptions {
            model: Some("opus".into()),
            ..Default::default()
        })
        .contains("\"model\""));
        assert!(err(SessionOptions {
            allowed_tools: Some(vec!["Bash".into()]),
            ..Default::default()
        })
        .contains("\"allowed_tools\""));
        assert!(err(SessionOptions {
            max_turns: Some(6),
            ..Default::default()
        })
        .contains("\"max_turns\""));
        assert!(err(SessionOptions {
            disallowed_tools: Some(vec!["a,b".into()]),
            ..Default::default()
        })
        .contains("\"disallowed_tools\""));
        let mut none = profile();
        none.client_options = ClientOptions::default();
        assert!(SessionOptions {
            permission_mode: Some("plan".into()),
            ..Default::default()
        }
        .check(&none)
        .unwrap_err()
        .to_string()
        .contains("\"permission_mode\""));
    }
}
