//! The one error type of the HTTP API.
//!
//! Every variant names its HTTP status and a stable `type` slug, and every
//! 4xx/5xx leaves the gateway as `application/problem+json` (RFC 9457) through
//! [`crate::http::recover`]. Internal details (I/O errors, panics) are logged
//! and never sent to clients.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// An error the API reports to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body or a parameter is malformed (bad JSON, unknown field, bad value).
    #[error("{0}")]
    BadRequest(String),
    /// The credential is missing or was refused.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The Host header or Origin is not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// No such route, session, message or permission request.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method; carries the `Allow` value.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(String),
    /// The request conflicts with the session's state (e.g. interrupt with nothing running).
    #[error("{0}")]
    Conflict(String),
    /// The session was closed while the request was handled.
    #[error("{0}")]
    Gone(String),
    /// The body is larger than `--max-body`.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(u64),
    /// Part of the body is too large (e.g. one image of a message).
    #[error("{0}")]
    ContentTooLarge(String),
    /// The agent refused a request the gateway passed on (e.g. a model change).
    #[error("{0}")]
    AgentRefused(String),
    /// The body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The session's queue is full; retry after the given time.
    #[error("{detail}")]
    TooManyRequests {
        /// Human-readable explanation.
        detail: String,
        /// Sent as `Retry-After` (whole seconds, at least 1).
        retry_after: Duration,
    },
    /// The caller's owner holds `--max-sessions-per-owner` open sessions.
    #[error("{0}")]
    TooManySessions(String),
    /// The gateway cannot take more sessions, or is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A child could not be started.
    #[error("{0}")]
    SpawnFailed(String),
    /// A one-shot run exceeded its timeout.
    #[error("{0}")]
    Timeout(String),
    /// Something went wrong inside the gateway; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status this error is reported with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PayloadTooLarge(_) | ApiError::ContentTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::AgentRefused(_) => StatusCode::BAD_GATEWAY,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } | ApiError::TooManySessions(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::SpawnFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable slug for the problem `type` (`urn:agentgate:problem:<slug>`).
    pub fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::Gone(_) => "gone",
            ApiError::PayloadTooLarge(_) | ApiError::ContentTooLarge(_) => "payload-too-large",
            ApiError::AgentRefused(_) => "agent-refused",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::TooManyRequests { .. } => "queue-full",
            ApiError::TooManySessions(_) => "too-many-sessions",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::SpawnFailed(_) => "spawn-failed",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The problem+json body for this error. Internal details stay in the log.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            kind: format!("urn:agentgate:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }
}

impl warp::reject::Reject for ApiError {}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, for a human.
    pub detail: String,
}
