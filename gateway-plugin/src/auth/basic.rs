//! OpenFaaS basic auth, drop-in: `basic_auth=true` with the credentials in
//! `$secret_mount_path/basic-auth-user` and `basic-auth-password` (as OpenFaaS mounts them;
//! surrounding white space trimmed, as OpenFaaS does). That identity holds every scope.

use std::path::Path;

use base64::Engine;
use subtle::ConstantTimeEq;

use super::AuthError;
use super::tokens::sha256;

/// The configured user and password, kept as hashes so that comparing them takes the same time
/// whatever their lengths.
#[derive(Debug)]
pub struct BasicAuth {
    user: String,
    user_hash: [u8; 32],
    password_hash: [u8; 32],
}

fn read_secret(dir: &Path, name: &str) -> Result<String, AuthError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| AuthError::io(&path, e))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(AuthError::BasicAuth(format!("{} is empty", path.display())));
    }
    Ok(text.to_owned())
}

impl BasicAuth {
    /// Reads `basic-auth-user` and `basic-auth-password` under `dir`.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        let user = read_secret(dir, "basic-auth-user")?;
        let password = read_secret(dir, "basic-auth-password")?;
        Ok(Self {
            user_hash: sha256(user.as_bytes()),
            password_hash: sha256(password.as_bytes()),
            user,
        })
    }

    /// The user name, if `credentials` (the part after `Basic `) are the configured ones.
    pub fn check(&self, credentials: &str) -> Option<&str> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .ok()?;
        let colon = decoded.iter().position(|b| *b == b':')?;
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let same_user = sha256(user).ct_eq(&self.user_hash);
        let same_password = sha256(password).ct_eq(&self.password_hash);
        bool::from(same_user & same_password).then_some(self.user.as_str())
    }
}
