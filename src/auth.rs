//! Client authentication: HS256 JWTs signed with `auth.secret`.
//!
//! A token's claims are `sub` (user id), `name` (display name) and `exp` (unix seconds);
//! all three are required. Verification happens once, before the WebSocket upgrade, so a
//! bad token costs an HTTP 401 and never a socket.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::User;

/// Why a token was refused; the message goes into the 401 body.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("bad token signature")]
    BadSignature,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// The claims a client token carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub exp: u64,
}

/// Verifies client tokens (and, for tests and tools, signs them).
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // PROTOCOL.md: an expired token is refused; the issuer sets `exp` with whatever
        // margin it wants.
        validation.leeway = 0;
        // Tokens may carry more claims than ours (an `aud` included): only added fields,
        // never a reason to refuse.
        validation.validate_aud = false;
        Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// # Errors
    /// Expired, badly signed, or missing a claim.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(AuthError::Invalid("claim `sub` is empty".into()));
        }
        Ok(User {
            id: c.sub,
            name: c.name,
        })
    }
}

/// Signs a token with `secret`: for tests, the load tool and the dev-token mode.
pub fn sign(secret: &str, sub: &str, name: &str, exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        name: name.into(),
        exp,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with an HMAC key cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::now_ms;

    #[test]
    fn accepts_good_and_refuses_bad() {
        let auth = Auth::new("s3cret");
        let exp = now_ms() / 1000 + 60;
        let user = auth.verify(&sign("s3cret", "u1", "Ann", exp)).unwrap();
        assert_eq!((user.id.as_str(), user.name.as_str()), ("u1", "Ann"));
        assert!(matches!(
            auth.verify(&sign("other", "u1", "Ann", exp)),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            auth.verify(&sign("s3cret", "u1", "Ann", now_ms() / 1000 - 120)),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            auth.verify("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
    }
}
