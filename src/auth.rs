//! Who is asking: the operator (`--token`, an admin JWT, or a gateway with
//! no credential configured) or an owner (the `sub` of a JWT), and how JWTs
//! are verified.
//!
//! A JWT is checked against keys each bound to one algorithm when the
//! gateway starts (`--jwt-secret`: HS256; `--jwt-public-key`: RS256, ES256
//! or EdDSA by the key's type; `--jwt-jwks`: each key's `alg`, else its
//! type). A token whose header names another algorithm finds no key: that
//! refuses `none` and the HS256-signed-with-the-public-key confusion before
//! any signature is checked. `exp` and `sub` are required, `nbf` is
//! honoured, both with 30 s of leeway for clocks that differ; `iss` and
//! `aud` are checked when the gateway is told them.

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::ApiError;

/// Seconds of clock difference forgiven on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// The `scope` entry that makes a JWT an operator token.
pub const ADMIN_SCOPE: &str = "agentgate:admin";

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Sees and manages every session: `--token`, a JWT whose `scope` holds
    /// `agentgate:admin` (`sub` kept as the owner of what it creates), or
    /// anyone when the gateway has no credential configured.
    Operator {
        /// The JWT's `sub`, if the operator came with one.
        sub: Option<String>,
    },
    /// A JWT holder: reaches only the sessions it created.
    Owner {
        /// The JWT's `sub`.
        sub: String,
        /// Profiles it may use (`agents` claim); `None`: all.
        agents: Option<Vec<String>>,
    },
}

impl Caller {
    /// The operator of a gateway without JWTs (`--token`, or no credential).
    pub const OPERATOR: Caller = Caller::Operator { sub: None };

    /// Whether it sees every session.
    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::Operator { .. })
    }

    /// The owner of the sessions it creates.
    pub fn sub(&self) -> Option<&str> {
        match self {
            Caller::Operator { sub } => sub.as_deref(),
            Caller::Owner { sub, .. } => Some(sub),
        }
    }

    /// Whether it may reach a session owned by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self {
            Caller::Operator { .. } => true,
            Caller::Owner { sub, .. } => owner == Some(sub.as_str()),
        }
    }

    /// Whether it may use profile `agent` (the `agents` claim).
    pub fn may_use(&self, agent: &str) -> bool {
        match self {
            Caller::Owner {
                agents: Some(list), ..
            } => list.iter().any(|a| a == agent),
            _ => true,
        }
    }

    /// 403 unless it may use profile `agent`.
    pub fn check_agent(&self, agent: &str) -> Result<(), ApiError> {
        if self.may_use(agent) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token may not use agent {agent:?} (its `agents` claim)"
            )))
        }
    }

    /// For audit lines: `operator` or `owner`.
    pub fn kind(&self) -> &'static str {
        match self {
            Caller::Operator { .. } => "operator",
            Caller::Owner { .. } => "owner",
        }
    }
}

/// The claims the gateway reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    agents: Option<Vec<String>>,
    /// OAuth style: one space-separated string, or a list.
    #[serde(default)]
    scope: Option<serde_json::Value>,
}

/// One verification key and the one algorithm it accepts.
struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies JWTs against the configured keys.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Key material is not printed: only which algorithms are accepted.
impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<String> = self.keys.iter().map(|k| format!("{:?}", k.alg)).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// Shortest `--jwt-secret` accepted: an HS256 key shorter than its hash
/// can be brute-forced from one token.
pub const MIN_SECRET_BYTES: usize = 32;

impl JwtVerifier {
    /// A verifier with no key yet.
    pub fn new(issuer: Option<String>, audience: Option<String>) -> JwtVerifier {
        JwtVerifier {
            keys: Vec::new(),
            issuer,
            audience,
        }
    }

    /// Whether any key was added.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Accepts HS256 tokens signed with `secret`.
    pub fn add_secret(&mut self, secret: &[u8]) -> Result<(), String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "an HS256 secret needs at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"
            ));
        }
        self.keys.push(Key {
            alg: Algorithm::HS256,
            kid: None,
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// Accepts tokens signed by the private half of a PEM public key: RS256
    /// for an RSA key, ES256 for an EC (P-256) key, EdDSA for an Ed25519 key.
    pub fn add_public_key_pem(&mut self, pem: &[u8]) -> Result<(), String> {
        let text = String::from_utf8_lossy(pem);
        if text.contains("PRIVATE KEY") {
            return Err("this is a private key; give the gateway the public key only".into());
        }
        let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            (Algorithm::RS256, k)
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            (Algorithm::ES256, k)
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            (Algorithm::EdDSA, k)
        } else {
            return Err("not a PEM public key of type RSA, EC (P-256) or Ed25519".into());
        };
        self.keys.push(Key {
            alg,
            kid: None,
            key,
        });
        Ok(())
    }

    /// Accepts tokens signed by the keys of a JWKS document (public keys
    /// only: RSA, EC P-256, Ed25519), each bound to its `alg` or, without
    /// one, to its type's algorithm. A token's `kid` picks the key.
    pub fn add_jwks(&mut self, json: &[u8]) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut added = 0;
        for (i, jwk) in set.keys.iter().enumerate() {
            let by_type = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => {
                    return Err(format!(
                        "key {i}: only RSA, EC P-256 and Ed25519 public keys are accepted"
                    ))
                }
            };
            let alg = match jwk.common.key_algorithm {
                Some(named) => named
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|e| format!("key {i}: {e}"))?,
                None => by_type,
            };
            if alg != by_type {
                return Err(format!(
                    "key {i}: alg {alg:?} does not fit its key type (expected {by_type:?})"
                ));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            self.keys.push(Key {
                alg,
                kid: jwk.common.key_id.clone(),
                key,
            });
            added += 1;
        }
        if added == 0 {
            return Err("the JWKS has no keys".into());
        }
        Ok(added)
    }

    /// Reads `--jwt-public-key` or `--jwt-jwks` from `path`.
    pub fn add_file(&mut self, path: &Path, jwks: bool) -> Result<(), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        if jwks {
            self.add_jwks(&bytes).map(|_| ())
        } else {
            self.add_public_key_pem(&bytes)
        }
    }

    /// The caller `token` proves, or why it proves nothing (a short reason
    /// for the audit line; never the token).
    pub fn verify(&self, token: &str) -> Result<Caller, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        let mut reason = "no key for this algorithm";
        for k in self.keys.iter().filter(|k| k.alg == header.alg) {
            if let (Some(want), Some(have)) = (&header.kid, &k.kid) {
                if want != have {
                    reason = "unknown key id";
                    continue;
                }
            }
            match jsonwebtoken::decode::<Claims>(token, &k.key, &self.validation(k.alg)) {
                Ok(data) => return caller_of(data.claims),
                Err(e) => reason = refusal(e.kind()),
            }
        }
        Err(reason)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }
}

fn caller_of(claims: Claims) -> Result<Caller, &'static str> {
    let sub = claims
        .sub
        .filter(|s| !s.trim().is_empty())
        .ok_or("missing sub")?;
    let admin = match &claims.scope {
        Some(serde_json::Value::String(s)) => s.split_whitespace().any(|s| s == ADMIN_SCOPE),
        Some(serde_json::Value::Array(list)) => list.iter().any(|s| s == ADMIN_SCOPE),
        _ => false,
    };
    Ok(if admin {
        Caller::Operator { sub: Some(sub) }
    } else {
        Caller::Owner {
            sub,
            agents: claims.agents,
        }
    })
}

fn refusal(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid (nbf)",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not accepted",
        K::MissingRequiredClaim(c) if c == "sub" => "missing sub",
        K::MissingRequiredClaim(c) if c == "exp" => "missing exp",
        K::MissingRequiredClaim(_) => "missing claim",
        _ => "malformed token",
    }
}

/// A directory name for owner `sub` that is safe whatever `sub` holds:
/// ASCII letters, digits, `-` and `_` stay; every other byte becomes `%XX`
/// (so `.`, `..` and `/` cannot appear, and two subs never share a name);
/// a name that would be long is cut and ends with `~` and 32 hex digits of
/// SHA-256 of the whole `sub` (`~` is never left unescaped, so cut names
/// cannot meet whole ones).
pub fn owner_dir_name(sub: &str) -> String {
    use std::fmt::Write;
    const KEEP: usize = 64;
    const MAX: usize = 120;
    let mut out = String::with_capacity(sub.len());
    for b in sub.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.is_empty() {
        // `sub` is never empty (refused at verification); still never "".
        return "%".into();
    }
    if out.len() > MAX {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(sub.as_bytes());
        out.truncate(KEEP);
        out.push('~');
        for b in &digest[..16] {
            let _ = write!(out, "{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_are_plain_file_names() {
        assert_eq!(owner_dir_name("alice"), "alice");
        assert_eq!(owner_dir_name("a.b"), "a%2Eb");
        assert_eq!(owner_dir_name(".."), "%2E%2E");
        assert_eq!(owner_dir_name("/"), "%2F");
        assert_eq!(owner_dir_name("a/b"), "a%2Fb");
        assert_eq!(owner_dir_name("é"), "%C3%A9");
        assert_ne!(owner_dir_name("a%2Fb"), owner_dir_name("a/b"));
        let long = "x".repeat(10_000);
        let name = owner_dir_name(&long);
        assert!(name.len() <= 64 + 1 + 32, "{name}");
        assert_ne!(name, owner_dir_name(&"x".repeat(10_001)));
        for sub in ["..", "/", "a/b", "\0", "~", " ", &long] {
            let n = owner_dir_name(sub);
            assert!(!n.is_empty() && n != "." && n != ".." && !n.contains('/'));
        }
    }

    #[test]
    fn callers_see_their_own() {
        let alice = Caller::Owner {
            sub: "alice".into(),
            agents: Some(vec!["demo".into()]),
        };
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(None));
        assert!(alice.may_use("demo") && !alice.may_use("python"));
        assert!(Caller::OPERATOR.may_see(Some("bob")) && Caller::OPERATOR.may_see(None));
    }
}
