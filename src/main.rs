//! `wasmgate`: an API gateway that runs unmodified Proxy-Wasm plugins.
//!
//! `wasmgate start` runs the master (which execs itself for each worker, titled `wasmgate:
//! worker process`, with `WASMGATE_WORKER` set);
//! `stop`, `reload` and `status` talk to a running master through its pid file and Admin API;
//! `tui` is a terminal console on the Admin API (`wasmgate-tui`).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wasmgate_master::cli::say;
use wasmgate_master::Options;

/// Master and workers allocate through mimalloc: under load glibc's malloc and free (with
/// their consolidation passes) took about a tenth of a worker's time. The wrapper
/// (`wasmgate_shared::alloc`) skips mimalloc's aligned path where plain `mi_malloc` suffices.
#[global_allocator]
static GLOBAL: wasmgate_shared::alloc::Mimalloc = wasmgate_shared::alloc::Mimalloc;

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version,
    about = "An API gateway that runs unmodified Proxy-Wasm plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Prefix directory: logs/, data/ and conf/config.yaml live under it.
    #[arg(short, long, default_value = ".")]
    prefix: PathBuf,
    /// Configuration file (default: <prefix>/conf/config.yaml, else the embedded default).
    #[arg(short, long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (master + workers), as a daemon unless --foreground.
    Start {
        #[command(flatten)]
        common: Common,
        /// Stay in the foreground and log to stderr too (containers, systemd, tests).
        #[arg(long)]
        foreground: bool,
    },
    /// Stop a running gateway (fast; --graceful lets in-flight requests finish).
    Stop {
        #[command(flatten)]
        common: Common,
        /// Stop accepting, let in-flight requests finish (up to worker_shutdown_timeout),
        /// then exit: SIGQUIT, as `nginx -s quit`. Without it: SIGTERM, as `nginx -s stop`.
        #[arg(long)]
        graceful: bool,
    },
    /// Reload config.yaml and plugins without dropping requests, and report the outcome
    /// (through the Admin API; SIGHUP when it cannot be asked).
    Reload {
        #[command(flatten)]
        common: Common,
    },
    /// Reopen the error and access logs, after logrotate moved them (SIGUSR1).
    Reopen {
        #[command(flatten)]
        common: Common,
    },
    /// Show the master and its workers.
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Check the configuration and exit (like `nginx -t`).
    Test {
        #[command(flatten)]
        common: Common,
    },
    /// A terminal console: routes, plugins, workers and the error log of a running gateway.
    Tui {
        #[command(flatten)]
        common: Common,
        /// Admin API address (default: deployment.admin.admin_listen of the configuration).
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
        /// Admin API key (default: the first admin key of the configuration, or the one
        /// generated into <prefix>/<data_dir>/admin_key).
        #[arg(long)]
        key: Option<String>,
    },
}

fn options(c: Common, foreground: bool) -> Options {
    Options {
        // Absolute, so messages name real paths (start creates the directory first).
        prefix: c.prefix.canonicalize().unwrap_or(c.prefix),
        config: c.config,
        foreground,
    }
}

fn main() -> ExitCode {
    // A worker the master started: its title is `wasmgate: worker process`, no arguments.
    if std::env::var_os(wasmgate_shared::WORKER_ENV).is_some() {
        return exit_code(wasmgate_worker::run());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Start { common, foreground } => {
            wasmgate_master::start(options(common, foreground))
        }
        Command::Stop { common, graceful } => {
            wasmgate_master::cli::stop(&options(common, false), graceful)
        }
        Command::Reload { common } => wasmgate_master::cli::reload(&options(common, false)),
        Command::Reopen { common } => wasmgate_master::cli::signal_master(
            &options(common, false),
            wasmgate_master::cli::Signal::SIGUSR1,
        )
        .map(|pid| say(&format!("reopen signal sent to master {pid}\n"))),
        Command::Status { common } => wasmgate_master::cli::status(&options(common, false)),
        Command::Test { common } => test_config(&options(common, false)),
        Command::Tui { common, admin, key } => tui(&options(common, false), admin, key),
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn test_config(opts: &Options) -> anyhow::Result<()> {
    let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    // What plugins log while they start (why `proxy_on_vm_start` refused, say) goes to
    // stderr at the configured level, as `start --foreground` would show it; the error log
    // file is not touched.
    let level = loaded.config.nginx_config.error_log_level;
    wasmgate_shared::logging::init_stderr(level, "test");
    let notes = wasmgate_master::check(opts)?;
    let origin = loaded.origin;
    for n in notes {
        say(&format!("wasmgate: note: {n}\n"));
    }
    say(&format!("wasmgate: configuration {origin} is ok\n"));
    Ok(())
}

/// `wasmgate tui`: what is not given on the command line comes from the configuration.
fn tui(opts: &Options, admin: Option<String>, key: Option<String>) -> anyhow::Result<()> {
    let (admin, key) = match (admin, key) {
        (Some(admin), Some(key)) => (admin, Some(key)),
        (admin, key) => {
            let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
            let cfg = &loaded.config;
            let key = match key {
                Some(k) => Some(k),
                None => {
                    wasmgate_tui::config::admin_key(cfg, &opts.resolve(&cfg.wasmgate.data_dir))?
                }
            };
            let admin = admin.unwrap_or_else(|| wasmgate_tui::config::admin_address(cfg));
            (admin, key)
        }
    };
    wasmgate_tui::run(wasmgate_tui::Options {
        admin,
        key,
        interval: std::time::Duration::from_secs(1),
    })
}
