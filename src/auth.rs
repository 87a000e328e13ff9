//! Identity: uid rules, JWT issue and verification, argon2 passwords.
//!
//! Tokens are HS256 JWTs signed with the cluster secret, so any node of the cluster accepts a
//! token any other node issued. Only HS256 is accepted: a token whose header names another
//! algorithm (including `none`) is refused before its signature is looked at.

use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Largest uid, in bytes of UTF-8.
pub const MAX_UID_BYTES: usize = 128;

/// Checks the protocol's uid rule: 1 to 128 bytes of UTF-8, no control characters.
///
/// # Errors
/// A human message saying which part of the rule is broken.
pub fn validate_uid(uid: &str) -> Result<(), &'static str> {
    if uid.is_empty() {
        return Err("uid must not be empty");
    }
    if uid.len() > MAX_UID_BYTES {
        return Err("uid must be at most 128 bytes");
    }
    if uid.chars().any(char::is_control) {
        return Err("uid must not contain control characters");
    }
    Ok(())
}

/// The claims of an imgate token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The uid.
    pub sub: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Not before, unix seconds.
    pub nbf: u64,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// Owner node at issue time.
    pub node: String,
    /// That node's WebSocket URL.
    pub url: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No token in the query or the `Authorization` header.
    #[error("missing token")]
    Missing,
    /// The token is past its `exp`.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// Bad signature, wrong algorithm, malformed, or a claim missing.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens with the cluster secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_s: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenKeys {
    /// Keys for `secret`, tokens living `ttl_s` seconds, `leeway_s` of clock skew allowed.
    pub fn new(secret: &str, ttl_s: u64, leeway_s: u64) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl_s,
        }
    }

    /// Issues a token for `uid` owned by `node` at `url`, valid from `now` (unix seconds).
    pub fn issue(&self, uid: &str, node: &str, url: &str, now: u64) -> (String, Claims) {
        let claims = Claims {
            sub: uid.to_string(),
            iat: now,
            nbf: now,
            exp: now + self.ttl_s,
            jti: random_id(),
            node: node.to_string(),
            url: url.to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail");
        (token, claims)
    }

    /// Verifies a token's algorithm, signature, `exp` and `nbf`.
    ///
    /// # Errors
    /// [`TokenError`] saying why it is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => {
                if validate_uid(&data.claims.sub).is_err() {
                    return Err(TokenError::Invalid("bad sub".into()));
                }
                Ok(data.claims)
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => TokenError::Invalid("algorithm not allowed".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    TokenError::Invalid(format!("missing claim {c}"))
                }
                _ => TokenError::Invalid("malformed token".into()),
            }),
        }
    }
}

/// 128 random bits as 32 hex characters.
pub fn random_id() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// A new secret for `cluster.secret`, `auth.jwt_secret` or an API key: 32 bytes from the
/// operating system's random source, base64 (44 characters).
pub fn gen_secret() -> String {
    use argon2::password_hash::rand_core::RngCore;
    use base64::Engine;
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Hashes `password` with argon2id and a random salt, as a PHC string.
///
/// # Errors
/// argon2's error (only for absurd inputs).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Checks `password` against a PHC string. A malformed hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_long_random_and_accepted_on_a_network() {
        use base64::Engine;
        let a = gen_secret();
        let b = gen_secret();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert!(a.len() >= crate::config::MIN_SECRET_BYTES);
        let mut cfg = crate::config::Config::for_test();
        cfg.nodes[0].http = "0.0.0.0:0".parse().unwrap();
        cfg.cluster.secret = a;
        cfg.auth.jwt_secret = b;
        cfg.api.keys = vec![gen_secret()];
        cfg.check_secrets_for("n1").unwrap();
    }

    #[test]
    fn uid_rules() {
        assert!(validate_uid("alice").is_ok());
        assert!(validate_uid("ålice 李").is_ok());
        assert!(validate_uid("").is_err());
        assert!(validate_uid(&"a".repeat(128)).is_ok());
        assert!(validate_uid(&"a".repeat(129)).is_err());
        assert!(validate_uid("a\nb").is_err());
        assert!(validate_uid("a\u{7f}").is_err());
    }

    #[test]
    fn token_round_trip_and_claims() {
        let keys = TokenKeys::new("s3cret", 7200, 30);
        let now = unix_now();
        let (tok, claims) = keys.issue("alice", "n1", "ws://h/ws", now);
        let back = keys.verify(&tok).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.exp, now + 7200);
        assert_eq!(back.nbf, now);
        assert_eq!(back.jti.len(), 32);
        let (tok2, _) = keys.issue("alice", "n1", "ws://h/ws", now);
        assert_ne!(keys.verify(&tok2).unwrap().jti, back.jti);
    }

    #[test]
    fn token_refusals() {
        let keys = TokenKeys::new("s3cret", 7200, 30);
        let now = unix_now();
        let (expired, _) = TokenKeys::new("s3cret", 60, 30).issue("a", "n", "u", now - 200);
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));
        let (future, _) = keys.issue("a", "n", "u", now + 600);
        assert_eq!(keys.verify(&future), Err(TokenError::NotYetValid));
        // Within the leeway both are accepted.
        let (soon, _) = keys.issue("a", "n", "u", now + 10);
        assert!(keys.verify(&soon).is_ok());
        let (other, _) = TokenKeys::new("other", 7200, 30).issue("a", "n", "u", now);
        assert!(matches!(keys.verify(&other), Err(TokenError::Invalid(_))));
        assert!(matches!(
            keys.verify("garbage"),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn passwords() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("pw", &h));
        assert!(!verify_password("nope", &h));
        assert!(!verify_password("pw", "not-a-hash"));
    }
}
