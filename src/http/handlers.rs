//! Route handlers: parse, call the registry or a session, answer. Errors are
//! answered as problem+json here, never rejected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;
use warp::http::header::{HeaderValue, LOCATION};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::sse::{self, Scope};
use super::{json_response, problem, AppState};
use crate::error::ApiError;
use crate::model::{
    Agent, AgentList, CreateSession, Health, MessageList, MessageStatus, OneshotRequest,
    OneshotResponse, PermissionDecision, SendMessage, SessionList,
};
use crate::session::{CloseReason, EventLog};

/// The OpenAPI document the server implements.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");
/// The web console.
pub const CONSOLE: &str = include_str!("console.html");

fn answer(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| problem::response(&e))
}

fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, ApiError>,
    empty_ok: bool,
) -> Result<Option<T>, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(None)
        } else {
            Err(ApiError::BadRequest("a JSON body is required".into()))
        };
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
}

fn query_bool(q: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{key} must be true or false, not {other:?}"
        ))),
    }
}

fn query_u64(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("{key} must be a non-negative integer, not {v:?}"))
            })
        })
        .transpose()
}

fn wants_sse(accept: &Option<String>) -> bool {
    accept
        .as_deref()
        .is_some_and(|a| a.contains("text/event-stream"))
}

fn timeout_of(ms: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match ms {
        Some(0) => Err(ApiError::BadRequest("timeout_ms must be at least 1".into())),
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
        None => Ok(None),
    }
}

fn with_location(mut res: Response, location: String) -> Response {
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res
}

/// `GET /`
pub fn index() -> Response {
    warp::reply::html(CONSOLE).into_response()
}

/// `GET /metrics`
pub fn metrics(state: AppState) -> Response {
    let text = state.registry.metrics.render(&state.registry);
    warp::reply::with_header(text, "content-type", crate::metrics::CONTENT_TYPE).into_response()
}

/// `GET /openapi.yaml`
pub fn openapi() -> Response {
    warp::reply::with_header(OPENAPI, "content-type", "application/yaml").into_response()
}

/// `GET /healthz`
pub fn healthz(state: AppState) -> Response {
    json_response(
        StatusCode::OK,
        &Health {
            status: "ok".into(),
            sessions: state.registry.len(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    )
}

/// `GET /agents`
pub fn agents(state: AppState) -> Response {
    let config = &state.registry.config;
    let agents = config
        .profiles
        .values()
        .map(|p| Agent {
            name: p.name.clone(),
            protocol: p.protocol,
            persistent: p.persistent,
            default: p.name == config.default_agent,
            description: p.description.clone(),
            prewarm: p.prewarm,
            warm: state.registry.pool().ready(&p.name),
        })
        .collect();
    json_response(StatusCode::OK, &AgentList { agents })
}

/// `POST /sessions`
pub async fn create_session(state: AppState, body: Result<Bytes, ApiError>) -> Response {
    answer(
        async {
            let req: CreateSession = parse_json(body, true)?.unwrap_or_default();
            let handle = state.registry.create(req).await?;
            let view = handle.shared.view();
            Ok(with_location(
                json_response(StatusCode::CREATED, &view),
                format!("/sessions/{}", view.id),
            ))
        }
        .await,
    )
}

/// `GET /sessions`
pub fn list_sessions(state: AppState) -> Response {
    let sessions = state
        .registry
        .list()
        .iter()
        .map(|h| h.shared.view())
        .collect();
    json_response(StatusCode::OK, &SessionList { sessions })
}

/// `GET /sessions/{id}`
pub fn get_session(id: String, state: AppState) -> Response {
    answer(
        state
            .registry
            .get(&id)
            .map(|h| json_response(StatusCode::OK, &h.shared.view())),
    )
}

/// `DELETE /sessions/{id}`
pub async fn delete_session(id: String, state: AppState) -> Response {
    answer(
        state
            .registry
            .close(&id, CloseReason::Deleted)
            .await
            .map(|()| StatusCode::NO_CONTENT.into_response()),
    )
}

/// `POST /sessions/{id}/messages`
pub async fn send_message(
    id: String,
    state: AppState,
    accept: Option<String>,
    raw_query: String,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let handle = state.registry.get(&id)?;
            let q = query(&raw_query)?;
            let wait = query_bool(&q, "wait")?;
            let req: SendMessage = parse_json(body, false)?.expect("required body");
            let timeout = timeout_of(req.timeout_ms)?;
            if wants_sse(&accept) {
                // Subscribe first: the message's first events follow this point.
                let sub = handle.shared.log.subscribe(handle.shared.log.last_seq());
                let message = handle.send(req.content, timeout).await?;
                let res = sse::response(
                    sub,
                    Scope::Message(message.id),
                    state.registry.config.heartbeat,
                    state.shutdown.clone(),
                    Some(Arc::new(state.registry.metrics.stream_opened())),
                );
                return Ok(with_location(
                    res,
                    format!("/sessions/{id}/messages/{}", message.id),
                ));
            }
            let message = handle.send(req.content, timeout).await?;
            let location = format!("/sessions/{}/messages/{}", handle.id(), message.id);
            if wait {
                let done = handle
                    .wait_finished(message.id)
                    .await
                    .ok_or_else(|| ApiError::Gone("the session was closed".into()))?;
                return Ok(with_location(
                    json_response(StatusCode::OK, &done),
                    location,
                ));
            }
            Ok(with_location(
                json_response(StatusCode::ACCEPTED, &message),
                location,
            ))
        }
        .await,
    )
}

/// `GET /sessions/{id}/messages`
pub fn list_messages(id: String, state: AppState, raw_query: String) -> Response {
    answer((|| {
        let handle = state.registry.get(&id)?;
        let q = query(&raw_query)?;
        let limit = query_u64(&q, "limit")?.unwrap_or(1000).clamp(1, 10_000) as usize;
        let after = match q.get("after") {
            Some(a) => Some(Uuid::parse_str(a).map_err(|_| {
                ApiError::BadRequest(format!("after must be a message id, not {a:?}"))
            })?),
            None => None,
        };
        let messages = handle.shared.messages(after, limit)?;
        Ok(json_response(StatusCode::OK, &MessageList { messages }))
    })())
}

/// `GET /sessions/{id}/messages/{mid}`
pub fn get_message(id: String, mid: String, state: AppState) -> Response {
    answer((|| {
        let handle = state.registry.get(&id)?;
        let message = Uuid::parse_str(&mid)
            .ok()
            .and_then(|m| handle.shared.message(m))
            .ok_or_else(|| ApiError::NotFound(format!("no message {mid} in session {id}")))?;
        Ok(json_response(StatusCode::OK, &message))
    })())
}

/// `POST /sessions/{id}/interrupt`
pub async fn interrupt(id: String, state: AppState) -> Response {
    answer(
        async {
            let handle = state.registry.get(&id)?;
            let mid = handle.interrupt().await?;
            let message = handle
                .shared
                .message(mid)
                .ok_or_else(|| ApiError::Internal("interrupted message vanished".into()))?;
            Ok(json_response(StatusCode::ACCEPTED, &message))
        }
        .await,
    )
}

/// `POST /sessions/{id}/permissions/{request_id}`
pub async fn permission(
    id: String,
    request_id: String,
    state: AppState,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let handle = state.registry.get(&id)?;
            let decision: PermissionDecision = parse_json(body, false)?.expect("required body");
            if decision.behavior.is_none() && decision.option_id.is_none() {
                return Err(ApiError::BadRequest(
                    "give `behavior` or `option_id`".into(),
                ));
            }
            handle.permission(request_id, decision).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `GET /sessions/{id}/events`
pub fn events(
    id: String,
    state: AppState,
    last_event_id: Option<String>,
    raw_query: String,
) -> Response {
    answer((|| {
        let handle = state.registry.get(&id)?;
        let q = query(&raw_query)?;
        let after = match last_event_id {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("Last-Event-ID must be an event id, not {v:?}"))
            })?),
            None => query_u64(&q, "after")?,
        };
        let sub = handle.shared.log.subscribe(after.unwrap_or(0));
        Ok(sse::response(
            sub,
            Scope::All,
            state.registry.config.heartbeat,
            state.shutdown.clone(),
            Some(Arc::new(state.registry.metrics.stream_opened())),
        ))
    })())
}

/// Aborts a task when the request that owns it goes away.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `POST /oneshot`
pub async fn oneshot(
    state: AppState,
    accept: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(async {
        let req: OneshotRequest = parse_json(body, false)?.expect("required body");
        if state.registry.is_shutting_down() {
            return Err(ApiError::Unavailable("the gateway is shutting down".into()));
        }
        let registry = &state.registry;
        let profile = registry.profile(req.agent.as_deref())?;
        // Held by the run's task: released when it ends, is aborted or its client leaves.
        let permit = state.oneshots.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable(format!(
                "{} one-shot runs are already running (--max-oneshot); retry later",
                registry.config.max_oneshot
            ))
        })?;
        let timeout = timeout_of(req.timeout_ms)?.unwrap_or(profile.timeout);
        let config = registry.config.clone();
        let log = EventLog::new(config.replay_events, config.replay_bytes);
        let mid = Uuid::new_v4();
        let task_log = log.clone();
        let task_profile = profile.clone();
        let task_registry = state.registry.clone();
        let span = tracing::info_span!("oneshot", message_id = %mid, agent = %profile.name);
        let task = tokio::spawn(async move {
            let _permit = permit;
            let log = task_log;
            log.publish("message.started", Some(mid), &json!({"message_id": mid}));
            let argv = task_profile.oneshot_argv(None);
            let result = crate::oneshot::run(&task_profile, argv, None, &req.content, timeout, config.max_output, |signal| {
                use crate::protocol::Signal;
                match signal {
                    Signal::Delta(text) => {
                        log.publish("message.delta", Some(mid), &json!({"message_id": mid, "text": text}));
                    }
                    Signal::AgentEvent(event) => {
                        log.publish("message.agent_event", Some(mid), &json!({"message_id": mid, "event": event}));
                    }
                    _ => {}
                }
            })
            .await;
            let metrics = &task_registry.metrics;
            let spawn_failed = result.error.as_ref().is_some_and(|e| e.code == crate::model::FailureCode::SpawnFailed);
            metrics.spawned(crate::metrics::SpawnKind::Oneshot, !spawn_failed);
            metrics.oneshot_finished(result.error.as_ref().map(|e| e.code));
            match &result.error {
                None => log.publish(
                    "message.completed",
                    Some(mid),
                    &json!({"message_id": mid, "output": result.output, "duration_ms": result.duration.as_millis() as u64, "usage": result.usage, "fallback": false, "exit_code": result.exit_code}),
                ),
                Some(error) => log.publish("message.failed", Some(mid), &json!({"message_id": mid, "error": error})),
            };
            log.close();
            result
        }.instrument(span));
        let abort = AbortOnDrop(task.abort_handle());
        if wants_sse(&accept) {
            let sub = log.subscribe(0);
            let guard: Arc<dyn Send + Sync> = Arc::new((abort, state.registry.metrics.stream_opened()));
            return Ok(sse::response(sub, Scope::Message(mid), state.registry.config.heartbeat, state.shutdown.clone(), Some(guard)));
        }
        let result = task.await.map_err(|e| ApiError::Internal(format!("oneshot task: {e}")))?;
        drop(abort);
        if let Some(err) = &result.error {
            use crate::model::FailureCode;
            match err.code {
                FailureCode::SpawnFailed => return Err(ApiError::SpawnFailed(err.detail.clone())),
                FailureCode::Timeout => return Err(ApiError::Timeout(err.detail.clone())),
                _ => {}
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &OneshotResponse {
                agent: profile.name.clone(),
                output: result.output,
                exit_code: result.exit_code,
                duration_ms: result.duration.as_millis() as u64,
                status: if result.error.is_none() { MessageStatus::Completed } else { MessageStatus::Failed },
                error: result.error,
                stderr: result.stderr,
                usage: result.usage,
                agent_session_id: result.agent_session_id,
            },
        ))
    }
    .await)
}
