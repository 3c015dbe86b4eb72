//! `wasmgate tui`: a terminal console for a running gateway, through its Admin API.
//!
//! Five screens — routes (create, edit, delete, enable/disable), plugins (loaded modules and
//! live per-context counters with req/s), workers (live table, reload), the error log, and
//! the certificates by expiry.
//! See `docs/tui.md`.
//!
//! The parts: [`app`] holds the state and turns keys and answers into state changes and
//! [`app::Command`]s (pure, unit-tested); [`render`] draws the state (pure, tested with
//! ratatui's `TestBackend`), one module per screen in [`panes`]; [`client`] is the Admin API
//! client and [`transport`] the thread that polls it and performs writes, so the UI thread
//! never blocks on the network. [`run`] wires them to the terminal.

pub mod app;
pub mod client;
pub mod config;
pub mod editor;
pub mod fmt;
pub mod model;
pub mod panes;
pub mod render;
pub mod theme;
pub mod transport;

#[cfg(test)]
mod snapshot_tests;

use anyhow::Context;
use ratatui::crossterm::event::{self, DisableBracketedPaste, EnableBracketedPaste, Event};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::prelude::CrosstermBackend;
use ratatui::Terminal;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the loop waits for a key before it looks for answers and signals again.
const WAIT: Duration = Duration::from_millis(100);

/// The screen is drawn when something changed (a key, an answer, a resize, a note that
/// expired), and at least this often.
const REDRAW_EVERY: Duration = Duration::from_secs(5);

/// What `wasmgate tui` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Admin API: `host:port`.
    pub admin: String,
    /// Its key (`X-API-KEY`); None when keys are not required.
    pub key: Option<String>,
    /// How often every screen's data is fetched.
    pub interval: Duration,
}

/// Whether the terminal is in the console's mode (raw, alternate screen).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back: raw mode off, main screen, cursor shown. Only the first call after
/// the terminal was set up does it: leaving the alternate screen twice would move the cursor
/// back over what was printed in between (a panic's message).
fn restore_terminal() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        DisableBracketedPaste,
        LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

/// Set by the panic hook, whichever thread panicked.
static PANICKED: AtomicBool = AtomicBool::new(false);

/// Restores the terminal when dropped, whichever way `run` ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Makes SIGTERM, SIGHUP and SIGINT (sent by `kill`, a closed terminal or a supervisor; in the
/// console's raw mode Ctrl-C is a key, not a SIGINT) set the returned flag, on which the
/// console ends as on `q`, the terminal restored. A second one while the first is being
/// handled ends the process at once.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGHUP, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
            .context("cannot handle signals")?;
    }
    // The loop sees the flag between two waits for input. A terminal that hung up (its window
    // closed, its tmux pane killed: SIGHUP) holds it elsewhere: its input reads as an endless
    // end of file, on which crossterm's wait spins without returning. The process then ends
    // all the same, a second later, the terminal restored.
    let flag = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("console-stop".into())
        .spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(1));
            restore_terminal();
            std::process::exit(0);
        })
        .context("cannot start the signal watch")?;
    Ok(stop)
}

/// Applies every answer that came in; whether there was any.
fn take_updates(app: &mut app::App, updates: &Receiver<app::Update>) -> anyhow::Result<bool> {
    let mut any = false;
    loop {
        match updates.try_recv() {
            Ok(u) => {
                app.on_update(u);
                any = true;
            }
            Err(TryRecvError::Empty) => return Ok(any),
            Err(TryRecvError::Disconnected) => {
                anyhow::bail!("the thread talking to the Admin API stopped")
            }
        }
    }
}

/// Runs the console until `q` (or a signal to stop).
pub fn run(opts: Options) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!("the console needs a terminal (stdin and stdout)");
    }
    let client = client::Client::new(&opts.admin, opts.key.clone());
    let (commands, updates) = transport::spawn(client, opts.interval);
    let stop = stop_on_signals()?;

    // A panic anywhere restores the terminal before the message is printed, so it is readable
    // and the shell is usable.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        restore_terminal();
        previous(info);
    }));
    ACTIVE.store(true, Ordering::SeqCst);
    let _guard = TerminalGuard;
    terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
    execute!(
        std::io::stdout(),
        EnterAlternateScreen,
        EnableBracketedPaste
    )
    .context("cannot set up the terminal")?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;

    let mut app = app::App::new(&opts.admin);
    let mut changed = true;
    let mut drawn = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if PANICKED.load(Ordering::SeqCst) {
            // Another thread panicked: the terminal is restored already, draw no more.
            anyhow::bail!("the console stopped after a panic (see above)");
        }
        changed |= take_updates(&mut app, &updates)?;
        let now = Instant::now();
        changed |= app.tick(now);
        // Drawing formats what is in view: not done again while nothing changed.
        if changed || now.saturating_duration_since(drawn) >= REDRAW_EVERY {
            terminal.draw(|f| render::draw(f, &app))?;
            changed = false;
            drawn = now;
        }
        if app.quit {
            break;
        }
        // Wait for input a little, then take everything typed meanwhile before drawing again.
        let ready = match event::poll(WAIT) {
            Ok(ready) => ready,
            // A signal interrupted the wait: the console ends as on `q`.
            Err(_) if stop.load(Ordering::SeqCst) => break,
            Err(e) => return Err(e.into()),
        };
        if ready {
            changed = true;
            read_events(&mut app, &commands)?;
        }
    }
    Ok(())
}

/// Takes every event waiting: keys (their writes go to the transport thread), pastes and
/// resizes (the next drawing takes the new size).
fn read_events(
    app: &mut app::App,
    commands: &std::sync::mpsc::Sender<app::Command>,
) -> anyhow::Result<()> {
    loop {
        match event::read()? {
            Event::Key(k) => {
                if let Some(c) = app.on_key(k) {
                    // The thread only goes away with the process.
                    let _ = commands.send(c);
                }
            }
            Event::Paste(text) => app.on_paste(&text),
            _ => {}
        }
        if app.quit || !event::poll(Duration::ZERO)? {
            return Ok(());
        }
    }
}
