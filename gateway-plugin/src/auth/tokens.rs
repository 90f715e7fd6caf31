//! API tokens from a file (`--auth-tokens-file`): one token a line,
//!
//! ```text
//! # name   sha256 of the token (hex)                                          scopes
//! ci-bot   9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   invoke:team-a read:team-a
//! ```
//!
//! Only the SHA-256 of each token is stored (the tokens are long random strings, so a plain
//! hash is enough); a presented token is hashed and compared with every entry in constant time.
//! The file is a [`crate::reload::Reloadable`]: reread when it changes (checked every second,
//! and at once on SIGHUP); a file that no longer parses leaves the previous table in force,
//! with an error in the log.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::AuthError;
use super::scope::Scopes;
use crate::reload::{LoadError, Reloadable, Watched};

/// One token's entry.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    hash: [u8; 32],
    scopes: Scopes,
}

/// The token table, reloadable.
#[derive(Debug)]
pub struct TokenStore {
    file: Arc<Reloadable<Vec<Entry>, AuthError>>,
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, AuthError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| AuthError::TokensFile {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(hash)) = (words.next(), words.next()) else {
            return Err(bad(
                "expected: name, SHA-256 of the token (hex), scopes".into()
            ));
        };
        let hash = parse_hex(hash).ok_or_else(|| {
            bad("the second field must be the SHA-256 of the token, 64 hex digits (printf %s \"$TOKEN\" | sha256sum)".into())
        })?;
        let scopes = Scopes::parse_strict(words).map_err(|e| bad(e.to_string()))?;
        if scopes == Scopes::default() {
            return Err(bad(format!("token {name:?} has no scopes")));
        }
        if entries.iter().any(|e| e.name == name) {
            return Err(bad(format!("token name {name:?} appears twice")));
        }
        if entries.iter().any(|e| bool::from(e.hash.ct_eq(&hash))) {
            return Err(bad(format!("token {name:?} has the same hash as another")));
        }
        entries.push(Entry {
            name: name.to_owned(),
            hash,
            scopes,
        });
    }
    Ok(entries)
}

impl TokenStore {
    /// Loads the file (an error stops the gateway at start).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let owned = path.to_owned();
        let file = Reloadable::load("tokens file", path, move |text| {
            let entries = parse(&owned, text)?;
            if entries.is_empty() {
                tracing::warn!(path = %owned.display(), "the tokens file has no tokens");
            }
            Ok(entries)
        })
        .map_err(|e| match e {
            LoadError::Io(e) => AuthError::io(path, e),
            LoadError::Invalid(e) => e,
        })?;
        Ok(Self {
            file: Arc::new(file),
        })
    }

    /// The file, for [`crate::reload::watch`].
    pub fn watched(&self) -> Arc<dyn Watched> {
        self.file.clone()
    }

    /// The name and scopes of `token`, if it is one of the file's.
    pub fn lookup(&self, token: &str) -> Option<(String, Scopes)> {
        let presented = sha256(token.as_bytes());
        let table = self.file.current();
        // Every entry is compared, whichever matches.
        let mut found = None;
        for entry in table.iter() {
            let same = bool::from(entry.hash.ct_eq(&presented));
            if same && found.is_none() {
                found = Some(entry);
            }
        }
        found.map(|e| (e.name.clone(), e.scopes.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_refuses_mistakes() {
        let p = Path::new("t");
        let h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let ok = parse(p, &format!("# c\n\n bot {h} invoke:a read:*\n")).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].hash, sha256(b"test"));
        for bad in [
            "bot".to_owned(),
            format!("bot {h}"),
            format!("bot {} invoke:a", &h[..63]),
            format!("bot {h} write:a"),
            format!("bot {h} invoke:a\nbot2 {h} read:a"),
            "bot test invoke:a".to_owned(),
        ] {
            let e = parse(p, &bad).unwrap_err().to_string();
            assert!(!e.contains("test invoke"), "no token text in {e}");
        }
    }
}
