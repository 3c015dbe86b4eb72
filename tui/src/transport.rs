//! The thread that talks to the gateway: it polls every endpoint once per interval and performs
//! the writes the UI asks for, reporting both as [`Update`]s. The UI thread never waits on the
//! network; when the gateway is gone, polls keep trying and the UI keeps its last data.

use crate::app::{Command, Poll, Update};
use crate::client::{ApiError, Client};
use crate::model::GatewayStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Log lines fetched per poll.
pub const LOG_LINES: usize = 200;

/// The route and service lists are fetched again at least this often even when the
/// configuration's generation stands still (a gateway that does not report one, or a missed
/// change).
pub const CONFIG_REFRESH: Duration = Duration::from_secs(30);

/// Polls everything once, the route and service lists included.
pub fn poll(client: &Client) -> Update {
    Poller::default().poll(client)
}

/// Polls, remembering which configuration the route and service lists were fetched at: they
/// are the largest answers (hundreds of KB with thousands of routes) and change far less often
/// than the counters, so they are fetched again only when the master's `generation` moved.
#[derive(Debug, Default)]
pub struct Poller {
    /// The generation the lists were last fetched at, and when.
    fetched: Option<(u64, Instant)>,
}

impl Poller {
    /// Polls once. An unreachable gateway stops the poll at the first call.
    pub fn poll(&mut self, client: &Client) -> Update {
        let update = self.poll_all(client);
        if !matches!(update, Update::Poll(_)) {
            // Whatever comes back may be another configuration.
            self.fetched = None;
        }
        update
    }

    /// Whether the lists must be fetched for a poll whose status says `generation`.
    fn stale(&self, generation: Option<u64>, now: Instant) -> bool {
        match (self.fetched, generation) {
            (Some((then, at)), Some(now_gen)) => {
                then != now_gen || now.saturating_duration_since(at) >= CONFIG_REFRESH
            }
            _ => true,
        }
    }

    fn poll_all(&mut self, client: &Client) -> Update {
        // The status first: its generation says whether the lists changed.
        let status = match reach(client.status()) {
            Ok(s) => s,
            Err(e) => return Update::Unreachable(e),
        };
        if let Some(why) = refusal(&status) {
            return Update::Refused(why);
        }
        let generation = status.as_ref().ok().and_then(|s| s.master.generation);
        let now = Instant::now();
        let fetch_config = self.stale(generation, now);
        let all = || -> Result<Poll, String> {
            let (routes, services, plugin_configs, upstreams, ssls) = if fetch_config {
                (
                    Some(reach(client.routes())?),
                    Some(reach(client.services())?),
                    Some(reach(client.plugin_configs())?),
                    Some(reach(client.upstreams())?),
                    Some(reach(client.ssls())?),
                )
            } else {
                (None, None, None, None, None)
            };
            Ok(Poll {
                routes,
                services,
                plugin_configs,
                upstreams,
                ssls,
                status,
                plugins: reach(client.plugins())?,
                stats: reach(client.stats())?,
                log: reach(client.log(LOG_LINES))?,
                traffic: reach(client.traffic())?,
                health: reach(client.health())?,
                at: Instant::now(),
            })
        };
        match all() {
            Ok(p) => {
                if fetch_config {
                    let ok = matches!(p.routes, Some(Ok(_)));
                    self.fetched = generation.filter(|_| ok).map(|g| (g, now));
                }
                Update::Poll(Box::new(p))
            }
            Err(e) => Update::Unreachable(e),
        }
    }
}

/// An answer, or why the gateway could not be reached at all.
fn reach<T>(r: Result<T, ApiError>) -> Result<Result<T, ApiError>, String> {
    match r {
        Err(ApiError::Unreachable(e)) => Err(e),
        other => Ok(other),
    }
}

/// Why a poll that reached something got nothing usable from it: the key refused (every
/// endpoint answers 401/403 then), or no wasmgate Admin API at that address (its status
/// endpoint unknown).
fn refusal(status: &Result<GatewayStatus, ApiError>) -> Option<String> {
    match status {
        Err(ApiError::Status {
            status: 401 | 403,
            message,
        }) => Some(format!("admin key refused ({message})")),
        Err(ApiError::Status { status: 404, .. }) => {
            Some("no wasmgate Admin API at this address (404 on /wasmgate/status)".into())
        }
        _ => None,
    }
}

/// Performs one write.
pub fn execute(client: &Client, command: &Command) -> Update {
    let result = match command {
        Command::SaveRoute { id, body } => client.put_route(id, body),
        Command::SetRouteStatus { id, enabled } => client.set_route_status(id, *enabled),
        Command::DeleteRoute { id } => client.delete_route(id),
        Command::Reload => client.reload(),
    };
    Update::Done {
        command: command.clone(),
        result,
    }
}

/// Starts the thread; it ends when either channel's other side is dropped.
pub fn spawn(client: Client, interval: Duration) -> (Sender<Command>, Receiver<Update>) {
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let (up_tx, up_rx) = mpsc::channel::<Update>();
    std::thread::Builder::new()
        .name("admin-api".into())
        .spawn(move || {
            let mut poller = Poller::default();
            let mut next = Instant::now();
            loop {
                match cmd_rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(command) => {
                        if up_tx.send(execute(&client, &command)).is_err() {
                            return;
                        }
                        // Show the change at once.
                        next = Instant::now();
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if up_tx.send(poller.poll(&client)).is_err() {
                            return;
                        }
                        next = Instant::now() + interval;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .expect("cannot start the Admin API thread");
    (cmd_tx, up_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_key_or_another_server_is_no_connection() {
        let refused = |status: u16| {
            refusal(&Err(ApiError::Status {
                status,
                message: "failed to check token: wrong apikey".into(),
            }))
        };
        assert_eq!(
            refused(401).as_deref(),
            Some("admin key refused (failed to check token: wrong apikey)")
        );
        assert!(refused(404).unwrap().contains("no wasmgate Admin API"));
        assert_eq!(
            refused(500),
            None,
            "an error of the gateway's own is shown where it is"
        );
        assert_eq!(refusal(&Ok(GatewayStatus::default())), None);
    }

    #[test]
    fn the_lists_are_fetched_again_only_when_the_generation_moves() {
        let t0 = Instant::now();
        let mut p = Poller::default();
        assert!(p.stale(Some(3), t0), "never fetched");
        p.fetched = Some((3, t0));
        assert!(!p.stale(Some(3), t0 + Duration::from_secs(1)));
        assert!(p.stale(Some(4), t0 + Duration::from_secs(1)), "changed");
        assert!(p.stale(None, t0), "a gateway without a generation");
        assert!(
            p.stale(Some(3), t0 + CONFIG_REFRESH),
            "refreshed now and then"
        );
    }
}
