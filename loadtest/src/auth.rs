//! Mints the HS256 JWTs the gateway accepts (`PROTOCOL.md`, "Token"): claims `sub`
//! (user id), `name` and `exp`, signed with the gateway's `auth.secret`.

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    name: &'a str,
    exp: u64,
}

/// Signs tokens with one secret.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    exp: u64,
}

impl Minter {
    /// Tokens valid for `valid_for_s` seconds from now (only checked at the upgrade).
    pub fn new(secret: &str, valid_for_s: u64) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(), // HS256
            exp: crate::report::unix_micros() / 1_000_000 + valid_for_s,
        }
    }

    /// A token for user `sub` named `name`.
    ///
    /// # Errors
    /// Only if signing fails, which HS256 with a byte secret does not.
    pub fn token(&self, sub: &str, name: &str) -> anyhow::Result<String> {
        jsonwebtoken::encode(
            &self.header,
            &Claims {
                sub,
                name,
                exp: self.exp,
            },
            &self.key,
        )
        .context("signing a JWT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn token_verifies_with_the_same_secret() {
        #[derive(serde::Deserialize)]
        struct Back {
            sub: String,
            name: String,
        }
        let t = Minter::new("s3cret", 60).token("u1", "User 1").unwrap();
        let back = jsonwebtoken::decode::<Back>(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::default(),
        )
        .unwrap();
        assert_eq!(
            (back.claims.sub.as_str(), back.claims.name.as_str()),
            ("u1", "User 1")
        );
        assert!(
            jsonwebtoken::decode::<Back>(
                &t,
                &DecodingKey::from_secret(b"other"),
                &Validation::default()
            )
            .is_err()
        );
    }
}
