//! `wasmgate stop | reload | status`: talking to a running master through its pid file and
//! Admin API.

use crate::state::LoadedConfig;
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
    running_pid_is_master(pid).then_some(pid)
}

/// Whether `pid` is alive and a wasmgate master (a stale file may name a recycled pid). A
/// process of another user answers EPERM: alive all the same (a master run by a service
/// account, asked by an operator who may not signal it).
pub(crate) fn running_pid_is_master(pid: i32) -> bool {
    let alive = matches!(
        kill(Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    );
    alive && is_master(pid)
}

/// Whether process `pid` is a wasmgate master: started with `start`, running this very binary
/// (an upgrade in place shows the old one as deleted) or a program named wasmgate…. Any
/// process whose command line merely mentions wasmgate (`tail -f /var/log/wasmgate/…`) is not,
/// nor another wasmgate command (`tui`).
fn is_master(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    let argv0 = args.next().unwrap_or_default().into_owned();
    if !args.any(|a| a == "start") {
        return false;
    }
    let exe = |p: &str| {
        std::fs::read_link(p).ok().map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_suffix(" (deleted)")
                .map(str::to_string)
                .unwrap_or(l)
        })
    };
    let same_binary = matches!(
        (exe(&format!("/proc/{pid}/exe")), exe("/proc/self/exe")),
        (Some(theirs), Some(ours)) if theirs == ours
    );
    same_binary
        || argv0
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("wasmgate"))
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

/// The running master config.yaml leads to: its pid, the pid file config.yaml names, and
/// where its Admin API listens when the master recorded it.
struct Found {
    pid: i32,
    pid_path: std::path::PathBuf,
    admin: Option<std::net::SocketAddr>,
}

fn master_pid(opts: &Options) -> anyhow::Result<Found> {
    let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid_path = opts.resolve(&loaded.config.wasmgate.pid_file);
    match master_of(opts, &loaded.config.wasmgate, Some(&loaded.origin))? {
        Some((pid, admin)) => Ok(Found {
            pid,
            pid_path,
            admin,
        }),
        None => bail!(
            "wasmgate is not running (no live master in {})",
            pid_path.display()
        ),
    }
}

/// The master serving the data directory config.yaml names (it holds the directory's lock),
/// else — a master of a version without the lock — the one its pid file names. The pid file
/// alone can mislead: it may have been edited since the master wrote it (a reload moves it),
/// or name another gateway's file. A master started with another configuration (`origin`,
/// when known) is not this one's to act on.
fn master_of(
    opts: &Options,
    section: &wasmgate_shared::config::WasmgateSection,
    origin: Option<&str>,
) -> anyhow::Result<Option<(i32, Option<std::net::SocketAddr>)>> {
    let pid_path = opts.resolve(&section.pid_file);
    let data_dir = opts.resolve(&section.data_dir);
    let by_file = running_pid(&pid_path);
    let Some(h) = crate::lock::holder(&data_dir) else {
        return Ok(by_file.map(|pid| (pid, None)));
    };
    // A master that started on the embedded default before `<prefix>/conf/config.yaml` was
    // written is the one that file configures (its next reload reads it): a command that
    // names no file finds it, as it found it before the file existed.
    // (Its data directory is then this prefix's default one: a config.yaml elsewhere that
    // names that directory is not its own.)
    let default_data = opts.resolve(&wasmgate_shared::config::WasmgateSection::default().data_dir);
    let embedded = h.config.starts_with('<') && opts.config.is_none() && data_dir == default_data;
    if let Some(origin) = origin.filter(|o| !embedded && !same_config(o, &h.config)) {
        bail!(
            "master {} serving data directory {} was started with {}, not {origin}: run the \
             command with that configuration",
            h.pid,
            data_dir.display(),
            h.config
        );
    }
    match by_file {
        Some(pid) if pid == h.pid => {}
        Some(pid) => eprintln!(
            "wasmgate: {} names master {pid}, which does not serve {}: master {} does",
            pid_path.display(),
            data_dir.display(),
            h.pid
        ),
        None => eprintln!(
            "wasmgate: no master in {}; master {} holds {} (a reload moves its pid file there)",
            pid_path.display(),
            h.pid,
            data_dir.display()
        ),
    }
    Ok(Some((h.pid, h.admin)))
}

/// Whether two configuration origins name the same file (paths compared once resolved).
fn same_config(a: &str, b: &str) -> bool {
    let canonical = |p: &str| std::fs::canonicalize(p).ok();
    a == b || matches!((canonical(a), canonical(b)), (Some(x), Some(y)) if x == y)
}

/// The running master for a command that needs nothing of config.yaml but the pid file's
/// place (`stop`, `reopen`): with the file broken on disk — mid-edit when logrotate runs — the
/// default pid file is tried, and the error named, rather than nothing sent.
fn master_pid_even_if_broken(opts: &Options) -> anyhow::Result<(i32, Option<LoadedConfig>)> {
    match opts.load_config() {
        Ok(loaded) => master_pid(opts).map(|f| (f.pid, Some(loaded))),
        Err(e) => {
            let default = wasmgate_shared::config::WasmgateSection::default();
            let Some((pid, _)) = master_of(opts, &default, None)? else {
                bail!("{e}");
            };
            eprintln!(
                "wasmgate: {e}\nwasmgate: found by the default pid file or data directory: \
                 master {pid}"
            );
            Ok((pid, None))
        }
    }
}

/// Sends `signal` to the master named by the pid file.
pub fn signal_master(opts: &Options, signal: Signal) -> anyhow::Result<i32> {
    let (pid, _) = master_pid_even_if_broken(opts)?;
    send(pid, signal)?;
    Ok(pid)
}

/// Sends `signal` to master `pid`, saying what to do when it is another user's.
fn send(pid: i32, signal: Signal) -> anyhow::Result<()> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            bail!("master {pid} runs as another user: run this command as that user (or root)")
        }
        Err(e) => Err(e).with_context(|| format!("cannot signal pid {pid}")),
    }
}

/// `wasmgate reload`: asks the master through its Admin API and reports the outcome — the
/// exit status says whether the new configuration serves (so `systemctl reload` fails when
/// the reload is refused). The Admin API is asked only once its status names the master of
/// the pid file (config.yaml may name another gateway's address); without an Admin API to
/// reach there, or with a key the running master does not know, SIGHUP, whose outcome the
/// error log tells. A config.yaml that does not load is refused here, before anything is sent.
pub fn reload(opts: &Options) -> anyhow::Result<()> {
    let loaded = opts
        .load_config()
        .map_err(|e| anyhow::anyhow!("{e}; nothing sent, the running configuration stays"))?;
    let Found { pid, admin, .. } = master_pid(opts)?;
    let (addr, key) = admin_access(opts, &loaded, admin, true);
    let answering = match http_request(addr, "GET", "/wasmgate/status", key.as_deref()) {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["master"]["pid"].as_i64()),
        _ => None,
    };
    if answering != Some(pid as i64) {
        // No answer will carry the master's notes: the file's own, as this command read it.
        for note in loaded.config.warnings() {
            say(&format!("wasmgate: note: {note}\n"));
        }
        let data_dir = opts.resolve(&loaded.config.wasmgate.data_dir);
        return reload_by_signal(pid, &data_dir, addr);
    }
    let (status, body) = http_request(addr, "POST", "/wasmgate/reload", key.as_deref())
        .with_context(|| {
            format!(
                "no answer to the reload from the Admin API on {addr} (is master {pid} stopping?)"
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match (status, v["error_msg"].as_str()) {
        (200, _) => {
            // What the master found in the file it loaded (as `test` prints it).
            for note in v["notes"].as_array().into_iter().flatten() {
                say(&format!(
                    "wasmgate: note: {}\n",
                    note.as_str().unwrap_or_default()
                ));
            }
            say(&format!(
                "reload applied by master {pid}: epoch {} serving\n",
                v["epoch"]
            ));
            Ok(())
        }
        (_, Some(msg)) => bail!("{msg}"),
        _ => bail!("the Admin API answered {status} to the reload: {body}"),
    }
}

/// How long `wasmgate reload` waits for the outcome of a reload it asked by signal: the
/// master's own wait for the new workers (30 s), and some.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// A reload asked with SIGHUP, when the Admin API cannot be asked (a key changed in
/// config.yaml and not yet reloaded, an Admin API turned off or unreachable): the outcome is
/// read from the data directory's lock, where the master records each reload's, and
/// reported as through the Admin API — the exit status says whether it applied.
fn reload_by_signal(pid: i32, data_dir: &Path, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let recorded = crate::lock::holder(data_dir)
        .filter(|h| h.pid == pid)
        .is_some_and(|h| h.records_reloads);
    // Outcomes of reloads begun from here on are this signal's: one running already (asked
    // through the Admin API) began before, and the master takes the signal after it.
    let sent_ms = crate::now_ms();
    send(pid, Signal::SIGHUP)?;
    let why = format!(
        "the Admin API on {addr} could not be asked (no answer, another master, or a key it \
         does not know): reload signal sent to master {pid}"
    );
    // A master that keeps no record (of a version before it): the error log tells.
    if !recorded {
        say(&format!("{why}; see the error log for the outcome\n"));
        return Ok(());
    }
    eprintln!("wasmgate: {why}");
    let deadline = std::time::Instant::now() + RELOAD_WAIT;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let Some(h) = crate::lock::holder(data_dir).filter(|h| h.pid == pid) else {
            bail!("master {pid} is gone: see the error log");
        };
        match h.last_reload {
            Some(r) if r.started_ms >= sent_ms => match r.outcome {
                Ok(epoch) => {
                    say(&format!(
                        "reload applied by master {pid}: epoch {epoch} serving\n"
                    ));
                    return Ok(());
                }
                Err(e) => bail!("reload refused: {e}"),
            },
            _ => {}
        }
    }
    // Unknown is not success: `systemctl reload` must not say it applied.
    bail!(
        "no outcome from master {pid} after {}s (the reload may still be running): see the \
         error log",
        RELOAD_WAIT.as_secs()
    )
}

/// Where the Admin API listens (loopback for a wildcard address) and the key to call it with:
/// where the master recorded it listens (`recorded`), else where config.yaml says — the key
/// is not sent to an address no reload applied yet, where anything may listen.
fn admin_access(
    opts: &Options,
    loaded: &LoadedConfig,
    recorded: Option<std::net::SocketAddr>,
    to_write: bool,
) -> (std::net::SocketAddr, Option<String>) {
    let data_dir = opts.resolve(&loaded.config.wasmgate.data_dir);
    let key = admin_key_for(&loaded.config, &data_dir, to_write);
    let addr = recorded.unwrap_or_else(|| loaded.config.deployment.admin.admin_listen.addr());
    (wasmgate_shared::config::reachable(addr), key)
}

/// `wasmgate stop`: signals the master and waits for it to exit (a graceful stop as long as
/// the master may drain: `worker_shutdown_timeout`, and some).
pub fn stop(opts: &Options, graceful: bool) -> anyhow::Result<()> {
    let sig = if graceful {
        Signal::SIGQUIT
    } else {
        Signal::SIGTERM
    };
    let (pid, loaded) = master_pid_even_if_broken(opts)?;
    send(pid, sig)?;
    let drain = loaded.map_or(std::time::Duration::from_secs(300), |l| {
        l.config.nginx_config.worker_shutdown_timeout
    });
    let wait = match graceful {
        true => drain + std::time::Duration::from_secs(15),
        false => std::time::Duration::from_secs(15),
    };
    let deadline = std::time::Instant::now() + wait;
    while kill(Pid::from_raw(pid), None).is_ok() {
        if std::time::Instant::now() > deadline {
            bail!("master {pid} is still running after {}s", wait.as_secs());
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
            let default = wasmgate_shared::config::WasmgateSection::default();
            let running = master_of(opts, &default, None)
                .ok()
                .flatten()
                .map(|(pid, _)| pid)
                .map(|pid| {
                    format!(
                        "; the master (pid {pid}) is running on the last configuration that loaded"
                    )
                })
                .unwrap_or_default();
            bail!("{e}{running}");
        }
    };
    let Found {
        pid,
        pid_path,
        admin,
    } = master_pid(opts)?;
    let (addr, key) = admin_access(opts, &loaded, admin, false);
    let (_, body) =
        http_request(addr, "GET", "/wasmgate/status", key.as_deref()).with_context(|| {
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
    // Found by the data directory's lock, the master has not written config.yaml's pid file.
    let pid_file = match running_pid(&pid_path) == Some(pid) {
        true => pid_path.display().to_string(),
        false => format!(
            "{} (not written yet: the next reload moves it there)",
            pid_path.display()
        ),
    };
    say(&render_status(&v, &pid_file));
    Ok(())
}

/// Where the objects live: the data directory, or etcd (endpoints, prefix, whether it
/// answers, the revision served).
fn store_line(store: &serde_json::Value) -> String {
    match store["kind"].as_str() {
        Some("etcd") => {
            let endpoints: Vec<&str> = store["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str())
                .collect();
            let reachable = match store["reachable"].as_bool() {
                Some(true) => "reachable",
                _ => "UNREACHABLE (serving the last configuration read)",
            };
            let mut line = format!(
                "        store etcd {} prefix {}  {reachable}  revision {}\n",
                endpoints.join(","),
                store["prefix"].as_str().unwrap_or("?"),
                store["revision"]
            );
            if let Some(why) = store["error"].as_str() {
                line += &format!("              {why}\n");
            }
            line
        }
        Some(kind) => format!("        store {kind}  revision {}\n", store["revision"]),
        None => String::new(),
    }
}

fn render_status(v: &serde_json::Value, pid_file: &str) -> String {
    let m = &v["master"];
    let mut out = format!(
        "master  pid {}  version {}  uptime {}s  epoch {}  generation {}\n        pid file {}  config {}\n",
        m["pid"], m["version"].as_str().unwrap_or("?"), m["uptime_s"], m["epoch"], m["generation"],
        pid_file, m["config"].as_str().unwrap_or("?")
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
    out.push_str(&store_line(&v["store"]));
    out.push_str(&health_line(&m["health"]));
    out.push_str(&format!(
        "{:<7} {:<5} {:<8} {:<9} {:<6} {:<9} {:<9} {:<10} {:<9} {:<6} {:<7} {}\n",
        "WORKER",
        "SLOT",
        "PID",
        "STATE",
        "EPOCH",
        "UPTIME",
        "RESTARTS",
        "GENERATION",
        "REQUESTS",
        "CONNS",
        "FAULTS",
        "RSS"
    ));
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for w in v["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<7} {:<5} {:<8} {:<9} {:<6} {:<9} {:<9} {:<10} {:<9} {:<6} {:<7} {}\n",
            text(&w["worker_id"]),
            text(&w["slot"]),
            text(&w["pid"]),
            text(&w["state"]),
            text(&w["epoch"]),
            format!("{}s", text(&w["uptime_s"])),
            text(&w["restarts"]),
            text(&w["generation_seen"]),
            text(&w["requests"]),
            text(&w["active_connections"]),
            text(&w["plugin_faults"]),
            w["rss_bytes"].as_u64().map_or("-".into(), mebibytes),
        ));
    }
    out
}

/// The nodes health checks watch, and those found unhealthy (nothing without checks).
fn health_line(health: &serde_json::Value) -> String {
    let checked = health["checked"].as_u64().unwrap_or(0);
    if checked == 0 {
        return String::new();
    }
    let down: Vec<String> = (health["unhealthy"].as_array().into_iter().flatten())
        .map(|n| {
            let upstream = n["upstream"].as_str().unwrap_or("?");
            format!("{} ({upstream})", n["node"].as_str().unwrap_or("?"))
        })
        .collect();
    match down.is_empty() {
        true => format!(
            "        upstream nodes {checked} checked, all healthy
"
        ),
        false => format!(
            "        upstream nodes {checked} checked, {} UNHEALTHY: {}
",
            down.len(),
            down.join(", ")
        ),
    }
}

/// `12.3M`, as `ps` and `top` show memory.
fn mebibytes(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

/// The first usable key: configured, or generated and stored under the data directory.
pub fn admin_key(cfg: &wasmgate_shared::config::GatewayConfig, data_dir: &Path) -> Option<String> {
    admin_key_for(cfg, data_dir, false)
}

/// [`admin_key`], of the admin role when `to_write` (a viewer's key cannot reload).
fn admin_key_for(
    cfg: &wasmgate_shared::config::GatewayConfig,
    data_dir: &Path,
    to_write: bool,
) -> Option<String> {
    let stored: std::collections::BTreeMap<String, String> =
        std::fs::read(data_dir.join("admin_key"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    let keys = cfg.deployment.admin.admin_key.iter();
    keys.filter(|k| !to_write || k.role == wasmgate_shared::config::Role::Admin)
        .find_map(|k| {
            if k.key.is_empty() {
                stored.get(&k.name).cloned()
            } else {
                Some(k.key.clone())
            }
        })
}

/// A minimal blocking HTTP/1.1 request without a body, on loopback (the CLI needs nothing
/// more): the answer's status and body.
fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    // A reload waits for the new workers to be ready (plugins compiled, VMs started).
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let key_header = key
        .map(|k| format!("X-API-KEY: {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{key_header}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    Ok((status, body.to_string()))
}

/// Writes a command's output. A reader that went away (`wasmgate status | head -1`) is not
/// an error worth a panic, which `print!` would make of it: the rest is dropped.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
