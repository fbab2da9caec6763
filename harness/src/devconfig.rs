//! A ready-made plugin config for development: one API key and one HS256 JWT issuer
//! with fresh secrets, so `tollgate up` prints curl commands that work as printed.
//! [`with_remote_keys`] adds managed keys (`api_keys.remote`) to a config, as
//! `tollgate up` does.

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

/// `config` with `remote` merged into `api_keys.remote` (fields already there are
/// overwritten; `api_keys` and `remote` are created when absent): managed keys resolved
/// from the tracker (`api_keys.remote`; its cluster and token default to the `usage`
/// section's, which the stack adds). A `config` that is not an object is returned as it is.
pub fn with_remote_keys(mut config: Value, remote: Value) -> Value {
    let Some(obj) = config.as_object_mut() else {
        return config;
    };
    let api_keys = obj.entry("api_keys").or_insert_with(|| json!({}));
    if let Some(api_keys) = api_keys.as_object_mut() {
        let target = api_keys.entry("remote").or_insert_with(|| json!({}));
        match (target.as_object_mut(), remote) {
            (Some(target), Value::Object(fields)) => target.extend(fields),
            (_, remote) => *target = remote,
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_keys_merge_into_api_keys() {
        let creds = DevCredentials::generate();
        let plain = creds.plugin_config();
        assert!(plain["api_keys"].get("remote").is_none(), "the dev config itself has no managed keys");
        let merged = with_remote_keys(plain.clone(), json!({"changes_interval_seconds": 5}));
        assert_eq!(merged["api_keys"]["keys"], plain["api_keys"]["keys"], "the static key stays");
        assert_eq!(merged["api_keys"]["remote"], json!({"changes_interval_seconds": 5}));
        assert_eq!(merged["jwt"], plain["jwt"]);
        let again = with_remote_keys(merged, json!({"ttl_seconds": 30, "changes_interval_seconds": 2}));
        assert_eq!(again["api_keys"]["remote"], json!({"changes_interval_seconds": 2, "ttl_seconds": 30}));
        assert_eq!(with_remote_keys(json!({}), json!({})), json!({"api_keys": {"remote": {}}}));
        assert_eq!(with_remote_keys(json!(null), json!({})), json!(null));
    }
}
