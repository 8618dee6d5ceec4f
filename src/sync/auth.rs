//! Connection auth (protocol §10): the token a client sends in its `Sec-WebSocket-Protocol`
//! header or in `updateAuth`.
//!
//! Tokens are opaque by default and only forwarded to the API server, which validates them.
//! With one of the (deprecated) legacy JWT options — `ZERO_AUTH_SECRET`, `ZERO_AUTH_JWK` or
//! `ZERO_AUTH_JWKS_URL` — the token is verified here (signature, `exp`/`nbf`, `sub` equal to the
//! connection's `userID`, and the configured issuer and audience), and its claims become the
//! `authData` that permission rules read.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value as Json;

use super::protocol::{ErrorBody, ErrorKind};

/// A connection's resolved token.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// Forwarded as is; never decoded.
    Opaque {
        /// The token.
        raw: String,
    },
    /// Verified legacy JWT.
    Jwt {
        /// The token.
        raw: String,
        /// Its payload: `authData` for permissions.
        claims: Json,
    },
}

/// The kind of token a client group is pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// No token.
    None,
    /// An opaque token.
    Opaque,
    /// A JWT.
    Jwt,
}

impl Auth {
    /// The raw token, forwarded as `Authorization: Bearer`.
    pub fn raw(&self) -> &str {
        match self {
            Auth::Opaque { raw } | Auth::Jwt { raw, .. } => raw,
        }
    }

    /// The claims, for JWTs.
    pub fn claims(&self) -> Option<&Json> {
        match self {
            Auth::Jwt { claims, .. } => Some(claims),
            Auth::Opaque { .. } => None,
        }
    }

    /// `exp` of a JWT, in seconds since the epoch.
    pub fn expires_at(&self) -> Option<f64> {
        self.claims().and_then(|c| c["exp"].as_f64())
    }

    fn kind(&self) -> TokenType {
        match self {
            Auth::Opaque { .. } => TokenType::Opaque,
            Auth::Jwt { .. } => TokenType::Jwt,
        }
    }
}

/// The type of an optional token.
pub fn token_type(a: Option<&Auth>) -> TokenType {
    a.map_or(TokenType::None, Auth::kind)
}

/// Where JWT verification keys come from.
#[derive(Debug)]
enum KeySource {
    Secret(Vec<u8>),
    Jwk(Box<Jwk>),
    JwksUrl {
        url: String,
        cache: Mutex<Option<(JwkSet, Instant)>>,
    },
}

/// Legacy JWT verification settings (`ZERO_AUTH_*`).
#[derive(Debug)]
pub struct JwtConfig {
    key: KeySource,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Invalid `ZERO_AUTH_*` settings.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthConfigError(pub String);

/// A remote key set is fetched again at most this often when a token names an unknown key.
const JWKS_REFRESH: Duration = Duration::from_secs(30);

impl JwtConfig {
    /// The verifier for the configured option; `None` when none of them is set. More than one
    /// is an error, as in zero-cache.
    pub fn from_options(
        secret: Option<&str>,
        jwk: Option<&str>,
        jwks_url: Option<&str>,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Option<JwtConfig>, AuthConfigError> {
        let set = [secret.is_some(), jwk.is_some(), jwks_url.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set > 1 {
            return Err(AuthConfigError(
                "only one of ZERO_AUTH_JWK, ZERO_AUTH_JWKS_URL and ZERO_AUTH_SECRET may be set"
                    .into(),
            ));
        }
        let key = if let Some(s) = secret {
            KeySource::Secret(s.as_bytes().to_vec())
        } else if let Some(j) = jwk {
            let jwk: Jwk = serde_json::from_str(j)
                .map_err(|e| AuthConfigError(format!("ZERO_AUTH_JWK is not a valid JWK: {e}")))?;
            DecodingKey::from_jwk(&jwk)
                .map_err(|e| AuthConfigError(format!("ZERO_AUTH_JWK cannot verify tokens: {e}")))?;
            KeySource::Jwk(Box::new(jwk))
        } else if let Some(u) = jwks_url {
            url::Url::parse(u)
                .map_err(|e| AuthConfigError(format!("ZERO_AUTH_JWKS_URL is not a URL: {e}")))?;
            KeySource::JwksUrl {
                url: u.to_string(),
                cache: Mutex::new(None),
            }
        } else {
            return Ok(None);
        };
        Ok(Some(JwtConfig {
            key,
            issuer: issuer.map(str::to_string),
            audience: audience.map(str::to_string),
        }))
    }

    async fn key_for(&self, header: &jsonwebtoken::Header) -> Result<DecodingKey, String> {
        match &self.key {
            KeySource::Secret(s) => Ok(DecodingKey::from_secret(s)),
            KeySource::Jwk(j) => DecodingKey::from_jwk(j).map_err(|e| e.to_string()),
            KeySource::JwksUrl { url, cache } => {
                let pick = |set: &JwkSet| -> Option<Jwk> {
                    match &header.kid {
                        Some(k) => set.find(k).cloned(),
                        None => set.keys.first().cloned(),
                    }
                };
                let cached = {
                    let c = cache.lock().expect("jwks cache lock");
                    c.as_ref()
                        .map(|(set, at)| (pick(set), at.elapsed() < JWKS_REFRESH))
                };
                let jwk = match cached {
                    Some((Some(j), _)) => j,
                    Some((None, true)) => return Err("no matching key in the JWKS".into()),
                    _ => {
                        let set = fetch_jwks(url).await?;
                        let j = pick(&set);
                        *cache.lock().expect("jwks cache lock") = Some((set, Instant::now()));
                        j.ok_or("no matching key in the JWKS")?
                    }
                };
                DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())
            }
        }
    }

    /// Verifies `token` for `user_id` and returns its claims.
    pub async fn verify(&self, token: &str, user_id: &str) -> Result<Json, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let key = self.key_for(&header).await?;
        let mut v = Validation::new(header.alg);
        v.required_spec_claims.clear();
        v.leeway = 0;
        v.sub = Some(user_id.to_string());
        match &self.issuer {
            Some(i) => v.set_issuer(&[i]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        jsonwebtoken::decode::<Json>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }
}

async fn fetch_jwks(url: &str) -> Result<JwkSet, String> {
    let r = super::fetch::http_client()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("fetching the JWKS failed: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("fetching the JWKS returned status {}", r.status()));
    }
    let text = r.text().await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("invalid JWKS: {e}"))
}

fn unauthorized(message: &str) -> ErrorBody {
    ErrorBody::new(ErrorKind::Unauthorized, message)
}

/// Resolves a connection's next auth from its previous one and the token it sent (zero-cache's
/// `resolveAuth`): no token after a token is refused, a token needs a userID, JWTs are verified
/// and must keep their `sub` (a newer `iat` wins), and the token type never changes.
pub async fn resolve(
    jwt: Option<&JwtConfig>,
    previous: Option<&Auth>,
    user_id: Option<&str>,
    wire: Option<&str>,
) -> Result<Option<Auth>, ErrorBody> {
    let wire = wire.filter(|w| !w.is_empty());
    let Some(token) = wire else {
        if previous.is_some() {
            return Err(unauthorized(
                "No token provided. An unauthenticated client cannot connect to an authenticated client group.",
            ));
        }
        return Ok(None);
    };
    let Some(user_id) = user_id else {
        return Err(unauthorized("Authenticated connections require a userID."));
    };
    let Some(cfg) = jwt else {
        if let Some(Auth::Jwt { .. }) = previous {
            return Err(unauthorized(
                "Token type cannot change from JWT to opaque. Connections are pinned to a single token type.",
            ));
        }
        return Ok(Some(Auth::Opaque {
            raw: token.to_string(),
        }));
    };
    let claims = cfg.verify(token, user_id).await.map_err(|e| {
        ErrorBody::new(
            ErrorKind::AuthInvalidated,
            format!("Failed to decode auth token: {e}"),
        )
    })?;
    let next = Auth::Jwt {
        raw: token.to_string(),
        claims,
    };
    match previous {
        None => Ok(Some(next)),
        Some(Auth::Opaque { .. }) => Err(unauthorized(
            "Token type cannot change from opaque to JWT. Client groups are pinned to a single token type.",
        )),
        Some(prev @ Auth::Jwt { claims: old, .. }) => {
            let new = next.claims().expect("jwt");
            if old["sub"] != new["sub"] {
                return Err(unauthorized(
                    "The user id in the new token does not match the previous token. Client groups are pinned to a single user.",
                ));
            }
            match (old["iat"].as_f64(), new["iat"].as_f64()) {
                (None, _) => Ok(Some(next)),
                (Some(_), None) => Err(unauthorized(
                    "The new token does not have an issued at time but the prior token does.",
                )),
                (Some(a), Some(b)) if a < b => Ok(Some(next)),
                _ => Ok(Some(prev.clone())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn token(secret: &str, claims: Json) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[tokio::test]
    async fn jwt_rules() {
        let cfg = JwtConfig::from_options(Some("k"), None, None, Some("iss1"), Some("aud1"))
            .unwrap()
            .unwrap();
        let good = json!({"sub": "u1", "iss": "iss1", "aud": "aud1", "iat": 10, "exp": now() + 60, "role": "admin"});
        let t = token("k", good.clone());
        let a = resolve(Some(&cfg), None, Some("u1"), Some(&t))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.claims().unwrap()["role"], "admin");
        let kind = |r: Result<Option<Auth>, ErrorBody>| r.unwrap_err().kind;
        // Bad signature, other user, issuer, audience, expired.
        assert_eq!(
            kind(
                resolve(
                    Some(&cfg),
                    None,
                    Some("u1"),
                    Some(&token("x", good.clone()))
                )
                .await
            ),
            ErrorKind::AuthInvalidated
        );
        assert_eq!(
            kind(resolve(Some(&cfg), None, Some("u2"), Some(&t)).await),
            ErrorKind::AuthInvalidated
        );
        let mut c = good.clone();
        c["iss"] = json!("other");
        assert_eq!(
            kind(resolve(Some(&cfg), None, Some("u1"), Some(&token("k", c))).await),
            ErrorKind::AuthInvalidated
        );
        let mut c = good.clone();
        c["aud"] = json!("other");
        assert_eq!(
            kind(resolve(Some(&cfg), None, Some("u1"), Some(&token("k", c))).await),
            ErrorKind::AuthInvalidated
        );
        let mut c = good.clone();
        c["exp"] = json!(now() - 5);
        assert_eq!(
            kind(resolve(Some(&cfg), None, Some("u1"), Some(&token("k", c))).await),
            ErrorKind::AuthInvalidated
        );
        // Newer iat wins; older keeps the previous; no token after a token is refused.
        let mut c = good.clone();
        c["iat"] = json!(20);
        let newer = resolve(Some(&cfg), Some(&a), Some("u1"), Some(&token("k", c)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(newer.claims().unwrap()["iat"], 20);
        let kept = resolve(Some(&cfg), Some(&newer), Some("u1"), Some(&t))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.claims().unwrap()["iat"], 20);
        assert_eq!(
            kind(resolve(Some(&cfg), Some(&a), Some("u1"), None).await),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            kind(resolve(Some(&cfg), None, None, Some(&t)).await),
            ErrorKind::Unauthorized
        );
        // Opaque tokens: not decoded; a JWT connection cannot switch to them.
        let o = resolve(None, None, Some("u1"), Some("opaque"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            o,
            Auth::Opaque {
                raw: "opaque".into()
            }
        );
        assert_eq!(
            kind(resolve(None, Some(&a), Some("u1"), Some("opaque")).await),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            kind(resolve(Some(&cfg), Some(&o), Some("u1"), Some(&t)).await),
            ErrorKind::Unauthorized
        );
        assert!(JwtConfig::from_options(Some("k"), None, Some("http://x"), None, None).is_err());
    }

    #[tokio::test]
    async fn jwk_option() {
        use base64::Engine as _;
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("jwk-secret");
        let jwk = json!({"kty": "oct", "k": k, "alg": "HS256"}).to_string();
        let cfg = JwtConfig::from_options(None, Some(&jwk), None, None, None)
            .unwrap()
            .unwrap();
        let t = token("jwk-secret", json!({"sub": "u1", "aud": "anything"}));
        let a = resolve(Some(&cfg), None, Some("u1"), Some(&t))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.claims().unwrap()["sub"], "u1");
        let bad = token("other", json!({"sub": "u1"}));
        assert!(
            resolve(Some(&cfg), None, Some("u1"), Some(&bad))
                .await
                .is_err()
        );
        assert!(JwtConfig::from_options(None, Some("{not json"), None, None, None).is_err());
    }
}
