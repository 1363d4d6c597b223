//! Tokens and scopes.
//!
//! Auth is on when the server is given an admin token (`--admin-token` or
//! `CITYTSDB_ADMIN_TOKEN`). Every request but `GET /health` then needs a token, as
//! `Authorization: Bearer T`, `Authorization: Token T`, or InfluxDB 1.x's `p=T`.
//! (1.x clients that send a username and password as HTTP Basic auth have the
//! password read as the token.) A token carries scopes: `admin` (everything), `write:DB`, `read:DB`, and
//! `rules:DEPARTMENT` (that department's rules and alerts). `POST /api/v1/tokens`
//! (admin) creates a token and shows its secret once; only its SHA-256 is stored,
//! in `<data-dir>/auth/tokens.json`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use citytsdb_storage::files::write_atomically;
use citytsdb_storage::paths;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One permission of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Writes to a database.
    Write(String),
    /// Queries of a database.
    Read(String),
    /// A department's rules and alerts.
    Rules(String),
}

impl Scope {
    /// Parses `admin`, `write:DB`, `read:DB` or `rules:DEPARTMENT`.
    pub fn parse(s: &str) -> Result<Self> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let need = |what: &str| {
            if arg.is_empty() {
                Err(Error::Invalid(format!(
                    "scope '{s}' names no {what}: use {kind}:NAME"
                )))
            } else {
                Ok(arg.to_string())
            }
        };
        match kind {
            "admin" if arg.is_empty() => Ok(Self::Admin),
            "write" => need("database").map(Self::Write),
            "read" => need("database").map(Self::Read),
            "rules" => need("department").map(Self::Rules),
            _ => Err(Error::Invalid(format!(
                "unknown scope '{s}': use admin, write:DB, read:DB or rules:DEPARTMENT"
            ))),
        }
    }
}

/// Who is calling: the scopes of the request's token (everything when auth is off).
#[derive(Debug, Clone)]
pub struct Caller {
    scopes: Vec<Scope>,
}

impl Caller {
    /// The caller when auth is off, or with the admin token.
    pub fn admin() -> Self {
        Self {
            scopes: vec![Scope::Admin],
        }
    }

    /// Whether the token has `admin`.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    fn has(&self, f: impl Fn(&Scope) -> bool) -> bool {
        self.is_admin() || self.scopes.iter().any(f)
    }

    /// Whether it may write to `db`.
    pub fn can_write(&self, db: &str) -> bool {
        self.has(|s| matches!(s, Scope::Write(d) if d == db))
    }

    /// Whether it may query `db`.
    pub fn can_read(&self, db: &str) -> bool {
        self.has(|s| matches!(s, Scope::Read(d) if d == db))
    }

    /// Whether it may see and change `department`'s rules and alerts.
    pub fn can_manage(&self, department: &str) -> bool {
        self.has(|s| matches!(s, Scope::Rules(d) if d == department))
    }

    /// The scopes, as written.
    pub fn describe(&self) -> String {
        self.scopes
            .iter()
            .map(|s| match s {
                Scope::Admin => "admin".to_string(),
                Scope::Write(d) => format!("write:{d}"),
                Scope::Read(d) => format!("read:{d}"),
                Scope::Rules(d) => format!("rules:{d}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A stored token: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToken {
    /// Token id (not secret).
    pub id: String,
    /// What it is for.
    pub name: String,
    /// Its scopes, as written.
    pub scopes: Vec<String>,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// When it was made, RFC 3339.
    pub created_at: String,
}

/// The token store and the admin token.
pub struct Auth {
    admin_hash: String,
    path: PathBuf,
    tokens: Mutex<Vec<StoredToken>>,
}

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| Error::io("no randomness for a token", std::io::Error::other(e)))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl Auth {
    /// Auth with `admin_token`, keeping tokens under `<data_dir>/auth`.
    pub fn open(data_dir: &Path, admin_token: &str) -> Result<Self> {
        if admin_token.len() < MIN_ADMIN_TOKEN {
            return Err(Error::setting(
                "admin-token",
                format!("at least {MIN_ADMIN_TOKEN} characters"),
            ));
        }
        let dir = paths::auth_dir(data_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = paths::tokens_file(data_dir);
        let tokens = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::io(
                    format!("{} is not readable", path.display()),
                    std::io::Error::other(e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        Ok(Self {
            admin_hash: sha256_hex(admin_token),
            path,
            tokens: Mutex::new(tokens),
        })
    }

    /// The caller a secret identifies, if any.
    pub fn caller(&self, secret: &str) -> Option<Caller> {
        let hash = sha256_hex(secret);
        if hash == self.admin_hash {
            return Some(Caller::admin());
        }
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let t = tokens.iter().find(|t| t.hash == hash)?;
        Some(Caller {
            scopes: t
                .scopes
                .iter()
                .filter_map(|s| Scope::parse(s).ok())
                .collect(),
        })
    }

    /// Replaces the token file; blocks on the disk.
    fn store(&self, tokens: &[StoredToken]) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(tokens)
            .map_err(|e| Error::io("storing tokens", std::io::Error::other(e)))?;
        write_atomically(&self.path, &bytes).map_err(|e| Error::io("storing tokens", e))
    }

    /// Makes a token; returns it and its secret (shown this once). Blocks on the
    /// disk: call it off the async threads.
    pub fn create(
        &self,
        name: &str,
        scopes: &[String],
        now: String,
    ) -> Result<(StoredToken, String)> {
        if scopes.is_empty() {
            return Err(Error::Invalid("a token needs at least one scope".into()));
        }
        for s in scopes {
            Scope::parse(s)?;
        }
        let secret = format!("ctsdb_{}", random_hex(24)?);
        let token = StoredToken {
            id: random_hex(8)?,
            name: name.to_string(),
            scopes: scopes.to_vec(),
            hash: sha256_hex(&secret),
            created_at: now,
        };
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = tokens.clone();
        next.push(token.clone());
        self.store(&next)?;
        *tokens = next;
        Ok((token, secret))
    }

    /// Every token (without secrets).
    pub fn list(&self) -> Vec<StoredToken> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Deletes a token; false if there is none with this id. Blocks on the disk:
    /// call it off the async threads.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let next: Vec<StoredToken> = tokens.iter().filter(|t| t.id != id).cloned().collect();
        if next.len() == tokens.len() {
            return Ok(false);
        }
        self.store(&next)?;
        *tokens = next;
        Ok(true)
    }
}

/// The token a request carries: `Authorization: Bearer T` or `Token T`, or `p=T`.
pub fn token_of(authorization: Option<&str>, query: Option<&str>) -> Option<String> {
    if let Some(h) = authorization {
        let h = h.trim();
        // InfluxDB 1.x clients send the token as a Basic password.
        if let Some(encoded) = h
            .strip_prefix("Basic ")
            .or_else(|| h.strip_prefix("basic "))
        {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())?;
            let (_, password) = decoded.split_once(':')?;
            return Some(password.to_string());
        }
        for prefix in ["Bearer ", "Token ", "bearer ", "token "] {
            if let Some(t) = h.strip_prefix(prefix) {
                return Some(t.trim().to_string());
            }
        }
    }
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "p")
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_tokens() {
        assert_eq!(
            Scope::parse("rules:water").ok(),
            Some(Scope::Rules("water".into()))
        );
        assert!(Scope::parse("rules:")
            .unwrap_err()
            .to_string()
            .contains("names no department"));
        assert!(Scope::parse("root")
            .unwrap_err()
            .to_string()
            .contains("unknown scope"));
        let dir = tempfile::tempdir().unwrap();
        assert!(Auth::open(dir.path(), "short").is_err());
        let auth = Auth::open(dir.path(), "0123456789abcdef").unwrap();
        assert!(auth.caller("0123456789abcdef").unwrap().is_admin());
        let (t, secret) = auth
            .create(
                "water dept",
                &["rules:water".into(), "read:city".into()],
                "now".into(),
            )
            .unwrap();
        assert!(
            !std::fs::read_to_string(dir.path().join("auth/tokens.json"))
                .unwrap()
                .contains(&secret)
        );
        let c = auth.caller(&secret).unwrap();
        assert!(c.can_manage("water") && !c.can_manage("covers"));
        assert!(c.can_read("city") && !c.can_write("city") && !c.is_admin());
        let reopened = Auth::open(dir.path(), "0123456789abcdef").unwrap();
        assert!(reopened.caller(&secret).is_some());
        assert!(reopened.delete(&t.id).unwrap());
        assert!(reopened.caller(&secret).is_none());
        assert_eq!(token_of(Some("Token abc"), None).as_deref(), Some("abc"));
        assert_eq!(token_of(None, Some("db=x&p=s%20t")).as_deref(), Some("s t"));
        assert_eq!(token_of(None, Some("db=x")), None);
        // "city:s3cret" as 1.x clients send it.
        assert_eq!(
            token_of(Some("Basic Y2l0eTpzM2NyZXQ="), None).as_deref(),
            Some("s3cret")
        );
    }
}
