//! `sluice top` in a real terminal (tmux), against a real node: the called function shows with
//! its calls, and `q` ends it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{BIN, Node, guests};

/// A tmux server of the test's own (`-L`), so nothing touches a user's sessions; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("running tmux")
    }

    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_the_called_function_with_its_calls_and_q_quits() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    // Calls with log lines are recorded, so they are in the invocations list that top reads.
    for _ in 0..5 {
        // Read to the end: a client that drops the body early cancels the call (client_closed).
        let res = node.get("/fn/default/tg/stdout");
        assert_eq!(res.status(), 200);
        res.bytes().unwrap();
    }
    node.wait_json("/v1/invocations?function=tg", |v| v["invocations"].as_array().unwrap().len() == 5);
    // Silent successes leave no record: only /metrics counts them.
    for _ in 0..5 {
        let res = node.get("/fn/default/tg/ok");
        assert_eq!(res.text().unwrap(), "ok");
    }

    let tmux = Tmux { socket: format!("sluice-e2e-top-{}", std::process::id()) };
    let url = format!("SLUICE_URL={}", node.url);
    let token = format!("SLUICE_TOKEN={}", node.token);
    let command = format!("{BIN} top --interval 200ms");
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "45",
        "-e",
        &url,
        "-e",
        &token,
        &command,
    ]);
    assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));

    let deadline = Instant::now() + Duration::from_secs(20);
    let (screen, row) = loop {
        let screen = tmux.capture();
        let row = screen.lines().find(|l| l.starts_with("│tg ")).map(str::to_string);
        if let Some(row) = row {
            break (screen, row);
        }
        assert!(Instant::now() < deadline, "tg never showed:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // FUNCTION VER RATE/s CALLS ERRORS P50 P99 CPU/call ACTIVE
    let cells: Vec<&str> = row.trim_matches('│').split_whitespace().collect();
    assert_eq!(cells[..2], ["tg", "1"], "{row}");
    assert_eq!(cells[3], "10", "calls, the unrecorded ones too: {row}");
    assert_eq!(cells[4], "0", "errors: {row}");
    assert!(screen.contains("sluice top: tenant default"), "{screen}");
    assert!(screen.contains("RATE/s▼"), "{screen}");
    assert!(screen.contains("functions (last 10s)"), "the numbers come from /metrics: {screen}");
    eprintln!("{screen}");

    // Enter opens the function: its invocations and log lines.
    tmux.run(&["send-keys", "-t", "top", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let screen = tmux.capture();
        if screen.contains("tg: log lines") && screen.contains("stdout line 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the function view never showed its logs:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    }

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "top did not quit on q:\n{}", tmux.capture());
        std::thread::sleep(Duration::from_millis(50));
    }
}
