//! Where a document states a name or a number the code owns, it is checked against the code:
//! the modules in `docs/architecture.md`, the metrics catalogue in `docs/api.md`, and the
//! buffer sizes, limits and defaults the docs quote.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use herald_server::config::Config;
use herald_server::metrics::CATALOGUE;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text of a `## ` section, up to the next one.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading:?}"));
    let body = &text[start + heading.len() + 2..];
    body.find("\n## ").map_or(body, |end| &body[..end])
}

/// The cells of each table row in `text`, trimmed, backticks removed.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|line| line.starts_with('|') && !line.starts_with("|---"))
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect()
}

/// Files and folders directly in `dir`: `name.rs` for a file, `name/` for a folder.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                format!("{name}/")
            } else {
                name
            }
        })
        .collect()
}

/// Checks one module table against its `src` folder: every file and folder there is in the
/// table (a folder through a row of its own or of a file in it), and every row names a path
/// that exists.
fn check_module_table(rows: &[Vec<String>], src: &Path) {
    let named: Vec<&str> = rows
        .iter()
        .map(|row| row[0].as_str())
        .filter(|cell| *cell != "file" && *cell != "module")
        .collect();
    for entry in entries(src) {
        let listed = if entry.ends_with('/') {
            named.iter().any(|cell| cell.starts_with(&entry))
        } else {
            named.contains(&entry.as_str())
        };
        assert!(
            listed,
            "{} is missing from docs/architecture.md#modules",
            src.join(&entry).display()
        );
    }
    for cell in named {
        assert!(
            src.join(cell).exists(),
            "docs/architecture.md#modules lists {cell}, which is not in {}",
            src.display()
        );
    }
}

#[test]
fn every_module_is_in_the_architecture_table_and_every_row_is_a_module() {
    let architecture = read("docs/architecture.md");
    let modules = section(&architecture, "## Modules");
    let (protocol, server) = modules
        .split_once("`crates/herald-server/src`,")
        .expect("the server's table follows its own line");
    check_module_table(
        &table_rows(protocol),
        &repository().join("crates/herald-protocol/src"),
    );
    check_module_table(
        &table_rows(server),
        &repository().join("crates/herald-server/src"),
    );
}

#[test]
fn the_metrics_catalogue_in_the_api_docs_is_the_one_in_the_code() {
    let api = read("docs/api.md");
    let documented: BTreeMap<String, String> = table_rows(section(&api, "## Metrics"))
        .into_iter()
        .filter(|row| row[0] != "metric")
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect();
    let catalogue: BTreeMap<String, String> = CATALOGUE
        .iter()
        .map(|metric| (metric.name.to_owned(), metric.kind.as_str().to_owned()))
        .collect();
    assert_eq!(
        documented, catalogue,
        "docs/api.md#metrics (left) and metrics::CATALOGUE (right) differ"
    );
    // The sample output quotes help texts: they are the ones the server sends.
    for line in api
        .lines()
        .filter(|line| line.starts_with("# HELP herald_"))
    {
        let (name, help) = line["# HELP ".len()..].split_once(' ').unwrap();
        let metric = CATALOGUE.iter().find(|m| m.name == name).unwrap();
        assert_eq!(help, metric.help, "the help of {name} in docs/api.md");
    }
}

/// The value of `const NAME: T = VALUE;` in a server source file, digits only
/// (`Duration::from_secs(2)` gives 2).
fn constant(file: &str, name: &str) -> u64 {
    let source = read(&format!("crates/herald-server/src/{file}"));
    let declaration = format!("const {name}: ");
    let line = source
        .lines()
        .find(|line| line.contains(&declaration))
        .unwrap_or_else(|| panic!("no {name} in {file}"));
    let value = line.split_once(" = ").unwrap().1.trim_end_matches(';');
    let digits: String = value
        .trim_start_matches("Duration::from_secs(")
        .trim_end_matches(')')
        .chars()
        .filter(|c| *c != '_')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{name} = {value} is not a plain number"))
}

#[test]
fn numbers_the_docs_quote_are_the_ones_in_the_code() {
    let defaults = Config::default();
    let quoted: Vec<(&str, String, u64)> = vec![
        (
            "docs/architecture.md",
            "listen backlog {}".into(),
            constant("server.rs", "LISTEN_BACKLOG"),
        ),
        (
            "docs/architecture.md",
            "(backlog {})".into(),
            constant("server.rs", "LISTEN_BACKLOG"),
        ),
        (
            "docs/architecture.md",
            "a {}-byte read buffer".into(),
            constant("transport/mod.rs", "READ_BUFFER_BYTES"),
        ),
        (
            "docs/architecture.md",
            "a write buffer that starts at {} bytes".into(),
            constant("transport/mod.rs", "WRITE_BUFFER_BYTES"),
        ),
        (
            "docs/architecture.md",
            "up to {} wait for their commit".into(),
            constant("connection/session/answers.rs", "MAX_PIPELINED"),
        ),
        (
            "docs/architecture.md",
            "up to {} stored messages wait for their commit".into(),
            constant("connection/session/answers.rs", "MAX_PIPELINED"),
        ),
        (
            "docs/architecture.md",
            "never waits longer than {} s".into(),
            constant("connection/writer.rs", "CLOSE_WAIT"),
        ),
        (
            "docs/architecture.md",
            "`limits.send_queue` frames (default {})".into(),
            defaults.limits.send_queue as u64,
        ),
        (
            "docs/architecture.md",
            "`server.shutdown_grace` (default {} s)".into(),
            defaults.server.shutdown_grace.as_secs(),
        ),
        (
            "docs/operations.md",
            "`server.shutdown_grace` (default {} s)".into(),
            defaults.server.shutdown_grace.as_secs(),
        ),
        (
            "README.md",
            "(`interval`, default {} s)".into(),
            defaults.heartbeat.interval.as_secs(),
        ),
    ];
    for (doc, template, value) in quoted {
        let phrase = template.replace("{}", &value.to_string());
        let text = read(doc).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains(&phrase),
            "{doc} should say {phrase:?} (the code's value is {value})"
        );
    }
}
