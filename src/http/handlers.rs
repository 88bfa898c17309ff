//! Route handlers: parse, call the registry or a session, answer. Errors are
//! answered as problem+json here, never rejected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use uuid::Uuid;
use warp::http::header::{HeaderValue, LOCATION};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::sse::{self, Scope};
use super::{json_response, problem, AppState};
use crate::auth::Caller;
use crate::cluster::{Command, StoreFeed};
use crate::config::AgentProfile;
use crate::error::ApiError;
use crate::model::{
    Agent, AgentList, CreateSession, FailureCode, ForkSession, Health, MessageList, MessageStatus,
    OneshotRequest, OneshotResponse, PermissionDecision, SendMessage, SessionList, UpdateSession,
};
use crate::session::{Event, EventLog, Located, Remote};

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

/// Whether `Accept` asks for an SSE stream rather than JSON (RFC 9110
/// §12.5.1): `text/event-stream` must be named (media types compare
/// case-insensitively) with a q above 0, and at least as high as JSON's
/// (`application/json`, else `application/*`, else `*/*`). A bare `*/*`
/// (curl's default) gets JSON.
pub(crate) fn wants_sse(accept: &Option<String>) -> bool {
    let Some(accept) = accept.as_deref() else {
        return false;
    };
    let mut sse: Option<f32> = None;
    let (mut json, mut app_any, mut any) = (None, None, None);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(0.0);
        let slot = match media.as_str() {
            "text/event-stream" => &mut sse,
            "application/json" => &mut json,
            "application/*" => &mut app_any,
            "*/*" => &mut any,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    let json = json.or(app_any).or(any).unwrap_or(0.0);
    sse.is_some_and(|q| q > 0.0 && q >= json)
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

/// `GET /`: the console. No other site may frame it, so none can trick a
/// click on a permission's "Allow" (clickjacking).
pub fn index() -> Response {
    let mut res = warp::reply::html(CONSOLE).into_response();
    let h = res.headers_mut();
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// `GET /metrics`: operators only (the counts span every owner).
pub fn metrics(state: AppState, caller: Result<Caller, ApiError>) -> Response {
    match caller {
        Ok(c) if c.is_operator() => {}
        Ok(_) => {
            return problem::response(&ApiError::Forbidden(
                "metrics are for operators (--token or an agentgate:admin JWT)".into(),
            ))
        }
        Err(e) => return problem::response(&e),
    }
    let text = state.registry.metrics.render(&state.registry);
    warp::reply::with_header(text, "content-type", crate::metrics::CONTENT_TYPE).into_response()
}

/// `GET /openapi.yaml`
pub fn openapi() -> Response {
    warp::reply::with_header(OPENAPI, "content-type", "application/yaml").into_response()
}

/// `GET /healthz` (open to anyone: it names no session).
///
/// 503 when the store does not answer: a load balancer then sends new
/// requests to a gateway that can acknowledge them.
pub async fn healthz(state: AppState, _caller: Result<Caller, ApiError>) -> Response {
    let store = &state.registry.store;
    if let Err(e) = store.ping().await {
        return answer(Err(ApiError::Unavailable(e.to_string())));
    }
    json_response(
        StatusCode::OK,
        &Health {
            status: "ok".into(),
            sessions: state.registry.len(),
            store: store.kind().into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    )
}

/// `GET /agents`: the profiles the caller may use.
pub fn agents(state: AppState, caller: Result<Caller, ApiError>) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return problem::response(&e),
    };
    let config = &state.registry.config;
    let agents = config
        .profiles
        .values()
        .filter(|p| caller.may_use(&p.name))
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
pub async fn create_session(
    state: AppState,
    caller: Result<Caller, ApiError>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let req: CreateSession = parse_json(body, true)?.unwrap_or_default();
            let handle = state.registry.create_as(req, &caller).await?;
            let view = created_view(&state, &handle);
            audit("session.create", &caller, &view.id.to_string(), &view.agent);
            Ok(with_location(
                json_response(StatusCode::CREATED, &view),
                format!("/sessions/{}", view.id),
            ))
        }
        .await,
    )
}

/// A new session as its 201 shows it. In cluster mode it is held by no
/// node yet (its child starts with its first message): `node` is null.
fn created_view(state: &AppState, handle: &crate::session::SessionHandle) -> crate::model::Session {
    let mut view = handle.shared.view();
    if state.registry.cluster.is_some() && !state.registry.store.holds(view.id) {
        view.node = None;
    }
    view
}

/// `PATCH /sessions/{id}`
pub async fn update_session(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let located = state.registry.locate(&id, &caller?, true).await?;
            let update: UpdateSession = parse_json(body, false)?.expect("required body");
            let profile = located.profile();
            let profile = &profile;
            let allow = &profile.client_options;
            if let Some(m) = &update.model {
                crate::options::check_choice("model", m, &allow.model, profile)?;
            }
            if let Some(m) = &update.permission_mode {
                crate::options::check_choice(
                    "permission_mode",
                    m,
                    &allow.permission_mode,
                    profile,
                )?;
            }
            let handle = match located {
                Located::Here(h) => h,
                Located::Elsewhere(r) => {
                    let view = remote(&state, &r, Command::Update { update }).await?;
                    return Ok(json_response(StatusCode::OK, &view));
                }
            };
            handle.update(update).await?;
            Ok(json_response(StatusCode::OK, &handle.shared.view()))
        }
        .await,
    )
}

/// `POST /sessions/{id}/fork`
pub async fn fork_session(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let req: ForkSession = parse_json(body, true)?.unwrap_or_default();
            let handle = match state.registry.locate(&id, &caller, false).await? {
                Located::Here(_) => state.registry.fork(&id, req, &caller).await?,
                Located::Elsewhere(r) => state.registry.fork_remote(&r, req, &caller).await?,
            };
            let view = created_view(&state, &handle);
            audit("session.fork", &caller, &view.id.to_string(), &id);
            Ok(with_location(
                json_response(StatusCode::CREATED, &view),
                format!("/sessions/{}", view.id),
            ))
        }
        .await,
    )
}

/// `GET /sessions` (`?owner=`: only that owner's).
pub async fn list_sessions(
    state: AppState,
    caller: Result<Caller, ApiError>,
    raw_query: String,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let q = query(&raw_query)?;
            let owner = q.get("owner").map(String::as_str);
            let sessions = if state.registry.cluster.is_some() {
                state.registry.list_cluster(&caller, owner).await?
            } else {
                state
                    .registry
                    .list_for(&caller, owner)
                    .iter()
                    .map(|h| h.shared.view())
                    .collect()
            };
            Ok(json_response(StatusCode::OK, &SessionList { sessions }))
        }
        .await,
    )
}

/// `GET /sessions/{id}`
pub async fn get_session(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
) -> Response {
    answer(
        async {
            let view = match state.registry.locate(&id, &caller?, false).await? {
                Located::Here(h) => h.shared.view(),
                Located::Elsewhere(r) => state.registry.remote_view(&r).await?,
            };
            Ok(json_response(StatusCode::OK, &view))
        }
        .await,
    )
}

/// `DELETE /sessions/{id}`
pub async fn delete_session(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
) -> Response {
    answer(
        async {
            let caller = caller?;
            match state.registry.locate(&id, &caller, true).await? {
                Located::Here(_) => state.registry.delete(&id, &caller).await?,
                Located::Elsewhere(r) if r.holder().is_none() => {
                    state.registry.delete_unheld(&r).await?
                }
                Located::Elsewhere(r) => {
                    remote(&state, &r, Command::Delete).await?;
                }
            }
            audit("session.delete", &caller, &id, "");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// One line of the `audit` log target: who did what to which session.
/// Never a token: the caller is its kind and `sub`.
fn audit(action: &'static str, caller: &Caller, session_id: &str, detail: &str) {
    tracing::info!(
        target: "audit",
        action,
        caller = caller.kind(),
        owner = caller.sub().unwrap_or(""),
        session_id,
        detail,
        "audit"
    );
}

/// The 400 for images sent to a profile that cannot deliver them.
fn images_refused(profile: &AgentProfile) -> ApiError {
    ApiError::BadRequest(format!(
        "profile {:?} cannot take images (protocol {}{})",
        profile.name,
        profile.protocol.as_str(),
        if profile.protocol.carries_images() {
            ", and its one-shot command takes text only (claude: add --input-format stream-json)"
        } else {
            ""
        }
    ))
}

/// `POST /sessions/{id}/messages`
pub async fn send_message(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
    accept: Option<String>,
    raw_query: String,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let located = state.registry.locate(&id, &caller?, true).await?;
            let q = query(&raw_query)?;
            let wait = query_bool(&q, "wait")?;
            let req: SendMessage = parse_json(body, false)?.expect("required body");
            let timeout = timeout_of(req.timeout_ms)?;
            let content =
                crate::content::parse(req.content, state.registry.config.max_image_bytes)?;
            let profile = located.profile();
            let profile = &profile;
            if content.has_images() && !profile.takes_images() {
                return Err(images_refused(profile));
            }
            let handle = match located {
                Located::Here(h) => h,
                Located::Elsewhere(r) => {
                    return send_elsewhere(&state, &r, content, wait, wants_sse(&accept)).await
                }
            };
            if wants_sse(&accept) {
                // Subscribe first: the message's first events follow this point.
                let sub = handle.shared.log.subscribe(handle.shared.log.last_seq());
                let message = handle.send(content, timeout).await?;
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
            let message = handle.send(content, timeout).await?;
            let location = format!("/sessions/{}/messages/{}", handle.id(), message.id);
            if wait {
                let gone = || ApiError::Gone("the session was closed".into());
                let done = match handle.wait_finished(message.id).await {
                    Some(done) => done,
                    // Finished, and already left memory for the store.
                    None => state
                        .registry
                        .session_message(&handle.shared, message.id)
                        .await?
                        .ok_or_else(gone)?,
                };
                // Only a session's close (deleted, expired, failed, shut down)
                // fails a message with `shutdown`: 410, as for any request to
                // a closed session.
                let closed_it = done
                    .error
                    .as_ref()
                    .is_some_and(|e| e.code == FailureCode::Shutdown);
                if closed_it {
                    let detail = done.error.map(|e| e.detail).unwrap_or_default();
                    return Err(ApiError::Gone(format!(
                        "message {} did not finish: {detail}",
                        done.id
                    )));
                }
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
pub async fn list_messages(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
    raw_query: String,
) -> Response {
    answer(
        async {
            let located = state.registry.locate(&id, &caller?, false).await?;
            let q = query(&raw_query)?;
            let limit = query_u64(&q, "limit")?.unwrap_or(1000).clamp(1, 10_000) as usize;
            let after = match q.get("after") {
                Some(a) => Some(Uuid::parse_str(a).map_err(|_| {
                    ApiError::BadRequest(format!("after must be a message id, not {a:?}"))
                })?),
                None => None,
            };
            let messages = match located {
                Located::Here(h) => match h.shared.messages(after, limit)? {
                    Some(page) => page,
                    None => {
                        state
                            .registry
                            .stored_messages(&h.shared, after, limit)
                            .await?
                    }
                },
                Located::Elsewhere(r) => {
                    let all = state.registry.remote_messages(&r).await?;
                    let start = match after {
                        Some(a) => all
                            .iter()
                            .position(|m| m.id == a)
                            .map(|i| i + 1)
                            .ok_or_else(|| {
                                ApiError::NotFound(format!("no message {a} in this session"))
                            })?,
                        None => 0,
                    };
                    all.into_iter().skip(start).take(limit).collect()
                }
            };
            Ok(json_response(StatusCode::OK, &MessageList { messages }))
        }
        .await,
    )
}

/// `GET /sessions/{id}/messages/{mid}`
pub async fn get_message(
    id: String,
    mid: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
) -> Response {
    answer(
        async {
            let located = state.registry.locate(&id, &caller?, false).await?;
            let missing = || ApiError::NotFound(format!("no message {mid} in session {id}"));
            let mid = Uuid::parse_str(&mid).map_err(|_| missing())?;
            let message = match located {
                Located::Here(h) => state.registry.session_message(&h.shared, mid).await?,
                Located::Elsewhere(r) => state.registry.remote_message(&r, mid).await?,
            }
            .ok_or_else(missing)?;
            Ok(json_response(StatusCode::OK, &message))
        }
        .await,
    )
}

/// `POST /sessions/{id}/interrupt`
pub async fn interrupt(id: String, state: AppState, caller: Result<Caller, ApiError>) -> Response {
    answer(
        async {
            let handle = match state.registry.locate(&id, &caller?, true).await? {
                Located::Here(h) => h,
                Located::Elsewhere(r) => {
                    let message = remote(&state, &r, Command::Interrupt).await?;
                    return Ok(json_response(StatusCode::ACCEPTED, &message));
                }
            };
            let mid = handle.interrupt().await?;
            let message = state
                .registry
                .session_message(&handle.shared, mid)
                .await?
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
    caller: Result<Caller, ApiError>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let located = state.registry.locate(&id, &caller, true).await?;
            let decision: PermissionDecision = parse_json(body, false)?.expect("required body");
            if decision.behavior.is_none() && decision.option_id.is_none() {
                return Err(ApiError::BadRequest(
                    "give `behavior` or `option_id`".into(),
                ));
            }
            let answer = match (&decision.behavior, &decision.option_id) {
                (Some(b), _) => format!("request {request_id}: {b:?}"),
                (None, Some(o)) => format!("request {request_id}: option {o:?}"),
                (None, None) => String::new(),
            };
            match located {
                Located::Here(h) => h.permission(request_id, decision).await?,
                Located::Elsewhere(r) => {
                    remote(
                        &state,
                        &r,
                        Command::Permission {
                            request_id,
                            decision,
                        },
                    )
                    .await?;
                }
            }
            audit("permission.answer", &caller, &id, &answer);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `GET /sessions/{id}/events`
pub async fn events(
    id: String,
    state: AppState,
    caller: Result<Caller, ApiError>,
    last_event_id: Option<String>,
    raw_query: String,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let located = state.registry.locate(&id, &caller, false).await?;
            let q = query(&raw_query)?;
            let after = match last_event_id {
                Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(format!("Last-Event-ID must be an event id, not {v:?}"))
                })?),
                None => query_u64(&q, "after")?,
            };
            let owner = owner_stream_place(&state, &caller)?;
            let permit = stream_permit(&state)?;
            let guard =
                Some(Arc::new((state.registry.metrics.stream_opened(), permit, owner)) as Arc<_>);
            let heartbeat = state.registry.config.heartbeat;
            let after = after.unwrap_or(0);
            // Cluster mode: every node streams the session from the store, so
            // ids and `Last-Event-ID` are the same wherever a client connects.
            let session = located.id();
            if let Some(feed) = StoreFeed::new(&state.registry, session, after) {
                return Ok(sse::response(
                    feed,
                    Scope::All,
                    heartbeat,
                    state.shutdown.clone(),
                    guard,
                ));
            }
            let Located::Here(handle) = located else {
                return Err(ApiError::Internal(
                    "a remote session without a cluster".into(),
                ));
            };
            // After a restart a session's older events are read on first demand.
            state.registry.load_events(&handle.shared, after).await?;
            let sub = handle.shared.log.subscribe(after);
            Ok(sse::response(
                sub,
                Scope::All,
                heartbeat,
                state.shutdown.clone(),
                guard,
            ))
        }
        .await,
    )
}

/// Runs `command` on the node holding session `r`; a closed session is 410.
async fn remote(
    state: &AppState,
    r: &Remote,
    command: Command,
) -> Result<serde_json::Value, ApiError> {
    if r.is_closed() {
        return Err(ApiError::Gone(format!("session {} is closed", r.record.id)));
    }
    let (Some(cluster), Some(node)) = (&state.registry.cluster, r.holder()) else {
        return Err(ApiError::Unavailable(format!(
            "session {} is moving between nodes; retry",
            r.record.id
        )));
    };
    cluster
        .call(&state.registry.store, node, r.record.id, &command)
        .await
}

/// `POST …/messages` for a session held by another node: the message is
/// stored in its inbox (acknowledged = stored) and its holder queues it.
/// `wait` and `text/event-stream` follow it through the store.
async fn send_elsewhere(
    state: &AppState,
    r: &Remote,
    content: crate::content::Content,
    wait: bool,
    sse_wanted: bool,
) -> Result<Response, ApiError> {
    if r.is_closed() {
        return Err(ApiError::Gone(format!("session {} is closed", r.record.id)));
    }
    let session = r.record.id;
    let message = crate::model::Message {
        id: Uuid::new_v4(),
        session_id: session,
        input: content,
        output: String::new(),
        status: crate::model::MessageStatus::Queued,
        error: None,
        created_at: time::OffsetDateTime::now_utc(),
        started_at: None,
        finished_at: None,
        duration_ms: None,
        usage: None,
        fallback: false,
    };
    // The message's events all come after what is stored now: the feeds
    // below start there (not at the log's start, which may hold thousands).
    let after = state.registry.store.last_event_seq(session).await?;
    state.registry.store.push_inbox(&message).await?;
    let location = format!("/sessions/{session}/messages/{}", message.id);
    let feed = || {
        StoreFeed::new(&state.registry, session, after)
            .ok_or_else(|| ApiError::Internal("a remote session without a cluster".into()))
    };
    if sse_wanted {
        let res = sse::response(
            feed()?,
            Scope::Message(message.id),
            state.registry.config.heartbeat,
            state.shutdown.clone(),
            Some(Arc::new(state.registry.metrics.stream_opened())),
        );
        return Ok(with_location(res, location));
    }
    if !wait {
        return Ok(with_location(
            json_response(StatusCode::ACCEPTED, &message),
            location,
        ));
    }
    let mut feed = feed()?;
    while let Some(item) = feed.next().await {
        if let crate::session::Item::Event(e) = item {
            if e.message_id == Some(message.id) && e.ends_message() {
                break;
            }
        }
    }
    let done = state
        .registry
        .remote_message(r, message.id)
        .await?
        .ok_or_else(|| ApiError::Gone("the session was deleted".into()))?;
    Ok(with_location(
        json_response(StatusCode::OK, &done),
        location,
    ))
}

/// One of an owner's places among the open event streams, given back when
/// the stream ends.
#[derive(Debug)]
struct OwnerStream {
    streams: Arc<dashmap::DashMap<String, usize>>,
    owner: String,
}

impl Drop for OwnerStream {
    fn drop(&mut self) {
        self.streams.remove_if_mut(&self.owner, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// A place among `caller`'s open event streams
/// (`--max-event-streams-per-owner`), or 429; operators have no share of
/// their own (only the global cap applies to them).
fn owner_stream_place(state: &AppState, caller: &Caller) -> Result<Option<OwnerStream>, ApiError> {
    let Some(owner) = caller.sub() else {
        return Ok(None);
    };
    let max = state.registry.config.max_event_streams_per_owner;
    let mut n = state.owner_streams.entry(owner.to_string()).or_insert(0);
    if *n >= max {
        return Err(ApiError::TooManyRequests {
            detail: format!(
                "this owner has {max} event streams open (--max-event-streams-per-owner); close one or retry later"
            ),
            retry_after: std::time::Duration::from_secs(5),
        });
    }
    *n += 1;
    Ok(Some(OwnerStream {
        streams: state.owner_streams.clone(),
        owner: owner.to_string(),
    }))
}

/// A place among the open event streams (`--max-event-streams`), or 429:
/// all clients together (each owner also has its own share,
/// [`owner_stream_place`]).
fn stream_permit(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyRequests {
            detail: format!(
                "{} event streams are open (--max-event-streams); close one or retry later",
                state.registry.config.max_event_streams
            ),
            retry_after: std::time::Duration::from_secs(5),
        })
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
    caller: Result<Caller, ApiError>,
    accept: Option<String>,
    body: Result<Bytes, ApiError>,
) -> Response {
    answer(
        async {
            let caller = caller?;
            let req: OneshotRequest = parse_json(body, false)?.expect("required body");
            if state.registry.is_shutting_down() {
                return Err(ApiError::Unavailable("the gateway is shutting down".into()));
            }
            let registry = &state.registry;
            let profile = registry.profile(req.agent.as_deref())?;
            caller.check_agent(&profile.name)?;
            let content = crate::content::parse(req.content, registry.config.max_image_bytes)?;
            if content.has_images() && !profile.oneshot_takes_blocks() {
                return Err(images_refused(&profile));
            }
            let cwd = registry.oneshot_cwd(&profile, &caller)?;
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
            let task = tokio::spawn(
                async move {
                    let _permit = permit;
                    let log = task_log;
                    log.publish(&Event::MessageStarted {
                        fallback: false,
                        message_id: mid,
                    });
                    let argv = task_profile.oneshot_argv(None);
                    let result = crate::oneshot::run(
                        &task_profile,
                        argv,
                        cwd,
                        &content,
                        timeout,
                        config.max_output,
                        |signal| {
                            use crate::protocol::Signal;
                            match signal {
                                Signal::Delta(text) => {
                                    log.publish(&Event::MessageDelta {
                                        message_id: mid,
                                        text,
                                    });
                                }
                                Signal::AgentEvent(event) => {
                                    log.publish(&Event::MessageAgentEvent {
                                        event,
                                        message_id: Some(mid),
                                    });
                                }
                                _ => {}
                            }
                        },
                    )
                    .await;
                    let metrics = &task_registry.metrics;
                    let spawn_failed = result
                        .error
                        .as_ref()
                        .is_some_and(|e| e.code == crate::model::FailureCode::SpawnFailed);
                    metrics.spawned(crate::metrics::SpawnKind::Oneshot, !spawn_failed);
                    metrics.oneshot_finished(result.error.as_ref().map(|e| e.code));
                    match &result.error {
                        None => log.publish(&Event::MessageCompleted {
                            duration_ms: result.duration.as_millis() as u64,
                            exit_code: Some(result.exit_code),
                            fallback: false,
                            message_id: mid,
                            output: &result.output,
                            usage: Some(result.usage.as_ref()),
                        }),
                        Some(error) => log.publish(&Event::MessageFailed {
                            error,
                            message_id: mid,
                        }),
                    };
                    log.close();
                    result
                }
                .instrument(span),
            );
            let abort = AbortOnDrop(task.abort_handle());
            if wants_sse(&accept) {
                let sub = log.subscribe(0);
                let guard: Arc<dyn Send + Sync> =
                    Arc::new((abort, state.registry.metrics.stream_opened()));
                return Ok(sse::response(
                    sub,
                    Scope::Message(mid),
                    state.registry.config.heartbeat,
                    state.shutdown.clone(),
                    Some(guard),
                ));
            }
            let result = task
                .await
                .map_err(|e| ApiError::Internal(format!("oneshot task: {e}")))?;
            drop(abort);
            if let Some(err) = &result.error {
                use crate::model::FailureCode;
                match err.code {
                    FailureCode::SpawnFailed => {
                        return Err(ApiError::SpawnFailed(err.detail.clone()))
                    }
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
                    status: if result.error.is_none() {
                        MessageStatus::Completed
                    } else {
                        MessageStatus::Failed
                    },
                    error: result.error,
                    stderr: result.stderr,
                    usage: result.usage,
                    agent_session_id: result.agent_session_id,
                },
            ))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::wants_sse;

    fn sse(accept: &str) -> bool {
        wants_sse(&Some(accept.to_string()))
    }

    #[test]
    fn accept_is_parsed_with_q_values_and_without_case() {
        assert!(sse("text/event-stream"));
        assert!(sse("TEXT/EVENT-STREAM"));
        assert!(sse("application/json, text/event-stream"));
        assert!(sse("text/event-stream;q=0.5, */*;q=0.1"));
        assert!(!sse("text/event-stream;q=0"));
        assert!(!sse("text/event-stream; q=0.0, application/json"));
        assert!(!sse("*/*"));
        assert!(!sse("application/json;q=1, text/event-stream;q=0.5"));
        assert!(!sse("text/*"));
        assert!(!wants_sse(&None));
    }
}
