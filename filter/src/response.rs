//! The edge: every domain error becomes an HTTP status and an OpenAI-style error
//! body, so OpenAI SDKs show a useful message and pick the right exception class.
//! Bodies never echo the credential.

use crate::auth::AuthError;

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// `{"error": {"message", "type", "param": null, "code"}}` as the OpenAI API sends it.
pub fn openai_error_body(message: &str, kind: &str, code: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
}

impl From<&AuthError> for LocalReply {
    fn from(error: &AuthError) -> Self {
        let (status, message, code) = match error {
            AuthError::MissingCredential => (
                401,
                "Missing credentials. Send an API key as 'Authorization: Bearer <key>' or a JWT.".to_string(),
                "invalid_api_key",
            ),
            AuthError::InvalidApiKey => (401, "Incorrect API key provided.".to_string(), "invalid_api_key"),
            AuthError::InvalidToken(e) => (401, format!("Invalid token: {}.", e.message()), "invalid_api_key"),
            AuthError::GroupNotAllowed => (
                403,
                "You are not allowed to use this API: none of your groups is allowed.".to_string(),
                "permission_denied",
            ),
        };
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if status == 401 {
            let challenge = match error {
                AuthError::MissingCredential => r#"Bearer realm="tollgate""#,
                _ => r#"Bearer realm="tollgate", error="invalid_token""#,
            };
            headers.push(("www-authenticate".to_string(), challenge.to_string()));
        }
        LocalReply { status, headers, body: openai_error_body(&message, "invalid_request_error", code) }
    }
}
