//! The JSON types of the HTTP API, as `openapi.yaml` describes them.
//!
//! Request bodies reject unknown fields, so a typo is a 400 rather than a
//! silently ignored option.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// RFC 3339 timestamps on the wire.
pub type Timestamp = OffsetDateTime;

/// Lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// A child is being started (or has not yet said it is ready).
    Starting,
    /// A child is ready and nothing runs.
    Idle,
    /// A message is running.
    Busy,
    /// No child; the next message starts one.
    Suspended,
    /// Closed for good.
    Closed,
}

/// Status of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Waiting behind another message.
    Queued,
    /// Sent to the agent; the reply is streaming.
    Running,
    /// The reply ended normally.
    Completed,
    /// The reply failed (see `error`).
    Failed,
    /// The reply was interrupted by a client.
    Interrupted,
}

impl MessageStatus {
    /// Whether the message has finished.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MessageStatus::Completed | MessageStatus::Failed | MessageStatus::Interrupted
        )
    }
}

/// Why a message failed (`message.failed` `error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The per-message timeout passed.
    Timeout,
    /// The child exited while the message ran.
    ProcessExited,
    /// A client interrupted the message.
    Interrupted,
    /// The child could not be started.
    SpawnFailed,
    /// The agent reported an error.
    AgentError,
    /// The reply exceeded the output limit.
    OutputLimit,
    /// The gateway is shutting down.
    Shutdown,
    /// The child printed nothing for the profile's `stall_timeout`.
    Stalled,
    /// The gateway stopped (killed, restarted) while the message was queued
    /// or running; found so by the next gateway on the same store.
    GatewayLost,
    /// The running agent cannot take the message's content: an ACP agent
    /// whose `initialize` answer did not advertise
    /// `promptCapabilities.image` was sent an image. The message never
    /// reached the agent; the session goes on.
    UnsupportedContent,
}

/// `{code, detail}` of a failed message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageError {
    /// Machine-readable reason.
    pub code: FailureCode,
    /// Human-readable detail (e.g. the tail of stderr).
    pub detail: String,
}

/// `POST /sessions` body.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Profile name; the default profile when absent.
    pub agent: Option<String>,
    /// Working directory; must lie under one of the profile's `cwd_roots`.
    pub cwd: Option<String>,
    /// Free text for people.
    pub title: Option<String>,
    /// Free JSON for clients; stored and returned as is.
    pub metadata: Option<Value>,
    /// Per-session agent options, each within the profile's `client_options`.
    #[serde(default, deserialize_with = "object_only")]
    pub options: crate::options::SessionOptions,
}

/// A struct from a JSON object only: serde's derived structs also take a
/// JSON array (fields in order), which the API's schema does not allow.
fn object_only<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    let value = Value::deserialize(d)?;
    if !value.is_object() {
        return Err(D::Error::custom(format!(
            "expected a JSON object, not {}",
            match value {
                Value::Array(_) => "an array",
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Object(_) => "an object",
            }
        )));
    }
    serde_json::from_value(value).map_err(D::Error::custom)
}

/// `PATCH /sessions/{id}` body: what changes; absent fields stay.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSession {
    /// A new model (claude: a live child gets a `set_model` control request).
    pub model: Option<String>,
    /// A new permission mode (claude: `set_permission_mode`).
    pub permission_mode: Option<String>,
    /// A new title.
    pub title: Option<String>,
    /// New metadata (replaces the old).
    pub metadata: Option<Value>,
}

/// `POST /sessions/{id}/fork` body (optional).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForkSession {
    /// Title of the fork.
    pub title: Option<String>,
    /// Metadata of the fork.
    pub metadata: Option<Value>,
}

/// Tokens and cost summed over a session's messages.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionUsage {
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// Cost in US dollars as the agent reported it.
    pub cost_usd: f64,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Session id (UUID v4).
    pub id: Uuid,
    /// Profile name.
    pub agent: String,
    /// Lifecycle state.
    pub state: SessionState,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    /// Last message, event or request that touched it.
    #[serde(with = "time::serde::rfc3339")]
    pub last_activity_at: Timestamp,
    /// When the reaper will stop its idle child (null while busy or without a child).
    #[serde(with = "time::serde::rfc3339::option")]
    pub idle_deadline: Option<Timestamp>,
    /// Pid of the child (its process group id too), if one runs.
    pub pid: Option<u32>,
    /// Messages in the history.
    pub message_count: usize,
    /// Messages waiting behind the running one.
    pub queued: usize,
    /// Title given at creation or by `PATCH`.
    pub title: Option<String>,
    /// Metadata given at creation or by `PATCH`.
    pub metadata: Option<Value>,
    /// The agent's own conversation id (claude: `session_id`), used to resume.
    pub agent_session_id: Option<String>,
    /// Working directory of the child.
    pub cwd: Option<String>,
    /// The session's agent options (with `PATCH` changes).
    pub options: crate::options::SessionOptions,
    /// Tokens and cost summed over its messages.
    pub usage: SessionUsage,
    /// The session this one was forked from, if any.
    pub forked_from: Option<Uuid>,
    /// The JWT `sub` that created it (a fork keeps its parent's); null for
    /// sessions made with the operator token or on a gateway without credentials.
    pub owner: Option<String>,
    /// Cluster mode: the node holding the session's lease (running its
    /// child); null when no node holds it, and always without a cluster.
    pub node: Option<String>,
}

/// Reads a millisecond count written as an integer or as a float with no
/// fractional part (`1500.0`), which JSON Schema also calls an integer.
fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<f64> = Option::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(f) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => Ok(Some(f as u64)),
        Some(f) => Err(serde::de::Error::custom(format!(
            "timeout_ms must be a whole number of milliseconds, not {f}"
        ))),
    }
}

/// `POST /sessions/{id}/messages` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// The user's input: a string, or a list of text and image blocks
    /// (checked by [`crate::content::parse`]).
    pub content: Value,
    /// Per-message timeout in milliseconds (default: the profile's).
    #[serde(default, deserialize_with = "millis")]
    pub timeout_ms: Option<u64>,
}

/// A message and its reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// Message id (UUID v4).
    pub id: Uuid,
    /// Session it belongs to.
    pub session_id: Uuid,
    /// The content sent (a string, or the list of blocks).
    pub input: crate::content::Content,
    /// The reply so far (final once the status is terminal).
    pub output: String,
    /// Status.
    pub status: MessageStatus,
    /// Why it failed, when it did.
    pub error: Option<MessageError>,
    /// When it was accepted.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    /// When it was written to the agent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<Timestamp>,
    /// When it finished.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<Timestamp>,
    /// From start to finish, in milliseconds.
    pub duration_ms: Option<u64>,
    /// Token usage and cost the agent reported, if any.
    pub usage: Option<Value>,
    /// Whether it ran through the one-shot command instead of a persistent child.
    pub fallback: bool,
}

/// `GET /sessions/{id}/messages` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageList {
    /// Messages, oldest first.
    pub messages: Vec<Message>,
}

/// `GET /sessions` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionList {
    /// All live sessions, oldest first.
    pub sessions: Vec<Session>,
}

/// One profile in `GET /agents`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    /// Profile name.
    pub name: String,
    /// Protocol.
    pub protocol: crate::config::ProtocolKind,
    /// Whether sessions keep a child.
    pub persistent: bool,
    /// Whether it is the default profile.
    pub default: bool,
    /// One line for people.
    pub description: String,
    /// Children kept started ahead.
    pub prewarm: usize,
    /// Warm children ready right now.
    pub warm: usize,
}

/// `GET /agents` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentList {
    /// Profiles, by name.
    pub agents: Vec<Agent>,
}

/// `POST /oneshot` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OneshotRequest {
    /// The input: a string, or a list of text and image blocks (checked by
    /// [`crate::content::parse`]; images only for profiles whose one-shot
    /// command takes them). Written to the program's stdin.
    pub content: Value,
    /// Profile name; the default profile when absent.
    pub agent: Option<String>,
    /// Timeout in milliseconds (default: the profile's).
    #[serde(default, deserialize_with = "millis")]
    pub timeout_ms: Option<u64>,
}

/// `POST /oneshot` answer (JSON mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OneshotResponse {
    /// Profile that ran.
    pub agent: String,
    /// The reply.
    pub output: String,
    /// The program's exit code (null when killed by a signal).
    pub exit_code: Option<i32>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Status of the run.
    pub status: MessageStatus,
    /// Why it failed, when it did.
    pub error: Option<MessageError>,
    /// The last bytes of stderr.
    pub stderr: String,
    /// Usage the agent reported, if any.
    pub usage: Option<Value>,
    /// The agent's own conversation id, if any.
    pub agent_session_id: Option<String>,
}

/// `POST /sessions/{id}/permissions/{request_id}` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionDecision {
    /// `allow` or `deny`. At least one of `behavior` and `option_id` is given.
    pub behavior: Option<PermissionBehavior>,
    /// ACP: the `optionId` of one of the request's `options` (wins over `behavior`).
    pub option_id: Option<String>,
    /// Why (sent to the agent on deny).
    pub message: Option<String>,
}

/// A permission answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PermissionBehavior {
    /// Let the tool run.
    Allow,
    /// Refuse.
    Deny,
}

/// `GET /healthz` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `ok`: the process serves and its store answers.
    pub status: String,
    /// Live sessions.
    pub sessions: usize,
    /// The store's kind: `sqlite`, `postgres` or `memory`.
    pub store: String,
    /// Crate version.
    pub version: String,
}

#[cfg(test)]
mod object_only_tests {
    use super::CreateSession;

    #[test]
    fn options_must_be_an_object() {
        assert!(serde_json::from_str::<CreateSession>(r#"{"options": [null, null]}"#).is_err());
        assert!(serde_json::from_str::<CreateSession>(r#"{"options": null}"#).is_err());
        assert!(serde_json::from_str::<CreateSession>(r#"{"options": {}}"#).is_ok());
        assert!(serde_json::from_str::<CreateSession>(r#"{}"#).is_ok());
    }
}
