//! Client authentication: HS256 JWTs signed with `auth.secret`.
//!
//! A token's claims are `sub` (user id), `name` (display name) and `exp` (unix seconds);
//! all three are required. An optional `nbf` (unix seconds) is honoured: a token used
//! before it is refused, like an expired one. Verification happens once, before the WebSocket upgrade, so a
//! bad token costs an HTTP 401 and never a socket.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::User;

/// Why a token was refused; the message goes into the 401 body.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
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
        // PROTOCOL.md (hygiene): a token whose `nbf` is in the future is refused, with the
        // same zero leeway as `exp`. `nbf` stays optional: tokens without it are valid.
        validation.validate_nbf = true;
        // Tokens may carry more claims than ours (an `aud` included): only added fields,
        // never a reason to refuse.
        validation.validate_aud = false;
        Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// # Errors
    /// Expired, not yet valid (`nbf`), badly signed, or missing a claim.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
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

    #[test]
    fn honours_nbf_without_leeway() {
        #[derive(Serialize)]
        struct WithNbf<'a> {
            sub: &'a str,
            name: &'a str,
            exp: u64,
            nbf: u64,
        }
        let token = |nbf: u64| {
            let claims = WithNbf {
                sub: "u1",
                name: "Ann",
                exp: now_ms() / 1000 + 7200,
                nbf,
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap()
        };
        let auth = Auth::new("s3cret");
        let now = now_ms() / 1000;
        assert!(matches!(
            auth.verify(&token(now + 3600)),
            Err(AuthError::NotYetValid)
        ));
        assert!(matches!(
            auth.verify(&token(now + 5)),
            Err(AuthError::NotYetValid)
        ));
        assert!(auth.verify(&token(now - 60)).is_ok());
    }
}
