//! Group commit for sled: many writers that each need their write on disk share one `fsync`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;

/// Group commit: many calls completing together share one `fsync`. A writer takes a ticket;
/// if no flush is running it becomes the leader and flushes (on the blocking pool) for every
/// ticket taken so far; otherwise it waits for a flush that covers its ticket.
/// (sled's own `flush_async` was seen to hang with many concurrent callers.)
#[derive(Debug)]
pub struct GroupFlush {
    requested: AtomicU64,
    running: AtomicBool,
    flushed: watch::Sender<u64>,
}

impl Default for GroupFlush {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupFlush {
    /// A flusher with no flush done yet.
    pub fn new() -> Self {
        Self {
            requested: AtomicU64::new(0),
            running: AtomicBool::new(false),
            flushed: watch::channel(0).0,
        }
    }

    /// Returns once everything written to `db` before the call is on disk.
    pub async fn flush(&self, db: &sled::Db) -> sled::Result<()> {
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut rx = self.flushed.subscribe();
        loop {
            if *rx.borrow_and_update() >= ticket {
                return Ok(());
            }
            if !self.running.swap(true, Ordering::AcqRel) {
                let covered = self.requested.load(Ordering::Acquire);
                let db = db.clone();
                let result = tokio::task::spawn_blocking(move || db.flush()).await;
                self.running.store(false, Ordering::Release);
                match result {
                    Ok(Ok(_)) => {
                        self.flushed.send_modify(|f| *f = (*f).max(covered));
                    }
                    Ok(Err(e)) => {
                        // Wake the waiters so one of them retries.
                        self.flushed.send_modify(|_| {});
                        return Err(e);
                    }
                    Err(join) => {
                        self.flushed.send_modify(|_| {});
                        return Err(sled::Error::Io(std::io::Error::other(join)));
                    }
                }
                continue;
            }
            // Another task is flushing; its flush may not cover us, so look again afterwards.
            if rx.changed().await.is_err() {
                return Err(sled::Error::Io(std::io::Error::other(
                    "flush channel closed",
                )));
            }
        }
    }
}
