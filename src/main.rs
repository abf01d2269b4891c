//! The `courier` command: `run` the worker, or `validate` a configuration.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use courier::{Config, Error, Shutdown};

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
    /// Consume, deliver and ack until SIGINT or SIGTERM; SIGHUP or a change of the file reloads
    /// the configuration.
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
    /// Inspect, replay or purge dead letters. Works on the store directly when no worker runs,
    /// and through the worker's admin port (`[admin] listen`) when one holds the store.
    #[command(name = "dead-letters")]
    DeadLetters {
        /// The configuration file (for the store path, the destinations and the admin port).
        #[arg(long, short, default_value = "config.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        select: Select,
        /// One JSON array instead of text lines (includes the events and raw bodies).
        #[arg(long)]
        json: bool,
    },
    /// Attempt matching letters again now, through each destination's circuit and rate limit;
    /// delivered ones leave the list. Exit 1 if any was not delivered.
    Replay {
        #[command(flatten)]
        select: Select,
        /// Go through an open circuit and past the rate limit.
        #[arg(long)]
        force: bool,
    },
    /// Delete matching letters (all by default).
    Purge {
        #[command(flatten)]
        select: Select,
    },
}

/// Which letters a dead-letter command applies to (all by default).
#[derive(clap::Args)]
struct Select {
    /// Only this destination's letters.
    #[arg(long)]
    destination: Option<String>,
    /// Only the letter with this key (as listed) or the letters of this event id.
    #[arg(long)]
    id: Option<String>,
    /// Only letters after this key (as listed), to go on where an earlier command stopped.
    #[arg(long, value_name = "KEY")]
    after: Option<courier::store::LetterKey>,
    /// At most this many letters, the oldest that match.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl Select {
    fn filter(self) -> courier::deadletters::Filter {
        courier::deadletters::Filter {
            destination: self.destination,
            id: self.id,
            after: self.after,
            limit: self.limit,
        }
    }
}

/// jemalloc instead of glibc's malloc: each HTTP request makes three allocations larger than the
/// 1,032 bytes glibc's per-thread cache holds (hyper's 8 KiB read buffer, two reqwest futures),
/// and glibc serves those from its locked arena (docs/performance.md).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { config } => match Config::load(&config) {
            Ok(c) => {
                let sources: Vec<&str> = [
                    c.rabbitmq.as_ref().map(|_| "rabbitmq"),
                    c.mqtt.as_ref().map(|_| "mqtt"),
                ]
                .into_iter()
                .flatten()
                .collect();
                println!(
                    "{}: valid ({} destination(s); sources: {})",
                    config.display(),
                    c.destinations.len(),
                    sources.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("courier: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::DeadLetters { config, action } => {
            let (config, runtime) = match load_with_runtime(&config, false) {
                Ok(parts) => parts,
                Err(code) => return code,
            };
            match runtime.block_on(dead_letters(config, action)) {
                Ok(code) => code,
                Err(message) => {
                    eprintln!("courier: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config: path } => {
            let (config, runtime) = match load_with_runtime(&path, true) {
                Ok(parts) => parts,
                Err(code) => return code,
            };
            match runtime.block_on(run(config, &path)) {
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

/// Loads the configuration (exit code 2 when invalid) and builds the async runtime (exit 1).
fn load_with_runtime(
    path: &std::path::Path,
    multi_thread: bool,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("courier: {}: {e}", path.display());
        ExitCode::from(2)
    })?;
    let mut builder = if multi_thread {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = config.service.worker_threads {
            builder.worker_threads(threads);
        }
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().build().map_err(|e| {
        eprintln!("courier: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })?;
    Ok((config, runtime))
}

async fn run(config: Config, path: &std::path::Path) -> Result<(), Error> {
    let shutdown = Shutdown::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutdown requested: finishing in-flight deliveries (signal again to exit now)"
        );
        signal.request();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now; unacked messages will be redelivered");
        std::process::exit(130);
    });
    courier::run_reloading(config, path, shutdown, std::sync::Arc::default()).await
}

/// Runs a dead-letter command on the store, or through the running worker's admin port.
async fn dead_letters(config: Config, action: DeadLetterAction) -> Result<ExitCode, String> {
    use courier::deadletters::{self, ReplayOptions, ReplayResult};
    use courier::store::{DeadLetter, StoreError};

    let local = match courier::open_for_commands(&config).await {
        Ok(parts) => Some(parts),
        Err(Error::Store(StoreError::Locked { path })) => {
            if config.admin.listen.is_none() {
                return Err(format!(
                    "the store {path} is in use by a running courier; stop it first, or set \
                     [admin] listen in the config so this command can ask the worker"
                ));
            }
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    let admin = |path: &str| -> Result<String, String> {
        let listen = config.admin.listen.clone().unwrap_or_default();
        let addr: std::net::SocketAddr = listen
            .parse()
            .map_err(|_| format!("admin.listen {listen:?}"))?;
        let host = if addr.ip().is_unspecified() {
            std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        Ok(format!("http://{host}{path}"))
    };
    // Never through a proxy of the environment (HTTP_PROXY, set for partner traffic): the admin
    // port is local, and the request carries the admin token.
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| format!("making the HTTP client for the admin port: {e}"))?;
    // The worker's dead-letter endpoints need the admin token when one is set.
    let token = config
        .admin
        .token
        .as_ref()
        .map(|t| t.expose().to_string())
        .or_else(|| std::env::var("COURIER_ADMIN_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let authorized = |request: reqwest::RequestBuilder| match &token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    if local.is_none() {
        worker_takes_pages(authorized(client.get(admin("/dead-letters")?))).await?;
    }
    match action {
        DeadLetterAction::List { select, json } => {
            use serde::ser::{SerializeSeq, Serializer};
            use std::io::Write;

            // Page by page, each printed before the next is read: a tree of millions of
            // letters never sits in this process's memory, nor in the worker's.
            let filter = select.filter();
            let mut left = filter.limit.unwrap_or(usize::MAX);
            let mut page_filter = filter.clone();
            let mut text_out = (!json).then(|| std::io::BufWriter::new(std::io::stdout()));
            let mut json_out = json.then(|| {
                serde_json::Serializer::pretty(std::io::BufWriter::new(std::io::stdout()))
            });
            let mut array = match &mut json_out {
                Some(json_out) => Some(json_out.serialize_seq(None).map_err(|e| e.to_string())?),
                None => None,
            };
            let mut count = 0usize;
            while left > 0 {
                let want = left.min(courier::admin::LIST_PAGE);
                page_filter.limit = Some(want);
                let letters: Vec<DeadLetter> = match &local {
                    Some((deliverer, _)) => {
                        deadletters::list(deliverer, &page_filter).map_err(|e| e.to_string())?
                    }
                    None => {
                        ask_worker(authorized(
                            client.get(admin("/dead-letters")?).query(&page_filter),
                        ))
                        .await?
                    }
                };
                for l in &letters {
                    if let Some(array) = &mut array {
                        array.serialize_element(l).map_err(|e| e.to_string())?;
                    }
                    if let Some(out) = &mut text_out {
                        print_letter(out, l).map_err(|e| format!("writing the list: {e}"))?;
                    }
                }
                count += letters.len();
                left = left.saturating_sub(letters.len());
                match letters.last() {
                    Some(last) if letters.len() == want => {
                        let last = last.key.parse()?;
                        if page_filter.after.is_some_and(|after| last <= after) {
                            return Err(format!(
                                "the letters after {last} came back again; the list is cut short"
                            ));
                        }
                        page_filter.after = Some(last);
                    }
                    _ => break,
                }
            }
            if let Some(array) = array {
                array.end().map_err(|e| e.to_string())?;
            }
            let written = match (json_out, text_out) {
                (Some(json_out), _) => {
                    let mut out = json_out.into_inner();
                    writeln!(out).and_then(|()| out.flush())
                }
                (None, Some(mut out)) => {
                    writeln!(out, "{count} dead letter(s)").and_then(|()| out.flush())
                }
                (None, None) => Ok(()),
            };
            written.map_err(|e| format!("writing the list: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        DeadLetterAction::Replay { select, force } => {
            let filter = select.filter();
            let options = ReplayOptions { force };
            let results: Vec<ReplayResult> = match &local {
                Some((deliverer, destinations)) => {
                    let replayed =
                        deadletters::replay(deliverer, destinations, &filter, options).await;
                    deliverer.telemetry().shutdown().await;
                    replayed.map_err(|e| e.to_string())?
                }
                None => {
                    ask_worker(authorized(
                        client
                            .post(admin("/dead-letters/replay")?)
                            .query(&filter)
                            .query(&options),
                    ))
                    .await?
                }
            };
            for r in &results {
                println!(
                    "{:9} key={} event={} destination={}  {}",
                    r.outcome,
                    r.key,
                    r.event_id.as_deref().unwrap_or("-"),
                    r.destination.as_deref().unwrap_or("-"),
                    r.detail
                );
            }
            let delivered = results.iter().filter(|r| r.outcome == "delivered").count();
            println!(
                "{delivered} of {} replayed letter(s) delivered",
                results.len()
            );
            Ok(if delivered == results.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DeadLetterAction::Purge { select } => {
            let filter = select.filter();
            let purged = match &local {
                Some((deliverer, _)) => deadletters::purge(deliverer, &filter)
                    .await
                    .map_err(|e| e.to_string())?,
                None => {
                    let answer: serde_json::Value = ask_worker(authorized(
                        client.post(admin("/dead-letters/purge")?).query(&filter),
                    ))
                    .await?;
                    answer["purged"].as_u64().unwrap_or(0) as usize
                }
            };
            println!("{purged} dead letter(s) purged");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line of `dead-letters list`, and a second with the MQTT 5 properties a letter kept.
fn print_letter(
    out: &mut impl std::io::Write,
    l: &courier::store::DeadLetter,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{}  {}  {:?}  destination={}  event={}  attempts={}  status={}  {}",
        l.key,
        courier::sender::format_time(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(l.at_ms)
        ),
        l.kind,
        l.destination.as_deref().unwrap_or("-"),
        l.event_id.as_deref().unwrap_or("-"),
        l.attempts,
        l.last_status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        l.reason
    )?;
    if let Some(properties) = &l.properties {
        writeln!(out, "    mqtt5: {properties}")?;
    }
    Ok(())
}

/// Checks that the running worker takes `after` and `limit`. A worker older than them ignores
/// them: it would purge or replay every matching letter where `--limit` asked for a few, and
/// answer every page of a listing with the whole list. One that takes them refuses the `after`
/// of this probe (`400`); an older one answers it (`200`, no letter has that id).
async fn worker_takes_pages(request: reqwest::RequestBuilder) -> Result<(), String> {
    let response = request
        .query(&[("id", "\u{0}probe"), ("after", "-"), ("limit", "0")])
        .send()
        .await
        .map_err(|e| format!("asking the running worker: {e}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::BAD_REQUEST {
        return Ok(());
    }
    if status.is_success() {
        return Err(
            "the running worker is older than this command and would ignore its \
                    selection by --after and --limit; restart the worker with this version \
                    first"
                .into(),
        );
    }
    let why = response.text().await.unwrap_or_default();
    Err(format!(
        "the running worker answered {status}: {}",
        why.trim()
    ))
}

/// Sends a dead-letter request to the running worker's admin port and decodes its JSON answer;
/// a refusal comes back with the worker's own explanation.
async fn ask_worker<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> Result<T, String> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("asking the running worker: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let why = response.text().await.unwrap_or_default();
        return Err(format!(
            "the running worker answered {status}: {}",
            why.trim()
        ));
    }
    response
        .json()
        .await
        .map_err(|e| format!("reading the worker's answer: {e}"))
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
