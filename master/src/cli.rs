//! `wasmgate stop | reload | status`: talking to a running master through its pid file and
//! Admin API.

use crate::Options;
use anyhow::{bail, Context};
use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::path::Path;

/// The pid in `path` if that process is alive and is a wasmgate master.
pub fn running_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    kill(Pid::from_raw(pid), None).ok()?;
    // A stale pid file may name a recycled pid: check the process is ours.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("wasmgate")
        .then_some(pid)
}

/// Removes the pid file if it still names this process.
pub fn remove_pid_file(path: &Path) {
    if std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        == Some(std::process::id())
    {
        let _ = std::fs::remove_file(path);
    }
}

fn master_pid(opts: &Options) -> anyhow::Result<(i32, std::path::PathBuf)> {
    let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid_path = opts.resolve(&loaded.config.wasmgate.pid_file);
    match running_pid(&pid_path) {
        Some(pid) => Ok((pid, pid_path)),
        None => bail!(
            "wasmgate is not running (no live master in {})",
            pid_path.display()
        ),
    }
}

/// Sends `signal` to the master named by the pid file.
pub fn signal_master(opts: &Options, signal: Signal) -> anyhow::Result<i32> {
    let (pid, _) = master_pid(opts)?;
    kill(Pid::from_raw(pid), signal).with_context(|| format!("cannot signal pid {pid}"))?;
    Ok(pid)
}

/// `wasmgate stop`: signals the master and waits for it to exit.
pub fn stop(opts: &Options, graceful: bool) -> anyhow::Result<()> {
    let sig = if graceful {
        Signal::SIGQUIT
    } else {
        Signal::SIGTERM
    };
    let pid = signal_master(opts, sig)?;
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(if graceful { 300 } else { 15 });
    while kill(Pid::from_raw(pid), None).is_ok() {
        if std::time::Instant::now() > deadline {
            bail!("master {pid} is still running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    say(&format!("wasmgate stopped (pid {pid})\n"));
    Ok(())
}

/// `wasmgate status`: the master and its workers, from the Admin API.
pub fn status(opts: &Options) -> anyhow::Result<()> {
    let loaded = match opts.load_config() {
        Ok(loaded) => loaded,
        // Right after a bad edit is when an operator asks: say whether the gateway still
        // runs (on its last good configuration), from the default pid file.
        Err(e) => {
            let default = wasmgate_shared::config::WasmgateSection::default().pid_file;
            let running = running_pid(&opts.resolve(&default))
                .map(|pid| {
                    format!(
                        "; the master (pid {pid}) is running on the last configuration that loaded"
                    )
                })
                .unwrap_or_default();
            bail!("{e}{running}");
        }
    };
    let (pid, pid_path) = master_pid(opts)?;
    let admin = &loaded.config.deployment.admin;
    let data_dir = opts.resolve(&loaded.config.wasmgate.data_dir);
    let key = admin_key(&loaded.config, &data_dir);
    let mut addr = admin.admin_listen.addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let body = http_get(addr, "/wasmgate/status", key.as_deref()).with_context(|| {
        format!("master {pid} is running but its Admin API on {addr} did not answer")
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&body).context("unexpected Admin API answer")?;
    if let Some(e) = v.get("error_msg") {
        bail!(
            "Admin API: {e} ({})",
            v.get("description").and_then(|d| d.as_str()).unwrap_or("")
        );
    }
    say(&render_status(&v, &pid_path));
    Ok(())
}

fn render_status(v: &serde_json::Value, pid_path: &Path) -> String {
    let m = &v["master"];
    let mut out = format!(
        "master  pid {}  version {}  uptime {}s  epoch {}  generation {}\n        pid file {}  config {}\n",
        m["pid"], m["version"].as_str().unwrap_or("?"), m["uptime_s"], m["epoch"], m["generation"],
        pid_path.display(), m["config"].as_str().unwrap_or("?")
    );
    let shm = &m["shm"];
    if let (Some(snapshot), Some(capacity)) = (
        shm["snapshot_bytes"].as_u64(),
        shm["capacity_bytes"].as_u64(),
    ) {
        out.push_str(&format!(
            "        configuration {} of {} bytes of wasmgate.shm_size ({}%), journal {} bytes\n",
            snapshot,
            capacity,
            snapshot * 100 / capacity.max(1),
            shm["journal_bytes"]
        ));
    }
    out.push_str(&format!(
        "{:<7} {:<5} {:<8} {:<9} {:<6} {:<9} {:<9} {:<10} {:<9}\n",
        "WORKER", "SLOT", "PID", "STATE", "EPOCH", "UPTIME", "RESTARTS", "GENERATION", "REQUESTS"
    ));
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for w in v["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<7} {:<5} {:<8} {:<9} {:<6} {:<9} {:<9} {:<10} {:<9}\n",
            text(&w["worker_id"]),
            text(&w["slot"]),
            text(&w["pid"]),
            text(&w["state"]),
            text(&w["epoch"]),
            format!("{}s", text(&w["uptime_s"])),
            text(&w["restarts"]),
            text(&w["generation_seen"]),
            text(&w["requests"])
        ));
    }
    out
}

/// The first usable key: configured, or generated and stored under the data directory.
pub fn admin_key(cfg: &wasmgate_shared::config::GatewayConfig, data_dir: &Path) -> Option<String> {
    let stored: std::collections::BTreeMap<String, String> =
        std::fs::read(data_dir.join("admin_key"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    cfg.deployment.admin.admin_key.iter().find_map(|k| {
        if k.key.is_empty() {
            stored.get(&k.name).cloned()
        } else {
            Some(k.key.clone())
        }
    })
}

/// A minimal blocking HTTP/1.1 GET on loopback (the CLI needs nothing more).
fn http_get(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let key_header = key
        .map(|k| format!("X-API-KEY: {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{key_header}Connection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (_, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    Ok(body.to_string())
}

/// Writes a command's output. A reader that went away (`wasmgate status | head -1`) is not
/// an error worth a panic, which `print!` would make of it: the rest is dropped.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
