//! The API's one error shape: a status, a sentence naming the problem, and the offending field.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What is wrong, in a sentence that names the field.
    pub error: String,
    /// The request field at fault, where there is one.
    pub field: Option<String>,
}

/// A refused request.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { status, field: field.map(String::from), message: message.into(), retry_after: None }
    }

    pub fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        Self::new(status, Some(field), message)
    }

    /// A well-formed value the server does not take (422).
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::field(StatusCode::UNPROCESSABLE_ENTITY, field, message)
    }

    /// A malformed field (400).
    pub fn bad(field: &str, message: impl Into<String>) -> Self {
        Self::field(StatusCode::BAD_REQUEST, field, message)
    }

    pub fn unknown_job(id: &str) -> Self {
        Self::field(StatusCode::NOT_FOUND, "id", format!("no job with id '{id}' (finished jobs are kept for a limited time)"))
    }
}

impl From<super::backend::Unavailable> for ApiError {
    fn from(e: super::backend::Unavailable) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, None, format!("the job queue is unavailable: {}", e.0))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.message, field: self.field };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
