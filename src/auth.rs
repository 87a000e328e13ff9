//! Identity: JWT issue and verification, argon2 passwords (the uid rule is [`crate::uid`]).
//!
//! Tokens are HS256 JWTs signed with the cluster secret, so any node of the cluster accepts a
//! token any other node issued. Only HS256 is accepted: a token whose header names another
//! algorithm (including `none`) is refused before its signature is looked at.

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub use crate::clock::unix_now;
pub use crate::uid::{MAX_UID_BYTES, SYSTEM_SENDER, validate_sender, validate_uid};

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
    /// Issuer: `auth.issuer`.
    pub iss: String,
    /// Audience: the `cluster.id`, so a token of another cluster that shares the secret is refused.
    pub aud: String,
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
    /// Issued before a kick of its uid (`POST /api/kick`).
    #[error("token revoked: its user was kicked after it was issued")]
    Revoked,
    /// Bad signature, wrong algorithm, malformed, a claim missing, or a lifetime longer than
    /// this cluster issues.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens with the cluster secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_s: u64,
    leeway_s: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys for `secret`; tokens name `issuer` and `audience` (the cluster id), live `ttl_s`
    /// seconds, and `leeway_s` of clock skew is allowed.
    pub fn new(secret: &str, issuer: &str, audience: &str, ttl_s: u64, leeway_s: u64) -> TokenKeys {
        // Beyond any configuration `Config::validate` accepts; keeps the clock arithmetic
        // (here and in the JWT library) from overflowing.
        const MAX_S: u64 = 366 * 86_400;
        let (ttl_s, leeway_s) = (ttl_s.min(MAX_S), leeway_s.min(MAX_S));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub", "iss", "aud"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            ttl_s,
            leeway_s,
        }
    }

    /// The clock-skew leeway, in seconds.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    /// Issues a token for `uid` owned by `node` at `url`, valid from `now` (unix seconds).
    pub fn issue(&self, uid: &str, node: &str, url: &str, now: u64) -> (String, Claims) {
        let claims = Claims {
            sub: uid.to_string(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(self.ttl_s),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: random_id(),
            node: node.to_string(),
            url: url.to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail");
        (token, claims)
    }

    /// Verifies a token's algorithm, signature, `exp`, `nbf`, `iss` and `aud`, its `sub`
    /// against the uid rule, and its lifetime: `iat` not in the future and `exp - iat` no
    /// longer than this cluster issues (both with the leeway).
    ///
    /// # Errors
    /// [`TokenError`] saying why it is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, unix_now())
    }

    /// [`TokenKeys::verify`] with the lifetime checks made at `now` (unix seconds);
    /// `exp`/`nbf` are checked by the JWT library against the system clock.
    ///
    /// # Errors
    /// [`TokenError`] saying why it is refused.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => {
                let c = data.claims;
                if validate_uid(&c.sub).is_err() {
                    return Err(TokenError::Invalid("bad sub".into()));
                }
                if c.iat > now.saturating_add(self.leeway_s) {
                    return Err(TokenError::Invalid("issued in the future".into()));
                }
                let longest = self.ttl_s.saturating_add(self.leeway_s);
                if c.exp.saturating_sub(c.iat) > longest {
                    return Err(TokenError::Invalid(format!(
                        "lifetime longer than the {longest} s this cluster issues"
                    )));
                }
                Ok(c)
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => TokenError::Invalid("algorithm not allowed".into()),
                ErrorKind::InvalidIssuer => TokenError::Invalid("wrong issuer".into()),
                ErrorKind::InvalidAudience => {
                    TokenError::Invalid("wrong audience (cluster)".into())
                }
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

/// An argon2id hash of a random password with the parameters of `like` (a configured user's
/// PHC string) or the defaults: checked against when a uid is unknown, so that unknown and
/// known uids take the same time.
pub fn decoy_hash(like: Option<&str>) -> String {
    let params = like
        .and_then(|p| PasswordHash::new(p).ok())
        .and_then(|h| argon2::Params::try_from(&h).ok())
        .unwrap_or_default();
    let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(random_id().as_bytes(), &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
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
        // Look-alikes of the system sender and invisible characters (review rows 11, 12).
        for bad in [
            "$system",
            "\u{ff04}system",
            "\u{200b}$system",
            "\u{fe69}x",
            "a\u{200b}b",
            "\u{202e}bob",
            "a\u{2066}b",
            "\u{feff}alice",
            " ",
            "\u{3000}\u{a0}",
        ] {
            assert!(validate_uid(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["alice ", "a$b", "\u{0430}lice", "\u{ff41}lice", "日本"] {
            assert!(validate_uid(good).is_ok(), "{good:?} must be accepted");
        }
        assert!(validate_sender(SYSTEM_SENDER).is_ok());
        assert!(validate_sender("\u{ff04}system").is_err());
        assert!(validate_sender("bob").is_ok());
    }

    #[test]
    fn tokens_name_issuer_and_cluster_and_have_a_bounded_lifetime() {
        let keys = TokenKeys::new("s3cret", "imgate", "c1", 7200, 30);
        let now = unix_now();
        let (tok, claims) = keys.issue("alice", "n1", "ws://h/ws", now);
        assert_eq!((claims.iss.as_str(), claims.aud.as_str()), ("imgate", "c1"));
        assert!(keys.verify(&tok).is_ok());
        let other_cluster = TokenKeys::new("s3cret", "imgate", "c2", 7200, 30);
        assert!(
            matches!(other_cluster.verify(&tok), Err(TokenError::Invalid(m)) if m.contains("audience"))
        );
        let other_issuer = TokenKeys::new("s3cret", "sso", "c1", 7200, 30);
        assert!(
            matches!(other_issuer.verify(&tok), Err(TokenError::Invalid(m)) if m.contains("issuer"))
        );
        // A token living longer than this cluster issues (row 46).
        let (long, _) =
            TokenKeys::new("s3cret", "imgate", "c1", 7200 + 31, 30).issue("a", "n", "u", now);
        assert!(
            matches!(keys.verify(&long), Err(TokenError::Invalid(m)) if m.contains("lifetime"))
        );
        let (edge, _) =
            TokenKeys::new("s3cret", "imgate", "c1", 7200 + 30, 30).issue("a", "n", "u", now);
        assert!(keys.verify(&edge).is_ok());
        // iat in the future beyond the leeway, even with a valid nbf (row 46).
        let (tok, _) = keys.issue("a", "n", "u", now);
        assert!(
            matches!(keys.verify_at(&tok, now - 31), Err(TokenError::Invalid(m)) if m.contains("future"))
        );
        assert!(keys.verify_at(&tok, now - 30).is_ok());
        // The uid rule applies to `sub` ($system with the right secret, row 43).
        let (sys, _) = keys.issue("$system", "n", "u", now);
        assert!(matches!(keys.verify(&sys), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn token_round_trip_and_claims() {
        let keys = TokenKeys::new("s3cret", "imgate", "c1", 7200, 30);
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
        let keys = TokenKeys::new("s3cret", "imgate", "c1", 7200, 30);
        let now = unix_now();
        let (expired, _) =
            TokenKeys::new("s3cret", "imgate", "c1", 60, 30).issue("a", "n", "u", now - 200);
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));
        let (future, _) = keys.issue("a", "n", "u", now + 600);
        assert_eq!(keys.verify(&future), Err(TokenError::NotYetValid));
        // Within the leeway both are accepted.
        let (soon, _) = keys.issue("a", "n", "u", now + 10);
        assert!(keys.verify(&soon).is_ok());
        let (other, _) =
            TokenKeys::new("other", "imgate", "c1", 7200, 30).issue("a", "n", "u", now);
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
