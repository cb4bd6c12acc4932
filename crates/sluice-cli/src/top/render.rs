//! Draws a `Model` into a ratatui frame. Reads the model only; tests draw into a `TestBackend`.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState};

use super::model::{Capacity, FunctionRow, Model, SortBy, View};

const HEADER_STYLE: Style = Style::new().add_modifier(Modifier::BOLD);
const SELECTED_STYLE: Style = Style::new().add_modifier(Modifier::REVERSED);
/// Bounds of the function name column, in characters (names are at most 63).
const NAME_WIDTH_MIN: usize = 12;
const NAME_WIDTH_MAX: usize = 40;

pub fn render(frame: &mut Frame, model: &Model) {
    let [head, main, summary, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(5),
        Constraint::Length(2),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_head(frame, head, model);
    match &model.view {
        View::Functions => render_functions(frame, main, model),
        View::Function(name) => render_function(frame, main, model, name),
    }
    render_summary(frame, summary, model);
    render_foot(frame, foot, model);
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.0}%", v * 100.0))
}

fn capacity_lines(c: &Capacity) -> [Line<'static>; 2] {
    let slots = match (c.slots_busy, c.slots) {
        (Some(busy), Some(all)) if all > 0 => {
            format!(
                "slots {busy}/{all} busy ({:.0}%) on {} node(s)",
                busy as f64 * 100.0 / all as f64,
                or_dash(c.nodes_up)
            )
        }
        (busy, all) => format!("slots {}/{}", or_dash(busy), or_dash(all)),
    };
    let first = format!(
        "{slots}   utilization {} of target {}   queue {} queued, {} later, {} running, lag {} ms",
        percent(c.utilization),
        percent(c.utilization_target),
        or_dash(c.queued),
        or_dash(c.later),
        or_dash(c.running),
        or_dash(c.queue_lag_ms),
    );
    let mut second = match &c.node_note {
        Some(note) => format!("node view unavailable: {note}"),
        None => format!(
            "slow lane {} running, {} waiting   code cache {}/{} loaded",
            or_dash(c.slow_running),
            or_dash(c.slow_waiting),
            or_dash(c.cache_entries),
            or_dash(c.cache_entries_max),
        ),
    };
    if !c.waiting.is_empty() {
        second.push_str(&format!("   held: {}", c.waiting.join(", ")));
    }
    [Line::from(first), Line::from(second)]
}

fn render_head(frame: &mut Frame, area: Rect, model: &Model) {
    let title = format!(" sluice top: tenant {} at {} ", model.tenant, model.url);
    let block = Block::default().borders(Borders::ALL).title(title);
    frame.render_widget(Paragraph::new(capacity_lines(&model.capacity).to_vec()).block(block), area);
}

/// Column headers of the function table, with the sort column marked.
pub fn function_header(sort: SortBy) -> Vec<String> {
    let columns = [
        (SortBy::Name, "FUNCTION"),
        (SortBy::Name, "VER"),
        (SortBy::Rate, "RATE/s"),
        (SortBy::Calls, "CALLS"),
        (SortBy::Errors, "ERRORS"),
        (SortBy::P50, "P50"),
        (SortBy::P99, "P99"),
        (SortBy::Cpu, "CPU/call"),
        (SortBy::Name, "ACTIVE"),
    ];
    columns
        .iter()
        .enumerate()
        .map(|(i, (by, title))| {
            // The name column is the only one sorted by "Name"; VER and ACTIVE are not sortable.
            let marked = *by == sort && (sort != SortBy::Name || i == 0);
            if marked { format!("{title}▼") } else { title.to_string() }
        })
        .collect()
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v >= 10_000.0 => format!("{:.1}s", v / 1000.0),
        Some(v) if v >= 10.0 => format!("{v:.0}ms"),
        Some(v) if v >= 1.0 => format!("{v:.1}ms"),
        Some(v) => format!("{v:.2}ms"),
    }
}

fn function_cells(r: &FunctionRow) -> Vec<String> {
    vec![
        r.name.clone(),
        if r.version > 0 { r.version.to_string() } else { "-".to_string() },
        format!("{:.1}", r.rate_per_sec),
        r.calls.to_string(),
        r.errors.to_string(),
        ms(r.p50_ms),
        ms(r.p99_ms),
        r.cpu_ms.map_or_else(|| "-".to_string(), |c| format!("{c:.1}ms")),
        r.active.to_string(),
    ]
}

fn render_functions(frame: &mut Frame, area: Rect, model: &Model) {
    let visible = model.visible_rows();
    // The name column is as wide as the longest name (within bounds); the numbers follow it
    // instead of sitting at the far right of a wide terminal.
    let name_width =
        visible.iter().map(|r| r.name.len()).max().unwrap_or(0).clamp(NAME_WIDTH_MIN, NAME_WIDTH_MAX);
    let rows: Vec<Row> = visible.into_iter().map(|r| Row::new(function_cells(r))).collect();
    let source = if model.source_note.is_some() { "recent recorded calls" } else { "last 10s" };
    let title = if model.filter.is_empty() && !model.filtering {
        format!(" functions ({source}) ")
    } else {
        format!(" functions matching \"{}\" ({source}) ", model.filter)
    };
    let empty = rows.is_empty();
    let table = Table::new(
        rows,
        [
            Constraint::Length(name_width as u16),
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(7),
        ],
    )
    .header(Row::new(function_header(model.sort)).style(HEADER_STYLE))
    .flex(Flex::Start)
    .row_highlight_style(SELECTED_STYLE)
    .block(match &model.source_note {
        Some(note) => Block::default().borders(Borders::ALL).title(title).title_bottom(format!(" {note} ")),
        None => Block::default().borders(Borders::ALL).title(title),
    });
    let mut state = TableState::default().with_selected(model.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
    if empty && model.polls > 0 {
        let inner = Rect { x: area.x + 2, y: area.y + 2, width: area.width.saturating_sub(4), height: 1 };
        frame.render_widget(Paragraph::new("no functions (deploy one: sluice deploy NAME FILE.wasm)"), inner);
    }
}

fn render_function(frame: &mut Frame, area: Rect, model: &Model, name: &str) {
    let [calls, logs] =
        Layout::vertical([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(area);
    let rows: Vec<Row> = model
        .open_invocations()
        .into_iter()
        .map(|i| {
            Row::new(vec![
                i.id,
                i.status,
                or_dash(i.status_code),
                ms(i.duration_ms.map(|v| v as f64)),
                i.cpu_ms.map_or_else(|| "-".to_string(), |c| format!("{c:.1}ms")),
                i.error_kind.unwrap_or_default(),
                i.created_at,
            ])
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(32),
            Constraint::Length(9),
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(14),
            Constraint::Min(24),
        ],
    )
    .header(Row::new(["ID", "STATUS", "CODE", "TIME", "CPU", "ERROR", "CREATED"]).style(HEADER_STYLE))
    .block(Block::default().borders(Borders::ALL).title(format!(" {name}: recent invocations ")));
    frame.render_widget(table, calls);
    // The newest lines are at the bottom; show as many of them as fit.
    let fit = logs.height.saturating_sub(2) as usize;
    let shown: Vec<Line> = model
        .logs
        .iter()
        .skip(model.logs.len().saturating_sub(fit))
        .map(|l| Line::from(l.as_str()))
        .collect();
    let block = Block::default().borders(Borders::ALL).title(format!(" {name}: log lines "));
    frame.render_widget(Paragraph::new(shown).block(block), logs);
}

fn render_summary(frame: &mut Frame, area: Rect, model: &Model) {
    let slowest: Vec<String> =
        model.slowest().iter().map(|r| format!("{} p99 {}", r.name, ms(r.p99_ms))).collect();
    let failing: Vec<String> =
        model.failing().iter().map(|r| format!("{} {}/{} failed", r.name, r.errors, r.calls)).collect();
    let none = |v: Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    let lines = vec![
        Line::from(format!("slowest: {}", none(slowest))),
        Line::from(format!("failing: {}", none(failing))),
    ];
    frame.render_widget(Paragraph::new(lines), area);
}

fn render_foot(frame: &mut Frame, area: Rect, model: &Model) {
    let text = if model.filtering {
        format!("filter: {}█  (Enter keeps it, Esc clears it)", model.filter)
    } else if let Some(error) = &model.error {
        format!("error: {error}")
    } else {
        match model.view {
            View::Functions => "q quit  s sort  / filter  ↑↓ select  Enter open".to_string(),
            View::Function(_) => "q quit  Esc back".to_string(),
        }
    };
    frame.render_widget(Paragraph::new(text).style(Style::new().add_modifier(Modifier::DIM)), area);
}
