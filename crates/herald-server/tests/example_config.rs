//! `herald.example.toml` is the configuration reference: it must name every key of `Config`
//! and show its default, so a key added without documentation, or a default changed without
//! updating the file, fails here.
//!
//! Keys whose default is "unset" (`auth.secret`, …) cannot be written with their default value
//! in TOML, so the file documents them as a commented-out line `# key = example` in their
//! section; every other key is set, uncommented, to its default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};
use herald_server::config::Config;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../herald.example.toml")
}

/// `section.key` for every key of the default configuration, split by whether the default is
/// a value (`set`) or unset (`unset`).
fn default_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let mut set = BTreeSet::new();
    let mut unset = BTreeSet::new();
    for (section, keys) in defaults.as_object().unwrap() {
        for (key, value) in keys.as_object().unwrap() {
            let name = format!("{section}.{key}");
            if value.is_null() {
                unset.insert(name);
            } else {
                set.insert(name);
            }
        }
    }
    (set, unset)
}

/// `section.key` for every key the example sets and every key it shows commented out.
fn example_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let mut set = BTreeSet::new();
    let mut commented = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (target, assignment) = match line.strip_prefix("# ") {
            Some(rest) => (&mut commented, rest),
            None => (&mut set, line),
        };
        if let Some((key, _)) = assignment.split_once(" = ")
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            target.insert(format!("{section}.{key}"));
        }
    }
    (set, commented)
}

#[test]
fn example_config_is_a_valid_configuration() {
    Config::load(Some(&example_path()), []).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn example_config_names_every_key() {
    let (default_set, default_unset) = default_keys();
    let (example_set, example_commented) = example_keys();
    let undocumented: Vec<_> = default_set.difference(&example_set).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from herald.example.toml (set them to their default): {undocumented:?}"
    );
    let undocumented: Vec<_> = default_unset.difference(&example_commented).collect();
    assert!(
        undocumented.is_empty(),
        "unset-by-default keys missing from herald.example.toml (add `# key = example`): \
         {undocumented:?}"
    );
    let all_keys: BTreeSet<_> = default_set.union(&default_unset).collect();
    let stale: Vec<_> = example_commented
        .iter()
        .filter(|key| !all_keys.contains(key))
        .collect();
    assert!(
        stale.is_empty(),
        "herald.example.toml documents keys Config does not have: {stale:?}"
    );
}

#[test]
fn example_config_values_are_the_defaults() {
    // The file alone, without the HERALD_* environment that `Config::load` would also read.
    let from_file: Config = Figment::from(Toml::file_exact(example_path()))
        .extract()
        .unwrap_or_else(|e| panic!("{e}"));
    let from_file = serde_json::to_value(from_file).unwrap();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for (section, keys) in defaults.as_object().unwrap() {
        for (key, default) in keys.as_object().unwrap() {
            let documented = &from_file[section][key];
            assert_eq!(
                documented, default,
                "herald.example.toml sets {section}.{key} to {documented}, the default is {default}"
            );
        }
    }
    assert_eq!(from_file, defaults);
}
