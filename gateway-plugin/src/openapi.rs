//! `GET /openapi.json`: the OpenAPI 3 document of the gateway's HTTP API (`openapi.json` beside
//! this file, served as it is). Public, like `/healthz`: it describes the API, it holds nothing
//! of a deployment. A test holds it to the route table ([`crate::routes::routes`]): the same
//! paths with the same methods, nothing more, nothing less.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /openapi.json`.
pub async fn document() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DOCUMENT,
    )
        .into_response()
}

/// A route table's path (axum syntax) as an OpenAPI path template: `{*path}` is `{path}`.
pub fn template(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use queue_core::backend::jetstream::JetStreamQueue;
    use serde_json::Value;

    use super::*;

    const OPERATIONS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    type Operations = BTreeSet<(String, String)>;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// `(path template, method)` of every route of the table.
    fn table() -> Operations {
        crate::routes::routes::<JetStreamQueue>()
            .iter()
            .flat_map(|route| {
                route
                    .methods
                    .iter()
                    .map(|m| (template(route.path), m.as_str().to_ascii_lowercase()))
            })
            .collect()
    }

    /// `(path template, method)` of every operation of a document.
    fn documented(doc: &Value) -> Operations {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths is an object") {
            let item = item.as_object().expect("a path item is an object");
            for method in OPERATIONS {
                if item.contains_key(method) {
                    out.insert((path.clone(), method.to_owned()));
                }
            }
        }
        out
    }

    /// What one side has and the other lacks, one line each.
    fn differences(table: &Operations, documented: &Operations) -> Vec<String> {
        let missing = table.difference(documented).map(|(p, m)| {
            format!(
                "{} {p}: in the route table, not in openapi.json",
                m.to_uppercase()
            )
        });
        let extra = documented.difference(table).map(|(p, m)| {
            format!(
                "{} {p}: in openapi.json, not in the route table",
                m.to_uppercase()
            )
        });
        missing.chain(extra).collect()
    }

    #[test]
    fn the_document_lists_every_route_of_the_table_and_no_other() {
        let table = table();
        assert!(table.len() >= 20, "{table:?}");
        let diff = differences(&table, &documented(&document()));
        assert!(
            diff.is_empty(),
            "openapi.json and routes::routes differ:\n{}",
            diff.join("\n")
        );
    }

    #[test]
    fn the_comparison_names_a_missing_and_an_extra_route() {
        let mut doc = document();
        let paths = doc["paths"].as_object_mut().unwrap();
        paths.remove("/healthz");
        paths
            .get_mut("/readyz")
            .and_then(Value::as_object_mut)
            .unwrap()
            .insert("post".into(), serde_json::json!({"responses": {}}));
        let diff = differences(&table(), &documented(&doc));
        assert_eq!(
            diff,
            [
                "GET /healthz: in the route table, not in openapi.json",
                "POST /readyz: in openapi.json, not in the route table",
            ],
        );
    }

    /// The path parameters of every operation are exactly those of its template, and every
    /// `$ref` points at something in the document.
    #[test]
    fn parameters_match_the_templates_and_references_resolve() {
        let doc = document();
        let resolve = |value: &Value| -> Value {
            match value.get("$ref").and_then(Value::as_str) {
                Some(r) => doc
                    .pointer(r.trim_start_matches('#'))
                    .unwrap_or_else(|| panic!("{r} does not resolve"))
                    .clone(),
                None => value.clone(),
            }
        };
        for (path, item) in doc["paths"].as_object().unwrap() {
            let expected: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            let shared = item.get("parameters").and_then(Value::as_array);
            for method in OPERATIONS {
                let Some(op) = item.get(method) else { continue };
                let own = op.get("parameters").and_then(Value::as_array);
                let declared: BTreeSet<String> = shared
                    .into_iter()
                    .chain(own)
                    .flatten()
                    .map(&resolve)
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_owned())
                    .collect();
                let declared: BTreeSet<&str> = declared.iter().map(String::as_str).collect();
                assert_eq!(declared, expected, "{method} {path}");
                assert!(op.get("responses").is_some(), "{method} {path}");
            }
        }
        fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            assert!(
                r.starts_with("#/") && doc.pointer(&r[1..]).is_some(),
                "{r} does not resolve"
            );
        }
    }

    /// Every operation of an async route documents the `429` of the quotas.
    #[test]
    fn the_async_routes_document_their_429() {
        let doc = document();
        let invoke: BTreeSet<String> = crate::routes::routes::<JetStreamQueue>()
            .iter()
            .filter(|r| r.permission == crate::auth::Permission::Invoke)
            .map(|r| template(r.path))
            .collect();
        assert!(!invoke.is_empty());
        for path in invoke {
            // The preflight is answered from the CORS file alone, before any quota.
            for method in OPERATIONS.into_iter().filter(|m| *m != "options") {
                if let Some(op) = doc["paths"][&path].get(method) {
                    assert_eq!(
                        op["responses"]["429"]["$ref"], "#/components/responses/CallRateLimited",
                        "{method} {path}"
                    );
                }
            }
        }
    }

    /// Every operation of a route that needs a permission documents the `503`
    /// `auth_unavailable` of a JWT that cannot be checked yet (the keys of `--jwks-url` not
    /// fetched yet); the public ones do not.
    #[test]
    fn protected_routes_document_auth_unavailable() {
        let doc = document();
        let resolve = |value: &Value| -> Value {
            match value.get("$ref").and_then(Value::as_str) {
                Some(r) => doc.pointer(r.trim_start_matches('#')).cloned().unwrap(),
                None => value.clone(),
            }
        };
        let mut protected = 0;
        for route in crate::routes::routes::<JetStreamQueue>() {
            let path = template(route.path);
            for method in route.methods {
                let method = method.as_str().to_ascii_lowercase();
                let op = &doc["paths"][&path][&method];
                let answer = op["responses"].get("503").map(&resolve);
                let says = answer.as_ref().and_then(|a| a["description"].as_str());
                let mentions = says.is_some_and(|d| d.contains("`auth_unavailable`"));
                if route.permission == crate::auth::Permission::Public {
                    assert!(!mentions, "{method} {path} is public");
                } else {
                    protected += 1;
                    assert!(mentions, "{method} {path}: 503 {says:?}");
                    let retry = answer.as_ref().map(|a| &a["headers"]["Retry-After"]);
                    assert!(retry.is_some_and(|h| !h.is_null()), "{method} {path}");
                }
            }
        }
        assert!(protected >= 20, "{protected}");
    }

    #[test]
    fn the_document_carries_the_crate_version() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }
}
