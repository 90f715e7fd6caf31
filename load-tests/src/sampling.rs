//! Resident memory of the system's processes and the sizes of its stores, sampled through a
//! run (`--sample-every`): the figures a soak is judged by (does anything grow without
//! bound once the run has warmed up?).
//!
//! A [`Sampler`] reads `VmRSS` of each watched process and the bytes under each watched
//! directory every interval, in a task of its own, from the first call to the last callback.
//! [`SamplesReport::steady`] then gives each series' least and greatest value after the
//! warm-up ([`WARMUP_SHARE`] of the sampled time) and their spread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The share of the sampled time counted as warm-up: [`SamplesReport::steady`] looks at
/// the samples after it.
pub const WARMUP_SHARE: f64 = 0.25;

/// The shortest interval: reading `/proc` and walking the stores more often than this
/// would be a load of its own.
pub const MIN_EVERY: Duration = Duration::from_millis(500);

/// What is sampled: processes by pid, directories by path.
#[derive(Clone, Debug, Default)]
pub struct Watched {
    /// `(name, pid)`: the resident memory of each.
    pub processes: Vec<(String, u32)>,
    /// `(name, path)`: the bytes of the files under each.
    pub dirs: Vec<(String, PathBuf)>,
}

/// One sampled figure over the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    /// `worker RSS`, `nats-server store`...
    pub name: String,
    /// `MiB` (resident memory) or `MB` (bytes on disk).
    pub unit: &'static str,
    /// One value per sample; `null` where it could not be read (the process was gone).
    pub values: Vec<Option<f64>>,
}

/// A series after the warm-up.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Steady {
    /// The series' name.
    pub name: String,
    /// Its unit.
    pub unit: &'static str,
    /// The first second counted (the end of the warm-up).
    pub from_seconds: f64,
    /// The least value from then on.
    pub min: f64,
    /// The greatest value from then on.
    pub max: f64,
    /// `max / min - 1`: 0.2 is "within 20 %".
    pub spread: f64,
}

/// What a [`Sampler`] read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SamplesReport {
    /// The interval asked for, in seconds.
    pub every_seconds: f64,
    /// When each sample was taken, in seconds from the start of sampling.
    pub seconds: Vec<f64>,
    /// The figures, each with one value per sample.
    pub series: Vec<Series>,
}

impl SamplesReport {
    /// Each series' range after the warm-up ([`WARMUP_SHARE`] of the sampled time); a
    /// series without a value then is left out.
    pub fn steady(&self) -> Vec<Steady> {
        let Some(&last) = self.seconds.last() else {
            return Vec::new();
        };
        let from = last * WARMUP_SHARE;
        self.series
            .iter()
            .filter_map(|series| {
                let after: Vec<f64> = self
                    .seconds
                    .iter()
                    .zip(&series.values)
                    .filter(|(t, _)| **t >= from)
                    .filter_map(|(_, v)| *v)
                    .collect();
                let min = after.iter().copied().reduce(f64::min)?;
                let max = after.iter().copied().reduce(f64::max)?;
                Some(Steady {
                    name: series.name.clone(),
                    unit: series.unit,
                    from_seconds: from,
                    min,
                    max,
                    spread: if min > 0.0 { max / min - 1.0 } else { 0.0 },
                })
            })
            .collect()
    }
}

impl fmt::Display for SamplesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "samples every {:.1} s ({} taken):",
            self.every_seconds,
            self.seconds.len()
        )?;
        write!(f, "  {:>8}", "s")?;
        for series in &self.series {
            write!(f, " | {} ({})", series.name, series.unit)?;
        }
        writeln!(f)?;
        for (i, t) in self.seconds.iter().enumerate() {
            write!(f, "  {t:>8.1}")?;
            for series in &self.series {
                let width = series.name.len() + series.unit.len() + 3;
                match series.values.get(i).copied().flatten() {
                    Some(v) => write!(f, " | {v:>width$.1}")?,
                    None => write!(f, " | {:>width$}", "-")?,
                }
            }
            writeln!(f)?;
        }
        for s in self.steady() {
            writeln!(
                f,
                "  after the warm-up (from {:.0} s): {} {:.1}–{:.1} {}, spread {:.1} %",
                s.from_seconds,
                s.name,
                s.min,
                s.max,
                s.unit,
                s.spread * 100.0
            )?;
        }
        Ok(())
    }
}

/// A running sampling task; [`Sampler::finish`] stops it and returns what it read.
#[derive(Debug)]
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<SamplesReport>,
}

impl Sampler {
    /// Samples `watched` every `every` (at least [`MIN_EVERY`]), first at once.
    pub fn start(every: Duration, watched: Watched) -> Self {
        let every = every.max(MIN_EVERY);
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut report = SamplesReport {
                every_seconds: every.as_secs_f64(),
                seconds: Vec::new(),
                series: watched
                    .processes
                    .iter()
                    .map(|(name, _)| (format!("{name} RSS"), "MiB"))
                    .chain(watched.dirs.iter().map(|(name, _)| (name.clone(), "MB")))
                    .map(|(name, unit)| Series {
                        name,
                        unit,
                        values: Vec::new(),
                    })
                    .collect(),
            };
            let started = Instant::now();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {}
                }
                let values = read_all(&watched).await;
                report.seconds.push(started.elapsed().as_secs_f64());
                for (series, value) in report.series.iter_mut().zip(values) {
                    series.values.push(value);
                }
            }
            report
        });
        Self { stop, task }
    }

    /// Stops sampling; what was read so far (nothing if the task failed).
    pub async fn finish(self) -> SamplesReport {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// One value per watched process, then per watched directory.
async fn read_all(watched: &Watched) -> Vec<Option<f64>> {
    #[expect(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
    let mut values: Vec<Option<f64>> = watched
        .processes
        .iter()
        .map(|(_, pid)| crate::sut::read_usage(*pid).map(|u| u.rss_kib as f64 / 1024.0))
        .collect();
    let dirs: Vec<PathBuf> = watched.dirs.iter().map(|(_, p)| p.clone()).collect();
    // Walking a store is blocking file-system work: off the runtime's threads.
    #[expect(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
    let sizes = tokio::task::spawn_blocking(move || {
        dirs.iter()
            .map(|dir| dir_bytes(dir).map(|bytes| bytes as f64 / 1e6))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    values.extend(sizes);
    values.resize(watched.processes.len() + watched.dirs.len(), None);
    values
}

/// The bytes of the regular files under `dir` (not following links); `None` if `dir`
/// cannot be read. Files that vanish while it is walked (a store compacting) count 0.
pub fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0_u64;
    let mut pending = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(path) = pending.pop() {
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(_) if !first => continue,
            Err(_) => return None,
        };
        first = false;
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                total += entry.metadata().map_or(0, |m| m.len());
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seconds: &[f64], values: &[Option<f64>]) -> SamplesReport {
        SamplesReport {
            every_seconds: 1.0,
            seconds: seconds.to_vec(),
            series: vec![Series {
                name: "worker RSS".to_owned(),
                unit: "MiB",
                values: values.to_vec(),
            }],
        }
    }

    #[test]
    fn steady_leaves_the_warm_up_out() {
        // 0..=8 s: the warm-up is the first 2 s (a quarter of 8), values 10 and 50 are in it.
        let r = report(
            &[0.0, 1.0, 2.0, 4.0, 6.0, 8.0],
            &[
                Some(10.0),
                Some(50.0),
                Some(100.0),
                Some(110.0),
                None,
                Some(105.0),
            ],
        );
        let steady = r.steady();
        assert_eq!(steady.len(), 1);
        let s = &steady[0];
        assert!((s.from_seconds - 2.0).abs() < 1e-9);
        assert!((s.min - 100.0).abs() < 1e-9);
        assert!((s.max - 110.0).abs() < 1e-9);
        assert!((s.spread - 0.1).abs() < 1e-9);
        let text = r.to_string();
        assert!(text.contains("spread 10.0 %"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("6.0 ") && l.trim_end().ends_with(" -")),
            "a missing value is shown as '-': {text}"
        );
    }

    #[test]
    fn a_series_without_values_after_the_warm_up_has_no_steady_range() {
        assert!(report(&[0.0, 4.0], &[Some(1.0), None]).steady().is_empty());
        assert!(report(&[], &[]).steady().is_empty());
    }

    #[test]
    fn dir_bytes_sums_nested_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a"), vec![0_u8; 1000])?;
        std::fs::create_dir(dir.path().join("sub"))?;
        std::fs::write(dir.path().join("sub").join("b"), vec![0_u8; 234])?;
        assert_eq!(dir_bytes(dir.path()), Some(1234));
        assert_eq!(dir_bytes(&dir.path().join("missing")), None);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_sampler_reads_its_own_process() {
        let watched = Watched {
            processes: vec![("harness".to_owned(), std::process::id())],
            dirs: Vec::new(),
        };
        let sampler = Sampler::start(MIN_EVERY, watched);
        // The first sample is taken at once, then one per interval (paused time: the clock
        // moves only when every task waits).
        tokio::time::sleep(MIN_EVERY * 3 + Duration::from_millis(1)).await;
        let report = sampler.finish().await;
        assert!(report.seconds.len() >= 2, "{report:?}");
        let rss = &report.series[0];
        assert_eq!(rss.name, "harness RSS");
        assert!(
            rss.values.iter().all(|v| v.is_some_and(|mib| mib > 1.0)),
            "{rss:?}"
        );
    }
}
