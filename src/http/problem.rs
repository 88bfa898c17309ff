//! Errors as `application/problem+json` (RFC 9457).

use warp::http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use warp::reply::Response;

use crate::error::ApiError;

/// The problem+json response for `err`, with `Allow` / `Retry-After` where they apply.
pub fn response(err: &ApiError) -> Response {
    if let ApiError::Internal(detail) = err {
        tracing::error!(%detail, "internal error");
    }
    let body = serde_json::to_vec(&err.problem()).expect("a problem serialises");
    let mut res = warp::http::Response::new(body.into());
    *res.status_mut() = err.status();
    let headers = res.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    match err {
        ApiError::MethodNotAllowed(allow) => {
            if let Ok(v) = HeaderValue::from_str(allow) {
                headers.insert(ALLOW, v);
            }
        }
        ApiError::TooManyRequests { retry_after, .. } => {
            let secs = retry_after.as_secs().max(1).to_string();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
        }
        ApiError::Unauthorized => {
            headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        _ => {}
    }
    res
}
