//! The console's state and what keys and Admin API answers do to it. Nothing here touches the
//! terminal or the network: keys come in as `KeyEvent`s, answers as [`Update`]s, and writes go
//! out as [`Command`]s for [`crate::transport`] to perform. [`crate::render`] draws it.

use crate::client::ApiError;
use crate::editor::TextArea;
use crate::model::{
    ContextKey, GatewayStatus, Health, LogTail, Plugins, Route, StatContext, Stats, Traffic,
};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The seven screens, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    Routes,
    Plugins,
    Workers,
    Log,
    Certificates,
    Upstreams,
    Services,
}

impl Screen {
    pub const ALL: [Screen; 7] = [
        Screen::Routes,
        Screen::Plugins,
        Screen::Workers,
        Screen::Log,
        Screen::Certificates,
        Screen::Upstreams,
        Screen::Services,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Screen::Routes => "Routes",
            Screen::Plugins => "Plugins",
            Screen::Workers => "Workers",
            Screen::Log => "Log",
            // Short: the tab bar keeps the generation beside it at 80 columns.
            Screen::Certificates => "Certs",
            Screen::Upstreams => "Upstreams",
            Screen::Services => "Services",
        }
    }

    pub fn index(self) -> usize {
        Screen::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// An object looked up in a list the console reads.
pub enum Lookup<'a> {
    Found(&'a Route),
    /// The list was read and lacks it (a route naming a missing plugin config answers 503).
    Missing,
    /// The list was not read yet.
    Unread,
}

/// A write for the transport thread to perform.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `PUT /apisix/admin/routes/{id}` with the editor's text.
    SaveRoute { id: String, body: String },
    /// `PATCH /apisix/admin/routes/{id}` with `{"status": 0|1}`.
    SetRouteStatus { id: String, enabled: bool },
    /// `DELETE /apisix/admin/routes/{id}`.
    DeleteRoute { id: String },
    /// `POST /wasmgate/reload`.
    Reload,
}

impl Command {
    /// The route the command writes.
    pub fn route_id(&self) -> Option<&str> {
        match self {
            Command::SaveRoute { id, .. }
            | Command::SetRouteStatus { id, .. }
            | Command::DeleteRoute { id } => Some(id),
            Command::Reload => None,
        }
    }
}

/// How many lines at the end of `new` were written after `old`'s: the tail is a window of the
/// last N lines, so `new` is what is left of `old` once lines were dropped from its front,
/// followed by the new lines. No overlap (a rotated log, or more than a window written): all.
fn appended(old: &[String], new: &[String]) -> usize {
    (0..old.len())
        .find(|&dropped| new.starts_with(&old[dropped..]))
        .map_or(new.len(), |dropped| new.len() - (old.len() - dropped))
}

/// Everything one poll fetched.
#[derive(Debug, Clone)]
pub struct Poll {
    /// When the answers came (rates are computed between two polls).
    pub at: Instant,
    /// The route and service lists; None when the configuration did not change since they
    /// were last fetched (see [`crate::transport::Poller`]).
    pub routes: Option<Result<Vec<Route>, ApiError>>,
    pub services: Option<Result<Vec<Route>, ApiError>>,
    /// The plugin configs, fetched with the routes.
    pub plugin_configs: Option<Result<Vec<Route>, ApiError>>,
    /// The upstream objects, fetched with the routes.
    pub upstreams: Option<Result<Vec<Route>, ApiError>>,
    /// The SSL objects, fetched with the routes.
    pub ssls: Option<Result<Vec<Route>, ApiError>>,
    pub status: Result<GatewayStatus, ApiError>,
    pub plugins: Result<Plugins, ApiError>,
    pub stats: Result<Stats, ApiError>,
    pub log: Result<LogTail, ApiError>,
    pub traffic: Result<Traffic, ApiError>,
    /// The health of checked upstreams' nodes.
    pub health: Result<Health, ApiError>,
}

/// What the transport thread reports.
#[derive(Debug, Clone)]
pub enum Update {
    Poll(Box<Poll>),
    /// A poll could not reach the gateway.
    Unreachable(String),
    /// A poll reached the address, which refused the key or is no wasmgate Admin API.
    Refused(String),
    /// A [`Command`] finished.
    Done {
        command: Command,
        result: Result<Value, ApiError>,
    },
}

/// The last answer of one endpoint, kept when a later call fails.
#[derive(Debug, Clone)]
pub struct Feed<T> {
    pub data: Option<T>,
    pub error: Option<ApiError>,
}

impl<T> Default for Feed<T> {
    fn default() -> Self {
        Feed {
            data: None,
            error: None,
        }
    }
}

impl<T> Feed<T> {
    fn apply(&mut self, r: Result<T, ApiError>) {
        match r {
            Ok(v) => {
                self.data = Some(v);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// Columns the plugin stats table sorts by (`s` cycles, `r` reverses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Plugin,
    Owner,
    Rate,
    Requests,
    Errors,
    Traps,
    P50,
    P99,
}

impl SortBy {
    pub const ALL: [SortBy; 8] = [
        SortBy::Plugin,
        SortBy::Owner,
        SortBy::Rate,
        SortBy::Requests,
        SortBy::Errors,
        SortBy::Traps,
        SortBy::P50,
        SortBy::P99,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SortBy::Plugin => "plugin",
            SortBy::Owner => "route / rule",
            SortBy::Rate => "req/s",
            SortBy::Requests => "requests",
            SortBy::Errors => "errors",
            SortBy::Traps => "traps",
            SortBy::P50 => "p50",
            SortBy::P99 => "p99",
        }
    }

    /// Text columns sort ascending first, numbers largest first.
    fn descending_first(self) -> bool {
        !matches!(self, SortBy::Plugin | SortBy::Owner)
    }

    fn next(self) -> SortBy {
        let i = SortBy::ALL.iter().position(|s| *s == self).unwrap_or(0);
        SortBy::ALL[(i + 1) % SortBy::ALL.len()]
    }
}

/// How many req/s samples a context keeps (one per poll).
pub const HISTORY: usize = 300;

/// The plugin statistics and what was computed from successive polls.
#[derive(Debug, Clone)]
pub struct StatsView {
    pub feed: Feed<Stats>,
    /// req/s per context, from the last two polls.
    pub rates: HashMap<ContextKey, f64>,
    /// req/s samples per context, oldest first.
    pub history: HashMap<ContextKey, VecDeque<f64>>,
    /// req/s of all contexts together.
    pub total_history: VecDeque<f64>,
    last: Option<(Instant, HashMap<ContextKey, u64>)>,
    pub sort: SortBy,
    /// Descending order.
    pub descending: bool,
    pub selected: Option<ContextKey>,
    /// The sparkline shows all contexts instead of the selected one.
    pub show_all: bool,
}

impl Default for StatsView {
    fn default() -> Self {
        StatsView {
            feed: Feed::default(),
            rates: HashMap::new(),
            history: HashMap::new(),
            total_history: VecDeque::new(),
            last: None,
            sort: SortBy::Plugin,
            descending: false,
            selected: None,
            show_all: false,
        }
    }
}

fn push_sample(h: &mut VecDeque<f64>, v: f64) {
    if h.len() == HISTORY {
        h.pop_front();
    }
    h.push_back(v);
}

impl StatsView {
    fn apply(&mut self, r: Result<Stats, ApiError>, at: Instant) {
        if let Ok(stats) = &r {
            let now: HashMap<ContextKey, u64> = stats
                .contexts
                .iter()
                .filter_map(|c| Some((c.key(), c.requests?)))
                .collect();
            self.rates.clear();
            if let Some((then, before)) = &self.last {
                let dt = at.saturating_duration_since(*then).as_secs_f64();
                if dt > 0.0 {
                    let mut total = 0.0;
                    for (k, n) in &now {
                        // A context that appeared since counts from zero; a counter that went
                        // back (the gateway restarted) counts as no requests.
                        let rate =
                            n.saturating_sub(before.get(k).copied().unwrap_or(0)) as f64 / dt;
                        total += rate;
                        self.rates.insert(k.clone(), rate);
                        push_sample(self.history.entry(k.clone()).or_default(), rate);
                    }
                    push_sample(&mut self.total_history, total);
                }
            }
            self.history.retain(|k, _| now.contains_key(k));
            self.last = Some((at, now));
        }
        self.feed.apply(r);
        self.keep_selection();
    }

    /// The contexts in table order.
    pub fn rows(&self) -> Vec<&StatContext> {
        let mut rows: Vec<&StatContext> = self
            .feed
            .data
            .as_ref()
            .map(|s| s.contexts.iter().collect())
            .unwrap_or_default();
        let rate = |c: &StatContext| self.rates.get(&c.key()).copied();
        let num = |c: &StatContext| -> Option<f64> {
            match self.sort {
                SortBy::Rate => rate(c),
                SortBy::Requests => c.requests.map(|n| n as f64),
                SortBy::Errors => c.errors.map(|n| n as f64),
                SortBy::Traps => c.traps.map(|n| n as f64),
                SortBy::P50 => c.p50_us,
                SortBy::P99 => c.p99_us,
                SortBy::Plugin | SortBy::Owner => None,
            }
        };
        rows.sort_by(|a, b| {
            let (ka, kb) = (a.key(), b.key());
            let by_name = ka.cmp(&kb);
            let primary = match self.sort {
                SortBy::Plugin => by_name,
                SortBy::Owner => (&ka.owner_kind, &ka.owner_id, &ka.plugin).cmp(&(
                    &kb.owner_kind,
                    &kb.owner_id,
                    &kb.plugin,
                )),
                _ => num(a).unwrap_or(-1.0).total_cmp(&num(b).unwrap_or(-1.0)),
            };
            let primary = if self.descending {
                primary.reverse()
            } else {
                primary
            };
            primary.then(by_name)
        });
        rows
    }

    fn selected_index(&self) -> Option<usize> {
        let sel = self.selected.as_ref()?;
        self.rows().iter().position(|c| &c.key() == sel)
    }

    /// The selected row in table order, if any.
    pub fn selection(&self) -> Option<usize> {
        self.selected_index()
    }

    fn keep_selection(&mut self) {
        if self.selected_index().is_none() {
            self.selected = self.rows().first().map(|c| c.key());
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let keys: Vec<ContextKey> = self.rows().iter().map(|c| c.key()).collect();
        if keys.is_empty() {
            return;
        }
        let j = moved(self.selected_index().unwrap_or(0), delta, keys.len());
        self.selected = Some(keys[j].clone());
    }

    /// The sparkline's samples and what they are of.
    pub fn sparkline(&self) -> (String, Vec<f64>) {
        match (&self.selected, self.show_all) {
            (Some(k), false) => (
                format!("{} on {}", k.plugin, k.owner()),
                self.history
                    .get(k)
                    .map(|h| h.iter().copied().collect())
                    .unwrap_or_default(),
            ),
            _ => (
                "all contexts".into(),
                self.total_history.iter().copied().collect(),
            ),
        }
    }
}

/// The route editor: an id and the route's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEditor {
    /// A new route (its id may be edited) or an existing one.
    pub new: bool,
    pub id: TextArea,
    pub body: TextArea,
    pub focus: Focus,
    /// The Admin API's answer to the last save, shown under the text.
    pub error: Option<String>,
    /// A save is on its way.
    pub saving: bool,
    /// The id and the text as opened: closing with changes asks first.
    opened: (String, String),
    /// The route's revision when it was opened (None for a new route).
    pub revision: Option<u64>,
}

/// Which field of the route editor has the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Id,
    Body,
}

/// The JSON a new route starts from.
pub const NEW_ROUTE_TEMPLATE: &str = r#"{
  "uri": "/",
  "upstream": {
    "type": "roundrobin",
    "nodes": {
      "127.0.0.1:8080": 1
    }
  }
}"#;

impl RouteEditor {
    /// A text field with the cursor at its end.
    fn field(text: &str) -> TextArea {
        let mut t = TextArea::new(text);
        t.set_cursor(usize::MAX, usize::MAX);
        t
    }

    pub fn new_route(id: &str) -> RouteEditor {
        Self::open(true, id, NEW_ROUTE_TEMPLATE)
    }

    pub fn edit(route: &Route) -> RouteEditor {
        let mut ed = Self::open(false, &route.id, &route.editable_json());
        ed.revision = route.revision;
        ed
    }

    fn open(new: bool, id: &str, text: &str) -> RouteEditor {
        RouteEditor {
            new,
            id: Self::field(id),
            body: TextArea::new(text),
            focus: Focus::Body,
            error: None,
            saving: false,
            opened: (id.to_string(), text.to_string()),
            revision: None,
        }
    }

    /// Whether the id or the text differ from what was opened (closing would lose them).
    pub fn changed(&self) -> bool {
        self.id.text() != self.opened.0 || self.body.text() != self.opened.1
    }

    pub fn id_text(&self) -> String {
        self.id.text().trim().to_string()
    }

    /// Shows a failed save; a JSON mistake (`… at line L column C`) moves the cursor there.
    fn failed(&mut self, message: String) {
        if let Some((line, col)) = error_position(&message) {
            self.body
                .set_cursor(line.saturating_sub(1), col.saturating_sub(1));
            self.focus = Focus::Body;
        }
        self.error = Some(message);
        self.saving = false;
    }

    fn on_key(&mut self, key: KeyEvent) -> Option<Command> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('s') if ctrl => {
                if self.saving {
                    return None;
                }
                let id = self.id_text();
                if id.is_empty() {
                    self.error = Some("the route needs an id".into());
                    self.focus = Focus::Id;
                    return None;
                }
                self.saving = true;
                self.error = None;
                return Some(Command::SaveRoute {
                    id,
                    body: self.body.text(),
                });
            }
            KeyCode::Tab | KeyCode::BackTab if self.new => {
                self.focus = match self.focus {
                    Focus::Id => Focus::Body,
                    Focus::Body => Focus::Id,
                };
            }
            KeyCode::Enter if self.focus == Focus::Id => self.focus = Focus::Body,
            KeyCode::Up | KeyCode::Down | KeyCode::PageUp | KeyCode::PageDown
                if self.focus == Focus::Id => {}
            _ => {
                let field = match self.focus {
                    Focus::Id => &mut self.id,
                    Focus::Body => &mut self.body,
                };
                field.on_key(key);
            }
        }
        None
    }

    fn paste(&mut self, text: &str) {
        match self.focus {
            Focus::Id => self.id.insert_str(&text.replace(['\r', '\n'], "")),
            Focus::Body => self.body.insert_str(text),
        }
    }
}

/// `… at line 3 column 5` in a JSON parser's message.
pub fn error_position(msg: &str) -> Option<(usize, usize)> {
    let rest = &msg[msg.rfind(" at line ")? + " at line ".len()..];
    let (line, rest) = rest.split_once(" column ")?;
    let col: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.parse().ok()?, col.parse().ok()?))
}

/// A question that needs y or n.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirm {
    pub title: String,
    pub question: String,
    pub command: Command,
}

/// What is drawn over the screen and takes the keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Modal {
    Help,
    Confirm(Confirm),
    Editor(Box<RouteEditor>),
    /// Closing an editor with changes (`quit`: the whole console): `y` loses them, `n` or
    /// `Esc` goes back to the editor.
    Discard {
        editor: Box<RouteEditor>,
        quit: bool,
    },
    /// A save that would overwrite what someone else stored meanwhile (`why` says what):
    /// `y` saves anyway, `n` or `Esc` goes back to the editor.
    Overwrite {
        editor: Box<RouteEditor>,
        save: Command,
        why: String,
    },
    /// A result that deserves more than the status bar (a refused reload, a failed delete).
    Message {
        title: String,
        text: String,
        error: bool,
    },
}

/// A short note in the status bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Flash {
    pub text: String,
    pub error: bool,
    /// Set on the first tick after it was shown.
    shown_at: Option<Instant>,
}

/// How long a note stays in the status bar.
pub const FLASH_FOR: Duration = Duration::from_secs(5);

/// The longest Routes filter, in characters.
const MAX_FILTER: usize = 200;

/// Lines moved by PageUp/PageDown before a screen was drawn (then: its visible rows).
const PAGE: usize = 10;

/// The whole console.
#[derive(Debug, Clone)]
pub struct App {
    /// The Admin API address, as shown.
    pub admin: String,
    pub screen: Screen,
    pub modal: Option<Modal>,
    /// None until the first poll ended; then whether it reached the gateway.
    pub connected: Option<bool>,
    /// Why the gateway could not be reached.
    pub unreachable: Option<String>,
    /// What `unreachable` says is a refusal (the key, or not a gateway), not an address
    /// that does not answer.
    pub refused: bool,
    pub routes: Feed<Vec<Route>>,
    /// The services, for what routes take from theirs (hosts, plugins).
    pub services: Feed<Vec<Route>>,
    /// The plugin configs, for the plugins routes take from theirs.
    pub plugin_configs: Feed<Vec<Route>>,
    /// The upstream objects (the Upstreams screen), and the row selected there.
    pub upstreams: Feed<Vec<Route>>,
    pub upstream_selected: usize,
    /// The row selected on the Services screen.
    pub service_selected: usize,
    /// Counts changes of the route and service lists: what is measured over the whole list
    /// is measured again only when it moved.
    pub config_version: u64,
    /// The Routes table's column widths over the whole list, and the `config_version` they
    /// were measured at (filled when drawing).
    pub route_widths: std::cell::RefCell<Option<(u64, Vec<u16>)>>,
    /// The first route row shown at the last drawing (the table draws only the rows in view).
    pub route_offset: std::cell::Cell<usize>,
    /// The selected route, by id (so it stays put when the list changes).
    pub route_selected: Option<String>,
    /// The Routes filter (`/`): the routes shown are those that contain it (any case).
    pub route_filter: String,
    /// The filter is being typed: keys go to it.
    pub filtering: bool,
    /// The routes the filter lets through (None: no filter), and the `config_version` they
    /// were picked at.
    shown: Option<Vec<Route>>,
    shown_at: u64,
    pub status: Feed<GatewayStatus>,
    pub worker_selected: usize,
    /// The SSL objects (the Certificates screen), and the row selected there.
    pub ssls: Feed<Vec<Route>>,
    pub cert_selected: usize,
    /// The time the Certificates screen counts days from (Unix seconds); None: now. Set by
    /// tests, so that a drawing does not change from day to day.
    pub fixed_now: Option<i64>,
    pub plugins: Feed<Plugins>,
    pub stats: StatsView,
    pub log: Feed<LogTail>,
    /// Each route's requests by status class (the Routes table's counts).
    pub traffic: Feed<Traffic>,
    pub health: Feed<Health>,
    /// Lines scrolled up from the end of the log (0: follow it).
    pub log_scroll: usize,
    /// Lines the log's pane showed at its last drawing: scrolling back stops once its first
    /// line is in view (0 before the first drawing).
    pub log_view: std::cell::Cell<usize>,
    /// Columns scrolled right.
    pub log_hscroll: u16,
    /// Rows of the current screen's list at its last drawing: what PageUp/PageDown move.
    pub page: std::cell::Cell<usize>,
    /// The open question or editor did not fit on the screen at its last drawing: only the
    /// keys that cancel act (nothing is confirmed or saved unseen).
    pub blind: std::cell::Cell<bool>,
    /// A reload is on its way.
    pub reloading: bool,
    pub flash: Option<Flash>,
    pub quit: bool,
}

impl App {
    pub fn new(admin: &str) -> App {
        App {
            admin: admin.to_string(),
            screen: Screen::Routes,
            modal: None,
            connected: None,
            unreachable: None,
            refused: false,
            routes: Feed::default(),
            services: Feed::default(),
            plugin_configs: Feed::default(),
            upstreams: Feed::default(),
            upstream_selected: 0,
            service_selected: 0,
            config_version: 0,
            route_widths: Default::default(),
            route_offset: Default::default(),
            route_selected: None,
            route_filter: String::new(),
            filtering: false,
            shown: None,
            shown_at: 0,
            status: Feed::default(),
            worker_selected: 0,
            ssls: Feed::default(),
            cert_selected: 0,
            fixed_now: None,
            plugins: Feed::default(),
            stats: StatsView::default(),
            log: Feed::default(),
            traffic: Feed::default(),
            health: Feed::default(),
            log_scroll: 0,
            log_view: std::cell::Cell::new(0),
            log_hscroll: 0,
            page: std::cell::Cell::new(PAGE),
            blind: Default::default(),
            reloading: false,
            flash: None,
            quit: false,
        }
    }

    fn note(&mut self, text: impl Into<String>, error: bool) {
        self.flash = Some(Flash {
            text: text.into(),
            error,
            shown_at: None,
        });
    }

    /// Time passes: notes expire. Returns whether the screen changed (a note went).
    pub fn tick(&mut self, now: Instant) -> bool {
        if let Some(f) = &mut self.flash {
            match f.shown_at {
                None => f.shown_at = Some(now),
                Some(t) if now.saturating_duration_since(t) >= FLASH_FOR => {
                    self.flash = None;
                    return true;
                }
                Some(_) => {}
            }
        }
        false
    }

    /// The routes as listed: those the filter lets through.
    pub fn route_list(&self) -> &[Route] {
        self.shown.as_deref().unwrap_or_else(|| self.all_routes())
    }

    /// Every route, whatever the filter.
    pub fn all_routes(&self) -> &[Route] {
        self.routes.data.as_deref().unwrap_or(&[])
    }

    /// Picks the routes the filter lets through again (the list or the filter changed).
    fn refilter(&mut self) {
        let needle = self.route_filter.to_lowercase();
        self.shown = (!needle.is_empty()).then(|| {
            let all = self.all_routes().iter();
            all.filter(|r| r.matches(&needle)).cloned().collect()
        });
        self.shown_at = self.config_version;
        self.keep_route_selection();
    }

    /// A key while the filter is typed: text edits it (the list follows each key), `Enter`
    /// keeps it, `Esc` drops it; the arrows still move the selection.
    fn filter_key(&mut self, key: KeyEvent) -> Option<Command> {
        match key.code {
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                if !c.is_control() && self.route_filter.chars().count() < MAX_FILTER {
                    self.route_filter.push(c);
                }
            }
            KeyCode::Backspace => {
                self.route_filter.pop();
            }
            KeyCode::Enter => {
                self.filtering = false;
                return None;
            }
            KeyCode::Esc => {
                self.filtering = false;
                self.route_filter.clear();
            }
            KeyCode::Up | KeyCode::Down | KeyCode::PageUp | KeyCode::PageDown => {
                return self.routes_key(key);
            }
            _ => return None,
        }
        // The widths are measured again over what is shown.
        self.config_version += 1;
        self.refilter();
        None
    }

    /// Service `id`, as last read.
    pub fn service(&self, id: &str) -> Option<&Route> {
        let services = self.services.data.as_deref().unwrap_or(&[]);
        services.iter().find(|s| s.id == id)
    }

    /// Plugin config `id`, as last read.
    pub fn plugin_config(&self, id: &str) -> Lookup<'_> {
        match self.plugin_configs.data.as_deref() {
            None => Lookup::Unread,
            Some(list) => list
                .iter()
                .find(|p| p.id == id)
                .map_or(Lookup::Missing, Lookup::Found),
        }
    }

    pub fn route_index(&self) -> Option<usize> {
        let sel = self.route_selected.as_ref()?;
        self.route_list().iter().position(|r| &r.id == sel)
    }

    pub fn selected_route(&self) -> Option<&Route> {
        self.route_index().map(|i| &self.route_list()[i])
    }

    fn keep_route_selection(&mut self) {
        if self.route_index().is_none() {
            // The selected route went away: take its neighbour, or the first.
            let list = self.route_list();
            let next = self
                .route_selected
                .as_ref()
                .and_then(|sel| {
                    list.iter()
                        .find(|r| crate::model::id_order(&r.id, sel).is_gt())
                        .or(list.last())
                })
                .or(list.first())
                .map(|r| r.id.clone());
            self.route_selected = next;
        }
    }

    fn move_route(&mut self, delta: isize) {
        let list = self.route_list();
        if list.is_empty() {
            return;
        }
        let j = moved(self.route_index().unwrap_or(0), delta, list.len());
        self.route_selected = Some(list[j].id.clone());
    }

    /// The id a new route is offered: one more than the largest numeric id.
    pub fn next_route_id(&self) -> String {
        let max = self
            .all_routes()
            .iter()
            .filter_map(|r| r.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (max + 1).to_string()
    }

    fn worker_count(&self) -> usize {
        self.status.data.as_ref().map_or(0, |s| s.workers.len())
    }

    pub fn log_lines(&self) -> &[String] {
        self.log.data.as_ref().map_or(&[], |l| l.lines.as_slice())
    }

    /// An answer from the transport thread.
    pub fn on_update(&mut self, u: Update) {
        match u {
            Update::Unreachable(e) => {
                self.connected = Some(false);
                self.unreachable = Some(e);
                self.refused = false;
            }
            Update::Refused(e) => {
                self.connected = Some(false);
                self.unreachable = Some(e);
                self.refused = true;
            }
            Update::Poll(p) => {
                let p = *p;
                self.connected = Some(true);
                self.unreachable = None;
                self.refused = false;
                if let Some(routes) = p.routes {
                    self.routes.apply(routes);
                    self.config_version += 1;
                }
                if let Some(services) = p.services {
                    self.services.apply(services);
                    self.config_version += 1;
                }
                if let Some(plugin_configs) = p.plugin_configs {
                    self.plugin_configs.apply(plugin_configs);
                    self.config_version += 1;
                }
                if let Some(upstreams) = p.upstreams {
                    self.upstreams.apply(upstreams);
                }
                if let Some(ssls) = p.ssls {
                    self.ssls.apply(ssls);
                    let n = self.ssls.data.as_ref().map_or(0, Vec::len);
                    self.cert_selected = self.cert_selected.min(n.saturating_sub(1));
                }
                self.keep_route_selection();
                self.status.apply(p.status);
                self.worker_selected = self
                    .worker_selected
                    .min(self.worker_count().saturating_sub(1));
                self.plugins.apply(p.plugins);
                self.stats.apply(p.stats, p.at);
                self.apply_log(p.log);
                self.traffic.apply(p.traffic);
                self.health.apply(p.health);
            }
            Update::Done { command, result } => self.on_done(command, result),
        }
        if self.shown_at != self.config_version {
            self.refilter();
        }
    }

    /// A new tail of the log. Scrolled back, the view stays on the same lines: by as many
    /// lines as were written since, whether the tail grew or dropped as many from its front.
    fn apply_log(&mut self, r: Result<LogTail, ApiError>) {
        if self.log_scroll > 0 {
            if let Ok(new) = &r {
                let added = appended(self.log_lines(), &new.lines);
                let max = new.lines.len().saturating_sub(self.log_view.get());
                self.log_scroll = (self.log_scroll + added).min(max);
            }
        }
        self.log.apply(r);
    }

    fn on_done(&mut self, command: Command, result: Result<Value, ApiError>) {
        // The Admin API names a refused id as it got it, escaped for the path (`a%2Fb`):
        // shown as typed.
        let message = |e: &ApiError| {
            let text = match e {
                ApiError::Status { status, message } => format!("{status}: {message}"),
                other => other.to_string(),
            };
            match command.route_id() {
                Some(id) => text.replace(&crate::client::segment(id), id),
                None => text,
            }
        };
        if matches!(
            (&command, &result),
            (
                Command::SetRouteStatus { .. } | Command::DeleteRoute { .. },
                Ok(_)
            )
        ) {
            // Changed here, before the next poll shows it.
            self.config_version += 1;
        }
        match (command.clone(), result) {
            (Command::SaveRoute { id, .. }, Ok(_)) => {
                match self.modal.take() {
                    // Saved: nothing is lost by closing, whether the editor is open or its
                    // discard question (asked while the save was on its way).
                    Some(Modal::Editor(e)) if e.saving => {}
                    Some(Modal::Discard { editor, quit }) if editor.saving => self.quit = quit,
                    other => self.modal = other,
                }
                self.note(format!("route {id} saved"), false);
                self.route_selected = Some(id);
            }
            (Command::SaveRoute { id, .. }, Err(e)) => match self.modal.take() {
                Some(Modal::Editor(mut ed)) if ed.saving => {
                    ed.failed(message(&e));
                    self.modal = Some(Modal::Editor(ed));
                }
                // Not saved: back to the text, with why, rather than a discard of it.
                Some(Modal::Discard { mut editor, .. }) if editor.saving => {
                    editor.failed(message(&e));
                    self.modal = Some(Modal::Editor(editor));
                }
                other => {
                    self.modal = other;
                    self.note(format!("route {id} not saved: {}", message(&e)), true)
                }
            },
            (Command::SetRouteStatus { id, enabled }, Ok(_)) => {
                if let Some(r) = self
                    .routes
                    .data
                    .as_mut()
                    .and_then(|l| l.iter_mut().find(|r| r.id == id))
                {
                    r.value["status"] = Value::from(u8::from(enabled));
                }
                let state = if enabled { "enabled" } else { "disabled" };
                self.note(format!("route {id} {state}"), false);
            }
            (Command::SetRouteStatus { id, .. }, Err(e)) => {
                self.note(format!("route {id}: {}", message(&e)), true)
            }
            (Command::DeleteRoute { id }, Ok(_)) => {
                if let Some(l) = self.routes.data.as_mut() {
                    l.retain(|r| r.id != id);
                }
                self.keep_route_selection();
                self.note(format!("route {id} deleted"), false);
            }
            (Command::DeleteRoute { id }, Err(e)) => {
                self.modal = Some(Modal::Message {
                    title: format!("Route {id} not deleted"),
                    text: message(&e),
                    error: true,
                })
            }
            (Command::Reload, Ok(v)) => {
                self.reloading = false;
                let epoch = v
                    .get("epoch")
                    .and_then(Value::as_u64)
                    .map_or("-".to_string(), |e| e.to_string());
                self.note(format!("reloaded: epoch {epoch}"), false);
            }
            (Command::Reload, Err(e)) => {
                self.reloading = false;
                self.modal = Some(Modal::Message {
                    title: "Reload failed".into(),
                    text: message(&e),
                    error: true,
                });
            }
        }
    }

    /// Pasted text (bracketed paste): goes to the editor when it is open.
    pub fn on_paste(&mut self, text: &str) {
        if let Some(Modal::Editor(ed)) = &mut self.modal {
            ed.paste(text);
        }
    }

    /// A key; returns the write it asks for, if any.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Command> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let interrupt = ctrl && key.code == KeyCode::Char('c');
        if self.acting_blind() && !interrupt && key.code != KeyCode::Esc {
            return None;
        }
        match self.modal.take() {
            Some(Modal::Editor(ed)) if ed.changed() && (interrupt || key.code == KeyCode::Esc) => {
                self.modal = Some(Modal::Discard {
                    editor: ed,
                    quit: interrupt,
                });
                None
            }
            Some(Modal::Overwrite { editor, .. }) if interrupt && editor.changed() => {
                self.modal = Some(Modal::Discard { editor, quit: true });
                None
            }
            _ if interrupt => {
                self.quit = true;
                None
            }
            Some(Modal::Editor(mut ed)) => {
                if key.code == KeyCode::Esc {
                    return None;
                }
                let cmd = ed.on_key(key);
                if let Some(why) = cmd.as_ref().and_then(|c| self.overwrites(&ed, c)) {
                    self.modal = Some(Modal::Overwrite {
                        editor: ed,
                        save: cmd?,
                        why,
                    });
                    return None;
                }
                self.modal = Some(Modal::Editor(ed));
                cmd
            }
            Some(Modal::Overwrite {
                mut editor,
                save,
                why,
            }) => match key.code {
                // Only `y`: an Enter typed on from the text must not overwrite.
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    self.modal = Some(Modal::Editor(editor));
                    Some(save)
                }
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
                    editor.saving = false;
                    self.modal = Some(Modal::Editor(editor));
                    None
                }
                _ => {
                    self.modal = Some(Modal::Overwrite { editor, save, why });
                    None
                }
            },
            Some(Modal::Discard { editor, quit }) => {
                // Only `y` discards: text typed on after a stray Esc must not.
                match key.code {
                    KeyCode::Char('y') | KeyCode::Char('Y') => self.quit = quit,
                    KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
                        self.modal = Some(Modal::Editor(editor))
                    }
                    _ => self.modal = Some(Modal::Discard { editor, quit }),
                }
                None
            }
            Some(Modal::Confirm(c)) => match key.code {
                // Only `y`, as the question says: Enter (the edit key on Routes) must not
                // delete, disable or reload.
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    if c.command == Command::Reload {
                        self.reloading = true;
                    }
                    Some(c.command)
                }
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => None,
                _ => {
                    self.modal = Some(Modal::Confirm(c));
                    None
                }
            },
            Some(Modal::Help) => {
                match key.code {
                    KeyCode::Char('q') => self.quit = true,
                    KeyCode::Esc | KeyCode::Char('?') | KeyCode::Enter => {}
                    _ => self.modal = Some(Modal::Help),
                }
                None
            }
            Some(Modal::Message { .. }) => None,
            None => self.on_screen_key(key),
        }
    }

    /// Whether a key would act on a question or an editor that the last drawing could not
    /// show (the terminal too small).
    fn acting_blind(&self) -> bool {
        self.blind.get()
            && matches!(
                self.modal,
                Some(
                    Modal::Editor(_)
                        | Modal::Confirm(_)
                        | Modal::Overwrite { .. }
                        | Modal::Discard { .. }
                )
            )
    }

    /// Why saving `ed` with `save` would overwrite a route someone else stored since it was
    /// opened (as the last poll shows it), or a route a new one's id names; None when not.
    fn overwrites(&self, ed: &RouteEditor, save: &Command) -> Option<String> {
        let Command::SaveRoute { id, .. } = save else {
            return None;
        };
        let stored = self.all_routes().iter().find(|r| &r.id == id);
        let same_route = !ed.new && *id == ed.opened.0;
        let Some(stored) = stored else {
            // Gone from the list: deleted by someone else since it was opened (a delete is a
            // change too), unless the editor holds a new route.
            return same_route.then(|| {
                format!(
                    "Route {id} was deleted since you opened it: saving creates it again with \
                     this text. Save anyway?"
                )
            });
        };
        if !same_route {
            return Some(format!(
                "Route {id} exists: saving replaces it with this text. Save anyway?"
            ));
        }
        match (ed.revision, stored.revision) {
            (Some(opened), Some(now)) if now != opened => Some(format!(
                "Route {id} was changed since you opened it (revision {opened}, now {now}): \
                 saving replaces that change with this text. Save anyway?"
            )),
            _ => None,
        }
    }

    fn on_screen_key(&mut self, key: KeyEvent) -> Option<Command> {
        if self.filtering && self.screen == Screen::Routes {
            return self.filter_key(key);
        }
        match key.code {
            KeyCode::Char('q') => {
                self.quit = true;
                return None;
            }
            KeyCode::Char('?') => {
                self.modal = Some(Modal::Help);
                return None;
            }
            KeyCode::Char(c @ '1'..='7') => {
                self.screen = Screen::ALL[c as usize - '1' as usize];
                return None;
            }
            KeyCode::Tab => {
                let n = Screen::ALL.len();
                self.screen = Screen::ALL[(self.screen.index() + 1) % n];
                return None;
            }
            KeyCode::BackTab => {
                let n = Screen::ALL.len();
                self.screen = Screen::ALL[(self.screen.index() + n - 1) % n];
                return None;
            }
            _ => {}
        }
        match self.screen {
            Screen::Routes => self.routes_key(key),
            Screen::Plugins => {
                self.plugins_key(key);
                None
            }
            Screen::Workers => self.workers_key(key),
            Screen::Log => {
                self.log_key(key);
                None
            }
            Screen::Certificates => {
                if let Some(d) = self.movement(&key) {
                    let n = self.ssls.data.as_ref().map_or(0, Vec::len);
                    self.cert_selected = moved(self.cert_selected, d, n);
                }
                None
            }
            Screen::Upstreams => {
                if let Some(d) = self.movement(&key) {
                    let n = crate::panes::upstreams::row_count(self);
                    self.upstream_selected = moved(self.upstream_selected, d, n);
                }
                None
            }
            Screen::Services => {
                if let Some(d) = self.movement(&key) {
                    let n = crate::panes::services::row_count(self);
                    self.service_selected = moved(self.service_selected, d, n);
                }
                None
            }
        }
    }

    /// Up/Down/PageUp/PageDown/Home/End (and j/k/g/G) as a signed move; None for other keys.
    /// A page is what the screen's list showed at its last drawing.
    fn movement(&self, key: &KeyEvent) -> Option<isize> {
        let page = self.page.get().max(1) as isize;
        Some(match key.code {
            KeyCode::Up | KeyCode::Char('k') => -1,
            KeyCode::Down | KeyCode::Char('j') => 1,
            KeyCode::PageUp => -page,
            KeyCode::PageDown => page,
            KeyCode::Home | KeyCode::Char('g') => isize::MIN / 2,
            KeyCode::End | KeyCode::Char('G') => isize::MAX / 2,
            _ => return None,
        })
    }

    fn routes_key(&mut self, key: KeyEvent) -> Option<Command> {
        if let Some(d) = self.movement(&key) {
            self.move_route(d);
            return None;
        }
        match key.code {
            // Not before the routes were read once: the new id, and whether it exists, come
            // from them.
            KeyCode::Char('n') if self.routes.data.is_some() => {
                let ed = RouteEditor::new_route(&self.next_route_id());
                self.modal = Some(Modal::Editor(Box::new(ed)));
            }
            KeyCode::Char('/') => self.filtering = true,
            // Esc drops a filter that was kept.
            KeyCode::Esc if !self.route_filter.is_empty() => {
                self.route_filter.clear();
                self.config_version += 1;
                self.refilter();
            }
            KeyCode::Char('e') | KeyCode::Enter => {
                if let Some(r) = self.selected_route() {
                    self.modal = Some(Modal::Editor(Box::new(RouteEditor::edit(r))));
                }
            }
            KeyCode::Char('d') | KeyCode::Delete => {
                if let Some(r) = self.selected_route() {
                    let what = match r.name() {
                        Some(n) => format!("route {} ({n}, {})", r.id, r.uris().join(" ")),
                        None => format!("route {} ({})", r.id, r.uris().join(" ")),
                    };
                    self.modal = Some(Modal::Confirm(Confirm {
                        title: "Delete route".into(),
                        question: format!("Delete {what}?"),
                        command: Command::DeleteRoute { id: r.id.clone() },
                    }));
                }
            }
            KeyCode::Char(' ') => {
                if let Some(r) = self.selected_route() {
                    let command = Command::SetRouteStatus {
                        id: r.id.clone(),
                        enabled: !r.enabled(),
                    };
                    // Enabling serves more; disabling a live route answers its clients 404:
                    // asked first, as a delete is.
                    if r.enabled() {
                        self.modal = Some(Modal::Confirm(Confirm {
                            title: "Disable route".into(),
                            question: format!(
                                "Disable route {} ({})? Its requests get 404 until it is \
                                 enabled again.",
                                r.id,
                                r.uris().join(" ")
                            ),
                            command,
                        }));
                        return None;
                    }
                    return Some(command);
                }
            }
            _ => {}
        }
        None
    }

    fn plugins_key(&mut self, key: KeyEvent) {
        if let Some(d) = self.movement(&key) {
            self.stats.move_selection(d);
            self.stats.show_all = false;
            return;
        }
        match key.code {
            KeyCode::Char('s') => {
                self.stats.sort = self.stats.sort.next();
                self.stats.descending = self.stats.sort.descending_first();
            }
            KeyCode::Char('r') => self.stats.descending = !self.stats.descending,
            KeyCode::Char('a') => self.stats.show_all = !self.stats.show_all,
            _ => {}
        }
    }

    fn workers_key(&mut self, key: KeyEvent) -> Option<Command> {
        if let Some(d) = self.movement(&key) {
            self.worker_selected = moved(self.worker_selected, d, self.worker_count());
            return None;
        }
        if key.code == KeyCode::Char('R') && !self.reloading {
            self.modal = Some(Modal::Confirm(Confirm {
                title: "Reload".into(),
                question: "Reload config.yaml and plugins, replacing every worker?".into(),
                command: Command::Reload,
            }));
        }
        None
    }

    /// The furthest the log scrolls back: its first line at the top of the pane.
    pub fn log_scroll_max(&self) -> usize {
        self.log_lines().len().saturating_sub(self.log_view.get())
    }

    fn log_key(&mut self, key: KeyEvent) {
        let furthest = self.log_scroll_max();
        match key.code {
            KeyCode::Left | KeyCode::Char('h') => {
                self.log_hscroll = self.log_hscroll.saturating_sub(8)
            }
            KeyCode::Right | KeyCode::Char('l') => {
                self.log_hscroll = self.log_hscroll.saturating_add(8).min(2000)
            }
            _ => {
                if let Some(d) = self.movement(&key) {
                    // Up scrolls back: away from the end.
                    self.log_scroll =
                        (self.log_scroll as isize - d).clamp(0, furthest as isize) as usize;
                }
            }
        }
    }
}

/// Row `at` of a list of `n` moved by `d`, within the list (0 for an empty one).
fn moved(at: usize, d: isize, n: usize) -> usize {
    (at as isize + d).clamp(0, (n as isize - 1).max(0)) as usize
}

/// Keys listed by the help overlay: (section, [(keys, what they do)]), as `on_key`, the
/// screens' handlers and [`TextArea::on_key`] take them. The first [`HELP_LEFT`] sections
/// make the left column.
pub const HELP: &[(&str, &[(&str, &str)])] = &[
    (
        "Everywhere",
        &[
            ("1-7, Tab, S-Tab", "switch screen"),
            ("Up/Down, j/k", "select, scroll"),
            ("PgUp/PgDn", "a page up/down"),
            ("Home/End, g/G", "top/bottom"),
            ("?", "this help"),
            ("q, Ctrl-C", "quit"),
        ],
    ),
    (
        "Routes",
        &[
            ("n", "new route"),
            ("e, Enter", "edit selected route"),
            ("d, Delete", "delete (asks first)"),
            ("space", "enable/disable (asks)"),
            ("/", "filter; Esc drops it"),
        ],
    ),
    ("Questions", &[("y", "yes"), ("n, Esc", "no")]),
    (
        "Route editor",
        &[
            ("Ctrl-S", "save (PUT)"),
            ("Esc", "close, asks if edited"),
            ("Tab, S-Tab", "id/JSON (new), indent"),
            ("Ctrl-A, Ctrl-E", "line start/end"),
            ("Ctrl-Home/End", "text start/end"),
            ("Ctrl-K, Ctrl-U", "cut to line end/start"),
            ("Ctrl-D, Ctrl-H", "delete, backspace"),
        ],
    ),
    (
        "Plugins",
        &[
            ("s / r", "sort column / reverse"),
            ("a", "sparkline: row / all"),
        ],
    ),
    ("Workers", &[("R", "reload (asks first)")]),
    (
        "Log",
        &[
            ("Left/Right, h/l", "scroll sideways"),
            ("G, End", "follow new lines"),
        ],
    ),
];

/// Sections of [`HELP`] in its left column.
pub const HELP_LEFT: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ch(c: char) -> KeyEvent {
        key(KeyCode::Char(c))
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn route(id: &str, v: Value) -> Route {
        let mut value = v;
        value["id"] = json!(id);
        Route {
            id: id.into(),
            value,
            revision: Some(1),
        }
    }

    fn poll(at: Instant, routes: Vec<Route>, stats: Stats) -> Update {
        Update::Poll(Box::new(Poll {
            at,
            routes: Some(Ok(routes)),
            services: Some(Ok(vec![])),
            plugin_configs: Some(Ok(vec![])),
            upstreams: None,
            ssls: None,
            status: Ok(GatewayStatus::default()),
            plugins: Ok(Plugins::default()),
            stats: Ok(stats),
            traffic: Ok(Traffic::default()),
            health: Ok(Health::default()),
            log: Ok(LogTail::default()),
        }))
    }

    fn app_with_routes() -> App {
        let mut app = App::new("127.0.0.1:9180");
        let routes = vec![
            route("1", json!({"uri": "/a"})),
            route("2", json!({"uri": "/b", "status": 0})),
            route("web", json!({"uri": "/c", "name": "site"})),
        ];
        app.on_update(poll(Instant::now(), routes, Stats::default()));
        app
    }

    #[test]
    fn the_filter_narrows_the_list_and_esc_drops_it() {
        let mut app = app_with_routes();
        app.on_key(ch('/'));
        for c in "SIT".chars() {
            app.on_key(ch(c));
        }
        // By name, any case; `q` typed into the filter does not quit.
        assert_eq!(app.route_list().len(), 1);
        assert_eq!(app.selected_route().map(|r| r.id.as_str()), Some("web"));
        app.on_key(ch('q'));
        assert!(!app.quit && app.route_list().is_empty());
        app.on_key(key(KeyCode::Backspace));
        app.on_key(key(KeyCode::Enter));
        assert!(!app.filtering);
        // Kept across polls; keys act on what is shown.
        let routes = app.all_routes().to_vec();
        app.on_update(poll(Instant::now(), routes, Stats::default()));
        assert_eq!(app.route_list().len(), 1);
        app.on_key(ch('d'));
        let Some(Modal::Confirm(c)) = &app.modal else {
            panic!("{:?}", app.modal)
        };
        assert_eq!(c.command, Command::DeleteRoute { id: "web".into() });
        app.on_key(ch('n'));
        // A new route's id counts the routes the filter hides.
        assert_eq!(app.next_route_id(), "3");
        app.on_key(key(KeyCode::Esc));
        assert_eq!((app.route_list().len(), app.route_filter.as_str()), (3, ""));
        // By uri too.
        app.on_key(ch('/'));
        app.on_key(ch('/'));
        app.on_key(ch('b'));
        assert_eq!(app.route_list().len(), 1);
        assert_eq!(app.route_list()[0].id, "2");
    }

    #[test]
    fn a_save_over_someone_elses_change_asks_first() {
        let mut app = app_with_routes();
        app.on_key(key(KeyCode::Enter));
        app.on_key(ch('x'));
        // Unchanged since opened: saved at once.
        assert!(matches!(
            app.on_key(ctrl('s')),
            Some(Command::SaveRoute { .. })
        ));
        app.on_update(Update::Done {
            command: Command::SaveRoute {
                id: "1".into(),
                body: String::new(),
            },
            result: Err(ApiError::Status {
                status: 400,
                message: "x".into(),
            }),
        });
        // Someone stores route 1 meanwhile (the next poll shows its new revision).
        let mut changed = route("1", json!({"uri": "/a", "desc": "theirs"}));
        changed.revision = Some(2);
        let others = app.route_list()[1..].to_vec();
        app.on_update(poll(
            Instant::now(),
            [vec![changed], others].concat(),
            Stats::default(),
        ));
        assert_eq!(app.on_key(ctrl('s')), None);
        let Some(Modal::Overwrite { why, .. }) = &app.modal else {
            panic!("no question: {:?}", app.modal)
        };
        assert!(why.contains("revision 1, now 2"), "{why}");
        // `n`: back to the text, not saving.
        app.on_key(ch('n'));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("the editor is back")
        };
        assert!(!ed.saving && ed.body.text().starts_with('x'));
        app.on_key(ctrl('s'));
        assert!(matches!(app.on_key(ch('y')), Some(Command::SaveRoute { id, .. }) if id == "1"));
        // A new route with an existing route's id asks too.
        let mut app = app_with_routes();
        app.on_key(ch('n'));
        app.on_key(key(KeyCode::Tab));
        app.on_key(ctrl('u'));
        app.on_key(ch('2'));
        assert_eq!(app.on_key(ctrl('s')), None);
        assert!(
            matches!(&app.modal, Some(Modal::Overwrite { why, .. }) if why.contains("Route 2 exists"))
        );
    }

    #[test]
    fn a_save_over_a_route_deleted_meanwhile_asks_first() {
        let mut app = app_with_routes();
        app.on_key(key(KeyCode::Enter));
        app.on_key(ch('x'));
        // Someone deletes route 1 while it is open.
        let others = app.route_list()[1..].to_vec();
        app.on_update(poll(Instant::now(), others, Stats::default()));
        assert_eq!(app.on_key(ctrl('s')), None, "not re-created silently");
        let Some(Modal::Overwrite { why, .. }) = &app.modal else {
            panic!("no question: {:?}", app.modal)
        };
        assert!(
            why.contains("Route 1 was deleted since you opened it"),
            "{why}"
        );
        assert!(matches!(app.on_key(ch('y')), Some(Command::SaveRoute { id, .. }) if id == "1"));
    }

    #[test]
    fn enter_confirms_nothing() {
        let mut app = app_with_routes();
        app.on_key(ch('d'));
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(
            matches!(&app.modal, Some(Modal::Confirm(_))),
            "still asking"
        );
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.modal, None);
        app.on_key(ch(' '));
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(matches!(&app.modal, Some(Modal::Confirm(_))));
        app.on_key(ch('n'));
        // The overwrite question too: an Enter typed on from the text does not save.
        app.on_key(ch('n'));
        app.on_key(key(KeyCode::Tab));
        app.on_key(ctrl('u'));
        app.on_key(ch('2'));
        app.on_key(ctrl('s'));
        assert!(matches!(&app.modal, Some(Modal::Overwrite { .. })));
        assert_eq!(app.on_key(key(KeyCode::Enter)), None);
        assert!(matches!(&app.modal, Some(Modal::Overwrite { .. })));
    }

    #[test]
    fn no_new_route_before_the_routes_were_read() {
        let mut app = App::new("x");
        app.on_update(Update::Refused("admin key refused (wrong apikey)".into()));
        app.on_key(ch('n'));
        assert_eq!(app.modal, None);
    }

    #[test]
    fn a_refused_id_is_shown_as_typed() {
        let mut app = app_with_routes();
        app.on_key(ch('n'));
        app.on_key(key(KeyCode::Tab));
        app.on_key(ctrl('u'));
        app.on_paste("a/b c");
        let cmd = app.on_key(ctrl('s')).unwrap();
        app.on_update(Update::Done {
            command: cmd,
            result: Err(ApiError::Status {
                status: 400,
                message: "invalid id \"a%2Fb%20c\"".into(),
            }),
        });
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert_eq!(ed.error.as_deref(), Some("400: invalid id \"a/b c\""));
    }

    #[test]
    fn page_keys_move_by_the_rows_in_view() {
        let mut app = app_with_routes();
        let many = (1..=100).map(|i| route(&i.to_string(), json!({"uri": "/"})));
        app.on_update(poll(Instant::now(), many.collect(), Stats::default()));
        app.page.set(17);
        app.on_key(ch('g'));
        app.on_key(key(KeyCode::PageDown));
        assert_eq!(app.route_index(), Some(17));
        app.on_key(key(KeyCode::PageUp));
        assert_eq!(app.route_index(), Some(0));
    }

    #[test]
    fn keys_do_not_act_on_a_question_that_was_not_shown() {
        let mut app = app_with_routes();
        app.on_key(ch('d'));
        app.blind.set(true);
        assert_eq!(app.on_key(ch('y')), None);
        assert!(matches!(&app.modal, Some(Modal::Confirm(_))));
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.modal, None, "Esc still cancels");
    }

    #[test]
    fn the_log_stays_on_its_lines_when_the_tail_is_full() {
        let tail = |from: usize| LogTail {
            path: None,
            lines: (from..from + 200).map(|i| format!("line {i}")).collect(),
        };
        let mut app = App::new("x");
        let at_top = |app: &App| {
            let lines = app.log_lines();
            lines[lines.len() - app.log_scroll - app.log_view.get()].clone()
        };
        let mut p = match poll(Instant::now(), vec![], Stats::default()) {
            Update::Poll(p) => p,
            _ => unreachable!(),
        };
        p.log = Ok(tail(0));
        app.on_update(Update::Poll(p.clone()));
        app.log_view.set(40);
        app.on_key(ch('4'));
        for _ in 0..5 {
            app.on_key(ch('k'));
        }
        assert_eq!(at_top(&app), "line 155");
        // Three lines written: three dropped from the front.
        p.log = Ok(tail(3));
        app.on_update(Update::Poll(p.clone()));
        assert_eq!(at_top(&app), "line 155");
        assert_eq!(app.log_scroll, 8);
        // A new file: nothing in common, all new.
        p.log = Ok(tail(1000));
        app.on_update(Update::Poll(p));
        assert_eq!(app.log_scroll, 160, "as far back as it goes");
    }

    #[test]
    fn a_save_answered_while_its_discard_question_is_up() {
        let saved = |ok: bool| Update::Done {
            command: Command::SaveRoute {
                id: "1".into(),
                body: String::new(),
            },
            result: match ok {
                true => Ok(json!({})),
                false => Err(ApiError::Status {
                    status: 400,
                    message: "bad".into(),
                }),
            },
        };
        let mut app = app_with_routes();
        app.on_key(key(KeyCode::Enter));
        app.on_key(ch('x'));
        assert!(app.on_key(ctrl('s')).is_some());
        app.on_key(key(KeyCode::Esc));
        assert!(matches!(&app.modal, Some(Modal::Discard { .. })));
        // Refused: back to the text with why, ready to save again.
        app.on_update(saved(false));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("the editor is back: {:?}", app.modal)
        };
        assert!(!ed.saving && ed.error.as_deref() == Some("400: bad"));
        // Saved: nothing to discard, the question goes.
        assert!(app.on_key(ctrl('s')).is_some());
        app.on_key(key(KeyCode::Esc));
        app.on_key(key(KeyCode::Enter));
        assert!(
            matches!(&app.modal, Some(Modal::Discard { .. })),
            "Enter does not discard"
        );
        app.on_update(saved(true));
        assert_eq!(app.modal, None);
        assert!(!app.quit);
    }

    fn ctx(plugin: &str, owner: &str, requests: u64) -> StatContext {
        StatContext {
            plugin: plugin.into(),
            owner_kind: Some("route".into()),
            owner_id: Some(owner.into()),
            requests: Some(requests),
            ..Default::default()
        }
    }

    #[test]
    fn screens_switch_with_numbers_and_tab() {
        let mut app = App::new("x");
        app.on_key(ch('3'));
        assert_eq!(app.screen, Screen::Workers);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Log);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Certificates);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Upstreams);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Services);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.screen, Screen::Routes);
        app.on_key(key(KeyCode::BackTab));
        assert_eq!(app.screen, Screen::Services);
        app.on_key(ch('2'));
        assert_eq!(app.screen, Screen::Plugins);
        assert!(!app.quit);
        app.on_key(ch('q'));
        assert!(app.quit);
    }

    #[test]
    fn help_opens_and_closes() {
        let mut app = App::new("x");
        app.on_key(ch('?'));
        assert_eq!(app.modal, Some(Modal::Help));
        app.on_key(ch('2'));
        assert_eq!(
            app.screen,
            Screen::Routes,
            "keys do not reach the screen under help"
        );
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.modal, None);
        app.on_key(ch('?'));
        app.on_key(ch('q'));
        assert!(app.quit);
    }

    #[test]
    fn selection_follows_the_route_not_the_row() {
        let mut app = app_with_routes();
        assert_eq!(app.route_selected.as_deref(), Some("1"));
        app.on_key(key(KeyCode::Down));
        app.on_key(key(KeyCode::Down));
        app.on_key(key(KeyCode::Down));
        assert_eq!(app.route_selected.as_deref(), Some("web"));
        app.on_key(ch('g'));
        assert_eq!(app.route_selected.as_deref(), Some("1"));
        app.on_key(ch('j'));
        // Route 1 goes away: "2" stays selected, now first.
        let routes = vec![
            route("2", json!({"uri": "/b"})),
            route("web", json!({"uri": "/c"})),
        ];
        app.on_update(poll(Instant::now(), routes, Stats::default()));
        assert_eq!(app.route_index(), Some(0));
        assert_eq!(app.route_selected.as_deref(), Some("2"));
        // "2" goes away: its neighbour is taken.
        app.on_update(poll(
            Instant::now(),
            vec![route("web", json!({"uri": "/c"}))],
            Stats::default(),
        ));
        assert_eq!(app.route_selected.as_deref(), Some("web"));
    }

    #[test]
    fn space_toggles_the_status() {
        let mut app = app_with_routes();
        // Disabling a live route asks first.
        assert_eq!(app.on_key(ch(' ')), None);
        assert!(matches!(&app.modal, Some(Modal::Confirm(_))));
        assert_eq!(
            app.on_key(ch('y')),
            Some(Command::SetRouteStatus {
                id: "1".into(),
                enabled: false
            })
        );
        app.on_key(ch('j'));
        let cmd = app.on_key(ch(' ')).unwrap();
        assert_eq!(
            cmd,
            Command::SetRouteStatus {
                id: "2".into(),
                enabled: true
            }
        );
        app.on_update(Update::Done {
            command: cmd,
            result: Ok(json!({})),
        });
        assert!(
            app.route_list()[1].enabled(),
            "shown at once, before the next poll"
        );
        assert_eq!(app.flash.as_ref().unwrap().text, "route 2 enabled");
    }

    #[test]
    fn delete_asks_first() {
        let mut app = app_with_routes();
        app.on_key(ch('G'));
        assert_eq!(app.on_key(ch('d')), None);
        let Some(Modal::Confirm(c)) = &app.modal else {
            panic!("no confirmation: {:?}", app.modal)
        };
        assert_eq!(c.question, "Delete route web (site, /c)?");
        assert_eq!(app.on_key(ch('x')), None, "other keys wait for y or n");
        assert_eq!(app.on_key(ch('n')), None);
        assert_eq!(app.modal, None);
        app.on_key(ch('d'));
        let cmd = app.on_key(ch('y'));
        assert_eq!(cmd, Some(Command::DeleteRoute { id: "web".into() }));
        assert_eq!(app.modal, None);
        app.on_update(Update::Done {
            command: cmd.unwrap(),
            result: Ok(json!({"deleted": "web"})),
        });
        assert_eq!(app.route_list().len(), 2);
        assert_eq!(app.route_selected.as_deref(), Some("2"));
    }

    #[test]
    fn a_failed_delete_is_shown() {
        let mut app = app_with_routes();
        app.on_update(Update::Done {
            command: Command::DeleteRoute { id: "1".into() },
            result: Err(ApiError::Status {
                status: 404,
                message: "Key not found".into(),
            }),
        });
        assert!(
            matches!(&app.modal, Some(Modal::Message { text, .. }) if text == "404: Key not found")
        );
        app.on_key(ch('x'));
        assert_eq!(app.modal, None, "any key dismisses it");
    }

    #[test]
    fn new_route_is_saved_with_ctrl_s_and_errors_keep_the_text() {
        let mut app = app_with_routes();
        app.on_key(ch('n'));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert!(ed.new);
        assert_eq!(ed.id_text(), "3", "one more than the largest numeric id");
        assert_eq!(ed.body.text(), NEW_ROUTE_TEMPLATE);
        // Keys go to the text, not to the screen.
        app.on_key(ch('q'));
        app.on_key(ch('2'));
        assert!(!app.quit);
        // The id field: Tab, clear it, type another.
        app.on_key(key(KeyCode::Tab));
        app.on_key(ctrl('u'));
        for c in "api".chars() {
            app.on_key(ch(c));
        }
        app.on_key(key(KeyCode::Enter));
        let cmd = app.on_key(ctrl('s')).unwrap();
        let Command::SaveRoute { id, body } = &cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(id, "api");
        assert_eq!(body, &format!("q2{NEW_ROUTE_TEMPLATE}"));
        assert_eq!(
            app.on_key(ctrl('s')),
            None,
            "no second save while one is on its way"
        );
        app.on_update(Update::Done {
            command: cmd.clone(),
            result: Err(ApiError::Status {
                status: 400,
                message: "invalid request body: expected value at line 1 column 1".into(),
            }),
        });
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("the editor stays open")
        };
        assert_eq!(
            ed.error.as_deref(),
            Some("400: invalid request body: expected value at line 1 column 1")
        );
        assert_eq!(
            ed.body.text(),
            format!("q2{NEW_ROUTE_TEMPLATE}"),
            "nothing lost"
        );
        assert_eq!(ed.body.cursor(), (0, 0), "the cursor goes to the mistake");
        assert!(!ed.saving);
        app.on_key(key(KeyCode::Delete));
        app.on_key(key(KeyCode::Delete));
        let cmd = app.on_key(ctrl('s')).unwrap();
        app.on_update(Update::Done {
            command: cmd,
            result: Ok(json!({"key": "/apisix/routes/api"})),
        });
        assert_eq!(app.modal, None);
        assert_eq!(app.route_selected.as_deref(), Some("api"));
        assert_eq!(app.flash.as_ref().unwrap().text, "route api saved");
    }

    #[test]
    fn edit_prefills_the_route_and_esc_cancels() {
        let mut app = app_with_routes();
        app.on_key(key(KeyCode::Enter));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert!(!ed.new);
        assert_eq!(ed.id_text(), "1");
        assert_eq!(ed.body.text(), "{\n  \"uri\": \"/a\"\n}");
        // Tab indents: the id of an existing route is not editable.
        app.on_key(key(KeyCode::Tab));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert_eq!(ed.focus, Focus::Body);
        assert!(ed.body.text().starts_with("  {"));
        // Changed: Esc asks; `n` (or Esc) goes back to the text as it was, `y` drops it.
        app.on_key(key(KeyCode::Esc));
        assert!(matches!(
            &app.modal,
            Some(Modal::Discard { quit: false, .. })
        ));
        app.on_key(ch('n'));
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("the editor is back")
        };
        assert!(ed.body.text().starts_with("  {"));
        app.on_key(key(KeyCode::Esc));
        app.on_key(ch('y'));
        assert_eq!(app.modal, None);
        assert!(!app.quit);
        // Unchanged: Esc closes at once. Ctrl-C with changes asks too, then quits.
        app.on_key(key(KeyCode::Enter));
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.modal, None);
        app.on_key(key(KeyCode::Enter));
        app.on_key(ch('x'));
        app.on_key(ctrl('c'));
        assert!(matches!(
            &app.modal,
            Some(Modal::Discard { quit: true, .. })
        ));
        assert!(!app.quit);
        app.on_key(ch('y'));
        assert!(app.quit);
    }

    #[test]
    fn an_empty_id_is_refused_locally() {
        let mut app = App::new("x");
        app.on_update(poll(Instant::now(), vec![], Stats::default()));
        app.on_key(ch('n'));
        app.on_key(key(KeyCode::Tab));
        app.on_key(key(KeyCode::Backspace));
        assert_eq!(app.on_key(ctrl('s')), None);
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert_eq!(ed.error.as_deref(), Some("the route needs an id"));
    }

    #[test]
    fn paste_goes_to_the_focused_field() {
        let mut app = App::new("x");
        app.on_update(poll(Instant::now(), vec![], Stats::default()));
        app.on_key(ch('n'));
        app.on_key(ctrl('k'));
        app.on_paste("{\"uri\":\n\"/p\"");
        app.on_key(key(KeyCode::Tab));
        app.on_paste("7\n");
        let Some(Modal::Editor(ed)) = &app.modal else {
            panic!("no editor")
        };
        assert_eq!(ed.id_text(), "17");
        assert!(ed.body.text().starts_with("{\"uri\":\n\"/p\"\n"));
    }

    #[test]
    fn reload_asks_then_reports() {
        let mut app = App::new("x");
        app.on_key(ch('3'));
        app.on_key(ch('R'));
        assert!(matches!(&app.modal, Some(Modal::Confirm(c)) if c.command == Command::Reload));
        assert_eq!(app.on_key(key(KeyCode::Enter)), None, "only y confirms");
        assert!(matches!(&app.modal, Some(Modal::Confirm(_))));
        assert_eq!(app.on_key(ch('y')), Some(Command::Reload));
        assert!(app.reloading);
        app.on_key(ch('R'));
        assert_eq!(app.modal, None, "no second reload while one runs");
        app.on_update(Update::Done {
            command: Command::Reload,
            result: Ok(json!({"reloaded": true, "epoch": 4})),
        });
        assert!(!app.reloading);
        assert_eq!(app.flash.as_ref().unwrap().text, "reloaded: epoch 4");
        app.on_key(ch('R'));
        app.on_key(ch('y'));
        app.on_update(Update::Done {
            command: Command::Reload,
            result: Err(ApiError::Status {
                status: 400,
                message: "reload refused: bad yaml".into(),
            }),
        });
        assert!(
            matches!(&app.modal, Some(Modal::Message { title, error: true, .. }) if title == "Reload failed")
        );
    }

    #[test]
    fn rates_come_from_the_delta_between_polls() {
        let mut app = App::new("x");
        let t0 = Instant::now();
        let stats = |a, b| Stats {
            generation: Some(1),
            contexts: vec![ctx("echo", "1", a), ctx("rec", "2", b)],
        };
        app.on_update(poll(t0, vec![], stats(10, 0)));
        assert!(app.stats.rates.is_empty(), "one poll gives no rate");
        app.on_update(poll(t0 + Duration::from_secs(2), vec![], stats(30, 5)));
        let k = ctx("echo", "1", 0).key();
        assert_eq!(app.stats.rates[&k], 10.0);
        assert_eq!(app.stats.rates[&ctx("rec", "2", 0).key()], 2.5);
        assert_eq!(app.stats.total_history, [12.5]);
        // A counter that went back (restart) is no traffic, not a negative rate.
        app.on_update(poll(t0 + Duration::from_secs(3), vec![], stats(3, 6)));
        assert_eq!(app.stats.rates[&k], 0.0);
        assert_eq!(app.stats.history[&k], [10.0, 0.0]);
        // A gateway that cannot be reached keeps the numbers.
        app.on_update(Update::Unreachable("connection refused".into()));
        assert_eq!(app.connected, Some(false));
        assert_eq!(app.stats.rows().len(), 2);
        assert_eq!(app.route_list().len(), 0);
    }

    #[test]
    fn stats_sort_and_selection() {
        let mut app = App::new("x");
        app.on_key(ch('2'));
        let t0 = Instant::now();
        let stats = Stats {
            generation: None,
            contexts: vec![ctx("b", "1", 5), ctx("a", "2", 1), ctx("c", "3", 9)],
        };
        app.on_update(poll(t0, vec![], stats));
        let order = |app: &App| -> Vec<String> {
            app.stats.rows().iter().map(|c| c.plugin.clone()).collect()
        };
        assert_eq!(order(&app), ["a", "b", "c"]);
        assert_eq!(app.stats.selection(), Some(0));
        app.on_key(ch('j'));
        assert_eq!(app.stats.selected.as_ref().unwrap().plugin, "b");
        app.on_key(ch('r'));
        assert_eq!(order(&app), ["c", "b", "a"]);
        app.on_key(ch('s')); // owner
        app.on_key(ch('s')); // rate (none yet: by name)
        app.on_key(ch('s')); // requests, largest first
        assert_eq!(app.stats.sort, SortBy::Requests);
        assert_eq!(order(&app), ["c", "b", "a"]);
        app.on_key(ch('r'));
        assert_eq!(order(&app), ["a", "b", "c"]);
        assert_eq!(
            app.stats.selected.as_ref().unwrap().plugin,
            "b",
            "the selection follows its row"
        );
        assert_eq!(app.stats.sparkline().0, "b on route 1");
        app.on_key(ch('a'));
        assert_eq!(app.stats.sparkline().0, "all contexts");
        for _ in 0..5 {
            app.on_key(ch('s'));
        }
        assert_eq!(app.stats.sort, SortBy::Plugin);
    }

    #[test]
    fn log_scrolls_back_and_follows() {
        let mut app = App::new("x");
        app.on_key(ch('4'));
        let lines = |n: usize| LogTail {
            path: None,
            lines: (0..n).map(|i| format!("line {i}")).collect(),
        };
        let mut p = Poll {
            at: Instant::now(),
            routes: Some(Ok(vec![])),
            services: Some(Ok(vec![])),
            plugin_configs: Some(Ok(vec![])),
            upstreams: None,
            ssls: None,
            status: Ok(GatewayStatus::default()),
            plugins: Ok(Plugins::default()),
            stats: Ok(Stats::default()),
            log: Ok(lines(50)),
            traffic: Ok(Traffic::default()),
            health: Ok(Health::default()),
        };
        app.on_update(Update::Poll(Box::new(p.clone())));
        app.on_key(key(KeyCode::Up));
        app.on_key(key(KeyCode::PageUp));
        assert_eq!(app.log_scroll, 11);
        p.log = Ok(lines(53));
        app.on_update(Update::Poll(Box::new(p.clone())));
        assert_eq!(app.log_scroll, 14, "the same lines stay in view");
        app.on_key(ch('G'));
        assert_eq!(app.log_scroll, 0);
        app.on_key(ch('g'));
        assert_eq!(app.log_scroll, 53);
        // Drawn 41 lines high, the top is 12 lines back: the first line at the top, the pane
        // full, and the next key down scrolls at once.
        app.log_view.set(41);
        app.on_key(ch('G'));
        app.on_key(ch('g'));
        assert_eq!(app.log_scroll, 12);
        app.on_key(key(KeyCode::Down));
        assert_eq!(app.log_scroll, 11);
        app.on_key(key(KeyCode::Right));
        app.on_key(key(KeyCode::Right));
        app.on_key(key(KeyCode::Left));
        assert_eq!(app.log_hscroll, 8);
    }

    #[test]
    fn notes_expire() {
        let mut app = App::new("x");
        app.note("hello", false);
        let t = Instant::now();
        app.tick(t);
        app.tick(t + Duration::from_secs(1));
        assert!(app.flash.is_some());
        app.tick(t + FLASH_FOR);
        assert!(app.flash.is_none());
    }

    #[test]
    fn error_positions_are_found() {
        assert_eq!(
            error_position("invalid request body: expected `,` or `}` at line 3 column 5"),
            Some((3, 5))
        );
        assert_eq!(error_position("wrong route id"), None);
    }

    #[test]
    fn key_releases_are_ignored() {
        let mut app = App::new("x");
        let mut k = ch('q');
        k.kind = KeyEventKind::Release;
        app.on_key(k);
        assert!(!app.quit);
    }
}
