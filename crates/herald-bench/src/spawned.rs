//! A Herald server the tool starts itself (`soak --spawn-server PATH`): the given binary on a
//! free loopback port, with its store in a fresh folder and the run's secret, stopped (SIGTERM,
//! then waited for) and its folder removed when dropped. Its log goes to `herald.log` in that
//! folder while it runs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server has to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {binary}: {source}")]
    Start {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} exited before accepting connections ({status}); see {log}")]
    Exited {
        binary: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("{binary} accepted no connection within {START_TIMEOUT:?}")]
    Timeout { binary: String },
}

pub struct SpawnedServer {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
}

impl SpawnedServer {
    pub fn start(binary: &Path, secret: &str) -> Result<Self, SpawnError> {
        let shown = binary.display().to_string();
        let start_error = |source| SpawnError::Start {
            binary: shown.clone(),
            source,
        };
        // The port is free once the probe is dropped; another process could take it in between,
        // which the wait below reports.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .map_err(start_error)?;
        let data = std::env::temp_dir().join(format!(
            "herald-bench-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&data).map_err(start_error)?;
        let log = std::fs::File::create(data.join("herald.log")).map_err(start_error)?;
        let child = Command::new(binary)
            .args(["serve", "--listen", &addr.to_string()])
            .env("HERALD_AUTH_SECRET", secret)
            .env("HERALD_STORE_PATH", data.join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(start_error)?)
            .stderr(log)
            .spawn()
            .map_err(start_error)?;
        let mut server = SpawnedServer { child, addr, data };
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(SpawnError::Exited {
                    binary: shown,
                    status,
                    log: server.data.join("herald.log").display().to_string(),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(SpawnError::Timeout { binary: shown });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
