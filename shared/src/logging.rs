//! The error log, shared by the master and its workers (one file, `O_APPEND`).
//!
//! Lines look like nginx's: `2026/11/25 01:52:20 [warn] 4242#worker-1: message`, so operators'
//! habits (grep, logrotate, tail) carry over.

use crate::config::LogLevel;
use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

struct NginxFormat {
    role: String,
}

impl<S, N> FormatEvent<S, N> for NginxFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG | Level::TRACE => "debug",
        };
        write!(w, "{}", line_prefix(level, &self.role))?;
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// The start of an error-log line, as nginx writes it: `2026/12/06 09:00:00 [warn] 123#master: `.
pub fn line_prefix(level: &str, role: &str) -> String {
    let now = chrono::Local::now().format("%Y/%m/%d %H:%M:%S");
    format!("{now} [{level}] {}#{role}: ", std::process::id())
}

/// Installs the global logger writing to `path` (created if needed) at `level`; with
/// `stderr` the lines also go to standard error (foreground mode).
pub fn init(path: &Path, level: LogLevel, role: &str, stderr: bool) -> std::io::Result<()> {
    let file = open_append(path)?;
    let writer = Arc::new(Tee {
        file: Mutex::new((file, path.to_path_buf())),
        stderr,
    });
    let filter = tracing_subscriber::EnvFilter::new(level.as_tracing());
    let builder = tracing_subscriber::fmt()
        .event_format(NginxFormat {
            role: role.to_string(),
        })
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_filter_reloading();
    let filter = builder.reload_handle();
    if builder.try_init().is_ok() {
        let set_level: SetLevel = Box::new(move |level: LogLevel| {
            filter
                .reload(tracing_subscriber::EnvFilter::new(level.as_tracing()))
                .map_err(|e| e.to_string())
        });
        let _ = LOG.set(Installed {
            tee: writer,
            set_level,
        });
    }
    Ok(())
}

/// Installs a logger writing to standard error only, at `level`: for commands that must not
/// touch the error log file but should show what plugins and checks say (`wasmgate test`).
pub fn init_stderr(level: LogLevel, role: &str) {
    let filter = tracing_subscriber::EnvFilter::new(level.as_tracing());
    let _ = tracing_subscriber::fmt()
        .event_format(NginxFormat {
            role: role.to_string(),
        })
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

type SetLevel = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;

/// The error log [`init`] installed, for [`reopen`] and [`retarget`].
struct Installed {
    tee: Arc<Tee>,
    set_level: SetLevel,
}

static LOG: OnceLock<Installed> = OnceLock::new();

/// Reopens the error log file by its path (after logrotate moved it away: SIGUSR1).
pub fn reopen() -> std::io::Result<()> {
    let Some(log) = LOG.get() else {
        return Ok(());
    };
    let mut file = log.tee.file.lock().unwrap_or_else(|p| p.into_inner());
    file.0 = open_append(&file.1)?;
    Ok(())
}

/// Moves the installed error log to `path` at `level` (a reload that changed them). The file
/// is opened first: on error the log stays where it was, as it was.
pub fn retarget(path: &Path, level: LogLevel) -> std::io::Result<()> {
    let Some(log) = LOG.get() else {
        return Ok(());
    };
    {
        let mut file = log.tee.file.lock().unwrap_or_else(|p| p.into_inner());
        if file.1 != path {
            *file = (open_append(path)?, path.to_path_buf());
        }
    }
    (log.set_level)(level).map_err(std::io::Error::other)
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Writes each line to the file and, optionally, standard error.
struct Tee {
    /// The open file and the path it was opened by (reopened by path for logrotate).
    file: Mutex<(std::fs::File, PathBuf)>,
    stderr: bool,
}

impl std::io::Write for &Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stderr {
            let _ = std::io::stderr().write_all(buf);
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line: O_APPEND keeps lines from different processes whole.
        f.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
