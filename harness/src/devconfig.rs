//! A ready-made plugin config for development: one API key and one HS256 JWT issuer
//! with fresh secrets, so `tollgate up` prints curl commands that work as printed.

use serde_json::{json, Value};

use crate::dev;

pub struct DevCredentials {
    pub api_key: String,
    pub user: String,
    pub groups: Vec<String>,
    pub jwt_secret: String,
    pub kid: String,
    pub issuer: String,
    pub jwt_user: String,
}

impl DevCredentials {
    pub fn generate() -> Self {
        Self {
            api_key: dev::new_api_key(),
            user: "dev-user".into(),
            groups: vec!["premium".into()],
            jwt_secret: dev::new_secret(),
            kid: "dev-key".into(),
            issuer: "dev".into(),
            jwt_user: "jwt-user".into(),
        }
    }

    /// The plugin config that accepts these credentials.
    pub fn plugin_config(&self) -> Value {
        json!({
            "api_keys": {"keys": [dev::key_entry(&self.api_key, &self.user, &self.groups)]},
            "jwt": {"providers": [{
                "issuer": self.issuer,
                "jwks": dev::jwks(self.jwt_secret.as_bytes(), Some(&self.kid)),
            }]},
        })
    }

    /// A token for the JWT provider valid for `ttl_secs`.
    pub fn token(&self, ttl_secs: u64) -> anyhow::Result<String> {
        let claims = dev::claims(&self.issuer, &self.jwt_user, &self.groups, Some(ttl_secs), None);
        dev::mint_jwt(self.jwt_secret.as_bytes(), Some(&self.kid), &claims)
    }
}
