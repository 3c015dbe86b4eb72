//! The access log: one line per request, in `nginx_config.http.access_log_format`
//! (`wasmgate_shared::logformat`; by default APISIX's fields and the route id):
//!
//! ```text
//! $remote_addr - $remote_user [$time_local] $http_host "$request" $status $body_bytes_sent
//! $request_time "$http_referer" "$http_user_agent" $upstream_addr $upstream_status
//! $upstream_response_time $route_id
//! ```
//!
//! Lines are buffered per worker and written with one `write` per flush to a file opened with
//! `O_APPEND`, so lines from different workers never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use wasmgate_shared::logformat::{Escape, LogFormat};

/// Flush when this much is buffered, and at least every [`FLUSH_EVERY`].
const FLUSH_AT: usize = 32 << 10;
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

pub struct AccessLog {
    format: LogFormat,
    /// The format shows what went upstream (`$upstream_host`, `$upstream_uri`): only then is
    /// it kept for each request.
    pub upstream_target: bool,
    file: Option<Mutex<Sink>>,
    path: Option<std::path::PathBuf>,
    buf: Mutex<Vec<u8>>,
}

/// The open file, and what failed writes (a full disk, a read-only mount) cost.
struct Sink {
    file: File,
    /// Lines not written since the last write that went through.
    lost: u64,
    /// The last write stopped inside a line: the next one ends that line first, so no two
    /// requests share a line.
    torn: bool,
}

impl Sink {
    fn new(file: File) -> Sink {
        Sink {
            file,
            lost: 0,
            torn: false,
        }
    }

    /// Writes `data` (whole lines); on a failure counts the lines that did not make it, and
    /// once writes go through again says how many were lost.
    fn write(&mut self, data: &[u8]) {
        if self.torn {
            match self.file.write(b"\n") {
                Ok(1) => self.torn = false,
                _ => {
                    self.lost += lines(data);
                    return;
                }
            }
        }
        let mut done = 0;
        while done < data.len() {
            match self.file.write(&data[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.lost == 0 {
                        tracing::error!(
                            "access log write failed: {e}; lines are lost until it works"
                        );
                    }
                    break;
                }
            }
        }
        if done < data.len() {
            // The line cut short counts as lost too.
            let rest = &data[done..];
            self.lost += lines(rest);
            self.torn = done > 0 && data[done - 1] != b'\n';
            return;
        }
        if self.lost > 0 {
            tracing::warn!(
                "access log writes work again; {} lines were lost meanwhile",
                self.lost
            );
            self.lost = 0;
        }
    }
}

/// Lines in `data` (each ends with a newline).
fn lines(data: &[u8]) -> u64 {
    data.iter().filter(|b| **b == b'\n').count() as u64
}

/// The fields of one line.
pub struct Entry<'a> {
    pub remote_addr: &'a str,
    pub remote_port: u16,
    /// The connection's TLS: `$scheme` (`https`, else `http`) and the `$ssl_*` variables.
    pub tls: Option<&'a crate::proxy::TlsInfo>,
    /// nginx's `$host`: the request's host, lower-cased, without its port.
    pub host: &'a str,
    pub request_line: &'a str,
    pub status: u16,
    pub body_bytes_sent: u64,
    pub request_time: Duration,
    pub upstream_addr: &'a str,
    /// `http` or `https`, as the upstream speaks to its nodes.
    pub upstream_scheme: &'static str,
    pub upstream_status: Option<u16>,
    pub upstream_time: Option<Duration>,
    /// The `Host` and target the last attempt sent upstream (when the format shows them).
    pub upstream_host: &'a str,
    pub upstream_uri: &'a str,
    pub route_id: &'a str,
    pub request_id: &'a str,
    /// The format's [`wasmgate_shared::logformat::Capture`]s, read off the request's head.
    pub captured: &'a [String],
}

impl AccessLog {
    /// Writes what is buffered, then reopens the file by its path (SIGUSR1, after logrotate).
    pub fn reopen(&self) -> std::io::Result<()> {
        self.flush();
        let (Some(file), Some(path)) = (&self.file, &self.path) else {
            return Ok(());
        };
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let mut sink = file.lock().unwrap_or_else(|p| p.into_inner());
        // A new file starts with no line cut short; the count of lost lines goes on.
        (sink.file, sink.torn) = (f, false);
        Ok(())
    }

    /// Opens `path` (`off` disables the log); lines follow `format` (validated with the
    /// configuration).
    pub fn open(
        prefix: &Path,
        setting: &str,
        format: &str,
        escape: Escape,
    ) -> std::io::Result<AccessLog> {
        let format = LogFormat::parse(format)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .escaped(escape);
        let (file, path) = if setting == "off" {
            (None, None)
        } else {
            let path = prefix.join(setting);
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            (Some(Mutex::new(Sink::new(f))), Some(path))
        };
        Ok(AccessLog {
            upstream_target: format.uses(&["upstream_host", "upstream_uri"]),
            format,
            file,
            path,
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT * 2)),
        })
    }

    /// What a line shows: the request's captures are read with its head.
    pub fn format(&self) -> &LogFormat {
        &self.format
    }

    /// Whether lines are written (not `off`).
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    pub fn log(&self, e: &Entry<'_>) {
        if self.file.is_none() {
            return;
        }
        let target = e.request_line.split(' ').nth(1).unwrap_or("");
        let line = self.format.render(
            |var| match var {
                "remote_addr" => e.remote_addr.to_string(),
                "remote_port" => e.remote_port.to_string(),
                "time_local" => chrono::Local::now()
                    .format("%d/%b/%Y:%H:%M:%S %z")
                    .to_string(),
                "time_iso8601" => chrono::Local::now()
                    .format("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string(),
                "msec" => {
                    let d = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
                }
                "host" => e.host.to_string(),
                "request" => e.request_line.to_string(),
                "request_method" => e.request_line.split(' ').next().unwrap_or("").to_string(),
                "request_uri" => target.to_string(),
                // nginx's `$uri`: the path decoded and normalized, as routes match it.
                "uri" => {
                    let path = target.split('?').next().unwrap_or("");
                    match wasmgate_http1::request::normalized_path(path) {
                        Ok(p) => p.into_owned(),
                        Err(_) => path.to_string(),
                    }
                }
                "args" => target.split_once('?').map_or("", |(_, q)| q).to_string(),
                "server_protocol" => e.request_line.rsplit(' ').next().unwrap_or("").to_string(),
                "status" => e.status.to_string(),
                "body_bytes_sent" => e.body_bytes_sent.to_string(),
                "request_time" => format!("{:.3}", e.request_time.as_secs_f64()),
                "upstream_addr" => e.upstream_addr.to_string(),
                "upstream_status" => e.upstream_status.map(|s| s.to_string()).unwrap_or_default(),
                "upstream_response_time" => e
                    .upstream_time
                    .map(|t| format!("{:.3}", t.as_secs_f64()))
                    .unwrap_or_default(),
                "upstream_scheme" if !e.upstream_addr.is_empty() => e.upstream_scheme.into(),
                "upstream_host" => e.upstream_host.to_string(),
                "upstream_uri" => e.upstream_uri.to_string(),
                "route_id" | "apisix_route_id" => e.route_id.to_string(),
                "request_id" => e.request_id.to_string(),
                // `$scheme`, `$ssl_*`, `$pid`: as route `vars` read them.
                _ => crate::proxy::connection_var(e.tls, var)
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default(),
            },
            e.captured,
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
        file.lock().unwrap_or_else(|p| p.into_inner()).write(&data);
    }
}

/// What is still buffered is written when the worker goes: requests logged as its runtime
/// shuts down (a tunnel a draining worker closes) come after its last flush.
impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/dev/full` fails every write with ENOSPC, as a full disk does.
    #[test]
    fn lines_lost_to_a_full_disk_are_counted_and_no_line_is_shared() {
        let mut sink = Sink::new(File::options().write(true).open("/dev/full").unwrap());
        sink.write(b"one\ntwo\n");
        sink.write(b"three\n");
        assert_eq!((sink.lost, sink.torn), (3, false));
        // Space again, after a write that stopped inside a line.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "half a li").unwrap();
        sink.file = File::options().append(true).open(&path).unwrap();
        sink.torn = true;
        sink.write(b"four\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "half a li\nfour\n");
        assert_eq!((sink.lost, sink.torn), (0, false));
    }
}
