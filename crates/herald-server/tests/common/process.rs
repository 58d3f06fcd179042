//! The `herald` binary as a child process: a clean environment, and its JSON log read line by
//! line so a test can wait for what the server says it did.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{BufReader, Lines};
use tokio::process::{ChildStderr, Command};

use super::EVENT_TIMEOUT;

/// The binary with no HERALD_* variables from the caller, in `cwd`, output piped, killed when
/// dropped.
pub fn herald(cwd: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .env_clear()
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

pub type LogLines = Lines<BufReader<ChildStderr>>;

/// Reads JSON log lines (`--log-format json`) until one satisfies `wanted`.
pub async fn wait_for_log(lines: &mut LogLines, wanted: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the server exited early");
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && wanted(&entry)
            {
                return entry;
            }
        }
    })
    .await
    .expect("the log line did not come")
}

/// Whether a log entry's message starts with `prefix`.
pub fn message_starts(entry: &Value, prefix: &str) -> bool {
    entry["message"]
        .as_str()
        .is_some_and(|message| message.starts_with(prefix))
}
