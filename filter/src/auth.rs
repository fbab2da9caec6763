//! The request-path decision: find the credential, verify it, check groups, and say
//! which headers to remove and set. Pure: headers and the clock in, a verdict out.
//!
//! Client-sent identity headers are always removed, before anything else, so an
//! identity can only reach the upstream if this module put it there.

use crate::config::Settings;
use crate::credentials::{find_credential, Credential};
use crate::identity::Identity;
use crate::jwt::{JwtError, TokenCache};

/// Why a request was not let through. Mapped to a status and an OpenAI-style error
/// body in `response`; `reason()` is the stable name used in logs and usage events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    MissingCredential,
    InvalidApiKey,
    InvalidToken(JwtError),
    GroupNotAllowed,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingCredential => "missing_credential",
            AuthError::InvalidApiKey | AuthError::InvalidToken(_) => "invalid_credential",
            AuthError::GroupNotAllowed => "permission_denied",
        }
    }
}

/// Header changes to apply to the request before it goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow { identity: Identity, edits: HeaderEdits },
    Deny { error: AuthError, edits: HeaderEdits },
}

/// Decides one request. `cache` is the worker's cache of verified JWTs.
pub fn decide(settings: &Settings, cache: &mut TokenCache, headers: &[(String, String)], now: u64) -> Verdict {
    let mut edits = HeaderEdits {
        remove: vec![settings.identity_headers.user.clone(), settings.identity_headers.groups.clone()],
        set: Vec::new(),
    };
    let identity = match authenticate(settings, cache, headers, now).and_then(|id| authorize(settings, id)) {
        Ok(identity) => identity,
        Err(error) => return Verdict::Deny { error, edits },
    };
    if !settings.forward_credentials {
        for source in &settings.sources {
            if !edits.remove.contains(&source.header) {
                edits.remove.push(source.header.clone());
            }
        }
    }
    edits.set.push((settings.identity_headers.user.clone(), identity.user.clone()));
    edits.set.push((settings.identity_headers.groups.clone(), identity.groups_csv()));
    Verdict::Allow { identity, edits }
}

fn authenticate(
    settings: &Settings,
    cache: &mut TokenCache,
    headers: &[(String, String)],
    now: u64,
) -> Result<Identity, AuthError> {
    match find_credential(headers, &settings.sources) {
        None => Err(AuthError::MissingCredential),
        Some(Credential::ApiKey(key)) => {
            if key.is_empty() {
                return Err(AuthError::InvalidApiKey);
            }
            settings.keys.lookup(key).cloned().ok_or(AuthError::InvalidApiKey)
        }
        Some(Credential::Jwt(token)) => {
            if settings.jwt.is_empty() {
                return Err(AuthError::InvalidToken(JwtError::UnknownIssuer));
            }
            if let Some(hit) = cache.get(token, now) {
                return Ok(hit.identity);
            }
            let verified = settings.jwt.verify(token, now).map_err(AuthError::InvalidToken)?;
            cache.insert(token, &verified, now);
            Ok(verified.identity)
        }
    }
}

fn authorize(settings: &Settings, identity: Identity) -> Result<Identity, AuthError> {
    if settings.allowed_groups.is_empty() || identity.groups.iter().any(|g| settings.allowed_groups.contains(g)) {
        Ok(identity)
    } else {
        Err(AuthError::GroupNotAllowed)
    }
}
