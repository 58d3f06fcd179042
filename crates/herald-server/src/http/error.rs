//! The one error type every HTTP handler returns: a status and a JSON body
//! `{"error": "<message>"}`, with `"field": "<name>"` when one request field is at fault.
//! Internal details are logged, never sent.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    /// The request field (body, path or query) the error is about.
    pub field: Option<String>,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            field: None,
        }
    }

    /// An error about one field of the request.
    pub fn field(status: StatusCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(field) => serde_json::json!({ "error": self.message, "field": field }),
            None => serde_json::json!({ "error": self.message }),
        };
        (self.status, Json(body)).into_response()
    }
}
