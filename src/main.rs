//! The `courier` command: `run` the worker, or `validate` a configuration.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use courier::{Config, Error};

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Queue-to-REST event delivery worker"
)]
struct Cli {
    /// Log line format; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        env = "COURIER_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, deliver and ack until SIGINT or SIGTERM.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Load and check a configuration, then exit (0 valid, 2 invalid).
    Validate {
        /// The configuration file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: valid ({} destination(s); sources: {})",
                    config.display(),
                    c.destinations.len(),
                    if c.rabbitmq.is_some() {
                        "rabbitmq"
                    } else {
                        "none"
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("courier: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("courier: {}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("courier: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(Error::Config(e)) => {
                    eprintln!("courier: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("courier: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(config: Config) -> Result<(), Error> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutdown requested: finishing in-flight deliveries (signal again to exit now)"
        );
        signal.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; unacked messages will be redelivered");
        std::process::exit(130);
    });
    courier::run(config, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
