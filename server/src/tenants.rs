//! Tenants: who may use which lock names, and how much, by bearer token.
//!
//! With `--auth-file`, every request must carry `Authorization: Bearer <token>`; the token names a
//! tenant, which has a lock-name prefix it may use and quotas. Without it, every request is the
//! one open tenant [`Tenant::open`] (local use and the demo; the server warns once at start).
//!
//! The file is JSON (re-read on SIGHUP; a file that fails to load leaves the old one in force):
//!
//! ```json
//! {"tenants": [
//!   {"name": "concert", "tokens": ["<secret>"], "token_sha256": ["<hex>"],
//!    "lock_prefix": "concert/", "max_leases": 1000, "max_waiters_per_lock": 100, "max_ttl": "5m"}
//! ]}
//! ```
//!
//! `tokens` lists tokens as written; `token_sha256` lists hex SHA-256 digests of tokens, so the
//! file need not hold the secrets themselves. A tenant's data is isolated by construction: its
//! lock names start with its prefix (prefixes of two tenants may not nest), and its leases are
//! named and authenticated by tenant and handle together (`handle.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use serde::Deserialize;

use crate::keys::LockName;

/// How much a tenant may use. `None`: no limit beyond the server's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Live leases at most (leases granted directly and for `ttl` acquires).
    pub max_leases: Option<u64>,
    /// Waiters queued behind the holder of one lock, at most.
    pub max_waiters_per_lock: Option<u64>,
    /// Longest lease TTL.
    pub max_ttl: Option<Duration>,
}

/// A tenant: a name, the lock names it may use, its quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's name (part of every lease id and handle digest it gets).
    pub name: String,
    /// Every lock name this tenant uses starts with this.
    pub lock_prefix: String,
    /// Its quotas.
    pub quotas: Quotas,
}

impl Tenant {
    /// The tenant of a server without `--auth-file`: every name, no quotas.
    pub fn open() -> Self {
        Self {
            name: "default".into(),
            lock_prefix: String::new(),
            quotas: Quotas::default(),
        }
    }

    /// Whether this tenant may use lock `name`.
    pub fn may_use(&self, name: &LockName) -> bool {
        name.as_str().starts_with(&self.lock_prefix)
    }
}

/// Why a request is refused before it reaches the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token, or one that names no tenant.
    #[error("{0}")]
    Unauthorized(&'static str),
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    tenants: Vec<TenantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_sha256: Vec<String>,
    #[serde(default)]
    lock_prefix: String,
    max_leases: Option<u64>,
    max_waiters_per_lock: Option<u64>,
    max_ttl: Option<String>,
}

/// Token digests → tenants, as loaded from the auth file.
#[derive(Debug, Default)]
struct Table {
    by_token_digest: HashMap<String, Arc<Tenant>>,
}

/// The tenants in force: open (no auth file), or the ones from the auth file, reloadable.
#[derive(Debug, Clone)]
pub struct Tenants {
    file: Option<PathBuf>,
    table: Arc<RwLock<Arc<Table>>>,
    open: Arc<Tenant>,
}

impl Tenants {
    /// No authentication: every request is [`Tenant::open`].
    pub fn open() -> Self {
        Self {
            file: None,
            table: Arc::default(),
            open: Arc::new(Tenant::open()),
        }
    }

    /// Tenants from `path`; fails if the file does not load.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let table = load(path)?;
        Ok(Self {
            file: Some(path.to_owned()),
            table: Arc::new(RwLock::new(Arc::new(table))),
            open: Arc::new(Tenant::open()),
        })
    }

    /// Whether requests must authenticate.
    pub fn required(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the auth file (on SIGHUP). On error the tenants in force stay.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let table = load(path)?;
        let count = table.by_token_digest.len();
        *self.table.write().expect("tenants lock") = Arc::new(table);
        Ok(count)
    }

    /// The tenant a request's `Authorization` header value names.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, AuthError> {
        if !self.required() {
            return Ok(self.open.clone());
        }
        let token = authorization
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Unauthorized(
                "this server requires `Authorization: Bearer <token>`",
            ))?;
        let table = self.table.read().expect("tenants lock").clone();
        table
            .by_token_digest
            .get(&token_digest(token))
            .cloned()
            .ok_or(AuthError::Unauthorized("unknown bearer token"))
    }
}

fn token_digest(token: &str) -> String {
    digest(&SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn load(path: &Path) -> Result<Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("reading auth file {}: {err}", path.display()))?;
    let file: AuthFile = serde_json::from_str(&text)
        .map_err(|err| format!("auth file {}: {err}", path.display()))?;
    let mut table = Table::default();
    let mut prefixes: Vec<(String, String)> = Vec::new();
    for entry in file.tenants {
        if entry.name.is_empty() {
            return Err("auth file: a tenant has an empty name".into());
        }
        for (other, prefix) in &prefixes {
            if prefix.starts_with(&entry.lock_prefix) || entry.lock_prefix.starts_with(prefix) {
                return Err(format!(
                    "auth file: the lock prefixes of tenants {other:?} ({prefix:?}) and {:?} ({:?}) nest, so their names could collide",
                    entry.name, entry.lock_prefix
                ));
            }
        }
        prefixes.push((entry.name.clone(), entry.lock_prefix.clone()));
        let max_ttl = entry
            .max_ttl
            .as_deref()
            .map(humantime::parse_duration)
            .transpose()
            .map_err(|err| format!("auth file: tenant {:?}: max_ttl: {err}", entry.name))?;
        let tenant = Arc::new(Tenant {
            name: entry.name.clone(),
            lock_prefix: entry.lock_prefix,
            quotas: Quotas {
                max_leases: entry.max_leases,
                max_waiters_per_lock: entry.max_waiters_per_lock,
                max_ttl,
            },
        });
        let digests = entry.tokens.iter().map(|token| token_digest(token)).chain(
            entry
                .token_sha256
                .iter()
                .map(|hex| hex.to_ascii_lowercase()),
        );
        let mut any = false;
        for digest in digests {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "auth file: tenant {:?}: a token_sha256 entry is not 64 hex digits",
                    entry.name
                ));
            }
            if table
                .by_token_digest
                .insert(digest, tenant.clone())
                .is_some()
            {
                return Err(format!(
                    "auth file: tenant {:?}: a token is listed twice",
                    entry.name
                ));
            }
            any = true;
        }
        if !any {
            return Err(format!("auth file: tenant {:?} has no token", entry.name));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn tokens_name_their_tenant() {
        let file = write(&format!(
            r#"{{"tenants": [
                {{"name": "a", "tokens": ["tok-a"], "lock_prefix": "a/", "max_leases": 3}},
                {{"name": "b", "token_sha256": ["{}"], "lock_prefix": "b/", "max_ttl": "1m"}}
            ]}}"#,
            token_digest("tok-b")
        ));
        let tenants = Tenants::from_file(file.path()).unwrap();
        let a = tenants.authenticate(Some("Bearer tok-a")).unwrap();
        assert_eq!((a.name.as_str(), a.quotas.max_leases), ("a", Some(3)));
        let b = tenants.authenticate(Some("bearer  tok-b ")).unwrap();
        assert_eq!(b.quotas.max_ttl, Some(Duration::from_secs(60)));
        assert!(b.may_use(&LockName::new("b/x").unwrap()));
        assert!(!b.may_use(&LockName::new("a/x").unwrap()));
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic tok-a"),
            Some("Bearer "),
        ] {
            assert!(tenants.authenticate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nested_prefixes_and_bad_files_are_refused() {
        let nested = write(
            r#"{"tenants": [{"name": "a", "tokens": ["1"], "lock_prefix": "a/"},
                           {"name": "b", "tokens": ["2"], "lock_prefix": "a/b/"}]}"#,
        );
        assert!(
            Tenants::from_file(nested.path())
                .unwrap_err()
                .contains("nest")
        );
        let no_token = write(r#"{"tenants": [{"name": "a", "lock_prefix": "a/"}]}"#);
        assert!(Tenants::from_file(no_token.path()).is_err());
        let unknown = write(r#"{"tenants": [{"name": "a", "tokens": ["1"], "color": 1}]}"#);
        assert!(Tenants::from_file(unknown.path()).is_err());
    }

    #[test]
    fn reload_keeps_the_old_table_on_error() {
        let file = write(r#"{"tenants": [{"name": "a", "tokens": ["1"]}]}"#);
        let tenants = Tenants::from_file(file.path()).unwrap();
        std::fs::write(file.path(), "not json").unwrap();
        assert!(tenants.reload().is_err());
        assert!(tenants.authenticate(Some("Bearer 1")).is_ok());
        std::fs::write(
            file.path(),
            r#"{"tenants": [{"name": "a", "tokens": ["2"]}]}"#,
        )
        .unwrap();
        assert_eq!(tenants.reload(), Ok(1));
        assert!(tenants.authenticate(Some("Bearer 1")).is_err());
        assert!(tenants.authenticate(Some("Bearer 2")).is_ok());
    }

    #[test]
    fn without_a_file_everyone_is_the_open_tenant() {
        let tenants = Tenants::open();
        assert!(!tenants.required());
        assert_eq!(*tenants.authenticate(None).unwrap(), Tenant::open());
    }
}
