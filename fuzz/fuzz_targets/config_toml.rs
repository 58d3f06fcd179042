//! The configuration loader on any TOML text: `Config::from_toml_str` is what `herald serve
//! --config FILE` does with the file's contents (figment over the defaults, then validation).
//! It must answer every input with a `Config` or an error naming the problem, never panic; an
//! accepted configuration must hold the invariants validation promises.
#![no_main]

use herald_server::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text) {
        Ok(config) => {
            let limits = &config.limits;
            assert!(limits.max_message_bytes > 0 && limits.send_queue > 0);
            assert!(limits.messages_per_second > 0 && limits.burst > 0);
            assert!(!config.heartbeat.interval.is_zero());
            assert!(config.auth.secret.as_ref().is_none_or(|s| s.len() >= 16));
            assert!(config.api.keys.iter().all(|key| key.len() >= 16));
            assert_eq!(config.tls.cert.is_some(), config.tls.key.is_some());
        }
        Err(ConfigError::Key { key, reason }) => {
            assert!(!key.is_empty() && !reason.is_empty());
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
