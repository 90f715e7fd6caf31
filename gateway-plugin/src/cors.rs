//! CORS for browser front-ends (`--cors-file`): which origins may call which functions from a
//! page, and read the status of their calls.
//!
//! ```toml
//! [default]                          # every function without a section of its own (optional)
//! origins = ["https://portal.example.org"]
//!
//! [namespaces.team-a]                # every function of team-a without its own section
//! origins = ["https://ui.team-a.example.org"]
//! methods = ["POST", "PUT"]          # default ["POST"]
//! headers = ["authorization", "content-type", "x-callback-url", "idempotency-key"]
//! max_age = "10m"                    # Access-Control-Max-Age (default 10m, at most 24h)
//! credentials = false                # Access-Control-Allow-Credentials (default false)
//!
//! [functions."resize.team-a"]        # one function (`name` alone: the default namespace)
//! origins = ["https://images.team-a.example.org"]
//!
//! [calls]                            # GET/DELETE /async-calls/{id}[/result] (optional)
//! origins = ["https://ui.team-a.example.org"]
//! methods = ["GET"]                  # GET and/or DELETE; default ["GET"]
//! ```
//!
//! The most specific section applies, whole: a function's, else its namespace's, else
//! `[default]`; none, no CORS. `/async-calls/...` has its own `[calls]` section, decided by the
//! origin alone (the call's function is only known from its record, and a different answer for
//! a call of another namespace would tell its id exists). CORS only lets a page *read* what
//! the gateway answers; who may call, read or cancel is still the authorization layer's.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) needs no
//! credentials (browsers send none) and does nothing else: `204` with the CORS headers when the
//! origin, the method and every requested header are allowed, else `403` `cors_not_allowed`
//! without any. Actual answers (errors included) carry `Access-Control-Allow-Origin` (the
//! origin itself, never `*`) and `Access-Control-Expose-Headers` for an allowed origin and
//! method, and no CORS header for any other; every answer of a route with a section carries
//! `Vary: Origin`.
//!
//! The file is a [`crate::reload::Reloadable`]: reread when it changes and on SIGHUP, a new
//! version applies whole from the next request; one that does not parse leaves the settings
//! in force, with an error in the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::message::{canonical_function, valid_namespace};
use serde::Deserialize;

use crate::error::ApiError;
use crate::reload::{LoadError, Reloadable};

/// The CORS file, reloadable.
pub type CorsFile = Reloadable<CorsPolicy>;

/// Default `Access-Control-Max-Age`.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
/// Longest `Access-Control-Max-Age` accepted (browsers cap it lower anyway).
const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Headers a page may read on the answers of the async routes.
const EXPOSE_FUNCTION: &str = "X-Call-Id, X-Start-Time, Idempotent-Replayed, Retry-After";
/// Headers a page may read on the answers of `/async-calls/...`.
const EXPOSE_CALLS: &str = "X-Call-Id, X-Function-Status, X-Function-Content-Type, Retry-After, Content-Range, Accept-Ranges";
/// Methods of the async routes.
const FUNCTION_METHODS: &[&str] = &["POST", "PUT", "PATCH", "DELETE", "GET"];
/// Methods of `/async-calls/...`.
const CALLS_METHODS: &[&str] = &["GET", "DELETE"];

/// A CORS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CorsError {
    /// It cannot be read.
    #[error("CORS file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It does not parse, or a value is wrong.
    #[error("CORS file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Option<RuleFile>,
    #[serde(default)]
    namespaces: BTreeMap<String, RuleFile>,
    #[serde(default)]
    functions: BTreeMap<String, RuleFile>,
    calls: Option<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    origins: Vec<String>,
    methods: Option<Vec<String>>,
    headers: Option<Vec<String>>,
    max_age: Option<String>,
    #[serde(default)]
    credentials: bool,
}

/// What one section allows.
#[derive(Debug)]
struct Rule {
    /// Serialized origins (`scheme://host[:port]`, lowercase).
    origins: HashSet<String>,
    /// Upper case.
    methods: Vec<&'static str>,
    /// Lower case.
    headers: Vec<String>,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
    expose: HeaderValue,
}

/// Which CORS section a request falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/async-function/{name}...`: the function's.
    Function,
    /// `/async-calls/...`: `[calls]`.
    Calls,
}

/// The CORS settings of every function and of `/async-calls/...`.
#[derive(Debug, Default)]
pub struct CorsPolicy {
    default: Option<Arc<Rule>>,
    namespaces: HashMap<String, Arc<Rule>>,
    /// By qualified name (`name`, or `name.namespace` outside the default namespace).
    functions: HashMap<String, Arc<Rule>>,
    calls: Option<Arc<Rule>>,
    default_namespace: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// `https://host[:port]` as a browser serializes it, or why not.
fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" || text.eq_ignore_ascii_case("null") {
        return Err(format!(
            "origin {text:?}: list each origin (scheme://host[:port]); `*` and `null` are not accepted"
        ));
    }
    let url = url::Url::parse(text).map_err(|e| format!("origin {text:?}: {e}"))?;
    let serialized = url.origin().ascii_serialization();
    let plain = matches!(url.scheme(), "http" | "https")
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.path() == "/"
        && !text.ends_with('/');
    if !plain || !serialized.eq_ignore_ascii_case(text) {
        return Err(format!(
            "origin {text:?}: expected scheme://host[:port] with http or https, no path (as a browser sends it: {serialized})"
        ));
    }
    Ok(serialized)
}

fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("{text:?} is not a header value"))
}

impl Rule {
    fn parse(
        section: &str,
        file: RuleFile,
        allowed_methods: &'static [&'static str],
        default_methods: &'static [&'static str],
        expose: &'static str,
    ) -> Result<Self, String> {
        let at = |m: String| format!("[{section}]: {m}");
        if file.origins.is_empty() {
            return Err(at(
                "origins is empty (leave the section out for no CORS)".into()
            ));
        }
        let origins = (file.origins.iter())
            .map(|o| parse_origin(o))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(at)?;
        let methods = match file.methods {
            None => default_methods.to_vec(),
            Some(list) => {
                let mut out = Vec::new();
                for m in list {
                    let found = (allowed_methods.iter())
                        .find(|a| a.eq_ignore_ascii_case(&m))
                        .ok_or_else(|| {
                            at(format!(
                                "method {m:?} is not one of {}",
                                allowed_methods.join(", ")
                            ))
                        })?;
                    if !out.contains(found) {
                        out.push(*found);
                    }
                }
                if out.is_empty() {
                    return Err(at("methods is empty".into()));
                }
                out
            }
        };
        let headers = match file.headers {
            None => vec!["authorization".to_owned(), "content-type".to_owned()],
            Some(list) => {
                let mut out: Vec<String> = Vec::new();
                for h in list {
                    let name = HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| at(format!("{h:?} is not a header name")))?;
                    if !out.iter().any(|o| o == name.as_str()) {
                        out.push(name.as_str().to_owned());
                    }
                }
                out
            }
        };
        let max_age = match &file.max_age {
            None => DEFAULT_MAX_AGE,
            Some(text) => queue_core::settings::parse_duration(text)
                .map_err(|e| at(format!("max_age: {e}")))?,
        };
        if max_age > MAX_MAX_AGE {
            return Err(at("max_age is at most 24h".into()));
        }
        Ok(Self {
            origins,
            allow_methods: header_value(&methods.join(", ")).map_err(at)?,
            allow_headers: header_value(&headers.join(", ")).map_err(at)?,
            max_age: HeaderValue::from(max_age.as_secs()),
            expose: HeaderValue::from_static(expose),
            methods,
            headers,
            credentials: file.credentials,
        })
    }

    fn allows_origin(&self, origin: &str) -> bool {
        self.origins.contains(&origin.to_ascii_lowercase())
    }

    fn allows_method(&self, method: &str) -> bool {
        self.methods.contains(&method)
    }
}

impl CorsPolicy {
    /// Reads and checks the file; errors name it (and the line, where TOML says). Each
    /// version read later is parsed the same way.
    pub fn load(path: &Path, default_namespace: &str) -> Result<CorsFile, CorsError> {
        let default_namespace = default_namespace.to_owned();
        Reloadable::load("CORS file", path, move |text| {
            Self::parse(text, &default_namespace)
        })
        .map_err(|e| match e {
            LoadError::Io(source) => CorsError::Io {
                path: path.to_owned(),
                source,
            },
            LoadError::Invalid(message) => CorsError::Invalid {
                path: path.to_owned(),
                message,
            },
        })
    }

    /// Parses the file's text.
    pub fn parse(text: &str, default_namespace: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| format!("line {}: ", line_of(text, span.start)))
                .unwrap_or_default();
            format!("{at}{}", e.message())
        })?;
        let function_rule = |section: &str, rule| {
            Rule::parse(section, rule, FUNCTION_METHODS, &["POST"], EXPOSE_FUNCTION).map(Arc::new)
        };
        let mut policy = Self {
            default_namespace: default_namespace.to_ascii_lowercase(),
            ..Self::default()
        };
        if let Some(rule) = file.default {
            policy.default = Some(function_rule("default", rule)?);
        }
        for (namespace, rule) in file.namespaces {
            if !valid_namespace(&namespace) {
                return Err(format!("[namespaces.{namespace}]: not a namespace"));
            }
            let rule = function_rule(&format!("namespaces.{namespace}"), rule)?;
            policy
                .namespaces
                .insert(namespace.to_ascii_lowercase(), rule);
        }
        for (function, rule) in file.functions {
            let section = format!("functions.\"{function}\"");
            let qualified = policy
                .qualified(&function)
                .ok_or_else(|| format!("[{section}]: not a function name"))?;
            let rule = function_rule(&section, rule)?;
            if policy.functions.insert(qualified, rule).is_some() {
                return Err(format!("[{section}]: the same function twice"));
            }
        }
        if let Some(rule) = file.calls {
            policy.calls = Some(Arc::new(Rule::parse(
                "calls",
                rule,
                CALLS_METHODS,
                &["GET"],
                EXPOSE_CALLS,
            )?));
        }
        Ok(policy)
    }

    /// `name` or `name.namespace` (outside the default namespace), as addressed in a path.
    fn qualified(&self, addressed: &str) -> Option<String> {
        match canonical_function(addressed, &self.default_namespace) {
            Ok((name, None)) => Some(name),
            Ok((name, Some(namespace))) => Some(format!("{name}.{namespace}")),
            Err(_) => None,
        }
    }

    /// The section a request to `path` falls under.
    fn rule(&self, kind: Kind, path: &str) -> Option<&Rule> {
        match kind {
            Kind::Calls => self.calls.as_deref(),
            Kind::Function => {
                let (addressed, _) = crate::paths::split_path(path);
                let (name, namespace) =
                    canonical_function(addressed, &self.default_namespace).ok()?;
                let qualified = match &namespace {
                    None => name,
                    Some(namespace) => format!("{name}.{namespace}"),
                };
                let namespace = namespace.unwrap_or_else(|| self.default_namespace.clone());
                (self.functions.get(&qualified))
                    .or_else(|| self.namespaces.get(&namespace))
                    .or(self.default.as_ref())
                    .map(Arc::as_ref)
            }
        }
    }

    /// The answer to a preflight to `path`, or `None` if the request is not one (no `Origin`
    /// or no `Access-Control-Request-Method`: the route's own answer to `OPTIONS`).
    pub fn preflight(&self, kind: Kind, path: &str, headers: &HeaderMap) -> Option<Response> {
        let origin = headers.get(header::ORIGIN)?;
        let method = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let refuse = |why: &str| {
            let mut response = ApiError::new(
                StatusCode::FORBIDDEN,
                "cors_not_allowed",
                format!("cross-origin request not allowed: {why}"),
            )
            .into_response();
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("Origin"));
            response
        };
        let Some(rule) = self.rule(kind, path) else {
            return Some(refuse("no CORS for this route"));
        };
        let Ok(origin_text) = origin.to_str() else {
            return Some(refuse("origin not listed"));
        };
        if !rule.allows_origin(origin_text) {
            return Some(refuse("origin not listed"));
        }
        if !method.to_str().is_ok_and(|m| rule.allows_method(m)) {
            return Some(refuse("method not allowed"));
        }
        for requested in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let Ok(list) = requested.to_str() else {
                return Some(refuse("header not allowed"));
            };
            let unlisted = (list.split(','))
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .any(|h| !rule.headers.iter().any(|a| a.eq_ignore_ascii_case(h)));
            if unlisted {
                return Some(refuse("header not allowed"));
            }
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            rule.allow_methods.clone(),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            rule.allow_headers.clone(),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, rule.max_age.clone());
        if rule.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Some(response)
    }

    /// Whether a request to `path` has a section at all.
    pub fn covers(&self, kind: Kind, path: &str) -> bool {
        self.rule(kind, path).is_some()
    }

    /// Whether the section of `path` lets a page of `origin` send `method` (what gets the
    /// CORS headers on the answer).
    pub fn allows(&self, kind: Kind, path: &str, origin: &str, method: &str) -> bool {
        self.rule(kind, path)
            .is_some_and(|rule| rule.allows_origin(origin) && rule.allows_method(method))
    }
}

/// The layer of the routes CORS may apply to (outside every other, so that refusals carry the
/// headers too): an allowed origin and method get `Access-Control-Allow-Origin` and
/// `Access-Control-Expose-Headers` on the answer, any other none.
pub async fn layer(file: Arc<CorsFile>, kind: Kind, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let origin = request.headers().get(header::ORIGIN).cloned();
    let method = request.method().clone();
    let mut response = next.run(request).await;
    // The version in force when the answer is sent.
    let policy = file.current();
    let Some(rule) = policy.rule(kind, &path) else {
        return response;
    };
    let h = response.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    // Whatever else set them (nothing should), only this decides.
    for name in [
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
    ] {
        h.remove(name);
    }
    let Some(origin) = origin else {
        return response;
    };
    if !(origin.to_str()).is_ok_and(|o| rule.allows_origin(o))
        || !rule.allows_method(method.as_str())
    {
        return response;
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, rule.expose.clone());
    if rule.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[default]
origins = ["https://portal.example.org"]

[namespaces.team-a]
origins = ["https://ui.team-a.example.org", "http://localhost:3000"]
methods = ["post", "GET"]
headers = ["Authorization", "content-type", "x-callback-url"]
max_age = "1h"
credentials = true

[functions."resize.team-a"]
origins = ["https://images.team-a.example.org"]

[functions."plain"]
origins = ["https://plain.example.org"]

[calls]
origins = ["https://ui.team-a.example.org"]
methods = ["GET", "DELETE"]
"#;

    fn preflight(
        policy: &CorsPolicy,
        kind: Kind,
        path: &str,
        origin: &str,
        method: &str,
        headers: Option<&str>,
    ) -> Response {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_str(method).unwrap(),
        );
        if let Some(list) = headers {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                HeaderValue::from_str(list).unwrap(),
            );
        }
        policy.preflight(kind, path, &h).unwrap()
    }

    fn value<'a>(r: &'a Response, name: &HeaderName) -> Option<&'a str> {
        r.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn the_most_specific_section_applies_whole() {
        let policy = CorsPolicy::parse(FILE, "openfaas-fn").unwrap();
        let ui = "https://ui.team-a.example.org";
        let ok = preflight(
            &policy,
            Kind::Function,
            "/async-function/fn.team-a/x",
            ui,
            "POST",
            Some("authorization, Content-Type"),
        );
        assert_eq!(ok.status(), 204);
        assert_eq!(value(&ok, &header::ACCESS_CONTROL_ALLOW_ORIGIN), Some(ui));
        assert_eq!(
            value(&ok, &header::ACCESS_CONTROL_ALLOW_METHODS),
            Some("POST, GET")
        );
        assert_eq!(
            value(&ok, &header::ACCESS_CONTROL_ALLOW_HEADERS),
            Some("authorization, content-type, x-callback-url")
        );
        assert_eq!(value(&ok, &header::ACCESS_CONTROL_MAX_AGE), Some("3600"));
        assert_eq!(
            value(&ok, &header::ACCESS_CONTROL_ALLOW_CREDENTIALS),
            Some("true")
        );
        assert!(value(&ok, &header::VARY).unwrap().starts_with("Origin"));

        let refused = |path: &str, origin: &str, method: &str, headers: Option<&str>| {
            let r = preflight(&policy, Kind::Function, path, origin, method, headers);
            assert_eq!(r.status(), 403, "{path} {origin} {method} {headers:?}");
            assert!(
                !r.headers()
                    .keys()
                    .any(|k| k.as_str().starts_with("access-control-")),
                "{path} {origin}"
            );
        };
        refused(
            "/async-function/fn.team-a",
            "https://evil.example",
            "POST",
            None,
        );
        refused("/async-function/fn.team-a", ui, "PUT", None);
        refused("/async-function/fn.team-a", ui, "POST", Some("x-other"));
        // The function's own section replaces the namespace's.
        refused("/async-function/resize.team-a", ui, "POST", None);
        let images = preflight(
            &policy,
            Kind::Function,
            "/async-function/resize.team-a",
            "https://images.team-a.example.org",
            "POST",
            None,
        );
        assert_eq!(images.status(), 204);
        // Other namespaces: [default]; `plain` is in the default namespace, either spelling.
        for path in ["/async-function/fn.team-b", "/async-function/fn"] {
            let r = preflight(
                &policy,
                Kind::Function,
                path,
                "https://portal.example.org",
                "POST",
                None,
            );
            assert_eq!(r.status(), 204, "{path}");
        }
        for path in [
            "/async-function/plain",
            "/async-function/plain.openfaas-fn/x",
        ] {
            let r = preflight(
                &policy,
                Kind::Function,
                path,
                "https://plain.example.org",
                "POST",
                None,
            );
            assert_eq!(r.status(), 204, "{path}");
        }
        refused("/async-function/not%20a%20name", ui, "POST", None);
        let calls = preflight(&policy, Kind::Calls, "/async-calls/x", ui, "DELETE", None);
        assert_eq!(calls.status(), 204);

        let none = CorsPolicy::parse("", "openfaas-fn").unwrap();
        let r = preflight(
            &none,
            Kind::Function,
            "/async-function/fn",
            ui,
            "POST",
            None,
        );
        assert_eq!(r.status(), 403);
        let r = preflight(&none, Kind::Calls, "/async-calls/x", ui, "GET", None);
        assert_eq!(r.status(), 403);
        assert!(
            none.preflight(Kind::Calls, "/x", &HeaderMap::new())
                .is_none()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, needle) in [
            ("[default]\norigins = [\"*\"]\n", "`*`"),
            ("[default]\norigins = [\"https://a.example/\"]\n", "no path"),
            (
                "[default]\norigins = [\"https://a.example/app\"]\n",
                "no path",
            ),
            (
                "[default]\norigins = [\"ftp://a.example\"]\n",
                "http or https",
            ),
            ("[default]\norigins = []\n", "empty"),
            (
                "[default]\norigins = [\"https://a.example\"]\nmethods = [\"HEAD\"]\n",
                "HEAD",
            ),
            (
                "[calls]\norigins = [\"https://a.example\"]\nmethods = [\"POST\"]\n",
                "POST",
            ),
            (
                "[default]\norigins = [\"https://a.example\"]\nheaders = [\"a b\"]\n",
                "header name",
            ),
            (
                "[default]\norigins = [\"https://a.example\"]\nmax_age = \"2d\"\n",
                "24h",
            ),
            ("[default]\norigin = [\"https://a.example\"]\n", "line 2"),
            (
                "[namespaces.\"a.b\"]\norigins = [\"https://a.example\"]\n",
                "not a namespace",
            ),
            (
                "[functions.\"a b\"]\norigins = [\"https://a.example\"]\n",
                "not a function",
            ),
            (
                "[functions.\"fn\"]\norigins = [\"https://a.example\"]\n[functions.\"fn.openfaas-fn\"]\norigins = [\"https://a.example\"]\n",
                "twice",
            ),
        ] {
            let e = CorsPolicy::parse(text, "openfaas-fn").unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
        assert!(
            CorsPolicy::parse("[default]\norigins = [\"HTTPS://A.example:8443\"]\n", "x").is_ok()
        );
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n# cors")
            .expect("a CORS example in README");
        let rest = &readme[start + "```toml\n".len()..];
        let example = &rest[..rest.find("```").unwrap()];
        CorsPolicy::parse(example, "openfaas-fn").unwrap();
    }
}
