//! The access log: one line per request, in APISIX's default (nginx-like) format:
//!
//! ```text
//! $remote_addr - - [$time_local] $http_host "$request" $status $body_bytes_sent $request_time
//! "$http_referer" "$http_user_agent" $upstream_addr $upstream_status $upstream_response_time $route_id
//! ```
//!
//! Lines are buffered per worker and written with one `write` per flush to a file opened with
//! `O_APPEND`, so lines from different workers never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Flush when this much is buffered, and at least every [`FLUSH_EVERY`].
const FLUSH_AT: usize = 32 << 10;
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

pub struct AccessLog {
    file: Option<Mutex<File>>,
    buf: Mutex<Vec<u8>>,
}

/// The fields of one line.
pub struct Entry<'a> {
    pub remote_addr: &'a str,
    pub host: &'a str,
    pub request_line: &'a str,
    pub status: u16,
    pub body_bytes_sent: u64,
    pub request_time: Duration,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub upstream_addr: &'a str,
    pub upstream_status: Option<u16>,
    pub upstream_time: Option<Duration>,
    pub route_id: &'a str,
}

impl AccessLog {
    /// Opens `path` (`off` disables the log).
    pub fn open(prefix: &Path, setting: &str) -> std::io::Result<AccessLog> {
        let file = if setting == "off" {
            None
        } else {
            let path = prefix.join(setting);
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            Some(Mutex::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            ))
        };
        Ok(AccessLog {
            file,
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT * 2)),
        })
    }

    pub fn log(&self, e: &Entry<'_>) {
        if self.file.is_none() {
            return;
        }
        let now = chrono::Local::now().format("%d/%b/%Y:%H:%M:%S %z");
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let up_status = e
            .upstream_status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        let up_time = e
            .upstream_time
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let line = format!(
            "{} - - [{now}] {} \"{}\" {} {} {:.3} \"{}\" \"{}\" {} {} {} {}\n",
            e.remote_addr,
            dash(e.host),
            e.request_line.escape_debug(),
            e.status,
            e.body_bytes_sent,
            e.request_time.as_secs_f64(),
            dash(e.referer).escape_debug(),
            dash(e.user_agent).escape_debug(),
            dash(e.upstream_addr),
            up_status,
            up_time,
            dash(e.route_id),
        );
        let full = {
            let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            buf.extend_from_slice(line.as_bytes());
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        }
    }

    pub fn flush(&self) {
        let Some(file) = &self.file else { return };
        let data = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        if data.is_empty() {
            return;
        }
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&data) {
            tracing::error!("access log write failed: {e}");
        }
    }
}
