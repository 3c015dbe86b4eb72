//! `wasmgate tui`: a terminal console for a running gateway, through its Admin API.
//!
//! Four screens — routes (create, edit, delete, enable/disable), plugins (loaded modules and
//! live per-context counters with req/s), workers (live table, reload) and the error log.
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
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

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

/// Runs the console until `q`.
pub fn run(opts: Options) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!("the console needs a terminal (stdin and stdout)");
    }
    let client = client::Client::new(&opts.admin, opts.key.clone());
    let (commands, updates) = transport::spawn(client, opts.interval);

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
    loop {
        if PANICKED.load(Ordering::SeqCst) {
            // Another thread panicked: the terminal is restored already, draw no more.
            anyhow::bail!("the console stopped after a panic (see above)");
        }
        loop {
            match updates.try_recv() {
                Ok(u) => app.on_update(u),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    anyhow::bail!("the thread talking to the Admin API stopped")
                }
            }
        }
        app.tick(Instant::now());
        terminal.draw(|f| render::draw(f, &app))?;
        if app.quit {
            break;
        }
        // Wait for input a little, then take everything typed meanwhile before drawing again.
        if event::poll(Duration::from_millis(100))? {
            loop {
                match event::read()? {
                    Event::Key(k) => {
                        if let Some(c) = app.on_key(k) {
                            // The thread only goes away with the process.
                            let _ = commands.send(c);
                        }
                    }
                    Event::Paste(text) => app.on_paste(&text),
                    // The next draw takes the new size.
                    Event::Resize(..) => {}
                    _ => {}
                }
                if app.quit || !event::poll(Duration::ZERO)? {
                    break;
                }
            }
        }
    }
    Ok(())
}
