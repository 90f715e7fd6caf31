//! OpenFaaS's queue-worker variables, read with OpenFaaS's meaning: those of the CE worker (NATS
//! Streaming), of the Pro JetStream worker, and of the charts that deploy them. Each one is
//! mapped onto one of our settings (a flag placed before the real command line, so our flags
//! and our own variables win), or noted at start when it has no effect here and OpenFaaS would
//! run with it all the same, or refused at start with a message naming it and saying why. None
//! is ignored silently. README.md ("OpenFaaS variables") has the table, with the reasons.
//!
//! Booleans are read as Go's `strconv.ParseBool` reads them (`1`, `t`, `true`, `0`, `f`, `false`,
//! any case). While any of these variables is set, OpenFaaS's defaults apply where ours differ:
//! NATS at `nats:4222` (ours: `127.0.0.1:4222`); the gateway is `http://gateway:8080` either way.

use std::ffi::OsString;

use queue_core::settings::{
    openfaas_either, openfaas_nats_url, openfaas_port, openfaas_value, parse_duration,
};

/// Every OpenFaaS variable this worker reads (each has a row in the README's table and a case
/// in this module's tests).
pub const VARIABLES: &[&str] = &[
    // Where NATS and the functions are.
    "faas_nats_address",
    "faas_nats_port",
    "nats_host",
    "nats_port",
    "faas_gateway_address",
    "faas_gateway_port",
    "gateway_url",
    "gateway_invoke",
    "faas_function_suffix",
    "default_function_name",
    // How calls are run and retried.
    "max_inflight",
    "ack_wait",
    "upstream_timeout",
    "max_retry_attempts",
    "initial_retry_wait",
    "max_retry_wait",
    "retry_http_codes",
    "backoff",
    "limiter_enabled",
    // Logs and TLS.
    "write_debug",
    "debug",
    "log_encoding",
    "faas_print_body",
    "tls_insecure",
    // The queue.
    "nats_stream",
    "faas_nats_channel",
    "nats_durable",
    "faas_nats_queue_group",
    "nats_stream_replicas",
    "queue_name",
    "queue_partitions",
    "filter_partition",
    "scaling_mode",
    // Read, with no effect here (as in OpenFaaS's static mode, or NATS Streaming only).
    "consumer_inactive_threshold",
    "consumer_pull_max_messages",
    "faas_nats_cluster_name",
    "faas_max_reconnect",
    "faas_reconnect_delay",
    "basic_auth",
    "secret_mount_path",
];

/// OpenFaaS's NATS when its variables are in use and name none.
const OPENFAAS_NATS: &str = "nats://nats:4222";
/// Where OpenFaaS's queue worker looks for its gateway's credentials by default.
const OPENFAAS_SECRET_MOUNT_PATH: &str = "/var/secrets";
/// The name of OpenFaaS's one shared queue.
const OPENFAAS_SHARED_QUEUE: &str = "faas-request";

/// What the OpenFaaS variables come to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenFaasSettings {
    /// Flags to put before the real command line
    /// ([`queue_core::settings::with_leading_args`]).
    pub args: Vec<OsString>,
    /// What the binary logs at start, once logging is set up: a variable read that has no
    /// effect here and why, a value OpenFaaS turns into another (`max_inflight=0`), a default
    /// OpenFaaS supplies.
    pub notes: Vec<String>,
}

/// An OpenFaaS boolean, as Go's `strconv.ParseBool` reads it (`1`, `t`, `true`, `0`, `f`,
/// `false`, any case); anything else is refused, naming the variable.
fn openfaas_bool(name: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        other => Err(format!(
            "{name}={other:?} is not a boolean (OpenFaaS reads 1, t, true, 0, f or false)"
        )),
    }
}

/// OpenFaaS's `faas_function_suffix` holds the namespace (`.openfaas-fn.svc.cluster.local`);
/// ours comes after `{name}.{namespace}`, so a leading `.{default namespace}` is dropped
/// rather than doubled.
fn suffix_without_namespace(suffix: &str, default_namespace: &str) -> String {
    let namespaced = format!(".{}", default_namespace.to_ascii_lowercase());
    match suffix.to_ascii_lowercase().strip_prefix(&namespaced) {
        Some(rest) if rest.is_empty() || rest.starts_with('.') => {
            suffix[namespaced.len()..].to_owned()
        }
        _ => suffix.to_owned(),
    }
}

/// Reads the variables through `lookup` and collects flags and notes.
struct Reader<L> {
    lookup: L,
    out: OpenFaasSettings,
}

impl<L: Fn(&str) -> Option<String>> Reader<L> {
    fn value(&self, name: &str) -> Option<String> {
        openfaas_value(&self.lookup, name)
    }

    /// Adds `--{flag}={value}` unless our own variable `ours` is set (it wins); says whether.
    fn flag(&mut self, ours: &str, flag: &str, value: impl std::fmt::Display) -> bool {
        if self.value(ours).is_some() {
            return false;
        }
        self.out.args.push(format!("--{flag}={value}").into());
        true
    }

    fn note(&mut self, note: impl Into<String>) {
        self.out.notes.push(note.into());
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, String> {
        self.value(name)
            .map(|v| openfaas_bool(name, &v))
            .transpose()
    }

    fn duration(&self, name: &str) -> Result<Option<String>, String> {
        match self.value(name) {
            Some(v) => match parse_duration(&v) {
                Ok(_) => Ok(Some(v)),
                Err(e) => Err(format!("{name}={v:?} is not a duration: {e}")),
            },
            None => Ok(None),
        }
    }

    fn number(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, String> {
        match self.value(name) {
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(format!(
                    "{name}={v:?} is not a whole number from {min} to {max}"
                )),
            },
            None => Ok(None),
        }
    }

    /// NATS, the gateway, gateway or direct invocation, the function namespace and suffix.
    fn addresses(&mut self) -> Result<(), String> {
        let url = openfaas_nats_url(&self.lookup)?;
        let given = url.is_some();
        let url = url.unwrap_or_else(|| OPENFAAS_NATS.to_owned());
        if self.flag("NATS_URL", "nats-url", &url) && !given {
            self.note(format!(
                "no NATS address among the OpenFaaS variables (faas_nats_address, nats_host): \
                 OpenFaaS's default, {url}"
            ));
        }

        // CE: an address and a port, either alone taking OpenFaaS's default for the other.
        let (address, port) = (
            self.value("faas_gateway_address"),
            self.value("faas_gateway_port"),
        );
        let ce = if address.is_some() || port.is_some() {
            let port = match port {
                Some(p) => openfaas_port("faas_gateway_port", &p)?,
                None => 8080,
            };
            let address = address.unwrap_or_else(|| "gateway".into());
            Some(format!("http://{address}:{port}"))
        } else {
            None
        };
        // Pro: a URL (the chart writes the scheme; without one, http).
        let pro = self.value("gateway_url").map(|url| {
            let url = url.trim_end_matches('/');
            if url.contains("://") {
                url.to_owned()
            } else {
                format!("http://{url}")
            }
        });
        let gateway = match (ce, pro) {
            (Some(ce), Some(pro)) if ce != pro => {
                return Err(format!(
                    "faas_gateway_address/faas_gateway_port ({ce}) and gateway_url ({pro}) name \
                     different gateways: set one"
                ));
            }
            (ce, pro) => ce.or(pro),
        };
        if let Some(url) = gateway {
            self.flag("QUEUE_WORKER_GATEWAY_URL", "gateway-url", url);
        }

        if let Some(invoke) = self.bool("gateway_invoke")? {
            let mode = if invoke { "gateway" } else { "direct" };
            self.flag("QUEUE_WORKER_INVOKE_MODE", "invoke-mode", mode);
        }
        // The Pro chart sets it to the functions' namespace: the one a call naming none is in.
        let namespace = self.value("default_function_name");
        if let Some(namespace) = &namespace {
            self.flag(
                "QUEUE_WORKER_DEFAULT_NAMESPACE",
                "default-namespace",
                namespace,
            );
        }
        if let Some(suffix) = self.value("faas_function_suffix") {
            let namespace = self
                .value("QUEUE_WORKER_DEFAULT_NAMESPACE")
                .or(namespace)
                .unwrap_or_else(|| "openfaas-fn".into());
            self.flag(
                "QUEUE_WORKER_FUNCTION_SUFFIX",
                "function-suffix",
                suffix_without_namespace(&suffix, &namespace),
            );
        }
        Ok(())
    }

    /// Concurrency, leases, timeouts, retries.
    fn calls(&mut self) -> Result<(), String> {
        if let Some(n) = self.number("max_inflight", 0, 100_000)? {
            let n = if n == 0 {
                self.note(
                    "max_inflight=0: one call at a time, as OpenFaaS runs it (its chart writes 1 \
                     for 0)",
                );
                1
            } else {
                n
            };
            self.flag("QUEUE_WORKER_MAX_INFLIGHT", "max-inflight", n);
        }
        for (theirs, ours, flag) in [
            ("ack_wait", "QUEUE_WORKER_ACK_WAIT", "ack-wait"),
            (
                "upstream_timeout",
                "QUEUE_WORKER_UPSTREAM_TIMEOUT",
                "upstream-timeout",
            ),
            (
                "initial_retry_wait",
                "QUEUE_WORKER_RETRY_INITIAL_WAIT",
                "retry-initial-wait",
            ),
            (
                "max_retry_wait",
                "QUEUE_WORKER_RETRY_MAX_WAIT",
                "retry-max-wait",
            ),
        ] {
            if let Some(v) = self.duration(theirs)? {
                self.flag(ours, flag, v);
            }
        }
        if let Some(n) = self.number("max_retry_attempts", 1, u64::from(u32::MAX))? {
            self.flag("QUEUE_WORKER_RETRY_MAX_ATTEMPTS", "retry-max-attempts", n);
        }
        if let Some(v) = self.value("retry_http_codes") {
            crate::retry::parse_codes(&v).map_err(|e| format!("retry_http_codes={v:?}: {e}"))?;
            self.flag("QUEUE_WORKER_RETRY_CODES", "retry-codes", v);
        }
        if let Some(v) = self.value("backoff") {
            let mode = v.to_ascii_lowercase();
            if !matches!(mode.as_str(), "exponential" | "full" | "equal") {
                return Err(format!(
                    "backoff={v:?} is not one of OpenFaaS's backoff modes: exponential, full, equal"
                ));
            }
            self.flag("QUEUE_WORKER_RETRY_BACKOFF", "retry-backoff", mode);
        }
        // OpenFaaS: adaptive concurrency per function from its 429s (its function mode, where
        // each function has a consumer). Here each function has its own limit in every mode.
        if let Some(on) = self.bool("limiter_enabled")? {
            let value = if on { "on" } else { "off" };
            self.flag(
                "QUEUE_WORKER_ADAPTIVE_CONCURRENCY",
                "adaptive-concurrency",
                value,
            );
        }
        Ok(())
    }

    /// Logs, bodies, TLS.
    fn logs(&mut self) -> Result<(), String> {
        let write_debug = self.bool("write_debug")?.unwrap_or(false);
        let debug = self.bool("debug")?.unwrap_or(false);
        if write_debug || debug {
            self.flag("LOG_LEVEL", "log-level", "debug");
        }
        if let Some(v) = self.value("log_encoding") {
            let format = match v.to_ascii_lowercase().as_str() {
                "console" => "text",
                "json" => "json",
                _ => {
                    return Err(format!(
                        "log_encoding={v:?} is not one of OpenFaaS's log encodings: console, json"
                    ));
                }
            };
            self.flag("LOG_FORMAT", "log-format", format);
        }
        if self.bool("faas_print_body")? == Some(true) {
            self.note(
                "faas_print_body=true: bodies are never logged here (they may carry secrets and \
                 personal data); debug logs name calls by id",
            );
        }
        if self.bool("tls_insecure")? == Some(true) {
            return Err(
                "tls_insecure=true is refused: this worker always verifies the TLS \
                        certificates of callback receivers and functions; give receivers \
                        certificates the system trusts, or use http:// on a private network"
                    .into(),
            );
        }
        Ok(())
    }

    /// The stream, the consumer, named queues and partitions, the consumer mode.
    fn queue(&mut self) -> Result<(), String> {
        if let Some(stream) = self.value("nats_stream") {
            self.flag("ASYNC_STREAM", "stream", stream);
        }
        if let Some(channel) = self.value("faas_nats_channel") {
            self.note(format!(
                "faas_nats_channel={channel:?} is a NATS Streaming channel, which OpenFaaS's CE \
                 worker does not read either (it subscribes to {OPENFAAS_SHARED_QUEUE}); this \
                 worker reads the JetStream stream of --stream (ASYNC_STREAM, or nats_stream)"
            ));
        }
        // Workers sharing a queue group (CE) or a durable (Pro) share the work: our consumer.
        if let Some((name, consumer)) =
            openfaas_either(&self.lookup, "faas_nats_queue_group", "nats_durable")?
        {
            if consumer.contains(['.', '*', '>']) || consumer.contains(char::is_whitespace) {
                return Err(format!(
                    "{name}={consumer:?} cannot name a JetStream consumer (no '.', '*', '>' or \
                     spaces)"
                ));
            }
            self.flag("QUEUE_WORKER_CONSUMER", "consumer", consumer);
        }
        if let Some(n) = self.number("nats_stream_replicas", 1, 5)? {
            self.note(format!(
                "nats_stream_replicas={n}: the gateway creates the stream and sets its replicas \
                 (ASYNC_STREAM_REPLICAS, or nats_stream_replicas on the gateway); this worker \
                 uses the stream as it finds it"
            ));
        }
        // A named queue (Pro: the functions of `com.openfaas.queue: <name>`): this worker
        // serves that queue's functions, lane by lane.
        let named_queue = match self.value("queue_name") {
            Some(queue) if queue != OPENFAAS_SHARED_QUEUE => {
                let name = crate::config::parse_queue_name(&queue)
                    .map_err(|e| format!("queue_name: {e}"))?;
                self.flag("QUEUE_WORKER_QUEUES", "queues", &name);
                true
            }
            _ => false,
        };
        if let Some(n) = self.number("queue_partitions", 0, u64::from(u32::MAX))?
            && n > 1
        {
            return Err(format!(
                "queue_partitions={n}: partitioned queues are not supported; one stream, one \
                 shared consumer (leave it at 1)"
            ));
        }
        if let Some(n) = self.number("filter_partition", 0, u64::from(u32::MAX))?
            && n > 0
        {
            return Err(format!(
                "filter_partition={n}: partitioned queues are not supported; there is only \
                 partition 0"
            ));
        }
        // Pro's `function` mode (a consumer per function, created on demand, removed when
        // idle) is fair scheduling here; so is a named queue, which is served lane by lane.
        let by_function = match self.value("scaling_mode") {
            None => false,
            Some(mode) => match mode.to_ascii_lowercase().as_str() {
                "static" => false,
                "function" => true,
                _ => {
                    return Err(format!(
                        "scaling_mode={mode:?} is not one of OpenFaaS's modes: static, function"
                    ));
                }
            },
        };
        if by_function || named_queue {
            self.flag("QUEUE_WORKER_FAIR_SCHEDULING", "fair-scheduling", true);
        }
        if by_function && let Some(v) = self.duration("consumer_inactive_threshold")? {
            self.flag("QUEUE_WORKER_LANE_IDLE", "lane-idle", &v);
        }
        Ok(())
    }

    /// Read and checked, with no effect here: noted.
    fn without_effect(&mut self) -> Result<(), String> {
        let function_mode = self
            .value("scaling_mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("function"));
        if !function_mode && let Some(v) = self.duration("consumer_inactive_threshold")? {
            self.note(format!(
                "consumer_inactive_threshold={v}: it applies to scaling_mode=function only; no \
                 effect in static mode, as in OpenFaaS"
            ));
        }
        if let Some(n) = self.number("consumer_pull_max_messages", 1, u64::from(u32::MAX))? {
            self.note(format!(
                "consumer_pull_max_messages={n}: not used; a pull asks for as many calls as \
                 this worker has free slots, at most --max-inflight"
            ));
        }
        if let Some(v) = self.value("faas_nats_cluster_name") {
            self.note(format!(
                "faas_nats_cluster_name={v:?}: a NATS Streaming cluster id; JetStream has none"
            ));
        }
        if let Some(n) = self.number("faas_max_reconnect", 0, u64::from(u32::MAX))? {
            self.note(format!(
                "faas_max_reconnect={n}: this worker reconnects to NATS without limit (OpenFaaS's \
                 CE worker gives up after this many attempts)"
            ));
        }
        if let Some(v) = self.duration("faas_reconnect_delay")? {
            self.note(format!(
                "faas_reconnect_delay={v}: the NATS client spaces its reconnect attempts itself"
            ));
        }
        // OpenFaaS's worker sends its gateway's credentials (basic-auth-user and
        // basic-auth-password under secret_mount_path) where the gateway asks for them: here,
        // reading the function list for its annotations (/function/ is not authenticated).
        match (self.bool("basic_auth")?, self.value("secret_mount_path")) {
            (Some(true), path) => {
                let dir = path.unwrap_or_else(|| OPENFAAS_SECRET_MOUNT_PATH.to_owned());
                self.flag(
                    "QUEUE_WORKER_GATEWAY_CREDENTIALS_DIR",
                    "gateway-credentials-dir",
                    &dir,
                );
            }
            (_, Some(path)) => self.note(format!(
                "secret_mount_path={path:?}: no credentials are read without basic_auth=true"
            )),
            (_, None) => {}
        }
        Ok(())
    }
}

/// Turns OpenFaaS queue-worker variables into flags, for those settings whose own variable is
/// not set, and notes to log. `lookup` reads the environment (a map in tests). A value OpenFaaS
/// would not take either, or one this worker cannot honour, is an error naming the variable.
pub fn openfaas_compat_args(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<OpenFaasSettings, String> {
    let mut reader = Reader {
        lookup,
        out: OpenFaasSettings::default(),
    };
    if VARIABLES.iter().all(|name| reader.value(name).is_none()) {
        return Ok(reader.out);
    }
    // OpenFaaS Pro's worker reads its functions' retry annotations from the gateway.
    reader.flag(
        "QUEUE_WORKER_FUNCTION_ANNOTATIONS",
        "function-annotations",
        "on",
    );
    reader.addresses()?;
    reader.calls()?;
    reader.logs()?;
    reader.queue()?;
    reader.without_effect()?;
    Ok(reader.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Adaptive, InvokeMode, LogFormat, WorkerConfig, with_leading_args};
    use crate::retry::Backoff;
    use clap::Parser;
    use std::collections::HashMap;
    use std::time::Duration;

    fn compat(env: &[(&str, &str)]) -> Result<OpenFaasSettings, String> {
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        openfaas_compat_args(|k| env.get(k).map(|v| (*v).to_owned()))
    }

    fn parse_with(env: &[(&str, &str)], cli: &[&str]) -> (WorkerConfig, Vec<String>) {
        let settings = compat(env).unwrap();
        let real = std::iter::once("queue-worker")
            .chain(cli.iter().copied())
            .map(OsString::from);
        let config = WorkerConfig::try_parse_from(with_leading_args(real, settings.args))
            .unwrap_or_else(|e| panic!("{env:?}: {e}"));
        (config, settings.notes)
    }

    fn parse(env: &[(&str, &str)]) -> WorkerConfig {
        parse_with(env, &[]).0
    }

    /// What a case expects.
    enum Expect {
        /// Accepted, and the settings satisfy this.
        Reads(fn(&WorkerConfig) -> bool),
        /// Accepted, the settings as without it, and a note containing this.
        Noted(&'static str),
        /// Refused at start; the message contains all of these.
        Refused(&'static [&'static str]),
    }
    use Expect::{Noted, Reads, Refused};

    /// One row per variable and meaning: the CE and Pro names, ports without addresses.
    fn cases() -> Vec<(&'static [(&'static str, &'static str)], Expect)> {
        vec![
            // NATS: CE and Pro names; either part alone; OpenFaaS's default host.
            (
                &[("faas_nats_address", "nats.openfaas")],
                Reads(|c| c.nats.nats_url == "nats://nats.openfaas:4222"),
            ),
            (
                &[("faas_nats_port", "4223")],
                Reads(|c| c.nats.nats_url == "nats://nats:4223"),
            ),
            (
                &[("nats_host", "nats.openfaas.svc.cluster.local")],
                Reads(|c| c.nats.nats_url == "nats://nats.openfaas.svc.cluster.local:4222"),
            ),
            (
                &[("nats_port", "4224")],
                Reads(|c| c.nats.nats_url == "nats://nats:4224"),
            ),
            (
                &[("nats_host", "a"), ("faas_nats_address", "b")],
                Refused(&["nats_host", "faas_nats_address", "different"]),
            ),
            (&[("nats_port", "nats")], Refused(&["nats_port", "port"])),
            // Only other variables: OpenFaaS's NATS, not ours.
            (
                &[("max_inflight", "3")],
                Reads(|c| c.nats.nats_url == "nats://nats:4222"),
            ),
            // The gateway: CE address and port each alone, Pro URL with or without scheme.
            (
                &[("faas_gateway_address", "gw.openfaas")],
                Reads(|c| c.gateway_url == "http://gw.openfaas:8080"),
            ),
            (
                &[("faas_gateway_port", "8081")],
                Reads(|c| c.gateway_url == "http://gateway:8081"),
            ),
            (
                &[("faas_gateway_port", "http")],
                Refused(&["faas_gateway_port", "port"]),
            ),
            (
                &[("gateway_url", "http://gateway.openfaas:8080/")],
                Reads(|c| c.gateway_url == "http://gateway.openfaas:8080"),
            ),
            (
                &[("gateway_url", "gateway.openfaas:8080")],
                Reads(|c| c.gateway_url == "http://gateway.openfaas:8080"),
            ),
            (
                &[
                    ("gateway_url", "http://gateway.openfaas:8080"),
                    ("faas_gateway_address", "gateway.openfaas"),
                ],
                Reads(|c| c.gateway_url == "http://gateway.openfaas:8080"),
            ),
            (
                &[
                    ("gateway_url", "http://a:8080"),
                    ("faas_gateway_address", "b"),
                ],
                Refused(&["gateway_url", "faas_gateway_address", "different"]),
            ),
            // Invocation.
            (
                &[("gateway_invoke", "0")],
                Reads(|c| c.invoke_mode == InvokeMode::Direct),
            ),
            (
                &[("gateway_invoke", "true")],
                Reads(|c| c.invoke_mode == InvokeMode::Gateway),
            ),
            (
                &[("faas_function_suffix", ".openfaas-fn.svc.cluster.local")],
                Reads(|c| c.function_suffix == ".svc.cluster.local"),
            ),
            (
                &[("default_function_name", "team-a")],
                Reads(|c| c.default_namespace == "team-a"),
            ),
            (
                &[
                    ("default_function_name", "team-a"),
                    ("faas_function_suffix", ".team-a.svc.cluster.local"),
                ],
                Reads(|c| c.function_suffix == ".svc.cluster.local"),
            ),
            // Calls and retries.
            (&[("max_inflight", "7")], Reads(|c| c.max_inflight == 7)),
            (&[("max_inflight", "0")], Reads(|c| c.max_inflight == 1)),
            (
                &[("max_inflight", "-1")],
                Refused(&["max_inflight", "whole number"]),
            ),
            (
                &[("ack_wait", "1m5s")],
                Reads(|c| c.ack_wait == Duration::from_secs(65)),
            ),
            (
                &[("ack_wait", "a while")],
                Refused(&["ack_wait", "duration"]),
            ),
            (
                &[("upstream_timeout", "2h")],
                Reads(|c| c.upstream_timeout == Duration::from_secs(7200)),
            ),
            (
                &[("max_retry_attempts", "100")],
                Reads(|c| c.retry_max_attempts == 100),
            ),
            (
                &[("max_retry_attempts", "0")],
                Refused(&["max_retry_attempts"]),
            ),
            (
                &[("initial_retry_wait", "10s")],
                Reads(|c| c.retry_initial_wait == Duration::from_secs(10)),
            ),
            (
                &[("initial_retry_wait", "0s")],
                Reads(|c| c.retry_initial_wait == Duration::ZERO),
            ),
            (
                &[("max_retry_wait", "120s")],
                Reads(|c| c.retry_max_wait == Duration::from_secs(120)),
            ),
            (
                &[("retry_http_codes", "429,502,500,504,408")],
                Reads(|c| c.retry_codes == [429, 502, 500, 504, 408]),
            ),
            (
                &[("retry_http_codes", "429,oops")],
                Refused(&["retry_http_codes", "oops"]),
            ),
            (
                &[("backoff", "exponential")],
                Reads(|c| c.retry_backoff == Backoff::Exponential),
            ),
            (
                &[("backoff", "full")],
                Reads(|c| c.retry_backoff == Backoff::Full),
            ),
            (
                &[("backoff", "Equal")],
                Reads(|c| c.retry_backoff == Backoff::Equal),
            ),
            (
                &[("backoff", "linear")],
                Refused(&["backoff", "linear", "exponential, full, equal"]),
            ),
            // Logs and TLS.
            (
                &[("write_debug", "1")],
                Reads(|c| c.log.log_level == "debug"),
            ),
            (&[("debug", "true")], Reads(|c| c.log.log_level == "debug")),
            (&[("debug", "false")], Reads(|c| c.log.log_level == "info")),
            (
                &[("log_encoding", "json")],
                Reads(|c| c.log.log_format == LogFormat::Json),
            ),
            (
                &[("log_encoding", "console")],
                Reads(|c| c.log.log_format == LogFormat::Text),
            ),
            (
                &[("log_encoding", "logfmt")],
                Refused(&["log_encoding", "console, json"]),
            ),
            (
                &[("faas_print_body", "1")],
                Noted("faas_print_body=true: bodies are never logged"),
            ),
            (&[("tls_insecure", "false")], Reads(|_| true)),
            (
                &[("tls_insecure", "1")],
                Refused(&["tls_insecure", "verifies"]),
            ),
            // The queue.
            (
                &[("nats_stream", "custom-request")],
                Reads(|c| c.nats.stream == "custom-request"),
            ),
            (
                &[("faas_nats_channel", "faas-request")],
                Noted("faas_nats_channel=\"faas-request\" is a NATS Streaming channel"),
            ),
            (
                &[("nats_durable", "custom-workers")],
                Reads(|c| c.consumer == "custom-workers"),
            ),
            (
                &[("faas_nats_queue_group", "faas")],
                Reads(|c| c.consumer == "faas"),
            ),
            (
                &[("faas_nats_queue_group", "a"), ("nats_durable", "b")],
                Refused(&["faas_nats_queue_group", "nats_durable"]),
            ),
            (
                &[("nats_durable", "my.workers")],
                Refused(&["nats_durable", "JetStream consumer"]),
            ),
            (
                &[("nats_stream_replicas", "3")],
                Noted("nats_stream_replicas=3: the gateway creates the stream"),
            ),
            (
                &[("nats_stream_replicas", "three")],
                Refused(&["nats_stream_replicas"]),
            ),
            (
                &[("queue_name", "")],
                Reads(|c| c.nats.stream == "faas-async"),
            ),
            (&[("queue_name", "faas-request")], Reads(|_| true)),
            (
                &[("queue_name", "slow-fns")],
                Reads(|c| c.queues == ["slow-fns"] && c.fair_scheduling),
            ),
            (
                &[("queue_name", "Not A Queue")],
                Refused(&["queue_name", "not a queue name"]),
            ),
            (&[("queue_partitions", "1")], Reads(|_| true)),
            (
                &[("queue_partitions", "4")],
                Refused(&["queue_partitions=4", "not supported"]),
            ),
            (&[("filter_partition", "0")], Reads(|_| true)),
            (
                &[("filter_partition", "2")],
                Refused(&["filter_partition=2", "not supported"]),
            ),
            (&[("scaling_mode", "static")], Reads(|_| true)),
            (
                &[("scaling_mode", "function")],
                Reads(|c| c.fair_scheduling && c.queues == ["default"]),
            ),
            (
                &[
                    ("scaling_mode", "function"),
                    ("consumer_inactive_threshold", "10m"),
                ],
                Reads(|c| c.fair_scheduling && c.lane_idle == Duration::from_secs(600)),
            ),
            (
                &[("scaling_mode", "dynamic")],
                Refused(&["scaling_mode", "dynamic", "static, function"]),
            ),
            // Read, no effect here: each noted, with the reason.
            (
                &[("consumer_inactive_threshold", "30s")],
                Noted("consumer_inactive_threshold=30s: it applies to scaling_mode=function"),
            ),
            (
                &[("consumer_inactive_threshold", "soon")],
                Refused(&["consumer_inactive_threshold", "duration"]),
            ),
            (
                &[("consumer_pull_max_messages", "100")],
                Noted("consumer_pull_max_messages=100: not used"),
            ),
            (
                &[("limiter_enabled", "true")],
                Reads(|c| c.adaptive_concurrency == Adaptive::On),
            ),
            (
                &[("limiter_enabled", "false")],
                Reads(|c| c.adaptive_concurrency == Adaptive::Off),
            ),
            (
                &[("limiter_enabled", "maybe")],
                Refused(&["limiter_enabled", "boolean"]),
            ),
            (
                &[("faas_nats_cluster_name", "faas-cluster")],
                Noted("faas_nats_cluster_name=\"faas-cluster\": a NATS Streaming cluster id"),
            ),
            (
                &[("faas_max_reconnect", "120")],
                Noted("faas_max_reconnect=120: this worker reconnects to NATS without limit"),
            ),
            (
                &[("faas_reconnect_delay", "2s")],
                Noted("faas_reconnect_delay=2s"),
            ),
            (
                &[("basic_auth", "true")],
                Reads(|c| {
                    c.gateway_credentials_dir.as_deref()
                        == Some(std::path::Path::new("/var/secrets"))
                }),
            ),
            (
                &[
                    ("basic_auth", "true"),
                    ("secret_mount_path", "/var/secrets/gateway"),
                ],
                Reads(|c| {
                    c.gateway_credentials_dir.as_deref()
                        == Some(std::path::Path::new("/var/secrets/gateway"))
                }),
            ),
            (
                &[("secret_mount_path", "/var/secrets/gateway")],
                Noted("secret_mount_path=\"/var/secrets/gateway\": no credentials are read"),
            ),
        ]
    }

    /// Every variable in the list has a case, and every case holds.
    #[test]
    fn each_openfaas_variable_is_read_with_openfaas_meaning_or_refused_by_name() {
        let cases = cases();
        for name in VARIABLES {
            assert!(
                cases
                    .iter()
                    .any(|(env, _)| env.iter().any(|(k, _)| k == name)),
                "no case for {name}"
            );
        }
        let plain = parse(&[("max_inflight", "50")]);
        for (env, expect) in &cases {
            match expect {
                Reads(holds) => {
                    let (config, _) = parse_with(env, &[]);
                    assert!(holds(&config), "{env:?}: {config:?}");
                }
                Noted(note) => {
                    let (config, notes) = parse_with(env, &[]);
                    assert!(notes.iter().any(|n| n.contains(note)), "{env:?}: {notes:?}");
                    // Nothing else changed (the NATS default comes with any variable).
                    assert_eq!(config.nats.nats_url, plain.nats.nats_url, "{env:?}");
                    assert_eq!(config.max_inflight, plain.max_inflight, "{env:?}");
                    assert_eq!(config.nats.stream, plain.nats.stream, "{env:?}");
                    assert_eq!(config.consumer, plain.consumer, "{env:?}");
                }
                Refused(words) => {
                    let e = compat(env).expect_err(&format!("{env:?} was accepted"));
                    assert!(words.iter().all(|w| e.contains(w)), "{env:?}: {e}");
                }
            }
        }
    }

    /// Booleans in every spelling Go's ParseBool takes, for each boolean variable; anything
    /// else refused, naming the variable and the value.
    #[test]
    fn openfaas_booleans_are_read_as_openfaas_reads_them() {
        for (value, on) in [
            ("1", true),
            ("true", true),
            ("TRUE", true),
            ("t", true),
            ("0", false),
            ("false", false),
            ("F", false),
        ] {
            let c = parse(&[("gateway_invoke", value), ("write_debug", value)]);
            let mode = if on {
                InvokeMode::Gateway
            } else {
                InvokeMode::Direct
            };
            assert_eq!(c.invoke_mode, mode, "gateway_invoke={value}");
            assert_eq!(
                c.log.log_level,
                if on { "debug" } else { "info" },
                "write_debug={value}"
            );
            let c = parse(&[("debug", value)]);
            assert_eq!(
                c.log.log_level,
                if on { "debug" } else { "info" },
                "debug={value}"
            );
            assert_eq!(
                parse(&[("basic_auth", value)])
                    .gateway_credentials_dir
                    .is_some(),
                on,
                "basic_auth={value}"
            );
            let notes = compat(&[("faas_print_body", value)]).unwrap().notes;
            assert_eq!(
                notes.iter().any(|n| n.starts_with("faas_print_body=true")),
                on,
                "faas_print_body={value}: {notes:?}"
            );
            assert_eq!(compat(&[("tls_insecure", value)]).is_err(), on);
            assert_eq!(
                parse(&[("limiter_enabled", value)]).adaptive_concurrency,
                if on { Adaptive::On } else { Adaptive::Off },
                "limiter_enabled={value}"
            );
        }
        for name in [
            "gateway_invoke",
            "write_debug",
            "debug",
            "faas_print_body",
            "tls_insecure",
            "limiter_enabled",
            "basic_auth",
        ] {
            for value in ["yes", "2", "on"] {
                let err = compat(&[(name, value)]).unwrap_err();
                assert!(err.contains(name) && err.contains(value), "{err}");
            }
        }
    }

    /// OpenFaaS's suffix carries the default namespace; ours must not repeat it.
    #[test]
    fn openfaas_function_suffix_is_not_doubled() {
        for (suffix, namespace, ours) in [
            (".openfaas-fn.svc.cluster.local", None, ".svc.cluster.local"),
            (".openfaas-fn", None, ""),
            (".svc.cluster.local", None, ".svc.cluster.local"),
            (
                ".team-a.svc.cluster.local",
                Some("team-a"),
                ".svc.cluster.local",
            ),
            (".openfaas-fnx.svc", None, ".openfaas-fnx.svc"),
        ] {
            let mut env = vec![("faas_function_suffix", suffix)];
            if let Some(ns) = namespace {
                env.push(("QUEUE_WORKER_DEFAULT_NAMESPACE", ns));
            }
            let c = parse(&env);
            assert_eq!(c.function_suffix, ours, "{suffix} with {namespace:?}");
        }
    }

    /// A whole set, as OpenFaaS's chart renders it for its CE worker.
    #[test]
    fn openfaas_variables_map_onto_settings() {
        let c = parse(&[
            ("faas_nats_address", "nats.openfaas"),
            ("faas_nats_port", "4223"),
            ("faas_gateway_address", "gateway.openfaas"),
            ("max_inflight", "7"),
            ("ack_wait", "1m"),
            ("gateway_invoke", "false"),
            ("faas_function_suffix", ".openfaas-fn.svc.cluster.local"),
            ("upstream_timeout", "2h"),
            ("write_debug", "true"),
            ("max_retry_attempts", "9"),
            ("retry_http_codes", "429,503"),
        ]);
        assert_eq!(c.nats.nats_url, "nats://nats.openfaas:4223");
        assert_eq!(c.gateway_url, "http://gateway.openfaas:8080");
        assert_eq!(c.max_inflight, 7);
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert_eq!(c.invoke_mode, InvokeMode::Direct);
        assert_eq!(c.function_suffix, ".svc.cluster.local");
        assert_eq!(c.upstream_timeout, Duration::from_secs(7200));
        assert_eq!(c.log.log_level, "debug");
        assert_eq!(c.retry_max_attempts, 9);
        assert_eq!(c.retry_codes, vec![429, 503]);
    }

    /// Without any OpenFaaS variable nothing changes: our defaults, no notes.
    #[test]
    fn without_openfaas_variables_nothing_is_added() {
        let settings = compat(&[("NATS_URL", "nats://x:1"), ("LOG_LEVEL", "warn")]).unwrap();
        assert_eq!(settings, OpenFaasSettings::default());
        let c = parse(&[]);
        assert_eq!(c.nats.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.retry_backoff, Backoff::Equal);
    }

    #[test]
    fn our_variables_and_flags_win_over_openfaas_ones() {
        // Our own variable set: the OpenFaaS one adds no flag for it (clap reads ours from the
        // real environment, so here we only check that no compat flag is produced for it).
        let settings = compat(&[
            ("max_inflight", "7"),
            ("QUEUE_WORKER_MAX_INFLIGHT", "9"),
            ("nats_host", "nats.openfaas"),
            ("NATS_URL", "nats://ours:4222"),
            ("backoff", "full"),
            ("QUEUE_WORKER_RETRY_BACKOFF", "equal"),
        ])
        .unwrap();
        // Only the one the OpenFaaS variables imply by being there at all.
        assert_eq!(
            settings.args,
            ["--function-annotations=on"],
            "{:?}",
            settings.args
        );
        // A flag on the command line beats the OpenFaaS variable.
        let (c, _) = parse_with(
            &[("max_inflight", "7"), ("backoff", "full")],
            &["--max-inflight", "3", "--retry-backoff", "exponential"],
        );
        assert_eq!(c.max_inflight, 3);
        assert_eq!(c.retry_backoff, Backoff::Exponential);
    }
}
