//! The thread that talks to the gateway: it polls every endpoint once per interval and performs
//! the writes the UI asks for, reporting both as [`Update`]s. The UI thread never waits on the
//! network; when the gateway is gone, polls keep trying and the UI keeps its last data.

use crate::app::{Command, Poll, Update};
use crate::client::{ApiError, Client};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Log lines fetched per poll.
pub const LOG_LINES: usize = 200;

/// Polls everything once. An unreachable gateway stops the poll at the first call.
pub fn poll(client: &Client) -> Update {
    fn reach<T>(r: Result<T, ApiError>) -> Result<Result<T, ApiError>, String> {
        match r {
            Err(ApiError::Unreachable(e)) => Err(e),
            other => Ok(other),
        }
    }
    let all = || -> Result<Poll, String> {
        Ok(Poll {
            routes: reach(client.routes())?,
            status: reach(client.status())?,
            plugins: reach(client.plugins())?,
            stats: reach(client.stats())?,
            log: reach(client.log(LOG_LINES))?,
            traffic: reach(client.traffic())?,
            at: Instant::now(),
        })
    };
    match all() {
        Ok(p) => match refusal(&p) {
            Some(why) => Update::Refused(why),
            None => Update::Poll(Box::new(p)),
        },
        Err(e) => Update::Unreachable(e),
    }
}

/// Why a poll that reached something got nothing usable from it: the key refused (every
/// endpoint answers 401/403 then), or no wasmgate Admin API at that address (its status
/// endpoint unknown).
fn refusal(p: &Poll) -> Option<String> {
    match &p.status {
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
                        if up_tx.send(poll(&client)).is_err() {
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
    use crate::model::{GatewayStatus, Plugins, Stats};

    fn poll_with(status: Result<GatewayStatus, ApiError>) -> Poll {
        Poll {
            at: Instant::now(),
            routes: Ok(vec![]),
            status,
            plugins: Ok(Plugins::default()),
            stats: Ok(Stats::default()),
            log: Err(ApiError::Invalid("-".into())),
            traffic: Ok(Default::default()),
        }
    }

    #[test]
    fn a_refused_key_or_another_server_is_no_connection() {
        let refused = |status: u16| {
            refusal(&poll_with(Err(ApiError::Status {
                status,
                message: "failed to check token: wrong apikey".into(),
            })))
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
        assert_eq!(refusal(&poll_with(Ok(GatewayStatus::default()))), None);
    }
}
