//! The `adaptive` scenario's view of the worker: its concurrency limit for the function over
//! time, read from the worker's metrics every [`SAMPLE_EVERY`], beside what the stub function
//! saw (most calls inside at once, `429`s for its capacity) and the callbacks so far.

use std::time::{Duration, Instant};

use serde::Serialize;
use test_support::stub::{CallbackReceiver, StubFunction};

/// How often the worker's metrics are read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One reading.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LimitSample {
    /// Since the sampling started, in seconds.
    pub at_seconds: f64,
    /// `faas_async_concurrency_limit` of the function (`null` before the worker shows one).
    pub limit: Option<f64>,
    /// `faas_async_in_flight` of the function: invocations running in the worker.
    pub in_flight: Option<f64>,
    /// `faas_async_concurrency_waiting`: calls held for a slot.
    pub waiting: Option<f64>,
    /// Most calls inside the stub at once since the previous reading.
    pub function_max_inside: usize,
    /// `429`s the stub answered for its capacity since the previous reading.
    pub refused: usize,
    /// Callbacks received so far.
    pub callbacks: usize,
}

/// The limit over a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdaptiveReport {
    /// Calls the stub takes at once (more are answered `429`).
    pub function_capacity: usize,
    /// `429`s the stub answered for its capacity, in all.
    pub refused_total: usize,
    /// The readings.
    pub samples: Vec<LimitSample>,
}

impl AdaptiveReport {
    /// The readings as a table, ending with a newline.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let mut out = format!(
            "adaptive concurrency: the stub takes {} at once ({} answered 429 for it in all)\n\
             {:>7} {:>6} {:>10} {:>8} {:>12} {:>5} {:>10}\n",
            self.function_capacity,
            self.refused_total,
            "t (s)",
            "limit",
            "in flight",
            "waiting",
            "max inside",
            "429s",
            "callbacks"
        );
        for s in &self.samples {
            let _ = writeln!(
                out,
                "{:>7.2} {:>6} {:>10} {:>8} {:>12} {:>5} {:>10}",
                s.at_seconds,
                show(s.limit),
                show(s.in_flight),
                show(s.waiting),
                s.function_max_inside,
                s.refused,
                s.callbacks
            );
        }
        out
    }
}

/// The value of `name{function="<function>"}` in a Prometheus text page.
pub fn gauge(page: &str, name: &str, function: &str) -> Option<f64> {
    let prefix = format!("{name}{{function=\"{function}\"}} ");
    page.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads `metrics_url` every [`SAMPLE_EVERY`] until `stop` resolves.
pub async fn sample(
    client: &reqwest::Client,
    metrics_url: &str,
    function: &str,
    stub: &StubFunction,
    receiver: &CallbackReceiver,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<LimitSample> {
    use queue_core::metrics::{CONCURRENCY_LIMIT, CONCURRENCY_WAITING, IN_FLIGHT};
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut refused_before = stub.over_capacity();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return samples,
        }
        let page = match client
            .get(metrics_url)
            .timeout(SAMPLE_EVERY * 4)
            .send()
            .await
        {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let refused = stub.over_capacity();
        samples.push(LimitSample {
            at_seconds: started.elapsed().as_secs_f64(),
            limit: gauge(&page, CONCURRENCY_LIMIT, function),
            in_flight: gauge(&page, IN_FLIGHT, function),
            waiting: gauge(&page, CONCURRENCY_WAITING, function),
            function_max_inside: stub.reset_max_in_flight(),
            refused: refused - refused_before,
            callbacks: receiver.count(),
        });
        refused_before = refused;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_by_function() {
        let page = "# TYPE faas_async_concurrency_limit gauge\n\
                    faas_async_concurrency_limit{function=\"bench\"} 3\n\
                    faas_async_concurrency_limit{function=\"other-fn\"} 50\n";
        assert_eq!(
            gauge(page, "faas_async_concurrency_limit", "bench"),
            Some(3.0)
        );
        assert_eq!(gauge(page, "faas_async_concurrency_limit", "none"), None);
        let report = AdaptiveReport {
            function_capacity: 3,
            refused_total: 1,
            samples: vec![LimitSample {
                at_seconds: 0.25,
                limit: Some(3.0),
                in_flight: None,
                waiting: Some(0.0),
                function_max_inside: 3,
                refused: 1,
                callbacks: 10,
            }],
        };
        let table = report.to_table();
        assert!(table.contains("   0.25      3          -"), "{table}");
    }
}
