//! The gate every request passes before it reaches a route: the Host
//! allowlist, the Origin allowlist (CORS), CORS preflights and the bearer
//! token.
//!
//! In that order, because each answers a different attacker:
//! - **Host** — a web page whose domain an attacker re-points at 127.0.0.1
//!   (DNS rebinding) talks to the gateway as its *own* origin, so CORS does
//!   not stop it; its requests carry the attacker's name in `Host`. Allowed:
//!   `localhost` and `*.localhost`, loopback addresses, the address the
//!   gateway listens on, and `--allowed-host` entries (any port unless the
//!   entry names one). [`crate::server`] has already made sure a request
//!   names one authority (the target's, for an absolute-form HTTP/1.0
//!   request); HTTP/1.0 without any passes: browsers always send one.
//! - **Origin** — a page on another origin can make a browser send requests
//!   it cannot read: a `no-cors` POST with a body but no `Content-Type` would
//!   run a message. So a request whose `Origin` is neither the gateway's own
//!   (`http://` + the same host and port as `Host`) nor in `--allow-origin`
//!   is refused with 403, and only allowed origins get `Access-Control-*`
//!   headers. `Origin: null` (sandboxed frames, `file:`) is never allowed,
//!   not even by `*`. A request without `Origin` that a browser marks
//!   `Sec-Fetch-Site: cross-site` or `same-site` is refused too, unless it is
//!   a GET or HEAD. Every POST to a route with a body must say
//!   `Content-Type: application/json`, even with an empty body
//!   ([`super::body`]): a form or `text/plain` POST is what a page can send
//!   without a preflight. A preflight (`OPTIONS`
//!   with `Access-Control-Request-Method`) is answered here, before the
//!   token check: browsers never send credentials on a preflight.
//! - **Credential** — with `--token` or a `--jwt-*` key, every route but
//!   `/healthz` and the console (`GET /`, which holds no data) needs
//!   `Authorization: Bearer <token>`: the operator token (compared in time
//!   that does not depend on where the first wrong byte is) or a JWT
//!   ([`crate::auth`]). The event stream (`GET /sessions/{id}/events`) also
//!   takes `?access_token=`, because EventSource cannot set headers; no
//!   other route does (a token in a URL ends up in logs and histories). A
//!   credential that was presented and refused is written to the `audit`
//!   log target with the reason.
//!
//! The gate never logs a header or a query string, so tokens stay out of the
//! logs (the request log writes the path only). Handlers learn who is asking
//! from [`Guard::caller`], which the routes call again after the gate let the
//! request through.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use warp::filters::path::FullPath;
use warp::http::header::{self, HeaderMap, HeaderValue};
use warp::http::{Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::problem;
use crate::auth::{Caller, JwtVerifier};
use crate::config::{Config, Secret};
use crate::error::ApiError;

/// Request headers a cross-origin client may send.
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Accept, Last-Event-ID";
/// Response headers a cross-origin client may read.
const EXPOSE_HEADERS: &str = "Location, Retry-After, Allow, WWW-Authenticate";
/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The checks, built once from the configuration.
#[derive(Debug)]
pub struct Guard {
    token: Option<Secret>,
    jwt: Option<Arc<JwtVerifier>>,
    hosts: Vec<HostRule>,
    any_host: bool,
    /// Allowed origins, lower-case, without a trailing `/`.
    origins: Vec<String>,
    any_origin: bool,
    /// The address the gateway listens on, unless it is a wildcard.
    listen_ip: Option<IpAddr>,
}

#[derive(Debug)]
struct HostRule {
    name: String,
    port: Option<u16>,
}

/// Why a request stopped at the gate, or the preflight answer it gets.
#[derive(Debug)]
enum Stop {
    Refused {
        error: ApiError,
        /// The origin to echo, so an allowed page can read the refusal.
        cors: Option<HeaderValue>,
    },
    Preflight {
        origin: HeaderValue,
        methods: &'static [&'static str],
    },
}

impl warp::reject::Reject for Stop {}

impl Guard {
    /// The gate for `config`.
    pub fn new(config: &Config) -> Guard {
        let mut hosts = Vec::new();
        let mut any_host = false;
        for entry in &config.allowed_host {
            let entry = entry.trim();
            if entry == "*" {
                any_host = true;
            } else if let Some((name, port)) = split_host(entry) {
                hosts.push(HostRule { name, port });
            } else if !entry.is_empty() {
                tracing::warn!(
                    entry,
                    "ignoring an --allowed-host entry that is not a host name"
                );
            }
        }
        let mut origins = Vec::new();
        let mut any_origin = false;
        for entry in &config.allow_origin {
            let entry = entry.trim().trim_end_matches('/').to_ascii_lowercase();
            if entry == "*" {
                any_origin = true;
            } else if !entry.is_empty() {
                origins.push(entry);
            }
        }
        let ip = config.listen.ip();
        Guard {
            token: config.token.clone(),
            jwt: config.jwt.clone(),
            hosts,
            any_host,
            origins,
            any_origin,
            listen_ip: (!ip.is_unspecified()).then_some(ip),
        }
    }

    /// Lets the request through (with the origin to echo in CORS headers,
    /// if any) or stops it.
    fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: &str,
    ) -> Result<Option<HeaderValue>, Stop> {
        let refuse = |error, cors| Stop::Refused { error, cors };
        let host = headers.get(header::HOST);
        if let Some(host) = host {
            if !self.host_allowed(host) {
                let shown = String::from_utf8_lossy(host.as_bytes());
                return Err(refuse(
                    ApiError::Forbidden(format!(
                        "Host {shown:?} is not allowed; allow it with --allowed-host"
                    )),
                    None,
                ));
            }
        }
        let cors = match headers.get(header::ORIGIN) {
            None if cross_site_without_origin(method, headers) => {
                return Err(refuse(
                    ApiError::Forbidden(
                        "a cross-site request without Origin is refused (Sec-Fetch-Site)".into(),
                    ),
                    None,
                ));
            }
            None => None,
            Some(origin) => match self.origin(origin, host) {
                OriginKind::Same => None,
                OriginKind::Allowed => Some(origin.clone()),
                OriginKind::Refused => {
                    let shown = String::from_utf8_lossy(origin.as_bytes());
                    return Err(refuse(
                        ApiError::Forbidden(format!(
                            "Origin {shown:?} is not allowed; allow it with --allow-origin"
                        )),
                        None,
                    ));
                }
            },
        };
        let preflight = headers
            .get(header::ORIGIN)
            .filter(|_| {
                method == Method::OPTIONS
                    && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
            })
            .cloned();
        if let Some(origin) = preflight {
            return Err(match super::allowed_methods(path) {
                Some(methods) => Stop::Preflight { origin, methods },
                None => refuse(ApiError::NotFound(format!("no route for {path}")), cors),
            });
        }
        let open = path == "/healthz"
            || (path == "/" && (method == Method::GET || method == Method::HEAD));
        if !open {
            if let Err(refusal) = self.caller(method, path, headers, query) {
                if let Some(reason) = refusal {
                    tracing::info!(target: "audit", action = "credential.refused", reason, %method, path, "a credential was refused");
                }
                return Err(refuse(ApiError::Unauthorized, cors));
            }
        }
        Ok(cors)
    }

    /// Who sends this request: the operator for `--token` (or on a gateway
    /// with no credential configured), else whoever a valid JWT names. The
    /// error is `None` when no credential came, else why the last one
    /// presented was refused.
    pub fn caller(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: &str,
    ) -> Result<Caller, Option<&'static str>> {
        if self.token.is_none() && self.jwt.is_none() {
            return Ok(Caller::OPERATOR);
        }
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, value) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| value.trim_start().to_string())
            });
        let from_query: Vec<String> = if takes_query_token(method, path) {
            serde_urlencoded::from_str::<Vec<(String, String)>>(query)
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| k == "access_token")
                .map(|(_, v)| v)
                .collect()
        } else {
            Vec::new()
        };
        let mut refused = None;
        for given in from_header.into_iter().chain(from_query) {
            match self.verify(&given) {
                Ok(caller) => return Ok(caller),
                Err(reason) => refused = Some(reason),
            }
        }
        Err(refused)
    }

    fn verify(&self, given: &str) -> Result<Caller, &'static str> {
        if let Some(token) = &self.token {
            if same_secret(given.as_bytes(), token.expose().as_bytes()) {
                return Ok(Caller::OPERATOR);
            }
        }
        match &self.jwt {
            Some(jwt) => jwt.verify(given),
            None => Err("wrong token"),
        }
    }

    fn host_allowed(&self, host: &HeaderValue) -> bool {
        if self.any_host {
            return true;
        }
        let Some((name, port)) = host.to_str().ok().and_then(split_host) else {
            return false;
        };
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let ip = ip.to_canonical();
            if ip.is_loopback() || Some(ip) == self.listen_ip.map(|l| l.to_canonical()) {
                return true;
            }
        }
        self.hosts
            .iter()
            .any(|rule| rule.name == name && rule.port.is_none_or(|p| Some(p) == port))
    }

    fn origin(&self, origin: &HeaderValue, host: Option<&HeaderValue>) -> OriginKind {
        let Ok(origin) = origin.to_str() else {
            return OriginKind::Refused;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if origin == "null" {
            // Sandboxed frames and file: pages share this one value: allowing
            // it would allow all of them, and echoing it would tell the
            // browser so.
            return OriginKind::Refused;
        }
        // The gateway's own pages (the console) send their own origin: it
        // speaks plain HTTP, so that is http:// with the Host's name and port.
        let same = host
            .and_then(|h| h.to_str().ok())
            .and_then(split_host)
            .zip(origin.strip_prefix("http://").and_then(split_host))
            .is_some_and(|((h, hp), (o, op))| h == o && hp.unwrap_or(80) == op.unwrap_or(80));
        if same {
            OriginKind::Same
        } else if self.any_origin || self.origins.contains(&origin) {
            OriginKind::Allowed
        } else {
            OriginKind::Refused
        }
    }
}

enum OriginKind {
    Same,
    Allowed,
    Refused,
}

/// Whether `path` is the event stream, the one route that also takes
/// `?access_token=` (EventSource cannot set headers).
fn takes_query_token(method: &Method, path: &str) -> bool {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        ["", "sessions", id, "events"] => method == Method::GET && !id.is_empty(),
        _ => false,
    }
}

/// A browser's request from another site that carries no `Origin` (some
/// browsers leave it off): `Sec-Fetch-Site` still says where it came from.
/// GET and HEAD change nothing, and a link to the console must open.
fn cross_site_without_origin(method: &Method, headers: &HeaderMap) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return false;
    }
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| !matches!(site.trim(), "same-origin" | "none"))
}

/// `host[:port]` as (lower-case name without a trailing dot, port). IPv6
/// names keep their brackets.
fn split_host(s: &str) -> Option<(String, Option<u16>)> {
    let authority: warp::http::uri::Authority = s.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let name = authority.host().trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some((name, authority.port_u16()))
}

/// Compares two secrets in time that depends on their lengths only, not on
/// where they differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Puts the gate in front of `app` and adds CORS headers to what it answers
/// for an allowed origin.
pub fn protect<F>(
    guard: Arc<Guard>,
    app: F,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let gate = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(query)
        .and_then(
            move |method: Method, path: FullPath, headers: HeaderMap, query: String| {
                let verdict = guard.check(&method, path.as_str(), &headers, &query);
                async move { verdict.map_err(warp::reject::custom) }
            },
        );
    gate.and(app)
        .map(|cors: Option<HeaderValue>, res: Response| with_cors(res, cors))
        .recover(|rejection: Rejection| async move { Ok::<_, Infallible>(stopped(rejection)) })
        .unify()
}

/// The answer for a request the gate stopped.
fn stopped(rejection: Rejection) -> Response {
    match rejection.find::<Stop>() {
        Some(Stop::Refused { error, cors }) => with_cors(problem::response(error), cors.clone()),
        Some(Stop::Preflight { origin, methods }) => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let h = res.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            if let Ok(v) = HeaderValue::from_str(&methods.join(", ")) {
                h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
            }
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(PREFLIGHT_MAX_AGE),
            );
            h.insert(
                header::VARY,
                HeaderValue::from_static(
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                ),
            );
            res
        }
        // Only the gate rejects: the routes behind it answer every request.
        None => problem::response(&ApiError::Internal(format!(
            "unexpected rejection: {rejection:?}"
        ))),
    }
}

fn with_cors(mut res: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(tweak: impl FnOnce(&mut Config)) -> Guard {
        let mut config = Config::defaults(std::path::Path::new("/bin/true"));
        tweak(&mut config);
        Guard::new(&config)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn status(r: Result<Option<HeaderValue>, Stop>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(Stop::Preflight { .. }) => 204,
            Err(Stop::Refused { error, .. }) => error.status().as_u16(),
        }
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let mut config = Config::defaults(std::path::Path::new("/bin/true"));
        config.token = Some("hunter2-very-secret".into());
        let shown = format!("{config:?} {:?}", Guard::new(&config));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn loopback_and_localhost_hosts_pass_others_do_not() {
        let g = guard(|c| {
            c.allowed_host = vec!["agent.example.com".into(), "pinned.example:8443".into()]
        });
        let get = Method::GET;
        for ok in [
            "localhost",
            "LOCALHOST:1",
            "localhost.",
            "app.localhost:8700",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:8700",
            "[::ffff:127.0.0.1]",
            "agent.example.com:9",
            "Agent.Example.com",
            "pinned.example:8443",
        ] {
            assert_eq!(
                status(g.check(&get, "/agents", &headers(&[("host", ok)]), "")),
                200,
                "{ok}"
            );
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1:8700",
            "pinned.example:8444",
            "pinned.example",
            "user@localhost",
            "",
            "[::2]",
        ] {
            assert_eq!(
                status(g.check(&get, "/agents", &headers(&[("host", bad)]), "")),
                403,
                "{bad}"
            );
        }
        let any = guard(|c| c.allowed_host = vec!["*".into()]);
        assert_eq!(
            status(any.check(&get, "/", &headers(&[("host", "evil.example")]), "")),
            200
        );
    }

    #[test]
    fn origins_same_allowed_or_refused() {
        let g = guard(|c| c.allow_origin = vec!["https://app.example/".into()]);
        let get = Method::GET;
        let h = |origin| headers(&[("host", "127.0.0.1:8700"), ("origin", origin)]);
        assert!(matches!(
            g.check(&get, "/agents", &h("http://127.0.0.1:8700"), ""),
            Ok(None)
        ));
        assert!(matches!(
            g.check(&get, "/agents", &h("https://APP.example"), ""),
            Ok(Some(_))
        ));
        assert_eq!(
            status(g.check(&get, "/agents", &h("https://evil.example"), "")),
            403
        );
        assert_eq!(status(g.check(&get, "/agents", &h("null"), "")), 403);
        // Same origin means the same scheme, host and port.
        for other in [
            "https://127.0.0.1:8700",
            "http://127.0.0.1:8701",
            "http://127.0.0.1",
            "http://localhost:8700",
        ] {
            assert_eq!(
                status(g.check(&get, "/agents", &h(other), "")),
                403,
                "{other}"
            );
        }
        let default_port = headers(&[("host", "localhost"), ("origin", "http://localhost:80")]);
        assert!(matches!(
            g.check(&get, "/agents", &default_port, ""),
            Ok(None)
        ));
        // `*` allows any origin but `null`, which is never echoed.
        let any = guard(|c| c.allow_origin = vec!["*".into()]);
        assert!(matches!(
            any.check(&get, "/agents", &h("https://evil.example"), ""),
            Ok(Some(_))
        ));
        assert_eq!(status(any.check(&get, "/agents", &h("null"), "")), 403);
        assert_eq!(status(any.check(&get, "/agents", &h("NULL"), "")), 403);
    }

    #[test]
    fn cross_site_requests_without_origin_are_refused_unless_get() {
        let g = guard(|_| {});
        let post = Method::POST;
        let site = |s| headers(&[("host", "localhost"), ("sec-fetch-site", s)]);
        for bad in ["cross-site", "same-site"] {
            assert_eq!(
                status(g.check(&post, "/sessions", &site(bad), "")),
                403,
                "{bad}"
            );
        }
        for ok in ["same-origin", "none"] {
            assert_eq!(
                status(g.check(&post, "/sessions", &site(ok), "")),
                200,
                "{ok}"
            );
        }
        assert_eq!(
            status(g.check(&Method::GET, "/", &site("cross-site"), "")),
            200
        );
        // Non-browser clients send neither header.
        assert_eq!(
            status(g.check(&post, "/sessions", &headers(&[("host", "localhost")]), "")),
            200
        );
    }

    #[test]
    fn tokens_from_the_header_or_on_sse_routes_from_the_query() {
        let g = guard(|c| c.token = Some("s3cret".into()));
        let get = Method::GET;
        let bearer = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(status(g.check(&get, "/agents", &bearer, "")), 200);
        let lower = headers(&[("authorization", "bearer s3cret")]);
        assert_eq!(status(g.check(&get, "/agents", &lower, "")), 200);
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer",
        ] {
            let h = headers(&[("authorization", wrong)]);
            assert_eq!(status(g.check(&get, "/agents", &h, "")), 401, "{wrong}");
        }
        let none = HeaderMap::new();
        assert_eq!(status(g.check(&get, "/healthz", &none, "")), 200);
        assert_eq!(
            status(g.check(&get, "/agents", &none, "access_token=s3cret")),
            401
        );
        let events = "/sessions/x/events";
        assert_eq!(
            status(g.check(&get, events, &none, "access_token=s3cret")),
            200
        );
        assert_eq!(
            status(g.check(&get, events, &none, "after=3&access_token=s3cret")),
            200
        );
        assert_eq!(
            status(g.check(&get, events, &none, "access_token=nope")),
            401
        );
        let post = Method::POST;
        // Only the event stream takes it: a POST that sends a message does not.
        assert_eq!(
            status(g.check(&post, "/sessions/x/messages", &none, "access_token=s3cret")),
            401
        );
        assert_eq!(
            status(g.check(&post, "/sessions/x/interrupt", &none, "access_token=s3cret")),
            401
        );
    }

    #[test]
    fn the_console_and_healthz_open_without_a_credential_jwt_or_token() {
        let mut jwt = crate::auth::JwtVerifier::new(None, None);
        jwt.add_secret(&[7; 32]).unwrap();
        let g = guard(|c| c.jwt = Some(Arc::new(jwt)));
        let none = HeaderMap::new();
        for (method, path, want) in [
            (Method::GET, "/", 200),
            (Method::HEAD, "/", 200),
            (Method::GET, "/healthz", 200),
            (Method::POST, "/", 401),
            (Method::GET, "/agents", 401),
            (Method::GET, "/sessions", 401),
        ] {
            assert_eq!(
                status(g.check(&method, path, &none, "")),
                want,
                "{method} {path}"
            );
        }
        let junk = headers(&[("authorization", "Bearer not.a.jwt")]);
        assert_eq!(status(g.check(&Method::GET, "/agents", &junk, "")), 401);
        assert_eq!(
            g.caller(&Method::GET, "/agents", &junk, ""),
            Err(Some("malformed token"))
        );
        assert_eq!(g.caller(&Method::GET, "/agents", &none, ""), Err(None));
    }

    #[test]
    fn preflights_need_an_allowed_origin_and_no_token() {
        let g = guard(|c| {
            c.token = Some("s3cret".into());
            c.allow_origin = vec!["https://app.example".into()];
        });
        let opt = Method::OPTIONS;
        let pre = |origin| {
            headers(&[
                ("host", "localhost:8700"),
                ("origin", origin),
                ("access-control-request-method", "POST"),
            ])
        };
        match g.check(&opt, "/sessions", &pre("https://app.example"), "") {
            Err(Stop::Preflight { methods, .. }) => assert_eq!(methods, &["GET", "POST"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(g.check(&opt, "/sessions", &pre("https://evil.example"), "")),
            403
        );
        assert_eq!(
            status(g.check(&opt, "/nowhere", &pre("https://app.example"), "")),
            404
        );
        // A plain OPTIONS is no preflight: it needs the token like anything else.
        assert_eq!(
            status(g.check(&opt, "/sessions", &HeaderMap::new(), "")),
            401
        );
    }
}
