//! The `herald` command line: parse, load config, call into the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use figment::value::Value;

use herald_server::auth::Authenticator;
use herald_server::config::{Config, LogFormat};
use herald_server::{embedded_node, server, telemetry};

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
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init_logging(&config.log);
    let generated = (config.auth.secret.is_none() && config.auth.public_key.is_none()).then(|| {
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        tracing::warn!(
            "auth.secret is not set: generated a random secret for this run only. Tokens stop \
             working when the server stops. Mint tokens with: \
             HERALD_AUTH_SECRET={secret} herald token --user NAME \
             (set auth.secret or HERALD_AUTH_SECRET to keep one)"
        );
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
    let node = embedded_node(config, generated.as_deref())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener =
            server::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        tracing::info!(
            address = %listener.local_addr()?,
            node = %node.id,
            "herald listening (ws://{}/ws)",
            listener.local_addr()?
        );
        server::run(listener, node, shutdown_signal()).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
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
