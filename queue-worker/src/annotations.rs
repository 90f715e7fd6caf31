//! Per-function retry settings from the OpenFaaS gateway's function list: the annotations
//! OpenFaaS Pro's queue worker reads (`com.openfaas.retry.attempts`, `.codes`, `.min_wait`,
//! `.max_wait`), fetched from `GET /system/functions` (every namespace `GET /system/namespaces`
//! lists) with the gateway's basic auth, and fetched again every refresh interval.
//!
//! Merged by [`crate::functions::FunctionSettings`], field by field: an entry of
//! `--functions-config` wins over an annotation, an annotation over the worker's defaults. A
//! function list that cannot be fetched keeps the last one (a warning says why); a value that does
//! not parse is left out with a warning naming the function and the annotation.
//! `faas-async.max_concurrency` (ours: OpenFaaS has no annotation for a function's concurrency
//! in the queue) caps the function's calls at once per worker, as `max_concurrency` does in the
//! file. `com.openfaas.queue` names the function's queue, as `queue` does in the file: the
//! workers of `--queues <it>` serve it (fair scheduling).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{WorkerConfig, parse_duration, redact_url};
use crate::functions::{Annotated, FunctionOverride};

/// Invocations at most (OpenFaaS: "the amount of times to try").
pub const ATTEMPTS: &str = "com.openfaas.retry.attempts";
/// Statuses retried, comma-separated.
pub const CODES: &str = "com.openfaas.retry.codes";
/// Wait before the first retry (a Go duration such as `10s`).
pub const MIN_WAIT: &str = "com.openfaas.retry.min_wait";
/// Longest wait between attempts.
pub const MAX_WAIT: &str = "com.openfaas.retry.max_wait";
/// Calls of the function one worker runs at once, at most (this project's own annotation).
pub const MAX_CONCURRENCY: &str = "faas-async.max_concurrency";
/// A named queue (OpenFaaS Pro): the workers of `--queues <it>` serve the function.
pub const QUEUE: &str = "com.openfaas.queue";

/// The overrides one function's annotations ask for, and the problems of those that do not
/// parse (each naming the annotation; the value itself is the operator's, not data).
pub fn override_from(annotations: &HashMap<String, String>) -> (FunctionOverride, Vec<String>) {
    let mut o = FunctionOverride::default();
    let mut problems = Vec::new();
    if let Some(raw) = annotations.get(ATTEMPTS) {
        match raw.trim().parse::<u32>() {
            Ok(n) if n >= 1 => o.max_attempts = Some(n),
            _ => problems.push(format!(
                "{ATTEMPTS}={raw:?} is not a whole number of at least 1"
            )),
        }
    }
    if let Some(raw) = annotations.get(MAX_CONCURRENCY) {
        match raw.trim().parse::<u32>() {
            Ok(n) if n >= 1 => o.max_concurrency = Some(n),
            _ => problems.push(format!(
                "{MAX_CONCURRENCY}={raw:?} is not a whole number of at least 1"
            )),
        }
    }
    if let Some(raw) = annotations.get(QUEUE) {
        let queue = raw.trim().to_ascii_lowercase();
        if crate::functions::is_queue_name(&queue) {
            o.queue = Some(queue);
        } else {
            problems.push(format!(
                "{QUEUE}={raw:?} is not a queue name (1 to 64 letters, digits and -)"
            ));
        }
    }
    if let Some(raw) = annotations.get(CODES) {
        let codes: Result<Vec<u16>, _> = raw
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or(c)
            })
            .collect();
        match codes {
            Ok(codes) if !codes.is_empty() => o.retry_codes = Some(codes),
            Ok(_) => problems.push(format!("{CODES}={raw:?} names no status")),
            Err(bad) => problems.push(format!("{CODES}: {bad:?} is not an HTTP status")),
        }
    }
    for (name, slot) in [(MIN_WAIT, &mut o.initial_wait), (MAX_WAIT, &mut o.max_wait)] {
        if let Some(raw) = annotations.get(name) {
            match parse_duration(raw.trim()) {
                Ok(d) => *slot = Some(d),
                Err(e) => problems.push(format!("{name}={raw:?}: {e}")),
            }
        }
    }
    (o, problems)
}

/// One function of `GET /system/functions` (the fields read; others are ignored).
#[derive(Debug, Deserialize)]
struct ListedFunction {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

/// Where the function list is and how to ask for it.
#[derive(Debug, Clone)]
pub struct FunctionList {
    /// The gateway's base URL (`http://gateway:8080`).
    pub gateway: url::Url,
    /// The gateway's basic-auth user and password (OpenFaaS `basic_auth`, `secret_mount_path`).
    pub credentials: Option<(String, String)>,
    /// The namespace of functions listed without one.
    pub default_namespace: String,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// Why the list could not be read (data-free).
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// No answer.
    #[error("{path}: {detail}")]
    Request {
        /// The route asked.
        path: String,
        /// What failed.
        detail: String,
    },
    /// An answer that is not a function list.
    #[error("{path}: answered {status}")]
    Status {
        /// The route asked.
        path: String,
        /// Its status.
        status: u16,
    },
}

impl FunctionList {
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        client: &reqwest::Client,
        path: &str,
        query: Option<(&str, &str)>,
    ) -> Result<T, ListError> {
        let request_error = |detail: String| ListError::Request {
            path: path.to_owned(),
            detail,
        };
        let mut url = self
            .gateway
            .join(path)
            .map_err(|e| request_error(e.to_string()))?;
        if let Some((key, value)) = query {
            url.query_pairs_mut().append_pair(key, value);
        }
        let mut request = client.get(url).timeout(self.timeout);
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| request_error(crate::invoke::transport_error_kind(&e).to_owned()))?;
        if !response.status().is_success() {
            return Err(ListError::Status {
                path: path.to_owned(),
                status: response.status().as_u16(),
            });
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| request_error(crate::invoke::transport_error_kind(&e).to_owned()))?;
        serde_json::from_slice(&body).map_err(|_| request_error("not the JSON expected".to_owned()))
    }

    /// Every listed function's annotations, keyed by lower-case `name.namespace`. Namespaces
    /// come from `/system/namespaces`; a gateway without it (OpenFaaS on one namespace, faasd)
    /// is asked for its default list only.
    pub async fn fetch(
        &self,
        client: &reqwest::Client,
    ) -> Result<HashMap<String, HashMap<String, String>>, ListError> {
        let namespaces: Vec<Option<String>> = match self
            .get::<Vec<String>>(client, "system/namespaces", None)
            .await
        {
            Ok(list) if !list.is_empty() => list.into_iter().map(Some).collect(),
            Ok(_) | Err(ListError::Status { .. }) => vec![None],
            Err(e) => return Err(e),
        };
        let mut out = HashMap::new();
        for namespace in namespaces {
            let query = namespace.as_deref().map(|ns| ("namespace", ns));
            let listed: Vec<ListedFunction> = self.get(client, "system/functions", query).await?;
            for f in listed {
                let ns = f
                    .namespace
                    .or_else(|| namespace.clone())
                    .unwrap_or_else(|| self.default_namespace.clone());
                let key = format!("{}.{}", f.name, ns).to_ascii_lowercase();
                out.insert(key, f.annotations.unwrap_or_default());
            }
        }
        Ok(out)
    }
}

/// Where the gateway's function annotations are read from, if they are
/// (`--function-annotations`), with the gateway's credentials read from
/// `--gateway-credentials-dir` (trailing newlines dropped; never logged). A credentials
/// file that cannot be read is an error naming it.
pub fn function_list(config: &WorkerConfig) -> Result<Option<FunctionList>, String> {
    if config.function_annotations == crate::config::Annotations::Off {
        return Ok(None);
    }
    let gateway = url::Url::parse(&config.gateway_url)
        .map_err(|e| format!("--gateway-url {:?}: {e}", redact_url(&config.gateway_url)))?;
    let credentials = match &config.gateway_credentials_dir {
        None => None,
        Some(dir) => {
            let file = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path)
                    .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|e| {
                        format!(
                            "--gateway-credentials-dir: cannot read {}: {e}",
                            path.display()
                        )
                    })
            };
            Some((file("basic-auth-user")?, file("basic-auth-password")?))
        }
    };
    Ok(Some(FunctionList {
        gateway,
        credentials,
        default_namespace: config.default_namespace.clone(),
        timeout: Duration::from_secs(10),
    }))
}

/// The overrides of a fetched list; problems are logged once per function and value.
pub fn overrides_of(
    listed: &HashMap<String, HashMap<String, String>>,
    warned: &mut HashSet<String>,
) -> HashMap<String, FunctionOverride> {
    let mut out = HashMap::with_capacity(listed.len());
    for (function, annotations) in listed {
        let (o, problems) = override_from(annotations);
        for problem in problems {
            if warned.insert(format!("{function} {problem}")) {
                tracing::warn!(%function, %problem, "function annotation left out");
            }
        }
        if o != FunctionOverride::default() {
            out.insert(function.clone(), o);
        }
    }
    out
}

/// Fetches the list now and then every `refresh` until `stop`, publishing the overrides into
/// `annotated`. A failed fetch keeps the last list.
pub async fn follow(
    list: FunctionList,
    refresh: Duration,
    annotated: Annotated,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder().build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the client for the function list; annotations are not read");
            return;
        }
    };
    let mut warned = HashSet::new();
    let mut last_error: Option<String> = None;
    loop {
        match list.fetch(&client).await {
            Ok(listed) => {
                let overrides = overrides_of(&listed, &mut warned);
                tracing::debug!(
                    functions = listed.len(),
                    annotated = overrides.len(),
                    "function list read"
                );
                if last_error.take().is_some() {
                    tracing::info!("the function list can be read again");
                }
                let mut slot = annotated
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *slot = Arc::new(overrides);
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot read the gateway's function list; its annotations stay as last read");
                }
                last_error = Some(text);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(refresh) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_retry_annotation_maps_onto_its_setting() {
        for (pairs, want) in [
            (
                vec![(ATTEMPTS, "3")],
                FunctionOverride {
                    max_attempts: Some(3),
                    ..FunctionOverride::default()
                },
            ),
            (
                vec![(CODES, "429, 502,500")],
                FunctionOverride {
                    retry_codes: Some(vec![429, 502, 500]),
                    ..FunctionOverride::default()
                },
            ),
            (
                vec![(MIN_WAIT, "5s"), (MAX_WAIT, "2m")],
                FunctionOverride {
                    initial_wait: Some(Duration::from_secs(5)),
                    max_wait: Some(Duration::from_secs(120)),
                    ..FunctionOverride::default()
                },
            ),
            (
                vec![(MAX_CONCURRENCY, "4")],
                FunctionOverride {
                    max_concurrency: Some(4),
                    ..FunctionOverride::default()
                },
            ),
            (
                vec![(QUEUE, " Batch ")],
                FunctionOverride {
                    queue: Some("batch".into()),
                    ..FunctionOverride::default()
                },
            ),
            (
                vec![("com.openfaas.scale.max", "5")],
                FunctionOverride::default(),
            ),
        ] {
            let (o, problems) = override_from(&annotations(&pairs));
            assert_eq!(o, want, "{pairs:?}");
            assert!(problems.is_empty(), "{pairs:?}: {problems:?}");
        }
    }

    #[test]
    fn values_that_do_not_parse_are_left_out_and_named() {
        for (pairs, names) in [
            (vec![(ATTEMPTS, "0")], ATTEMPTS),
            (vec![(ATTEMPTS, "three")], ATTEMPTS),
            (vec![(CODES, "429,abc")], CODES),
            (vec![(CODES, "999")], CODES),
            (vec![(CODES, " , ")], CODES),
            (vec![(MIN_WAIT, "soon")], MIN_WAIT),
            (vec![(MAX_CONCURRENCY, "0")], MAX_CONCURRENCY),
            (vec![(MAX_CONCURRENCY, "many")], MAX_CONCURRENCY),
        ] {
            let (o, problems) = override_from(&annotations(&pairs));
            assert_eq!(o, FunctionOverride::default(), "{pairs:?}");
            assert_eq!(problems.len(), 1, "{pairs:?}");
            assert!(problems[0].contains(names), "{problems:?}");
        }
        // The good ones beside a bad one still apply.
        let (o, problems) = override_from(&annotations(&[(ATTEMPTS, "2"), (MAX_WAIT, "x")]));
        assert_eq!(o.max_attempts, Some(2));
        assert_eq!(problems.len(), 1);
    }
}
