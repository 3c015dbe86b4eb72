//! Test harness: the real `wasmgate` binary (master + worker processes) on free loopback
//! ports in a temporary prefix, a Rust test upstream, and a small blocking HTTP client.

#![allow(dead_code, unused_imports)]

pub mod client;
pub mod prom;
pub mod tls;
pub mod upstream;

pub use client::{admin, http, Resp};
pub use upstream::TestUpstream;

use serde_json::Value;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const KEY: &str = "edd1c9f034335f136f87ad84b625c8f1";
pub const VIEWER_KEY: &str = "viewer-key-0123456789";

/// A free loopback port for a gateway, taken below the kernel's ephemeral range (where port-0
/// binds — test upstreams, clients — get theirs), so a port released here is not handed to
/// someone else before the gateway binds it.
pub fn free_port() -> u16 {
    static LOCK: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut used = LOCK.lock().unwrap();
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let mut n = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    loop {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let p = 20_000 + ((n >> 33) % 12_000) as u16;
        if !used.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            used.push(p);
            return p;
        }
    }
}

/// The committed test plugins (tests/plugins/wasm/*.wasm).
pub fn fixture(name: &str) -> String {
    format!(
        "{}/tests/plugins/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Plugins every test gateway declares: (name, priority, file, phase, extra settings).
pub const PLUGINS: [(&str, i64, &str, &str, &str); 17] = [
    ("wasm_log", 7999, "recorder", "access", ""),
    ("wasm_auth", 8000, "auth", "rewrite", ""),
    ("echo", 100, "echo", "access", ""),
    ("rewrite", 500, "header_rewrite", "access", ""),
    ("rec_a", 300, "recorder", "access", ""),
    ("rec_b", 200, "recorder", "rewrite", ""),
    (
        "faulty",
        9000,
        "faulty",
        "access",
        "callback_timeout: 200ms, memory_limit: 16m",
    ),
    (
        "faulty_open",
        9001,
        "faulty",
        "access",
        "fail_open: true, callback_timeout: 200ms",
    ),
    ("as_headers", 50, "as_headers", "access", ""),
    ("as_body", 45, "as_body", "access", ""),
    (
        "body_rewrite",
        40,
        "body_rewrite",
        "access",
        "body_buffer_limit: 64k",
    ),
    ("http_auth", 7000, "http_auth", "access", ""),
    ("shared_counter", 30, "shared_counter", "access", ""),
    ("heartbeat", 20, "heartbeat", "access", ""),
    ("queue", 10, "queue", "access", ""),
    ("metrics", 5, "metrics", "access", ""),
    ("c_headers", 55, "c_headers", "access", ""),
];

fn plugins_yaml() -> String {
    PLUGINS
        .iter()
        .map(|(name, prio, file, phase, extra)| {
            let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
            format!(
                "    - {{name: {name}, priority: {prio}, file: \"{}\", http_request_phase: {phase}{extra}}}\n",
                fixture(file)
            )
        })
        .collect()
}

/// Knobs for a gateway under test.
#[derive(Clone)]
pub struct Setup {
    pub workers: usize,
    /// Extra lines under `nginx_config.http:` (indented by the harness).
    pub http_extra: Vec<String>,
    /// Extra lines under `apisix:` (indented by the harness).
    pub apisix_extra: Vec<String>,
    pub shutdown_timeout: String,
    /// A whole config.yaml instead of the generated one (`{proxy}` and `{admin}` are replaced).
    pub raw_yaml: Option<String>,
    /// Top-level sections added to the generated config.yaml.
    pub extra_yaml: String,
    /// Environment variables the master is started with (its workers inherit them).
    pub env: Vec<(&'static str, &'static str)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            workers: 2,
            http_extra: Vec::new(),
            apisix_extra: Vec::new(),
            shutdown_timeout: "10s".into(),
            raw_yaml: None,
            extra_yaml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running gateway.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    /// Everything the master wrote to stderr (drained continuously so it never blocks).
    pub stderr: std::sync::Arc<Mutex<String>>,
    pub proxy_port: u16,
    pub admin_port: u16,
    /// The Prometheus export listener (`plugin_attr.prometheus.export_addr`).
    pub metrics_port: u16,
    pub child: Option<Child>,
    pub setup: Setup,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_wasmgate")
}

/// Runs `cmd` to the end, asserts it succeeded (showing its stderr if not) and returns what
/// it wrote to its standard output.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway::start_with(Setup::default())
    }

    pub fn start_with(setup: Setup) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let gw = Gateway {
            proxy_port: free_port(),
            admin_port: free_port(),
            metrics_port: free_port(),
            dir,
            stderr: Default::default(),
            child: None,
            setup,
        };
        std::fs::create_dir_all(gw.dir.path().join("conf")).unwrap();
        std::fs::write(gw.config_path(), gw.config_yaml()).unwrap();
        gw.spawn()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("conf/config.yaml")
    }

    pub fn prefix(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_yaml(&self) -> String {
        // Gateways of parallel tests must not all take the default 127.0.0.1:9091.
        let metrics = format!(
            "plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: {}}}\n",
            self.metrics_port
        );
        if let Some(raw) = &self.setup.raw_yaml {
            let mut yaml = raw
                .replace("{proxy}", &self.proxy_port.to_string())
                .replace("{admin}", &self.admin_port.to_string())
                .replace("{metrics}", &self.metrics_port.to_string());
            if !yaml.contains("plugin_attr:") {
                yaml.push_str(&metrics);
            }
            return yaml;
        }
        let extra: String = self
            .setup
            .http_extra
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect();
        let apisix: String = self
            .setup
            .apisix_extra
            .iter()
            .map(|l| format!("  {l}\n"))
            .collect();
        format!(
            "apisix:\n  node_listen:\n    - {{ip: 127.0.0.1, port: {proxy}}}\n{apisix}\
             deployment:\n  admin:\n    admin_key:\n      - {{name: admin, key: {KEY}, role: admin}}\n      - {{name: viewer, key: {VIEWER_KEY}, role: viewer}}\n    admin_listen: {{ip: 127.0.0.1, port: {admin}}}\n\
             nginx_config:\n  worker_processes: {workers}\n  error_log_level: info\n  worker_shutdown_timeout: {st}\n  http:\n    keepalive_timeout: 60s\n{extra}\
             {metrics}{top}wasm:\n  plugins:\n{plugins}",
            proxy = self.proxy_port,
            admin = self.admin_port,
            workers = self.setup.workers,
            st = self.setup.shutdown_timeout,
            top = self.setup.extra_yaml,
            plugins = plugins_yaml(),
        )
    }

    /// Starts the master in the foreground and waits until every worker is ready.
    pub fn spawn(mut self) -> Gateway {
        let mut child = Command::new(bin())
            .args(["start", "--foreground", "-p"])
            .arg(self.dir.path())
            .envs(self.setup.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let sink = self.stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        self.child = Some(child);
        self.wait_ready();
        self
    }

    /// Starts the master again on the same prefix and ports (after it stopped or was killed).
    pub fn restart(mut self) -> Gateway {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.stderr.lock().unwrap().clear();
        self.spawn()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("gateway exited during start ({status}): {}", self.stderr());
                }
            }
            if let Ok(s) = self.try_status() {
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                let running = workers.iter().filter(|w| w["state"] == "running").count();
                if running == self.setup.workers && workers.len() == self.setup.workers {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready in 30 s: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn master_pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.proxy_port, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// An Admin API call with the admin key.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin(&self.admin_url(path), method, Some(KEY), body)
    }

    pub fn try_status(&self) -> Result<Value, String> {
        let r = client::request(
            "GET",
            &self.admin_url("/wasmgate/status"),
            &[("X-API-KEY", KEY)],
            None,
        )?;
        serde_json::from_slice(&r.body).map_err(|e| e.to_string())
    }

    pub fn status(&self) -> Value {
        self.try_status().unwrap()
    }

    /// Pids of the workers currently listed as running.
    /// Plugin faults counted by the live workers, summed.
    pub fn plugin_faults(&self) -> u64 {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["plugin_faults"].as_u64().unwrap())
            .sum()
    }

    pub fn worker_pids(&self) -> Vec<i32> {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_i64().unwrap() as i32)
            .collect()
    }

    /// Waits until every worker has applied the master's generation.
    pub fn wait_propagated(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status();
            let g = &s["master"]["generation"];
            if s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| &w["generation_seen"] == g)
            {
                return;
            }
            assert!(Instant::now() < deadline, "generation not propagated: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.master_pid()), sig).unwrap();
    }

    /// Waits for the master to exit; returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "master did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Puts a route pointing at `upstream`, waits until all workers serve it.
    pub fn route(&self, id: &str, mut body: Value, upstream: Option<&TestUpstream>) {
        if let Some(u) = upstream {
            body["upstream"] = serde_json::json!({"type": "roundrobin", "nodes": {u.addr(): 1}});
        }
        let (status, v) = self.admin("PUT", &format!("/apisix/admin/routes/{id}"), Some(body));
        assert!(status == 200 || status == 201, "route {id}: {status} {v}");
        self.wait_propagated();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); read its state to tell.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The whole lines of a log that contain `needle`: a line another process is appending may
/// be read half-way (a reader can see a write's first page before its last), and is left out
/// until its end is there.
pub fn log_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    let whole = log.rfind('\n').map_or("", |end| &log[..end]);
    whole.lines().filter(|l| l.contains(needle)).collect()
}

/// Polls `cond` for up to `within`.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
