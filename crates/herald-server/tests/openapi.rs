//! `docs/openapi.yaml` and the router stay in step: every endpoint the router is built from is
//! documented, every documented operation is served, and each documented example succeeds,
//! with a documented status, against a real server.

mod common;

use std::collections::BTreeSet;

use common::TestServer;
use herald_server::http::ENDPOINTS;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn spec() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml exists");
    YamlLoader::load_from_str(&text)
        .expect("docs/openapi.yaml is valid YAML")
        .remove(0)
}

/// Every (METHOD, path, operation) the spec documents.
fn operations(spec: &Yaml) -> Vec<(String, String, Yaml)> {
    let mut found = Vec::new();
    for (path, item) in spec["paths"].as_hash().expect("paths") {
        let path = path.as_str().unwrap().to_owned();
        for method in METHODS {
            let operation = &item[method];
            if !operation.is_badvalue() {
                found.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
    }
    found
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(spec: &'a Yaml, node: &'a Yaml) -> &'a Yaml {
    match node["$ref"].as_str() {
        Some(reference) => reference
            .trim_start_matches("#/")
            .split('/')
            .fold(spec, |node, key| &node[key]),
        None => node,
    }
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Hash(hash) => Value::Object(
            hash.iter()
                .map(|(k, v)| (k.as_str().unwrap().to_owned(), to_json(v)))
                .collect(),
        ),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::String(text) => Value::String(text.clone()),
        Yaml::Integer(number) => Value::from(*number),
        Yaml::Real(text) => Value::from(text.parse::<f64>().unwrap()),
        Yaml::Boolean(flag) => Value::Bool(*flag),
        _ => Value::Null,
    }
}

#[test]
fn the_spec_documents_exactly_the_endpoints_the_router_is_built_from() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let documented: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let routed: BTreeSet<(String, String)> = ENDPOINTS
        .iter()
        .map(|e| (e.method.as_str().to_owned(), e.path.to_owned()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from docs/openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not routed: {unserved:?}"
    );
}

#[test]
fn the_spec_asks_for_a_key_exactly_where_the_router_does() {
    let spec = spec();
    let global_key = !spec["security"].as_vec().unwrap().is_empty();
    for (method, path, operation) in operations(&spec) {
        let documented = match operation["security"].as_vec() {
            Some(requirements) => !requirements.is_empty(),
            None => global_key,
        };
        let endpoint = ENDPOINTS
            .iter()
            .find(|e| e.method.as_str() == method && e.path == path)
            .unwrap_or_else(|| panic!("{method} {path} is documented but not routed"));
        assert_eq!(documented, endpoint.needs_api_key, "{method} {path}");
        if endpoint.needs_api_key {
            let responses = operation["responses"].as_hash().unwrap();
            assert!(
                responses.contains_key(&Yaml::String("401".into())),
                "{method} {path} documents no 401"
            );
        }
    }
}

#[tokio::test]
async fn every_documented_example_succeeds_with_a_documented_status() {
    let spec = spec();
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await;

    let mut operations = operations(&spec);
    // The disconnect example ends alice's connection, which the others look at: it goes last.
    operations.sort_by_key(|(_, path, _)| path.ends_with("/disconnect"));
    for (method, template, operation) in operations {
        let mut path = template.clone();
        for parameter in operation["parameters"].as_vec().into_iter().flatten() {
            let parameter = resolve(&spec, parameter);
            if parameter["in"].as_str() == Some("path") {
                let name = parameter["name"].as_str().unwrap();
                let example = parameter["example"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{template}: path parameter {name} has no example"));
                // A connection id is only known once the connection exists.
                let value = if name == "id" {
                    &alice.welcome.conn
                } else {
                    example
                };
                path = path.replace(&format!("{{{name}}}"), value);
            }
        }
        let body = operation["requestBody"]["content"]["application/json"]["example"].clone();
        let body = (!body.is_badvalue()).then(|| to_json(&body).to_string());
        if operation["requestBody"]["required"].as_bool() == Some(true) {
            assert!(
                body.is_some(),
                "{method} {template}: a required body needs an example"
            );
        }
        let reply = server
            .http(&method, &path, body, Some(common::API_KEY))
            .await;
        let documented: Vec<u16> = operation["responses"]
            .as_hash()
            .unwrap()
            .keys()
            .map(|code| code.as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            (200..300).contains(&reply.status) && documented.contains(&reply.status),
            "{method} {path} answered {} to its example (documented: {documented:?}): {}",
            reply.status,
            reply.body
        );
        if path.starts_with("/api/") {
            let _: Value = serde_json::from_str(&reply.body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", reply.body));
        }
    }
}
