//! Protocol adapters: how input is framed for a child and how its output
//! becomes reply text, agent events and the end of a reply.
//!
//! Adapters are pure — bytes in, [`Signal`]s out — so they are tested without
//! processes. The session task feeds them what the child prints and acts on
//! what they report.

pub mod acp;
pub mod claude;
pub mod jsonl;
pub mod lines;
pub mod utf8;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::config::{AgentProfile, ProtocolKind};
use crate::model::{FailureCode, PermissionDecision};

/// What an adapter made of the child's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The child is ready for its first message (a start-up prompt was seen).
    Ready,
    /// Reply text.
    Delta(String),
    /// One raw JSON event from a JSON-speaking agent, verbatim.
    AgentEvent(Value),
    /// The agent's own conversation id.
    AgentSessionId(String),
    /// The agent asks to use a tool.
    PermissionRequest {
        /// Id to answer with.
        request_id: String,
        /// The tool.
        tool_name: String,
        /// The tool's input.
        input: Value,
        /// The answers the agent offers (ACP `options`); `None` for allow/deny only.
        options: Option<Value>,
    },
    /// The agent withdrew a permission request.
    PermissionCancelled(String),
    /// The agent answered a control request of ours (`error`: why it refused).
    ControlResponse {
        /// Id of our request.
        request_id: String,
        /// `None` on success, else the agent's reason.
        error: Option<String>,
    },
    /// The agent could not resume its conversation (it no longer exists);
    /// the next child must start a new one.
    ConversationLost,
    /// The child printed this many bytes while no reply was running: they
    /// belong to no message and are never given to the next one.
    Unattributed(usize),
    /// The agent's previous conversation is not continued (it cannot be
    /// loaded, or the agent offers no loading); the child starts a new one.
    ConversationReset(String),
    /// Bytes to write to the child's stdin (answers to the agent's requests,
    /// the next step of a start-up handshake).
    Write(Bytes),
    /// The reply ended.
    Done(Outcome),
}

/// How a reply ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `Ok(Some(text))`: the agent's final text (replaces the streamed text);
    /// `Ok(None)`: the streamed text is the output; `Err`: it failed.
    pub result: Result<Option<String>, (FailureCode, String)>,
    /// Usage and cost the agent reported.
    pub usage: Option<Value>,
}

impl Outcome {
    /// A normal end whose output is the streamed text.
    pub fn streamed() -> Outcome {
        Outcome {
            result: Ok(None),
            usage: None,
        }
    }
}

/// A protocol adapter for one child.
pub trait Adapter: Send {
    /// The child was started (in `cwd`, to continue conversation `resume`):
    /// bytes the gateway writes first, for protocols where the client speaks
    /// first (ACP's `initialize`). `None` for the others.
    fn start(&mut self, _cwd: &Path, _resume: Option<&str>) -> Option<Bytes> {
        None
    }
    /// Frames `content` as one message and notes that a reply is expected.
    fn frame(&mut self, content: &str) -> Bytes;
    /// Frames structured content (text and image blocks). Protocols without
    /// blocks get the text; images never reach them (refused when posted).
    /// `Err` says why this child cannot take `content` (an ACP agent that
    /// did not advertise images): the message fails and nothing is written.
    fn frame_content(&mut self, content: &crate::content::Content) -> Result<Bytes, String> {
        Ok(self.frame(&content.text()))
    }
    /// A control request to the agent (e.g. claude's `set_model`): its id
    /// and bytes, or `None` if the protocol has no such thing.
    fn control(&mut self, _request: Value) -> Option<(String, Bytes)> {
        None
    }
    /// Bytes a prewarmed child gets right after it starts so that it does
    /// its first-turn preparation ahead of the first message, without a model
    /// call; its answer is dropped by every adapter of the protocol. `None`
    /// when the protocol has no such thing.
    fn warm_up(&mut self) -> Option<Bytes> {
        None
    }
    /// Feeds stdout bytes.
    fn stdout(&mut self, chunk: &[u8], out: &mut Vec<Signal>);
    /// Feeds stderr bytes.
    fn stderr(&mut self, chunk: &[u8], out: &mut Vec<Signal>);
    /// Whether the child must report [`Signal::Ready`] before the first message.
    fn needs_ready(&self) -> bool {
        false
    }
    /// For silence-terminated replies: how much silence ends one.
    fn quiet_after(&self) -> Option<Duration> {
        None
    }
    /// The silence passed: end the reply.
    fn quiet(&mut self, _out: &mut Vec<Signal>) {}
    /// The child's stdout ended (the child exited): flush what is held back.
    fn eof(&mut self, _out: &mut Vec<Signal>) {}
    /// Bytes that interrupt the reply in band; `None` means SIGINT to the group.
    fn interrupt(&mut self) -> Option<Bytes> {
        None
    }
    /// Bytes that answer a permission request; `None` if the protocol has none.
    fn permission_answer(
        &mut self,
        _request_id: &str,
        _input: &Value,
        _decision: &PermissionDecision,
    ) -> Option<Bytes> {
        None
    }
}

/// The adapter for a persistent child of `profile`.
pub fn persistent(profile: &AgentProfile) -> Box<dyn Adapter> {
    match profile.protocol {
        ProtocolKind::Lines => Box::new(
            lines::Lines::new(
                profile
                    .ending
                    .clone()
                    .expect("validated: lines profiles have an ending"),
            )
            .with_continuation(profile.continuation_prompt.clone()),
        ),
        ProtocolKind::ClaudeStreamJson => Box::new(claude::StreamJson::new()),
        ProtocolKind::Acp => Box::new(acp::Acp::new()),
    }
}

/// The adapter for a one-shot run of `profile` (the reply ends when the process exits).
pub fn oneshot(profile: &AgentProfile) -> Box<dyn Adapter> {
    match profile.protocol {
        ProtocolKind::Lines => Box::new(lines::Passthrough::default()),
        ProtocolKind::ClaudeStreamJson => {
            Box::new(claude::StreamJson::oneshot(profile.oneshot_takes_blocks()))
        }
        // The same adapter: `oneshot::run` drives the handshake, then ends the child after the reply.
        ProtocolKind::Acp => Box::new(acp::Acp::new()),
    }
}
