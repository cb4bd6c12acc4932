//! The `/v1` router against its OpenAPI document: every served route is documented and every
//! documented route served, the schemas match the types the code parses. A test module of its
//! own, so that no `api*` module has to import the router that imports it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use sluice_core::{ErrorKind, FunctionConfig, SluiceError};

use crate::api_openapi::*;
use crate::node::Node;

fn doc() -> Value {
    serde_json::from_str(&crate::api::routes().1).expect("the document is JSON")
}

/// (METHOD, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// (METHOD, path) of every route the router serves, read from its `Debug` form: axum has no
/// API that lists routes. Should axum change that form, this finds nothing and the test
/// fails rather than passes. HEAD is left out: axum answers it for every GET.
fn served(router: &axum::Router<Arc<Node>>) -> BTreeSet<(String, String)> {
    let debug = format!("{router:?}");
    let main = debug.split("fallback_router:").next().unwrap();
    let (routes, paths) = main.split_once("paths: {").expect("the router's Debug lists its paths");
    let mut methods: HashMap<&str, Vec<&str>> = HashMap::new();
    for chunk in routes.split("RouteId(").skip(1) {
        let (id, rest) = chunk.split_once(')').unwrap();
        let allow = rest.split("allow_header: Bytes(b\"").nth(1).expect("a route lists its methods");
        methods.insert(id, allow.split('"').next().unwrap().split(',').collect());
    }
    let mut out = BTreeSet::new();
    for chunk in paths.split("RouteId(").skip(1) {
        let (id, rest) = chunk.split_once(')').unwrap();
        let path = rest.split('"').nth(1).unwrap();
        for m in methods[id].iter().filter(|m| **m != "HEAD") {
            out.insert((m.to_string(), path.to_string()));
        }
    }
    out
}

#[test]
fn the_document_is_openapi_3_1_and_every_reference_resolves() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every `{param}` of a path is declared, on every operation of that path.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let wanted: BTreeSet<&str> = path.split('{').skip(1).map(|p| p.split('}').next().unwrap()).collect();
        for (method, op) in item.as_object().unwrap() {
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(declared, wanted, "{method} {path}");
            assert!(!op["responses"].as_object().unwrap().is_empty(), "{method} {path}");
        }
    }
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"").skip(1) {
        let name = r.split('"').next().unwrap().strip_prefix("#/components/schemas/").unwrap();
        assert!(doc["components"]["schemas"][name].is_object(), "dangling reference {name}");
    }
    assert_eq!(doc["components"]["securitySchemes"][BEARER]["scheme"], "bearer");
}

#[test]
fn every_route_the_router_serves_is_documented_and_every_documented_route_is_served() {
    let (router, _) = crate::api::routes();
    let served = served(router);
    assert!(served.len() >= 10, "could not read the routes from the router: {served:?}");
    let doc = doc();
    let documented: BTreeSet<_> =
        documented(&doc).into_iter().filter(|(_, path)| !path.starts_with("/fn/")).collect();
    assert_eq!(served, documented, "the router and the OpenAPI document differ");
}

#[test]
fn the_fn_route_is_documented_for_its_methods_with_optional_auth() {
    let doc = doc();
    let fn_path = "/fn/{tenant}/{function}/{path}";
    for method in ["get", "post", "put", "delete", "patch"] {
        let op = &doc["paths"][fn_path][method];
        assert!(op.is_object(), "{method} {fn_path} is not documented");
        assert_eq!(op["security"], serde_json::json!([{}, { BEARER: [] }]));
        for status in ["202", "401", "403", "404", "413", "429", "503", "504", "default"] {
            assert!(op["responses"][status].is_object(), "{method} /fn lacks {status}");
        }
    }
    // `split_fn_path` serves exactly this shape.
    assert_eq!(crate::invoke::split_fn_path("/fn/t/f/a/b"), Some(("t", "f", "/a/b")));
}

#[test]
fn every_error_response_has_the_error_schema_and_keyed_routes_document_401_and_503() {
    let doc = doc();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
            let public = path == "/v1/openapi.json";
            for status in ["401", "503"] {
                assert_eq!(responses.contains_key(status), !public, "{method} {path} {status}");
            }
            for status in ["400", "431"] {
                assert!(responses.contains_key(status), "{method} {path} {status}");
            }
        }
    }
    let retry_after = &doc["paths"]["/v1/tenants"]["get"]["responses"]["503"]["headers"]["retry-after"];
    assert!(retry_after.is_object(), "503 documents Retry-After");
}

#[test]
fn the_error_schema_is_what_sluice_sends() {
    for kind in ErrorKind::ALL {
        let json = SluiceError::new(kind, "m").to_json();
        let body: ErrorBody = serde_json::from_value(json).expect("matches ErrorBody");
        assert_eq!(body.error.code, kind.as_str());
    }
    let codes = doc()["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"].clone();
    assert_eq!(codes.as_array().unwrap().len(), ErrorKind::ALL.len());
}

#[test]
fn the_function_config_schema_has_exactly_the_fields_of_function_config() {
    // A field only FunctionConfig has fails here (unknown field); one only the schema has
    // fails to compile (the Default impl reads every field from FunctionConfig).
    let config = serde_json::to_value(FunctionConfig::default()).unwrap();
    let schema: FunctionConfigSchema = serde_json::from_value(config.clone()).expect("same fields");
    assert_eq!(serde_json::to_value(schema).unwrap(), config);
    let documented = doc()["components"]["schemas"]["FunctionConfigSchema"]["properties"].clone();
    let mut names: Vec<_> = documented.as_object().unwrap().keys().cloned().collect();
    let mut fields: Vec<_> = config.as_object().unwrap().keys().cloned().collect();
    names.sort();
    fields.sort();
    assert_eq!(names, fields);
}

#[test]
fn documented_function_limits_are_the_nodes() {
    let limits = sluice_core::Limits::default();
    let props = doc()["components"]["schemas"]["FunctionConfigSchema"]["properties"].clone();
    assert_eq!(props["memory_bytes"]["maximum"], limits.function_memory_bytes_max);
    let timeout_max = limits.function_timeout_max.as_millis() as u64;
    assert_eq!(props["timeout_ms"]["maximum"], timeout_max);
    assert_eq!(props["async_timeout_ms"]["maximum"], timeout_max);
    // What the schema allows, validation accepts; one past it, validation refuses.
    let at_max = FunctionConfig {
        memory_bytes: limits.function_memory_bytes_max,
        timeout_ms: timeout_max,
        ..Default::default()
    };
    assert!(at_max.validate(&limits).is_ok());
    let over = FunctionConfig { memory_bytes: limits.function_memory_bytes_max + 1, ..Default::default() };
    assert!(over.validate(&limits).is_err());
}
