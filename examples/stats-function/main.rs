//! `stats-function`: a small example function for trying the async path. It takes numbers
//! (a JSON array, or numbers separated by commas, spaces or newlines) and answers with their
//! summary statistics as JSON. Bad input gets `400` with a JSON error.
//!
//! It answers on any path, so it works both as `{gateway}/function/stats` (how the worker calls
//! functions through a gateway) and as a direct URL.
//!
//! ```text
//! cargo run --release --bin stats-function            # listens on 127.0.0.1:8081
//! curl -s 127.0.0.1:8081/function/stats -d '[1, 2, 3, 4]'
//! {"count":4,"mean":2.5,"median":2.5,"min":1.0,"max":4.0,"stddev":1.118033988749895}
//! ```

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clap::Parser;
use serde::Serialize;

/// An example function: summary statistics of the numbers in the request body.
#[derive(Debug, Parser)]
#[command(name = "stats-function", version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "STATS_FUNCTION_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
}

/// The summary of a sample.
#[derive(Debug, Serialize, PartialEq)]
struct Summary {
    count: usize,
    mean: f64,
    median: f64,
    min: f64,
    max: f64,
    /// Population standard deviation.
    stddev: f64,
}

/// Parses the numbers of a body: a JSON array, or numbers separated by commas or whitespace.
fn parse_numbers(body: &[u8]) -> Result<Vec<f64>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text".to_owned())?;
    let trimmed = text.trim();
    let numbers: Vec<f64> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| format!("not a JSON array of numbers: {e}"))?
    } else {
        trimmed
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<f64>().map_err(|_| {
                    format!(
                        "{:?} is not a number",
                        s.chars().take(40).collect::<String>()
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    if numbers.is_empty() {
        return Err("no numbers given".into());
    }
    if numbers.iter().any(|n| !n.is_finite()) {
        return Err("numbers must be finite".into());
    }
    Ok(numbers)
}

fn summarize(mut numbers: Vec<f64>) -> Summary {
    numbers.sort_by(f64::total_cmp);
    let count = numbers.len();
    let n = count as f64;
    let mean = numbers.iter().sum::<f64>() / n;
    let variance = numbers.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let median = if count % 2 == 1 {
        numbers[count / 2]
    } else {
        (numbers[count / 2 - 1] + numbers[count / 2]) / 2.0
    };
    Summary {
        count,
        mean,
        median,
        min: numbers[0],
        max: numbers[count - 1],
        stddev: variance.sqrt(),
    }
}

async fn stats(body: Bytes) -> Response {
    match parse_numbers(&body) {
        Ok(numbers) => axum::Json(summarize(numbers)).into_response(),
        Err(message) => (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": "bad_input", "message": message})),
        )
            .into_response(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    eprintln!(
        "stats-function listening on http://{}",
        listener.local_addr()?
    );
    let app = Router::new().fallback(stats);
    axum::serve(listener, app)
        .with_graceful_shutdown(queue_core::signal::shutdown_signal())
        .await
        .context("serving")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_json_and_plain_lists() {
        let s = summarize(parse_numbers(b"[1, 2, 3, 4]").unwrap());
        assert_eq!(
            (s.count, s.mean, s.median, s.min, s.max),
            (4, 2.5, 2.5, 1.0, 4.0)
        );
        assert!((s.stddev - 1.118_033_988_749_895).abs() < 1e-12);
        let s = summarize(parse_numbers(b"5\n-1, 3").unwrap());
        assert_eq!((s.count, s.median, s.min, s.max), (3, 3.0, -1.0, 5.0));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_numbers(b"").is_err());
        assert!(parse_numbers(b"[]").is_err());
        assert!(parse_numbers(b"1, two").unwrap_err().contains("two"));
        assert!(parse_numbers(b"[1, \"x\"]").is_err());
        assert!(parse_numbers(&[0xff, 0xfe]).is_err());
    }
}
