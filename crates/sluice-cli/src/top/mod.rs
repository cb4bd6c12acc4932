//! `sluice top`: a terminal dashboard of a tenant's functions and the node's scheduling, polled
//! from the node's JSON API (never its database) every `--interval`.
//!
//! `model` owns the state and how polls and keys change it, `render` draws it; this module owns
//! the terminal and the network, and nothing else.

mod metrics;
mod model;
mod render;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use reqwest::Method;
use sluice_core::units::parse_duration;
use sluice_core::{Clock, SystemClock};

use crate::client::{Client, Target};
use model::{Key, Model, Poll};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Time between polls of the node, e.g. 1s or 500ms; at least 100ms.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Invocations read per poll (the newest; 1 to 1000): the rate, percentiles and errors are
    /// taken over them.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub sample: u32,
    #[command(flatten)]
    pub target: Target,
}

/// The shortest `--interval`: each poll is five requests, and a dashboard gains nothing from
/// asking the node more often than a person can read.
const INTERVAL_MIN: Duration = Duration::from_millis(100);

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < INTERVAL_MIN {
        return Err(format!("{s} is shorter than the shortest interval, {}ms", INTERVAL_MIN.as_millis()));
    }
    Ok(d)
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let mut model = Model::new(&client.tenant, &client.base);
    // The first poll happens before the terminal is taken, so a wrong URL, key or tenant is a
    // plain error message instead of a dashboard full of errors.
    let first = poll(&client, args.sample, None, &[]).await;
    if let Err(e) = &first.functions {
        anyhow::bail!("{e}");
    }
    model.apply(first);
    let mut terminal = ratatui::try_init().context("taking the terminal")?;
    let result = run_loop(&mut terminal, &client, &args, &mut model).await;
    ratatui::restore();
    result
}

async fn run_loop(
    terminal: &mut ratatui::DefaultTerminal,
    client: &Client,
    args: &TopArgs,
    model: &mut Model,
) -> anyhow::Result<()> {
    let mut next_poll = Instant::now() + args.interval;
    loop {
        terminal.draw(|frame| render::render(frame, model))?;
        // Blocking here is fine: this runtime has no other task, and the poll below waits its
        // turn (the model is batched per interval, not per event).
        if event::poll(next_poll.saturating_duration_since(Instant::now()))?
            && let Event::Key(k) = event::read()?
            && let Some(key) = key_of(k)
        {
            let open = model.open_function().map(str::to_string);
            model.key(key);
            if model.quit {
                return Ok(());
            }
            // A function just opened wants its log lines now, not at the next tick.
            if model.open_function().is_some() && model.open_function() != open.as_deref() {
                next_poll = Instant::now();
            }
        }
        if Instant::now() >= next_poll {
            let open = model.open_function().map(str::to_string);
            let targets = model.metrics_targets.clone();
            model.apply(poll(client, args.sample, open.as_deref(), &targets).await);
            next_poll = Instant::now() + args.interval;
        }
    }
}

fn key_of(k: KeyEvent) -> Option<Key> {
    if k.kind != KeyEventKind::Press {
        return None;
    }
    Some(match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        _ => return None,
    })
}

/// One round of requests, made concurrently; each answer is kept apart so one refusal (e.g.
/// `/v1/node` for a tenant key) does not hide the others. `/metrics` is scraped on each of
/// `targets` (the nodes up at the last poll), or on the one node when there are none.
async fn poll(client: &Client, sample: u32, open: Option<&str>, targets: &[String]) -> Poll {
    let get = |path: String, query: Vec<(&'static str, String)>| async move {
        client.json(client.request(Method::GET, &path).query(&query)).await.map_err(|e| format!("{e:#}"))
    };
    let tenant = client.tenant.clone();
    let logs = async {
        match open {
            Some(name) => {
                let path = client.tenant_path(&format!("/functions/{name}/logs"));
                let limit = model::LOG_LINES_MAX.to_string();
                Some((name.to_string(), get(path, vec![("limit", limit)]).await))
            }
            None => None,
        }
    };
    let scrape = |base: String| async move {
        let res = client
            .send(client.request_at(&base, Method::GET, "/metrics"))
            .await
            .map_err(|e| format!("{e:#}"))?;
        let res = crate::client::check(res).await.map_err(|e| format!("{e:#}"))?;
        res.text().await.map_err(|e| format!("reading /metrics of {base}: {e}"))
    };
    let bases = if targets.is_empty() { vec![client.base.clone()] } else { targets.to_vec() };
    let metrics =
        async { futures::future::join_all(bases.into_iter().map(scrape)).await.into_iter().collect() };
    let (functions, invocations, usage, node, nodes, logs, metrics) = futures::join!(
        get(client.tenant_path("/functions"), vec![]),
        get("/v1/invocations".to_string(), vec![("tenant", tenant.clone()), ("limit", sample.to_string())]),
        get(client.tenant_path("/usage"), vec![]),
        get("/v1/node".to_string(), vec![]),
        get("/v1/nodes".to_string(), vec![]),
        logs,
        metrics,
    );
    Poll { now_ms: SystemClock.now_ms(), functions, invocations, usage, node, nodes, logs, metrics }
}
