//! The dashboard's state and how it changes: from a poll's JSON answers and from keys. Pure: no
//! I/O, no terminal, no clock (each poll carries its time), so tests drive it with fixtures.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use sluice_core::{InvocationStatus, parse_rfc3339};

use super::metrics::{self, Snapshot};

/// Window of the function table: calls that ended in the last this-many milliseconds (from
/// `/metrics`), or invocations created in it (the fallback's rate).
pub const RATE_WINDOW_MS: i64 = 10_000;
/// Finished invocations per function that the fallback's percentiles, errors and CPU are taken
/// over.
pub const SAMPLE_PER_FUNCTION_MAX: usize = 100;
/// Rows of the "slowest" and "failing" summaries.
pub const SUMMARY_ROWS_MAX: usize = 3;
/// Log lines kept for the function view.
pub const LOG_LINES_MAX: usize = 200;

/// What one poll brought back: each answer is the node's JSON, or why there is none.
#[derive(Debug, Clone)]
pub struct Poll {
    /// Unix milliseconds when the poll was made.
    pub now_ms: i64,
    pub functions: Answer,
    pub invocations: Answer,
    pub usage: Answer,
    /// `/v1/node` and `/v1/nodes` need an admin key; with another key they are errors.
    pub node: Answer,
    pub nodes: Answer,
    /// The open function's log lines, when a function is open.
    pub logs: Option<(String, Answer)>,
    /// The text of `/metrics` of each node scraped (every node that is up, when the key may list
    /// them; else the one node), or why there is none (a key without the `metrics` scope).
    pub metrics: Result<Vec<String>, String>,
}

type Answer = Result<Value, String>;

/// A key, as the model understands it (the terminal loop maps crossterm's events to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Up,
    Down,
    Enter,
    Esc,
    Backspace,
    /// Ctrl-C: quits whatever the mode.
    Interrupt,
}

/// Columns the function table can be sorted by; `s` cycles through them in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Rate,
    Calls,
    Errors,
    P50,
    P99,
    Cpu,
    Name,
}

impl SortBy {
    pub const ALL: [SortBy; 7] =
        [SortBy::Rate, SortBy::Calls, SortBy::Errors, SortBy::P50, SortBy::P99, SortBy::Cpu, SortBy::Name];

    fn next(self) -> SortBy {
        let i = Self::ALL.iter().position(|s| *s == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }
}

/// One function's recent behaviour: from `/metrics` over the last `RATE_WINDOW_MS`, or, without
/// it, from the invocations list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionRow {
    pub name: String,
    pub version: i64,
    /// Calls per second over the last `RATE_WINDOW_MS`.
    pub rate_per_sec: f64,
    /// Calls the columns below are taken over: those that ended in the window (or, in the
    /// fallback, the sample of at most `SAMPLE_PER_FUNCTION_MAX` finished invocations).
    pub calls: usize,
    pub errors: usize,
    /// Queued or running now (async calls, from the invocations list).
    pub active: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Mean CPU time of a call.
    pub cpu_ms: Option<f64>,
}

/// One invocation as the function view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct InvocationRow {
    pub id: String,
    pub status: String,
    pub status_code: Option<u64>,
    pub duration_ms: Option<i64>,
    pub cpu_ms: Option<f64>,
    pub created_at: String,
    pub error_kind: Option<String>,
}

/// The node's (and cluster's) scheduling view; `None` where the answer was missing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capacity {
    /// Async slots busy and in all, over the nodes that are up.
    pub slots_busy: Option<u64>,
    pub slots: Option<u64>,
    pub nodes_up: Option<u64>,
    /// The longest queue lag the nodes report.
    pub queue_lag_ms: Option<u64>,
    /// The tenant's async work: runnable and waiting, not runnable yet, running.
    pub queued: Option<u64>,
    pub later: Option<u64>,
    pub running: Option<u64>,
    /// The answering node's guest CPU utilization and its target, 0 to 1.
    pub utilization: Option<f64>,
    pub utilization_target: Option<f64>,
    /// Why the tenant's work waited in the last scheduling round, e.g. "plain: utilization".
    pub waiting: Vec<String>,
    pub slow_running: Option<u64>,
    pub slow_waiting: Option<u64>,
    pub cache_entries: Option<u64>,
    pub cache_entries_max: Option<u64>,
    /// Why the admin-only parts are missing (a tenant key), if they are.
    pub node_note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    Functions,
    /// One function's recent invocations and log lines.
    Function(String),
}

#[derive(Debug)]
pub struct Model {
    pub tenant: String,
    pub url: String,
    pub view: View,
    pub sort: SortBy,
    pub filter: String,
    /// Typing a filter after `/`.
    pub filtering: bool,
    /// The selected function, by name, so it stays selected when the order changes.
    pub selected: Option<String>,
    pub quit: bool,
    pub polls: u64,
    pub last_poll_ms: Option<i64>,
    /// The last poll's error (node unreachable, ...), shown until a poll succeeds.
    pub error: Option<String>,
    pub capacity: Capacity,
    rows: Vec<FunctionRow>,
    /// The latest invocations page, newest first.
    invocations: Vec<Value>,
    pub logs: Vec<String>,
    /// The tenant's counters at each poll within the window (and the last one before it).
    history: VecDeque<(i64, Snapshot)>,
    /// Where the table's numbers come from when it is not `/metrics`, and why.
    pub source_note: Option<String>,
    /// The nodes to scrape: every node that was up at the last poll (empty: the one node).
    pub metrics_targets: Vec<String>,
}

impl Model {
    pub fn new(tenant: &str, url: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            url: url.to_string(),
            view: View::Functions,
            sort: SortBy::Rate,
            filter: String::new(),
            filtering: false,
            selected: None,
            quit: false,
            polls: 0,
            last_poll_ms: None,
            error: None,
            capacity: Capacity::default(),
            rows: Vec::new(),
            invocations: Vec::new(),
            logs: Vec::new(),
            history: VecDeque::new(),
            source_note: None,
            metrics_targets: Vec::new(),
        }
    }

    /// The function whose logs the next poll should fetch.
    pub fn open_function(&self) -> Option<&str> {
        match &self.view {
            View::Function(name) => Some(name),
            View::Functions => None,
        }
    }

    pub fn apply(&mut self, poll: Poll) {
        self.polls += 1;
        self.last_poll_ms = Some(poll.now_ms);
        self.error = None;
        // Without the function list and the invocations there is nothing to show: keep the last
        // good picture and say why it is old.
        match (&poll.functions, &poll.invocations) {
            (Ok(functions), Ok(invocations)) => {
                self.invocations = invocations["invocations"].as_array().cloned().unwrap_or_default();
                self.rows = function_rows(functions, &self.invocations, poll.now_ms);
                match poll
                    .metrics
                    .as_ref()
                    .map_err(String::clone)
                    .and_then(|texts| self.window(texts, poll.now_ms))
                {
                    Ok((window, seconds)) => {
                        self.source_note = None;
                        apply_window(&mut self.rows, &window, seconds);
                    }
                    Err(e) => {
                        self.history.clear();
                        self.source_note = Some(format!(
                            "numbers from recorded invocations (sync calls that succeeded without a log \
                             line are missing): /metrics: {e}"
                        ));
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => self.error = Some(e.clone()),
        }
        self.capacity = capacity(&poll.usage, &poll.node, &poll.nodes);
        self.metrics_targets = up_addresses(&poll.nodes);
        if let Some((name, logs)) = &poll.logs
            && self.open_function() == Some(name.as_str())
        {
            match logs {
                Ok(v) => self.logs = log_lines(v),
                Err(e) => self.error = Some(e.clone()),
            }
        }
        if self.selected.is_none() {
            self.selected = self.visible_rows().first().map(|r| r.name.clone());
        }
    }

    pub fn key(&mut self, key: Key) {
        if key == Key::Interrupt {
            self.quit = true;
            return;
        }
        if self.filtering {
            match key {
                Key::Char(c) => self.filter.push(c),
                Key::Backspace => {
                    self.filter.pop();
                }
                Key::Enter => self.filtering = false,
                Key::Esc => {
                    self.filter.clear();
                    self.filtering = false;
                }
                _ => {}
            }
            self.keep_selection_visible();
            return;
        }
        match (&self.view, key) {
            (_, Key::Char('q')) => self.quit = true,
            (View::Function(_), Key::Esc) => {
                self.view = View::Functions;
                self.logs.clear();
            }
            (View::Function(_), _) => {}
            (View::Functions, Key::Char('s')) => self.sort = self.sort.next(),
            (View::Functions, Key::Char('/')) => self.filtering = true,
            (View::Functions, Key::Esc) => {
                self.filter.clear();
                self.keep_selection_visible();
            }
            (View::Functions, Key::Up) => self.move_selection(-1),
            (View::Functions, Key::Down) => self.move_selection(1),
            (View::Functions, Key::Enter) => {
                if let Some(name) = self.selected_row().map(|r| r.name.clone()) {
                    self.logs.clear();
                    self.view = View::Function(name);
                }
            }
            (View::Functions, _) => {}
        }
    }

    /// The rows the table shows: filtered by name, sorted by the sort column (ties by name).
    pub fn visible_rows(&self) -> Vec<&FunctionRow> {
        let mut rows: Vec<&FunctionRow> =
            self.rows.iter().filter(|r| r.name.contains(&self.filter)).collect();
        let by = self.sort;
        rows.sort_by(|a, b| {
            let key = |r: &FunctionRow| -> f64 {
                match by {
                    SortBy::Rate => r.rate_per_sec,
                    SortBy::Calls => r.calls as f64,
                    SortBy::Errors => r.errors as f64,
                    SortBy::P50 => r.p50_ms.unwrap_or(-1.0),
                    SortBy::P99 => r.p99_ms.unwrap_or(-1.0),
                    SortBy::Cpu => r.cpu_ms.unwrap_or(-1.0),
                    SortBy::Name => 0.0,
                }
            };
            // Largest first (what a person looks for), then by name.
            key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
        });
        rows
    }

    pub fn selected_index(&self) -> Option<usize> {
        let rows = self.visible_rows();
        let name = self.selected.as_deref()?;
        rows.iter().position(|r| r.name == name)
    }

    pub fn selected_row(&self) -> Option<&FunctionRow> {
        let name = self.selected.as_deref()?;
        self.rows.iter().find(|r| r.name == name && r.name.contains(&self.filter))
    }

    /// Adds this poll's counters to the history and returns what changed over the window, by
    /// function, with the window's length in seconds (`None` on the first poll: the counts are
    /// then the node's totals and there is no rate yet).
    fn window(&mut self, texts: &[String], now_ms: i64) -> Result<(Snapshot, Option<f64>), String> {
        let mut snapshot = Snapshot::new();
        for text in texts {
            metrics::snapshot_into(&mut snapshot, &metrics::parse(text)?, &self.tenant);
        }
        // Keep the newest snapshot at or before the window's start as the base.
        while self.history.len() >= 2 && self.history[1].0 <= now_ms - RATE_WINDOW_MS {
            self.history.pop_front();
        }
        let window = match self.history.front() {
            Some((then, base)) if *then < now_ms => {
                let d = snapshot.iter().map(|(f, c)| (f.clone(), metrics::delta(c, base.get(f)))).collect();
                (d, Some((now_ms - then) as f64 / 1000.0))
            }
            _ => (snapshot.clone(), None),
        };
        self.history.push_back((now_ms, snapshot));
        Ok(window)
    }

    /// The slowest functions by p99, slowest first.
    pub fn slowest(&self) -> Vec<&FunctionRow> {
        let mut rows: Vec<&FunctionRow> = self.rows.iter().filter(|r| r.p99_ms.is_some()).collect();
        rows.sort_by(|a, b| {
            b.p99_ms
                .partial_cmp(&a.p99_ms)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.name.cmp(&b.name))
        });
        rows.truncate(SUMMARY_ROWS_MAX);
        rows
    }

    /// The functions with errors among their recent calls, most errors first.
    pub fn failing(&self) -> Vec<&FunctionRow> {
        let mut rows: Vec<&FunctionRow> = self.rows.iter().filter(|r| r.errors > 0).collect();
        rows.sort_by(|a, b| b.errors.cmp(&a.errors).then_with(|| a.name.cmp(&b.name)));
        rows.truncate(SUMMARY_ROWS_MAX);
        rows
    }

    /// The open function's invocations from the latest page, newest first.
    pub fn open_invocations(&self) -> Vec<InvocationRow> {
        let Some(name) = self.open_function() else { return Vec::new() };
        self.invocations.iter().filter(|i| i["function"].as_str() == Some(name)).map(invocation_row).collect()
    }

    fn move_selection(&mut self, by: isize) {
        let rows = self.visible_rows();
        if rows.is_empty() {
            return;
        }
        let at = self.selected_index().map_or(0, |i| i as isize + by);
        let at = at.clamp(0, rows.len() as isize - 1) as usize;
        self.selected = Some(rows[at].name.clone());
    }

    fn keep_selection_visible(&mut self) {
        if self.selected_index().is_none() {
            self.selected = self.visible_rows().first().map(|r| r.name.clone());
        }
    }
}

fn status(inv: &Value) -> Option<InvocationStatus> {
    inv["status"].as_str().and_then(InvocationStatus::parse)
}

fn is_error(inv: &Value) -> bool {
    status(inv).is_some_and(InvocationStatus::is_failure)
        || inv["status_code"].as_u64().is_some_and(|c| c >= 500)
}

fn duration_ms(inv: &Value) -> Option<i64> {
    let started = parse_rfc3339(inv["started_at"].as_str()?)?;
    let finished = parse_rfc3339(inv["finished_at"].as_str()?)?;
    Some((finished - started).max(0))
}

/// The value at rank `q` (0 to 1) of sorted `values`, by the nearest-rank method.
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn function_rows(functions: &Value, invocations: &[Value], now_ms: i64) -> Vec<FunctionRow> {
    let mut rows: BTreeMap<String, FunctionRow> = BTreeMap::new();
    for f in functions["functions"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or_default().to_string();
        let version = f["latest_version"].as_i64().unwrap_or_default();
        rows.insert(name.clone(), FunctionRow { name, version, ..Default::default() });
    }
    let mut durations: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut recent: BTreeMap<String, u32> = BTreeMap::new();
    // The page is newest first, so the first finished ones of a function are its sample.
    for inv in invocations {
        let Some(name) = inv["function"].as_str() else { continue };
        // A function deleted since its calls still shows, without a version.
        let row = rows
            .entry(name.to_string())
            .or_insert_with(|| FunctionRow { name: name.to_string(), ..Default::default() });
        let created = inv["created_at"].as_str().and_then(parse_rfc3339);
        if created.is_some_and(|c| c > now_ms - RATE_WINDOW_MS) {
            *recent.entry(name.to_string()).or_default() += 1;
        }
        if inv["finished_at"].is_null() {
            row.active += usize::from(matches!(
                status(inv),
                Some(InvocationStatus::Queued | InvocationStatus::Running)
            ));
            continue;
        }
        if row.calls >= SAMPLE_PER_FUNCTION_MAX {
            continue;
        }
        row.calls += 1;
        row.errors += usize::from(is_error(inv));
        durations.entry(name.to_string()).or_default().extend(duration_ms(inv));
        cpu.entry(name.to_string()).or_default().extend(inv["cpu_ms"].as_f64());
    }
    for (name, n) in recent {
        rows.get_mut(&name).expect("inserted above").rate_per_sec =
            f64::from(n) * 1000.0 / RATE_WINDOW_MS as f64;
    }
    for (name, mut d) in durations {
        d.sort_unstable();
        let row = rows.get_mut(&name).expect("inserted above");
        row.p50_ms = percentile(&d, 0.50).map(|v| v as f64);
        row.p99_ms = percentile(&d, 0.99).map(|v| v as f64);
    }
    for (name, c) in cpu {
        if !c.is_empty() {
            rows.get_mut(&name).expect("inserted above").cpu_ms =
                Some(c.iter().sum::<f64>() / c.len() as f64);
        }
    }
    rows.into_values().collect()
}

/// Replaces the rows' numbers with what `/metrics` says about the window (`seconds` long; the
/// rate is unknown before there is one). A function with counts but no longer listed (deleted
/// since) gets a row too.
fn apply_window(rows: &mut Vec<FunctionRow>, window: &Snapshot, seconds: Option<f64>) {
    for (name, c) in window {
        let at = match rows.iter().position(|r| &r.name == name) {
            Some(at) => at,
            None if c.calls > 0.0 => {
                rows.push(FunctionRow { name: name.clone(), ..Default::default() });
                rows.len() - 1
            }
            None => continue,
        };
        let row = &mut rows[at];
        row.rate_per_sec = seconds.filter(|s| *s > 0.0).map_or(0.0, |s| c.calls / s);
        row.calls = c.calls.round() as usize;
        row.errors = c.errors.round() as usize;
        row.p50_ms = metrics::quantile(&c.duration_buckets, 0.50).map(|s| s * 1000.0);
        row.p99_ms = metrics::quantile(&c.duration_buckets, 0.99).map(|s| s * 1000.0);
        row.cpu_ms = (c.cpu_count > 0.0).then(|| c.cpu_seconds * 1000.0 / c.cpu_count);
    }
    for row in rows.iter_mut().filter(|r| !window.contains_key(&r.name)) {
        // Never called on the nodes scraped.
        (row.rate_per_sec, row.calls, row.errors, row.p50_ms, row.p99_ms, row.cpu_ms) =
            (0.0, 0, 0, None, None, None);
    }
}

/// The addresses of the nodes that are up, from `/v1/nodes` (empty without the list).
fn up_addresses(nodes: &Answer) -> Vec<String> {
    let Ok(n) = nodes else { return Vec::new() };
    n["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["health"] == "up")
        .filter_map(|n| n["address"].as_str().filter(|a| !a.is_empty()).map(str::to_string))
        .collect()
}

fn invocation_row(inv: &Value) -> InvocationRow {
    InvocationRow {
        id: inv["id"].as_str().unwrap_or_default().to_string(),
        status: inv["status"].as_str().unwrap_or_default().to_string(),
        status_code: inv["status_code"].as_u64(),
        duration_ms: duration_ms(inv),
        cpu_ms: inv["cpu_ms"].as_f64(),
        created_at: inv["created_at"].as_str().unwrap_or_default().to_string(),
        error_kind: inv["error_kind"].as_str().map(str::to_string),
    }
}

fn log_lines(v: &Value) -> Vec<String> {
    let lines: Vec<String> =
        v["lines"].as_array().into_iter().flatten().map(crate::logs::format_line).collect();
    let skip = lines.len().saturating_sub(LOG_LINES_MAX);
    lines.into_iter().skip(skip).collect()
}

fn capacity(usage: &Answer, node: &Answer, nodes: &Answer) -> Capacity {
    let mut c = Capacity::default();
    if let Ok(u) = usage {
        let a = &u["async"];
        c.queued = a["queued"].as_u64();
        c.later = a["later"].as_u64();
        c.running = a["running"].as_u64();
        c.utilization = a["node_utilization"].as_f64();
        c.utilization_target = a["node_utilization_target"].as_f64();
        c.waiting = a["waiting"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(class, why)| format!("{class}: {}", why.as_str().unwrap_or_default()))
            .collect();
    }
    if let Ok(n) = nodes {
        let up: Vec<&Value> =
            n["nodes"].as_array().into_iter().flatten().filter(|n| n["health"] == "up").collect();
        c.nodes_up = Some(up.len() as u64);
        c.slots = Some(up.iter().filter_map(|n| n["slots"].as_u64()).sum());
        c.slots_busy = Some(up.iter().filter_map(|n| n["in_flight"].as_u64()).sum());
        c.queue_lag_ms = up.iter().filter_map(|n| n["queue_lag_ms"].as_u64()).max();
    }
    match node {
        Ok(n) => {
            c.slow_running = n["lanes"]["slow_running"].as_u64();
            c.slow_waiting = n["lanes"]["slow_waiting"].as_u64();
            c.cache_entries = n["code_cache"]["entries"].as_u64();
            c.cache_entries_max = n["code_cache"]["entries_max"].as_u64();
        }
        Err(e) => c.node_note = Some(e.clone()),
    }
    c
}
