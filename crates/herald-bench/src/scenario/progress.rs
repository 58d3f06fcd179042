//! The progress line on stderr: the phase, deliveries per second over the last second, and
//! the error counters. Redrawn in place on a terminal, one line per second otherwise.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::recorder::Recorder;

pub struct Progress {
    phase: Arc<Mutex<String>>,
    stop: CancellationToken,
}

impl Progress {
    pub fn start(enabled: bool, recorder: Arc<Recorder>) -> Self {
        let phase = Arc::new(Mutex::new(String::from("starting")));
        let stop = CancellationToken::new();
        if enabled {
            tokio::spawn(draw(phase.clone(), stop.clone(), recorder));
        }
        Progress { phase, stop }
    }

    pub fn phase(&self, text: impl Into<String>) {
        *self
            .phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = text.into();
    }

    pub fn finish(&self) {
        self.stop.cancel();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn draw(phase: Arc<Mutex<String>>, stop: CancellationToken, recorder: Arc<Recorder>) {
    let terminal = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last = recorder.delivered_total();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let total = recorder.delivered_total();
        let line = format!(
            "{} | {}/s | lost {} | refused {}",
            phase.lock().unwrap_or_else(|p| p.into_inner()),
            crate::report::thousands((total - last) as f64),
            recorder.lost_connections(),
            recorder.refused_count(),
        );
        last = total;
        let mut stderr = std::io::stderr().lock();
        let _ = if terminal {
            write!(stderr, "\r\x1b[K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }
    if terminal {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}
