//! Every fuzz target under `cargo test`: its seeds, the committed seed files, the inputs kept
//! from earlier crashes (`fuzz/regressions/<target>/`), and a seeded mutation loop over the
//! seeds (`FUZZ_SMOKE_ITERATIONS` per target, default 2000). A failing input is written to
//! `fuzz/artifacts/<target>/` and named in the failure.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fuzz_targets::Target;
use fuzz_targets::mutate::mutate;

fuzz_targets::limit_memory!(1 << 30);

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Runs `target` on `input`; on a failure keeps the input and fails naming it.
fn run_kept(target: Target, input: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| target.run(input))).is_ok() {
        return;
    }
    let dir = fuzz_dir().join("artifacts").join(target.name());
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("smoke-{:016x}", fnv1a(input));
    std::fs::write(dir.join(&name), input).unwrap();
    panic!(
        "{} failed on {origin}, kept as fuzz/artifacts/{}/{name}: {input:02x?}",
        target.name(),
        target.name()
    );
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn every_seed_passes_its_target() {
    for target in Target::ALL {
        let seeds = target.seeds();
        assert!(!seeds.is_empty(), "{} has no seeds", target.name());
        for (i, seed) in seeds.iter().enumerate() {
            run_kept(target, seed, &format!("seed {i}"));
        }
    }
}

/// The seed files cargo-fuzz starts from are the seeds the code makes
/// (`FUZZ_UPDATE_SEEDS=1 cargo test -p fuzz-targets` rewrites them).
#[test]
fn committed_seeds_are_the_generated_ones() {
    for target in Target::ALL {
        let dir = fuzz_dir().join("seeds").join(target.name());
        let expected: Vec<(String, Vec<u8>)> = target
            .seeds()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("seed-{i:02}"), s))
            .collect();
        if std::env::var_os("FUZZ_UPDATE_SEEDS").is_some() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &expected {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let committed: Vec<(String, Vec<u8>)> = files(&dir)
            .into_iter()
            .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().into_owned(), b))
            .collect();
        assert!(
            committed == expected,
            "fuzz/seeds/{} is out of date: FUZZ_UPDATE_SEEDS=1 cargo test -p fuzz-targets",
            target.name()
        );
    }
}

#[test]
fn kept_crash_inputs_pass() {
    for target in Target::ALL {
        let dir = fuzz_dir().join("regressions").join(target.name());
        for (path, input) in files(&dir) {
            run_kept(target, &input, &path.display().to_string());
        }
    }
}

#[test]
fn mutated_seeds_pass() {
    let iterations: usize = std::env::var("FUZZ_SMOKE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for (i, target) in Target::ALL.into_iter().enumerate() {
        let mut rng = fastrand::Rng::with_seed(0x5eed + i as u64);
        let seeds = target.seeds();
        for n in 0..iterations {
            let mut input = seeds[n % seeds.len()].clone();
            mutate(&mut rng, &mut input, &seeds);
            run_kept(target, &input, &format!("mutation {n}"));
        }
    }
}
