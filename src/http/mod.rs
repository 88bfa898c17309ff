//! The HTTP layer: warp filters for every route, the handlers they call, SSE
//! streams, and the one place errors become problem+json.
//!
//! Handlers never reject: they answer with a response, errors included. Only
//! path and method filters reject, and the last filter turns a request no
//! route took into a 404, or a 405 with `Allow` when the path exists. In
//! front of all of them, [`guard`] checks the Host, the Origin and the token,
//! and answers CORS preflights.

pub mod guard;
mod handlers;
pub mod problem;
mod sse;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use warp::filters::path::FullPath;
use warp::http::Method;
use warp::reply::Response;
use warp::{Buf, Filter, Rejection, Reply};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::session::Registry;

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The sessions.
    pub registry: Arc<Registry>,
    /// Cancelled when the gateway shuts down; open SSE streams end then.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// One permit per `POST /oneshot` run (`--max-oneshot`): one-shot
    /// children are not session children, so `--max-children` cannot bound them.
    pub oneshots: Arc<tokio::sync::Semaphore>,
    /// One permit per open event stream (`--max-event-streams`): each holds a
    /// connection and a subscriber slot for as long as the client likes.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Open event streams per JWT owner (`--max-event-streams-per-owner`).
    pub owner_streams: Arc<dashmap::DashMap<String, usize>>,
}

impl AppState {
    /// The state for `registry`, its limits taken from the registry's configuration.
    pub fn new(registry: Arc<Registry>, shutdown: tokio_util::sync::CancellationToken) -> AppState {
        let oneshots = Arc::new(tokio::sync::Semaphore::new(registry.config.max_oneshot));
        let event_streams = Arc::new(tokio::sync::Semaphore::new(
            registry.config.max_event_streams,
        ));
        AppState {
            registry,
            shutdown,
            oneshots,
            event_streams,
            owner_streams: Default::default(),
        }
    }
}

/// Every route and its methods, in the order `openapi.yaml` lists them.
/// `{…}` matches one path segment.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/", &["GET"]),
    ("/agents", &["GET"]),
    ("/sessions", &["GET", "POST"]),
    ("/sessions/{id}", &["GET", "DELETE", "PATCH"]),
    ("/sessions/{id}/fork", &["POST"]),
    ("/sessions/{id}/messages", &["GET", "POST"]),
    ("/sessions/{id}/messages/{message_id}", &["GET"]),
    ("/sessions/{id}/interrupt", &["POST"]),
    ("/sessions/{id}/permissions/{request_id}", &["POST"]),
    ("/sessions/{id}/events", &["GET"]),
    ("/oneshot", &["POST"]),
    ("/healthz", &["GET"]),
    ("/metrics", &["GET"]),
    ("/openapi.yaml", &["GET"]),
];

/// The methods allowed on `path`, if any route matches it.
pub fn allowed_methods(path: &str) -> Option<&'static [&'static str]> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES.iter().find_map(|(pattern, methods)| {
        let pat: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
        let same = pat.len() == segs.len()
            && pat
                .iter()
                .zip(&segs)
                .all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s);
        same.then_some(*methods)
    })
}

/// GET, and HEAD wherever GET works (RFC 9110 §9.3.2; `curl -I` and uptime
/// monitors use it). hyper sends no body for HEAD, only the headers.
fn get() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::get().or(warp::head()).unify()
}

fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The request body, read up to `limit` bytes (413 beyond). It must be
/// declared JSON (415 otherwise), even when empty: a cross-site form or
/// `text/plain` POST needs no CORS preflight, so the content type is part of
/// the CSRF defence.
fn body(
    limit: u64,
) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::stream())
        .then(
            move |len: Option<u64>, ctype: Option<String>, stream| async move {
                if len.is_some_and(|n| n > limit) {
                    return Err(ApiError::PayloadTooLarge(limit));
                }
                let Some(ct) = ctype else {
                    return Err(ApiError::UnsupportedMediaType(
                        "no Content-Type; send application/json".into(),
                    ));
                };
                let essence = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if essence != "application/json" && !essence.ends_with("+json") {
                    return Err(ApiError::UnsupportedMediaType(format!(
                        "Content-Type {ct:?} is not JSON; send application/json"
                    )));
                }
                collect(stream, limit).await
            },
        )
}

async fn collect<S, B>(stream: S, limit: u64) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            buf.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(buf))
}

fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// An optional header as text. Bytes that are not UTF-8 are replaced rather
/// than rejected, so a bad value reaches the handler and gets a clear 400
/// instead of falling through to "no route".
fn header(
    name: &'static str,
) -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::headers_cloned().map(move |headers: warp::http::HeaderMap| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    })
}

/// Who sends the request ([`guard::Guard::caller`]). The gate in front of
/// the routes has already refused a request without a valid credential, so
/// the error arm is only reached if a token expires between the two looks;
/// asking again (rather than passing the gate's answer through) keeps the
/// routes free of per-request state, at the price of a second signature check.
/// Boxed, as the routes are below: every route embeds it, and the nested
/// filter types are what reach rustc's query depth limit.
fn caller(guard: Arc<guard::Guard>) -> warp::filters::BoxedFilter<(Result<Caller, ApiError>,)> {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(raw_query())
        .map(
            move |method: Method, path: FullPath, headers: warp::http::HeaderMap, query: String| {
                guard
                    .caller(&method, path.as_str(), &headers, &query)
                    .map_err(|_| ApiError::Unauthorized)
            },
        )
        .boxed()
}

/// All routes, with the 404/405 fallback and the problem+json recover.
pub fn routes(state: AppState) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    use warp::path::{end, param};
    let limit = state.registry.config.max_body;
    let guard = Arc::new(guard::Guard::new(&state.registry.config));
    let s = || with_state(state.clone()).and(caller(guard.clone()));

    let index = warp::path::end().and(get()).map(handlers::index);
    let agents = warp::path!("agents")
        .and(get())
        .and(s())
        .map(handlers::agents);
    let sessions_list = warp::path!("sessions")
        .and(get())
        .and(s())
        .and(raw_query())
        .then(handlers::list_sessions);
    let sessions_create = warp::path!("sessions")
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(handlers::create_session);
    let session_get = warp::path!("sessions" / String)
        .and(get())
        .and(s())
        .then(handlers::get_session);
    let session_delete = warp::path!("sessions" / String)
        .and(warp::delete())
        .and(s())
        .then(handlers::delete_session);
    let session_patch = warp::path!("sessions" / String)
        .and(warp::patch())
        .and(s())
        .and(body(limit))
        .then(handlers::update_session);
    let session_fork = warp::path!("sessions" / String / "fork")
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(handlers::fork_session);
    let messages_post = warp::path("sessions")
        .and(param::<String>())
        .and(warp::path("messages"))
        .and(end())
        .and(warp::post())
        .and(s())
        .and(header("accept"))
        .and(raw_query())
        .and(body(limit))
        .then(handlers::send_message);
    let messages_list = warp::path!("sessions" / String / "messages")
        .and(get())
        .and(s())
        .and(raw_query())
        .then(handlers::list_messages);
    let message_get = warp::path!("sessions" / String / "messages" / String)
        .and(get())
        .and(s())
        .then(handlers::get_message);
    let interrupt = warp::path!("sessions" / String / "interrupt")
        .and(warp::post())
        .and(s())
        .then(handlers::interrupt);
    let permission = warp::path!("sessions" / String / "permissions" / String)
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(handlers::permission);
    let events = warp::path!("sessions" / String / "events")
        .and(get())
        .and(s())
        .and(header("last-event-id"))
        .and(raw_query())
        .then(handlers::events);
    let oneshot = warp::path!("oneshot")
        .and(warp::post())
        .and(s())
        .and(header("accept"))
        .and(body(limit))
        .then(handlers::oneshot);
    let healthz = warp::path!("healthz")
        .and(get())
        .and(s())
        .then(handlers::healthz);
    let metrics = warp::path!("metrics")
        .and(get())
        .and(s())
        .map(handlers::metrics);
    let openapi = warp::path!("openapi.yaml")
        .and(get())
        .map(handlers::openapi);

    let api = index
        .or(agents)
        .unify()
        .or(sessions_list)
        .unify()
        .or(sessions_create)
        .unify()
        .or(session_get)
        .unify()
        .or(session_delete)
        .unify()
        .or(session_patch)
        .unify()
        .or(session_fork)
        .unify()
        .or(messages_post)
        .unify()
        .or(messages_list)
        .unify()
        .or(message_get)
        .unify()
        .or(interrupt)
        .unify()
        .or(permission)
        .unify()
        .or(events)
        .unify()
        .or(oneshot)
        .unify()
        .or(healthz)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
        // One boxed filter: the nested type of seventeen routes, the gate,
        // the recover and the log went past rustc's query depth limit
        // wherever the whole is used (e.g. `warp::test` in tests/fuzz.rs).
        .boxed();
    let fallback = warp::method()
        .and(warp::path::full())
        .map(|method: Method, path: FullPath| no_route(&method, path.as_str()));
    let log = warp::log::custom(|info| {
        tracing::debug!(method = %info.method(), path = info.path(), status = info.status().as_u16(), elapsed_ms = info.elapsed().as_millis() as u64, "request");
    });
    guard::protect(guard, api.or(fallback).unify()).with(log)
}

fn no_route(method: &Method, path: &str) -> Response {
    match allowed_methods(path) {
        Some(methods) if !methods.contains(&method.as_str()) => {
            let mut allow = methods.join(", ");
            if methods.contains(&"GET") {
                allow.push_str(", HEAD");
            }
            problem::response(&ApiError::MethodNotAllowed(allow))
        }
        _ => problem::response(&ApiError::NotFound(format!("no route for {method} {path}"))),
    }
}

/// Turns anything into a response (used by handlers for success bodies).
pub(crate) fn json_response(
    status: warp::http::StatusCode,
    body: &impl serde::Serialize,
) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}
