//! The connection loop: accepts TCP connections and serves the warp routes on
//! them with hyper's HTTP/1.1 server.
//!
//! warp's own server accepts every connection, waits for a request's headers
//! forever, speaks h2c to anyone who asks, and logs every client that goes
//! away at ERROR. Anyone who can connect could then hold every descriptor the
//! gateway has. This loop adds:
//! - **a cap on open connections** (`--max-connections`). Past it, a small
//!   overflow pool still answers `GET /healthz` (so a probe can tell "full"
//!   from "dead") and 503 to anything else, one request per connection; past
//!   that pool a connection is closed unanswered.
//! - **a header-read timeout** (`--header-timeout`): a client has that long
//!   to send a request's headers after connecting. hyper starts the same
//!   clock when a keep-alive connection waits for its next request, so it is
//!   also the idle keep-alive timeout. It never ends a response that is being
//!   sent (an open event stream).
//! - **HTTP/1.1 only**, and one authority per request: duplicate `Host`
//!   headers, an absolute-form target (`GET http://host/…`) that disagrees
//!   with `Host`, and an HTTP/1.1 request without `Host` get 400 before the
//!   routes; an HTTP/1.0 absolute-form target becomes the `Host` the guard
//!   checks.
//! - connection errors (resets, timeouts, clients leaving mid-request) logged
//!   at debug: they are the clients' doing, not the gateway's.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{self, Either};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use warp::http::header::{HeaderValue, CONNECTION, HOST, RETRY_AFTER};
use warp::http::{Method, Request, Version};
use warp::reply::Response;

use crate::error::ApiError;
use crate::http::problem;

/// Connections served past `--max-connections`, each for one answer (the
/// health check or a 503), so a probe still gets through when the gateway is full.
const OVERFLOW: usize = 32;

/// How long `accept` rests after running out of descriptors (or memory):
/// retrying at once would spin, and the log would fill with the same line.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits the loop enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`crate::config::Cli::max_connections`].
    pub max_connections: usize,
    /// See [`crate::config::Cli::header_timeout`].
    pub header_timeout: Duration,
}

/// Serves `routes` (a warp filter turned into a service) on `listener` until
/// `shutdown` completes, then waits for open connections to finish.
pub async fn run<S>(
    routes: S,
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower_service::Service<
            Request<Incoming>,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let overflow = Arc::new(Semaphore::new(OVERFLOW));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_accept_warning: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM: the connection stays in the backlog
                // until a descriptor is free. Say so once in a while, not per try.
                let now = tokio::time::Instant::now();
                if last_accept_warning.is_none_or(|t| now - t > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "cannot accept connections; retrying");
                    last_accept_warning = Some(now);
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        // SSE writes small frames one after another: with Nagle's algorithm
        // on, each frame after the first waits for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let (permit, full) = match connections.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match overflow.clone().try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    tracing::debug!("connection refused: the overflow pool is full too");
                    continue;
                }
            },
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(!full);
        let service = Gate {
            routes: routes.clone(),
            full,
        };
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Errors `accept` reports for a connection that is already gone.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The per-connection service: checks the request's authority, answers for
/// a full gateway, and hands everything else to the routes.
#[derive(Clone)]
struct Gate<S> {
    routes: S,
    /// This connection is past `--max-connections`.
    full: bool,
}

impl<S> hyper::service::Service<Request<Incoming>> for Gate<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<future::Ready<Result<Response, Infallible>>, S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Err(e) = one_authority(&mut req) {
            return Either::Left(future::ready(Ok(problem::response(&e))));
        }
        if self.full && !(req.method() == Method::GET && req.uri().path() == "/healthz") {
            let e = ApiError::Unavailable("too many open connections; retry shortly".into());
            let mut res = problem::response(&e);
            let h = res.headers_mut();
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(CONNECTION, HeaderValue::from_static("close"));
            return Either::Left(future::ready(Ok(res)));
        }
        // warp's service is a cheap clone (its filter holds `Arc`s) and always ready.
        Either::Right(self.routes.clone().call(req))
    }
}

/// Makes the request name exactly one authority, in `Host`, for the guard:
/// 400 for duplicate `Host` headers, an HTTP/1.1 request without one, or an
/// absolute-form target that names another.
fn one_authority<B>(req: &mut Request<B>) -> Result<(), ApiError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(ApiError::BadRequest("more than one Host header".into()));
    }
    let target = req.uri().authority().map(|a| a.as_str().to_string());
    match (host, target) {
        (None, None) if req.version() == Version::HTTP_11 => Err(ApiError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        (None, None) => Ok(()),
        (Some(_), None) => Ok(()),
        (Some(host), Some(target)) => {
            if host.as_bytes().eq_ignore_ascii_case(target.as_bytes()) {
                Ok(())
            } else {
                Err(ApiError::BadRequest(format!(
                    "the request target names {target:?} but Host names {:?}",
                    String::from_utf8_lossy(host.as_bytes())
                )))
            }
        }
        (None, Some(target)) if req.version() == Version::HTTP_11 => Err(ApiError::BadRequest(
            format!("an HTTP/1.1 request needs a Host header (the target names {target:?})"),
        )),
        (None, Some(target)) => {
            let value = HeaderValue::from_str(&target)
                .map_err(|_| ApiError::BadRequest("the request target is not valid".into()))?;
            req.headers_mut().insert(HOST, value);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(target);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn status(mut r: Request<()>) -> Result<Option<String>, u16> {
        one_authority(&mut r).map_err(|e| e.status().as_u16())?;
        Ok(r.headers()
            .get(HOST)
            .map(|h| h.to_str().unwrap().to_string()))
    }

    #[test]
    fn one_authority_per_request() {
        use Version as V;
        assert_eq!(
            status(req(V::HTTP_11, "/agents", &["localhost:1"])),
            Ok(Some("localhost:1".into()))
        );
        assert_eq!(status(req(V::HTTP_11, "/agents", &[])), Err(400));
        assert_eq!(status(req(V::HTTP_10, "/agents", &[])), Ok(None));
        assert_eq!(
            status(req(V::HTTP_11, "/agents", &["localhost", "evil.example"])),
            Err(400)
        );
        assert_eq!(
            status(req(
                V::HTTP_11,
                "http://evil.example/agents",
                &["localhost"]
            )),
            Err(400)
        );
        assert_eq!(
            status(req(
                V::HTTP_11,
                "http://LOCALHOST:1/agents",
                &["localhost:1"]
            )),
            Ok(Some("localhost:1".into()))
        );
        assert_eq!(
            status(req(V::HTTP_11, "http://evil.example/agents", &[])),
            Err(400)
        );
        // HTTP/1.0 may leave Host out; the target's authority is then what the guard checks.
        assert_eq!(
            status(req(V::HTTP_10, "http://evil.example/agents", &[])),
            Ok(Some("evil.example".into()))
        );
    }
}
