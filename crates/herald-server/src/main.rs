//! The `herald` command line: parse, load config, call into the library.
//!
//! `publish`, `send` and `broadcast` call a running server's API over HTTP(S) with `ureq`: a
//! small blocking client (no async runtime needed for one request) on the same rustls/ring
//! stack as the server, so a cron job or shell script can push with one command.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use figment::value::Value;

use herald_server::auth::Authenticator;
use herald_server::config::{Config, LogFormat};
use herald_server::engine::sqlite::backup::backup;
use herald_server::tls::ServerTls;
use herald_server::{build_node, server, telemetry};

/// jemalloc rather than the system allocator: an idle connection is a few dozen small
/// allocations made while thousands of handshakes come and go, and glibc's per-chunk headers,
/// its 128-byte-aligned blocks (tokio tasks) and the holes handshakes leave between live
/// objects cost ~0.4 KiB per idle connection more (`docs/benchmarks.md`, idle memory).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Herald: real-time messaging over WebSocket.
///
/// Run `herald serve` to start a server on 127.0.0.1:8080 with embedded engines (no setup), and
/// `herald token --user alice` to mint a token for it.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML configuration file (see herald.example.toml). Environment variables HERALD_* and
    /// flags override it.
    #[arg(long, short, global = true, env = "HERALD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Address to listen on for HTTP and WebSocket [default: 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Name of this node in logs and welcome frames.
        #[arg(long)]
        node_id: Option<String>,
        /// Development only: accept ?user=NAME without a token.
        #[arg(long)]
        anonymous: bool,
        /// Development only: hand out tokens at POST /dev/token (the chat page's name sign-in).
        #[arg(long)]
        dev_login: bool,
    },
    /// Mint a token signed with the configured auth.secret (HS256).
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Allow broadcast to every connection.
        #[arg(long)]
        admin: bool,
        /// Limit the rooms the user may join or publish to (comma-separated).
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Publish a message to a room through a running server's API.
    Publish {
        /// The room.
        #[arg(long)]
        room: String,
        #[command(flatten)]
        message: MessageArgs,
    },
    /// Send a direct message to users through a running server's API.
    Send {
        /// Recipients (comma-separated user ids).
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        #[command(flatten)]
        message: MessageArgs,
    },
    /// Send a message to every connection through a running server's API.
    Broadcast {
        #[command(flatten)]
        message: MessageArgs,
    },
    /// Copy the database in store.path to a new file, consistently, while the server runs
    /// (SQLite's online backup). To restore: stop the server, put the copy in the data folder
    /// as herald.db, remove herald.db-wal and herald.db-shm, start the server.
    Backup {
        /// The file to write; it must not exist yet.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

/// What every API message command takes. The server is found at `--url`, else `api.url`
/// (HERALD_API_URL), else from `server.listen`; the key is `api.key` (HERALD_API_KEY), else the
/// first of `api.keys`.
#[derive(Args)]
struct MessageArgs {
    /// The content: JSON (`{"text":"hi"}`, `42`), or else sent as a JSON string; `-` reads it
    /// from standard input.
    content: String,
    /// The sender recipients see [default: server].
    #[arg(long)]
    from: Option<String>,
    /// The server's base URL, e.g. https://chat.example.com.
    #[arg(long)]
    url: Option<String>,
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("herald: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            log_format,
            node_id,
            anonymous,
            dev_login,
        } => {
            let mut overrides: Vec<(&'static str, Value)> = Vec::new();
            if let Some(listen) = listen {
                overrides.push(("server.listen", listen.into()));
            }
            if let Some(format) = log_format {
                let name = match format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                };
                overrides.push(("log.format", name.into()));
            }
            if let Some(node_id) = node_id {
                overrides.push(("server.node_id", node_id.into()));
            }
            if anonymous {
                overrides.push(("auth.anonymous", true.into()));
            }
            if dev_login {
                overrides.push(("auth.dev_login", true.into()));
            }
            let config = Config::load(cli.config.as_deref(), overrides)?;
            serve(config)
        }
        Command::Token {
            user,
            admin,
            rooms,
            ttl,
        } => {
            let config = Config::load(cli.config.as_deref(), [])?;
            let auth = Authenticator::from_config(&config.auth, None)?;
            let token = auth.mint(&user, admin, rooms, ttl)?;
            println!("{token}");
            Ok(())
        }
        Command::Publish { room, message } => {
            let mut body = message.body()?;
            body["room"] = room.into();
            call_api(cli.config, "/api/publish", message.url, body)
        }
        Command::Send { to, message } => {
            let mut body = message.body()?;
            body["to"] = to.into();
            call_api(cli.config, "/api/send", message.url, body)
        }
        Command::Broadcast { message } => {
            let body = message.body()?;
            call_api(cli.config, "/api/broadcast", message.url, body)
        }
        Command::Backup { to } => {
            let config = Config::load(cli.config.as_deref(), [])?;
            let report = backup(&config.store.path, &to)?;
            println!(
                "backed up {} to {} ({} pages, {} bytes)",
                config.store.path.display(),
                to.display(),
                report.pages,
                report.bytes
            );
            Ok(())
        }
    }
}

impl MessageArgs {
    /// The request body with `content` and `from`.
    fn body(&self) -> anyhow::Result<serde_json::Value> {
        let text = if self.content == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the content from standard input")?;
            text
        } else {
            self.content.clone()
        };
        let content = serde_json::from_str(text.trim())
            .unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        let mut body = serde_json::json!({ "content": content });
        if let Some(from) = &self.from {
            body["from"] = from.as_str().into();
        }
        Ok(body)
    }
}

/// Posts a JSON body to the API and prints the JSON answer; a refusal is an error with the
/// server's message.
fn call_api(
    config_file: Option<PathBuf>,
    path: &str,
    url: Option<String>,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref(), [])?;
    let key = config
        .api
        .client_key()
        .context("no API key: set HERALD_API_KEY (or api.key or api.keys in the configuration)")?;
    let base = url
        .or_else(|| config.api.url.clone())
        .unwrap_or_else(|| url_from_listen(config.server.listen, config.tls.enabled()));
    let endpoint = format!("{}{path}", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .post(&endpoint)
        .header("Authorization", &format!("Bearer {key}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let status = response.status();
    let answer = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("cannot read the answer from {endpoint}"))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|value| value["error"].as_str().map(str::to_owned))
            .unwrap_or(answer);
        bail!("{endpoint} answered {status}: {message}");
    }
    println!("{answer}");
    Ok(())
}

/// The server's own address as a URL, with a loopback address for a wildcard listen address.
fn url_from_listen(listen: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = match listen {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => format!("127.0.0.1:{}", v4.port()),
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => format!("[::1]:{}", v6.port()),
        other => other.to_string(),
    };
    format!("{scheme}://{host}")
}

fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init_logging(&config.log);
    let generated = (config.auth.secret.is_none() && config.auth.public_key.is_none()).then(|| {
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        announce_generated_secret(&secret);
        secret
    });
    if config.auth.dev_login {
        tracing::warn!(
            "auth.dev_login is on: POST /dev/token gives anyone a token for any user name; \
             development only"
        );
    }
    if config.auth.anonymous {
        tracing::warn!(
            "auth.anonymous is on: anyone can connect as any user with ?user=NAME; development only"
        );
    }
    let listen = config.server.listen;
    let tls = if config.tls.enabled() {
        Some(ServerTls::load(&config.tls)?)
    } else {
        None
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let node = build_node(config, generated.as_deref()).await?;
        let listener =
            server::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        tracing::info!(
            %address,
            node = %node.id(),
            "herald listening ({scheme}://{address}/ws)"
        );
        match tls {
            Some(tls) => server::run_tls(listener, node, tls, shutdown_signal()).await,
            None => server::run(listener, node, shutdown_signal()).await,
        }
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// Tells the operator about a secret generated for this run. The secret itself goes to the
/// terminal only, written directly rather than through `tracing`: whoever can read the logs
/// could otherwise mint tokens for any user, admins included. When standard error is not a
/// terminal (a service manager, a pipe into a log collector) it is not shown at all.
fn announce_generated_secret(secret: &str) {
    let shown = std::io::stderr().is_terminal();
    tracing::warn!(
        secret_shown_on_terminal = shown,
        "auth.secret is not set: generated a random secret for this run only; tokens stop \
         working when the server stops (set auth.secret or HERALD_AUTH_SECRET to keep one)"
    );
    if shown {
        eprintln!(
            "\nMint tokens for this run with:\n  HERALD_AUTH_SECRET={secret} herald token --user NAME\n"
        );
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_url_defaults_to_the_listen_address_with_loopback_for_a_wildcard() {
        let url = |listen: &str, tls| url_from_listen(listen.parse().unwrap(), tls);
        assert_eq!(url("127.0.0.1:8080", false), "http://127.0.0.1:8080");
        assert_eq!(url("0.0.0.0:443", true), "https://127.0.0.1:443");
        assert_eq!(url("[::]:8080", false), "http://[::1]:8080");
        assert_eq!(url("[::1]:9000", true), "https://[::1]:9000");
    }
}
