//! Settings files reread while the gateway runs: the tokens file, the claims policy file, the
//! quotas file and the CORS file are each a [`Reloadable`], and one task ([`watch`]) rereads
//! them all.
//!
//! - Every second each file is read again; when its text differs from the text last read, it is
//!   parsed and, if it parses, put in force whole from the next request ([`Reloadable::current`]).
//! - `SIGHUP` rereads and parses every file at once, changed or not.
//! - A file that no longer parses (or cannot be read) leaves the previous contents in force,
//!   with an error in the log naming the file and what is wrong; it is reported once per
//!   version of the file (and again on each `SIGHUP`), not every second. It never opens up
//!   or locks out more than the last good version did.
//!
//! A leaf: it knows nothing of what the files mean (each owner gives the parser).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the files are read again.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a file could not be loaded at start.
#[derive(Debug)]
pub enum LoadError<E> {
    /// It cannot be read.
    Io(std::io::Error),
    /// Its parser refused it.
    Invalid(E),
}

/// What was last read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Text with this SHA-256 (put in force, or refused).
    Text([u8; 32]),
    /// The file could not be read.
    Unreadable,
}

type Parser<T, E> = Box<dyn Fn(&str) -> Result<T, E> + Send + Sync>;

/// A setting parsed from a file, reread when the file changes ([`watch`]).
pub struct Reloadable<T, E = String> {
    what: &'static str,
    /// The file and its parser (none for a fixed value).
    source: Option<(PathBuf, Parser<T, E>)>,
    current: RwLock<Arc<T>>,
    seen: Mutex<Seen>,
    generation: AtomicU64,
}

impl<T, E> std::fmt::Debug for Reloadable<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.what)
            .field("path", &self.path())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

fn digest(text: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl<T, E> Reloadable<T, E> {
    /// Reads and parses `path` (`what` names it in the log: "tokens file"); `parse` is used
    /// again for every new version of the file.
    pub fn load(
        what: &'static str,
        path: &Path,
        parse: impl Fn(&str) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, LoadError<E>> {
        let text = std::fs::read_to_string(path).map_err(LoadError::Io)?;
        let value = parse(&text).map_err(LoadError::Invalid)?;
        Ok(Self {
            what,
            source: Some((path.to_owned(), Box::new(parse))),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(Seen::Text(digest(&text))),
            generation: AtomicU64::new(0),
        })
    }

    /// A value that comes from no file (never reloaded).
    pub fn fixed(what: &'static str, value: T) -> Self {
        Self {
            what,
            source: None,
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(Seen::Unreadable),
            generation: AtomicU64::new(0),
        }
    }

    /// What is in force now.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many times new contents were put in force since start (what was derived from
    /// older contents can tell it is stale).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|(path, _)| path.as_path())
    }

    /// Puts `value` in force (as a reload would).
    fn put(&self, value: T) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A file [`watch`] rereads (a [`Reloadable`] of any type).
pub trait Watched: Send + Sync {
    /// What it is, for the log ("tokens file").
    fn what(&self) -> &'static str;
    /// The file.
    fn file(&self) -> Option<&Path>;
    /// Rereads the file; parses it when its text changed (or always, with `force`).
    /// `Ok(true)`: new contents are in force; `Ok(false)`: nothing changed (or the error was
    /// already reported for this version); `Err`: the previous contents stay in force.
    fn reload(&self, force: bool) -> Result<bool, String>;
}

impl<T: Send + Sync, E: std::fmt::Display> Watched for Reloadable<T, E> {
    fn what(&self) -> &'static str {
        self.what
    }

    fn file(&self) -> Option<&Path> {
        self.path()
    }

    fn reload(&self, force: bool) -> Result<bool, String> {
        let Some((path, parse)) = &self.source else {
            return Ok(false);
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                let first = *seen != Seen::Unreadable;
                *seen = Seen::Unreadable;
                return if first || force {
                    Err(format!("cannot read {}: {e}", path.display()))
                } else {
                    Ok(false)
                };
            }
        };
        let now = Seen::Text(digest(&text));
        if *seen == now && !force {
            return Ok(false);
        }
        *seen = now;
        let value = parse(&text).map_err(|e| e.to_string())?;
        self.put(value);
        Ok(true)
    }
}

/// Rereads every file of `files` every [`POLL_INTERVAL`] and on `SIGHUP`, until `stop`. The
/// `SIGHUP` handler is installed when this is called (not when the future is first polled), and
/// whether or not there are files: a `SIGHUP` (`systemctl reload`) is a reread, never the
/// signal's default (the end of the process).
pub fn watch(
    files: Vec<Arc<dyn Watched>>,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; the settings files are still polled");
            None
        }
    };
    async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let force = tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => false,
                _ = hup => true,
            };
            if force {
                tracing::info!(
                    files = files.len(),
                    "SIGHUP received: rereading the settings files"
                );
            } else if files.is_empty() {
                continue;
            }
            for file in &files {
                check(file.as_ref(), force);
            }
        }
    }
}

/// One reread of `file`, logged.
fn check(file: &dyn Watched, force: bool) {
    let path = file.file().map(|p| p.display().to_string());
    let path = path.as_deref();
    match file.reload(force) {
        Ok(true) => tracing::info!(path, "{} reloaded: the new contents apply", file.what()),
        Ok(false) => {}
        Err(e) => tracing::error!(
            path,
            error = %e,
            "{} not reloaded; the previous contents stay in force",
            file.what()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(text: &str) -> Result<u32, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a number"))
    }

    #[test]
    fn a_changed_file_applies_a_broken_one_keeps_the_last_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let r = Reloadable::load("number file", &path, number).unwrap();
        assert_eq!(*r.current(), 1);
        assert_eq!(r.reload(false), Ok(false), "unchanged");
        assert_eq!(r.reload(true), Ok(true), "forced");
        assert_eq!(r.generation(), 1);
        std::fs::write(&path, "2").unwrap();
        assert_eq!(r.reload(false), Ok(true));
        assert_eq!(*r.current(), 2);
        std::fs::write(&path, "two").unwrap();
        assert!(r.reload(false).unwrap_err().contains("not a number"));
        assert_eq!(r.reload(false), Ok(false), "reported once");
        assert!(r.reload(true).is_err(), "again when forced");
        assert_eq!(*r.current(), 2, "the last good contents stay");
        std::fs::remove_file(&path).unwrap();
        assert!(r.reload(false).unwrap_err().contains("cannot read"));
        assert_eq!(r.reload(false), Ok(false), "reported once");
        assert_eq!(*r.current(), 2);
        std::fs::write(&path, "3").unwrap();
        assert_eq!(r.reload(false), Ok(true));
        assert_eq!((*r.current(), r.generation()), (3, 3));
        assert!(matches!(
            Reloadable::load("number file", &path.with_extension("x"), number),
            Err(LoadError::Io(_))
        ));
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(
            Reloadable::load("number file", &path, number),
            Err(LoadError::Invalid(_))
        ));
        let fixed = Reloadable::<u32>::fixed("number", 7);
        assert_eq!((fixed.reload(true), *fixed.current()), (Ok(false), 7));
    }
}
