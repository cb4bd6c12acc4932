//! Schedules through the real binary: an every-second schedule fires each occurrence once with
//! the key `sched:{id}:{occurrence}` and its request, pauses and resumes; a one-time schedule
//! fires once; an occurrence fired ahead starts on time and a pause takes it back; the overlap
//! policies keep a slow function's runs apart; after the node was
//! stopped, each catch-up policy enqueues what it promises; and two nodes on PostgreSQL fire 200
//! schedules without a double fire. Time scales are shortened (1-3 s intervals,
//! `--schedule-missed-after 1s`); every wait polls the invocations the store holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{PgDatabase, cluster_node};
use crate::harness::{Node, guests};

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.cli(args);
    assert!(ok, "sluice {args:?} failed: {out}{err}");
    out
}

fn ms(rfc3339: &str) -> i64 {
    sluice_core::parse_rfc3339(rfc3339).unwrap_or_else(|| panic!("not RFC 3339: {rfc3339}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// One enqueued occurrence, as the invocation that carries it says.
#[derive(Debug, Clone)]
struct Fire {
    schedule: i64,
    scheduled_for: i64,
    /// When its enqueue committed (the invocation's `created_at`).
    created_at: i64,
    id: String,
    status: String,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

/// Every invocation of `function` (all pages), read as fires: each must carry a schedule's key.
fn fires(node: &Node, function: &str) -> Vec<Fire> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = format!("/v1/invocations?function={function}&limit=1000");
        if let Some(b) = &before {
            path += &format!("&before={b}");
        }
        let page: Value = node.get(&path).json().unwrap();
        for inv in page["invocations"].as_array().unwrap() {
            let key = inv["idempotency_key"].as_str().unwrap_or_else(|| panic!("no key: {inv}"));
            let parts: Vec<&str> = key.split(':').collect();
            assert!(parts.len() == 3 && parts[0] == "sched", "a schedule's key: {key}");
            out.push(Fire {
                schedule: parts[1].parse().unwrap(),
                scheduled_for: parts[2].parse().unwrap(),
                created_at: ms(inv["created_at"].as_str().unwrap()),
                id: inv["id"].as_str().unwrap().to_string(),
                status: inv["status"].as_str().unwrap().to_string(),
                started_at: inv["started_at"].as_str().map(ms),
                finished_at: inv["finished_at"].as_str().map(ms),
            });
        }
        match page["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    out.sort_by_key(|f| (f.schedule, f.scheduled_for));
    out
}

/// Polls until `done` holds for the fires of `function`; 30 s at most.
fn wait_fires(node: &Node, function: &str, done: impl Fn(&[Fire]) -> bool) -> Vec<Fire> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = fires(node, function);
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "the schedules did not fire as expected in 30 s: {now:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each occurrence at most once, per schedule.
fn assert_no_double_fire(fires: &[Fire]) {
    let mut seen = BTreeSet::new();
    for f in fires {
        assert!(seen.insert((f.schedule, f.scheduled_for)), "fired twice: {f:?}");
    }
}

/// The p50 and p99 of how late the fires were enqueued, in ms.
fn lateness(fires: &[Fire]) -> (i64, i64) {
    let mut late: Vec<i64> = fires.iter().map(|f| f.created_at - f.scheduled_for).collect();
    late.sort();
    let at = |q: f64| late[((late.len() as f64 * q).ceil() as usize).clamp(1, late.len()) - 1];
    (at(0.5), at(0.99))
}

fn show(node: &Node, name: &str) -> Value {
    serde_json::from_str(&cli_ok(node, &["schedules", "show", name, "-o", "json"])).unwrap()
}

#[test]
fn an_every_second_schedule_fires_each_occurrence_once_and_pauses_and_resumes() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let out = cli_ok(
        &node,
        &[
            "schedules",
            "create",
            "tick",
            "--function",
            "tg",
            "--every",
            "1s",
            "--path",
            "/headers",
            "--header",
            "x-team: billing",
            "--body",
            "hello",
            // Every occurrence fires even while the one before still runs: on a machine whose
            // cores are busy (CI), async guests at SCHED_IDLE may outlast a second, and `skip`
            // (tested below) would leave gaps.
            "--overlap",
            "allow",
        ],
    );
    assert!(out.starts_with("created schedule tick\ntick: tg@latest  every 1s  active\n"), "{out}");
    assert!(out.contains("overlap allow, catch-up latest, flex none"), "{out}");

    let fired =
        wait_fires(&node, "tg", |f| f.len() >= 4 && f.iter().take(3).all(|f| f.status == "succeeded"));
    assert_no_double_fire(&fired);
    let id = show(&node, "tick")["id"].as_i64().unwrap();
    for pair in fired.windows(2) {
        assert_eq!(pair[0].schedule, id);
        assert_eq!(
            pair[1].scheduled_for - pair[0].scheduled_for,
            1_000,
            "every occurrence, in order: {fired:#?}"
        );
    }
    assert!(fired.iter().all(|f| f.scheduled_for % 1_000 == 0), "aligned to whole seconds");
    let (p50, p99) = lateness(&fired);
    eprintln!("fire lateness on one node: p50 {p50} ms, p99 {p99} ms over {} fires", fired.len());
    // The node's metrics count the fires and how late each was.
    let metrics = node.get("/metrics").text().unwrap();
    let value = |series: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(series)).and_then(|v| v.trim().parse::<f64>().ok())
    };
    let fires_total = value("sluice_schedule_fires_total ").unwrap_or_default();
    let count = value("sluice_schedule_lateness_seconds_count ").unwrap_or_default();
    assert!(fires_total >= fired.len() as f64 && count >= fired.len() as f64, "{metrics}");
    assert_eq!(value("sluice_schedule_lateness_seconds_bucket{le=\"+Inf\"} "), Some(count), "{metrics}");
    let within = value("sluice_schedule_lateness_seconds_bucket{le=\"2.5\"} ").unwrap_or_default();
    assert!(within >= 1.0, "fires 2.5 s late or more on an idle node: {metrics}");
    // The request the guest saw: the schedule's path, headers and body, and its name and
    // occurrence.
    let seen = node.get(&format!("/v1/invocations/{}/response", fired[0].id)).text().unwrap();
    assert!(seen.contains("x-team: billing\n"), "{seen}");
    assert!(seen.contains("sluice-schedule: tick\n"), "{seen}");
    let occurrence = sluice_core::rfc3339(fired[0].scheduled_for);
    assert!(seen.contains(&format!("sluice-scheduled-for: {occurrence}\n")), "{seen}");

    let shown = cli_ok(&node, &["schedules", "show", "tick"]);
    let next: Vec<&str> = shown.lines().skip_while(|l| *l != "next fires:").skip(1).collect();
    assert_eq!(next.len(), 5, "{shown}");
    let listed = cli_ok(&node, &["schedules", "list"]);
    assert!(listed.lines().nth(1).unwrap().starts_with("tick "), "{listed}");
    assert!(listed.contains("tg@latest") && listed.contains("active"), "{listed}");

    // Paused: nothing fires (a tick that read it before the pause commits nothing after it).
    let paused = cli_ok(&node, &["schedules", "pause", "tick"]);
    assert!(paused.contains("  paused\n") && paused.contains("next fires: none"), "{paused}");
    let at_pause = fires(&node, "tg").len();
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(fires(&node, "tg").len(), at_pause, "a paused schedule fired");
    let resumed_at = now_ms();
    cli_ok(&node, &["schedules", "resume", "tick"]);
    let after = wait_fires(&node, "tg", |f| f.len() >= at_pause + 2);
    assert_no_double_fire(&after);
    // What fell in the pause was not caught up: the first fire after it is after the resume.
    let resumed: Vec<&Fire> = after.iter().skip(at_pause).collect();
    assert!(resumed[0].scheduled_for > resumed_at - 1_000, "{resumed:#?}");

    cli_ok(&node, &["schedules", "delete", "tick"]);
    let (ok, _, err) = node.cli(&["schedules", "show", "tick"]);
    assert!(!ok && err.contains("no schedule tick"), "{err}");
}

#[test]
fn a_one_time_schedule_fires_once_and_bad_schedules_are_refused() {
    let node = Node::start(&["--tenant-schedules-max", "2"]);
    node.deploy("tg", &guests().testguest, &[]);
    let at = sluice_core::rfc3339(now_ms() + 1_500);
    let body = node.dir.path().join("body.json");
    std::fs::write(&body, "{\"report\": \"daily\"}").unwrap();
    let body_arg = format!("@{}", body.display());
    cli_ok(
        &node,
        &[
            "schedules",
            "create",
            "once",
            "--function",
            "tg",
            "--at",
            &at,
            "--path",
            "/echo",
            "--body",
            &body_arg,
            "--header",
            "content-type: application/json",
        ],
    );
    let fired = wait_fires(&node, "tg", |f| f.len() == 1 && f[0].status == "succeeded");
    assert_eq!(fired[0].scheduled_for, ms(&at));
    let echoed = node.get(&format!("/v1/invocations/{}/response", fired[0].id));
    assert_eq!(echoed.headers()["content-type"], "application/json");
    assert_eq!(echoed.text().unwrap(), "{\"report\": \"daily\"}", "the guest got the schedule's body");
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(fires(&node, "tg").len(), 1, "once");
    let shown = show(&node, "once");
    assert_eq!(
        (shown["fires"].as_u64(), shown["next_fires"].as_array().map(Vec::len)),
        (Some(1), Some(0)),
        "{shown}"
    );
    assert!(cli_ok(&node, &["schedules", "list"]).contains(" done "), "a fired one-time schedule is done");

    // Refused with a reason, before anything is stored.
    for (args, says) in [
        (vec!["--every", "500ms"], "every_ms must be from 1000"),
        (vec!["--cron", "* * * * * *", "--tz", "Mars/Olympus"], "unknown time zone"),
        (vec!["--cron", "not a cron"], "cron expression"),
        (vec!["--at", "2001-01-01T00:00:00Z"], "in the past"),
        (vec!["--every", "1m", "--overlap", "sometimes"], "overlap policy"),
        (vec!["--every", "1m", "--header", "sluice-version: 2"], "the platform's"),
    ] {
        let mut all = vec!["schedules", "create", "bad", "--function", "tg"];
        all.extend_from_slice(&args);
        let (ok, _, err) = node.cli(&all);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
    let (ok, _, err) = node.cli(&["schedules", "create", "x", "--function", "nofn", "--every", "1m"]);
    assert!(!ok && err.contains("no function nofn"), "{err}");
    // The tenant's quota of schedules (2 here).
    cli_ok(
        &node,
        &[
            "schedules",
            "create",
            "second",
            "--function",
            "tg",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Europe/Berlin",
        ],
    );
    let (ok, _, err) = node.cli(&["schedules", "create", "third", "--function", "tg", "--every", "1m"]);
    assert!(!ok && err.contains("507") && err.contains("schedules_max"), "{err}");
    let usage = node.get("/v1/tenants/default/usage").json::<Value>().unwrap();
    let schedules = &usage["quotas"]["schedules"];
    assert_eq!((schedules["used"].as_u64(), schedules["max"].as_u64()), (Some(2), Some(2)), "{usage}");
    // Deleting the function deletes its schedules.
    cli_ok(&node, &["functions", "delete", "tg"]);
    let list: Value = serde_json::from_str(&cli_ok(&node, &["schedules", "list", "-o", "json"])).unwrap();
    assert_eq!(list["schedules"], json!([]), "{list}");
}

/// `serve --schedule-fire-ahead`: an occurrence is stored before its time, runnable at it (it
/// starts no earlier), listed as the next fire; pausing before its time takes it back, and a
/// resume before its time fires it again, once.
#[test]
fn an_occurrence_fired_ahead_starts_on_time_and_a_pause_takes_it_back() {
    let node = Node::start(&["--schedule-fire-ahead", "20s"]);
    node.deploy("tg", &guests().testguest, &[]);
    // Far enough ahead that the pause and the resume below come before it even on a loaded
    // machine; within the window, so the first tick fires it.
    let at_ms = (now_ms() + 12_000) / 1_000 * 1_000;
    let at = sluice_core::rfc3339(at_ms);
    cli_ok(&node, &["schedules", "create", "soon", "--function", "tg", "--at", &at, "--path", "/ok"]);
    let fired = wait_fires(&node, "tg", |f| f.len() == 1);
    assert!(now_ms() < at_ms, "the test is too slow to see the occurrence ahead");
    assert_eq!((fired[0].scheduled_for, fired[0].status.as_str()), (at_ms, "queued"), "{fired:?}");
    assert!(fired[0].created_at < at_ms, "stored ahead: {fired:?}");
    let shown = show(&node, "soon");
    assert_eq!(shown["next_fires"], json!([at]), "the occurrence fired ahead is still to come: {shown}");
    assert_eq!((shown["fires"].as_u64(), shown["last_fired_for"].as_str()), (Some(1), Some(at.as_str())));

    // Paused before its time: the invocation is taken back, nothing runs.
    let paused = show_after(&node, &["schedules", "pause", "soon"]);
    assert_eq!((paused["fires"].as_u64(), &paused["last_fired_for"]), (Some(0), &Value::Null), "{paused}");
    assert!(fires(&node, "tg").is_empty(), "taken back");
    // Resumed before its time: fired again (its key was freed with it), and run at its time.
    cli_ok(&node, &["schedules", "resume", "soon"]);
    let fired = wait_fires(&node, "tg", |f| f.len() == 1 && f[0].status == "succeeded");
    assert!(fired[0].started_at.unwrap() >= at_ms, "started before its time: {fired:?}");
    assert_eq!(show(&node, "soon")["fires"].as_u64(), Some(1));
}

fn show_after(node: &Node, args: &[&str]) -> Value {
    cli_ok(node, args);
    show(node, args[2])
}

#[test]
fn overlapping_occurrences_are_skipped_or_buffered_never_run_together() {
    let node = Node::start(&[]);
    node.deploy("slow", &guests().testguest, &[]);
    // Each run takes 2.2 s, the schedules fire every second.
    for (name, overlap) in [("skipper", "skip"), ("buffer", "buffer-one")] {
        cli_ok(
            &node,
            &[
                "schedules",
                "create",
                name,
                "--function",
                "slow",
                "--every",
                "1s",
                "--overlap",
                overlap,
                "--path",
                "/sleep?ms=2200",
            ],
        );
    }
    let ids: BTreeMap<i64, &str> =
        ["skipper", "buffer"].into_iter().map(|n| (show(&node, n)["id"].as_i64().unwrap(), n)).collect();
    let per_schedule = |f: &[Fire], name: &str| -> Vec<Fire> {
        f.iter().filter(|x| ids[&x.schedule] == name).cloned().collect()
    };
    let fired = wait_fires(&node, "slow", |f| {
        ["skipper", "buffer"]
            .iter()
            .all(|n| per_schedule(f, n).iter().filter(|x| x.status == "succeeded").count() >= 2)
    });
    assert_no_double_fire(&fired);
    for name in ["skipper", "buffer"] {
        let runs: Vec<Fire> =
            per_schedule(&fired, name).into_iter().filter(|f| f.finished_at.is_some()).collect();
        for pair in runs.windows(2) {
            // The next one was enqueued only once the previous one had finished.
            assert!(
                pair[1].created_at >= pair[0].finished_at.unwrap(),
                "{name}: enqueued while the previous ran: {pair:#?}"
            );
            assert!(
                pair[1].started_at.unwrap() >= pair[0].finished_at.unwrap(),
                "{name}: runs overlap: {pair:#?}"
            );
        }
        let shown = show(&node, name);
        assert!(shown["skipped"].as_u64().unwrap() >= 1, "{name}: {shown}");
    }
    // buffer-one enqueues the occurrence it kept as soon as the previous run finished (a tick
    // later), skip waits for the next occurrence after it: at most a second more.
    let buffer: Vec<Fire> =
        per_schedule(&fired, "buffer").into_iter().filter(|f| f.finished_at.is_some()).collect();
    let waits: Vec<i64> = buffer.windows(2).map(|p| p[1].created_at - p[0].finished_at.unwrap()).collect();
    assert!(waits.iter().all(|w| *w < 900), "buffered runs start a tick after the previous: {waits:?}");
    let buffered = &buffer[1];
    assert!(
        buffered.created_at - buffered.scheduled_for > 1_000,
        "it ran late, from the buffer: {buffered:?}"
    );
}

#[test]
fn after_an_outage_each_catch_up_policy_enqueues_what_it_promises() {
    const EVERY: i64 = 3_000;
    let mut node = Node::start(&["--schedule-missed-after", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    for policy in ["all", "latest", "none"] {
        cli_ok(
            &node,
            &[
                "schedules",
                "create",
                policy,
                "--function",
                "tg",
                "--every",
                "3s",
                "--catchup",
                policy,
                "--overlap",
                "allow",
                "--path",
                "/ok",
            ],
        );
    }
    let ids: BTreeMap<i64, String> = ["all", "latest", "none"]
        .into_iter()
        .map(|n| (show(&node, n)["id"].as_i64().unwrap(), n.to_string()))
        .collect();
    wait_fires(&node, "tg", |f| ids.keys().all(|id| f.iter().any(|x| x.schedule == *id)));
    node.terminate();
    let stopped_at = now_ms();
    // An outage of at least two occurrences after the one the node fired ahead before it
    // stopped (`--schedule-fire-ahead`, runnable at its time: not missed), ending 1.5 s after
    // one: the most recent occurrence due at restart is then more than
    // `--schedule-missed-after` late.
    let restart_at = {
        let mut t = stopped_at + sluice_core::schedule::FIRE_AHEAD_MS + 2 * EVERY + 500;
        t += (EVERY + 1_500 - t.rem_euclid(EVERY)).rem_euclid(EVERY);
        t
    };
    std::thread::sleep(Duration::from_millis((restart_at - now_ms()).max(0) as u64));
    let restarted_at = now_ms();
    node.spawn();
    // Two occurrences after the restart, for every schedule.
    let fired = wait_fires(&node, "tg", |f| {
        ids.keys()
            .all(|id| f.iter().filter(|x| x.schedule == *id && x.scheduled_for > restarted_at).count() >= 2)
    });
    assert_no_double_fire(&fired);
    for (id, policy) in &ids {
        let mine: Vec<&Fire> = fired.iter().filter(|f| f.schedule == *id).collect();
        let before_stop =
            mine.iter().filter(|f| f.created_at < stopped_at).map(|f| f.scheduled_for).max().unwrap();
        // Occurrences due while no node ran: the most recent 1.5 s before the restart.
        let missed: Vec<i64> =
            (1..).map(|k| before_stop + k * EVERY).take_while(|t| *t < restarted_at).collect();
        assert!(missed.len() >= 2, "{policy}: the outage spans occurrences: {missed:?}");
        let enqueued: Vec<i64> =
            missed.iter().copied().filter(|t| mine.iter().any(|f| f.scheduled_for == *t)).collect();
        // The first tick after the restart (the first commit): before the next occurrence unless
        // the node took more than 1.5 s to start.
        let first_tick =
            mine.iter().filter(|f| f.created_at >= restarted_at).map(|f| f.created_at).min().unwrap();
        let came_up_in_time = first_tick < missed.last().unwrap() + EVERY;
        match policy.as_str() {
            "all" => assert_eq!(enqueued, missed, "all: every missed one"),
            "latest" if came_up_in_time => {
                assert_eq!(enqueued, [*missed.last().unwrap()], "latest: the most recent only")
            }
            // A new occurrence was due at the first tick already: it stands for the missed ones.
            "latest" => assert_eq!(enqueued, Vec::<i64>::new(), "latest"),
            // Each missed one was more than `--schedule-missed-after` late at any tick.
            "none" => assert_eq!(enqueued, Vec::<i64>::new(), "none: nothing missed"),
            _ => unreachable!(),
        }
        eprintln!("{policy}: missed {missed:?}, enqueued {enqueued:?}");
    }
}

/// Two nodes on one PostgreSQL database fire 200 schedules every second for a few seconds: each
/// occurrence is enqueued exactly once (no double fire, and with `--catchup all` none lost), and
/// the fires are on time.
#[test]
fn two_nodes_fire_200_schedules_without_a_double_fire() {
    let Some(db) = PgDatabase::create() else { return };
    let quota = ["--tenant-schedules-max", "1000"];
    let one = cluster_node(&db, None, &quota);
    let two = cluster_node(&db, Some(&one.token), &quota);
    one.deploy("hello", &guests().hello, &[]);
    two.wait_json("/v1/node", |v| v["functions"] == 1);
    const SCHEDULES: usize = 200;
    let client = one.client();
    for i in 0..SCHEDULES {
        // Half created through each node.
        let node = if i % 2 == 0 { &one } else { &two };
        let res = client
            .post(format!("{}/v1/tenants/default/schedules", node.url))
            .bearer_auth(&one.token)
            .json(&json!({ "name": format!("s{i:03}"), "function": "hello", "every_ms": 1000, "catchup": "all", "overlap": "allow" }))
            .send()
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().unwrap());
    }
    let started = now_ms();
    // A few seconds of fires from both nodes.
    wait_fires(&one, "hello", |f| {
        f.iter().filter(|x| x.scheduled_for > started + 3_000).count() >= SCHEDULES
    });
    for i in 0..SCHEDULES {
        let res = client
            .delete(format!("{}/v1/tenants/default/schedules/s{i:03}", one.url))
            .bearer_auth(&one.token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 204);
    }
    let fired = fires(&one, "hello");
    assert_no_double_fire(&fired);
    let mut per_schedule: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for f in &fired {
        per_schedule.entry(f.schedule).or_default().push(f.scheduled_for);
    }
    assert_eq!(per_schedule.len(), SCHEDULES);
    for (id, times) in &per_schedule {
        for pair in times.windows(2) {
            assert_eq!(pair[1] - pair[0], 1_000, "schedule {id} lost an occurrence: {times:?}");
        }
    }
    let (p50, p99) = lateness(&fired);
    eprintln!(
        "two nodes, {SCHEDULES} schedules every second: {} fires, 0 double; lateness p50 {p50} ms, p99 {p99} ms",
        fired.len()
    );
}

/// A 10-minute outage without waiting 10 minutes: schedules written into the store of a stopped
/// node as if created 10 minutes ago (their first occurrence then), as a node down since would
/// find them (the store's state is the only clock a restarted node reads for the past). On
/// restart each policy enqueues exactly what it promises, once: every 1 s with `all` the most
/// recent 100 of the 600 missed (the cap), every 10 s with `all` each of the 60, `latest` the most
/// recent one only, `none` none; the counts of skipped occurrences say the rest.
#[test]
fn after_a_ten_minute_outage_catch_up_is_exactly_per_policy() {
    let mut node = Node::start(&["--schedule-missed-after", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    node.terminate();
    let stopped_at = now_ms();
    // The first occurrence 10 minutes (or a few seconds more) before the stop, on the 10 s grid.
    let first = (stopped_at - 610_000) / 10_000 * 10_000;
    let rows = [
        ("all-1s", 1_000, "all"),
        ("all-10s", 10_000, "all"),
        ("latest-1s", 1_000, "latest"),
        ("none-1s", 1_000, "none"),
    ];
    let db = node.dir.path().join("sluice.db");
    let mut script = String::from("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\n");
    for (name, every, policy) in rows {
        script += &format!(
            "c.execute(\"INSERT INTO schedules (tenant, name, function, alias, every_ms, overlap, catchup, request_path, \
             request_headers, next_fire_at, created_at, updated_at) VALUES ('default', '{name}', 'tg', 'latest', {every}, \
             'allow', '{policy}', '/ok', '[]', {first}, {created}, {created})\")\n",
            created = first - 1
        );
    }
    script += "c.commit()\n";
    let out = std::process::Command::new("python3").arg("-c").arg(&script).arg(&db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: BTreeMap<String, i64> = {
        let restarted = now_ms();
        node.spawn();
        assert!(now_ms() - restarted < 30_000);
        rows.iter().map(|(name, ..)| (name.to_string(), show(&node, name)["id"].as_i64().unwrap())).collect()
    };
    let restarted_at = now_ms();
    // The first tick after the restart fires the catch-up; then the schedules go on.
    let fired = wait_fires(&node, "tg", |f| {
        ids.values().all(|id| f.iter().any(|x| x.schedule == *id && x.scheduled_for > restarted_at + 2_000))
    });
    assert_no_double_fire(&fired);
    for (name, every, policy) in rows {
        let id = ids[name];
        // Occurrences missed: from the first to the last one due before the node came back.
        let missed: Vec<i64> = (0..).map(|k| first + k * every).take_while(|t| *t < restarted_at).collect();
        assert!(missed.len() >= 600 * 1_000 / every as usize, "{name}: 10 minutes missed: {}", missed.len());
        let caught: Vec<i64> = fired
            .iter()
            .filter(|f| f.schedule == id && f.scheduled_for < restarted_at)
            .map(|f| f.scheduled_for)
            .collect();
        // What the policy promises is judged at the tick that caught up (on a loaded machine it
        // may come a second or more after `restarted_at`): the schedule's first commit after
        // the restart. Occurrences due by then, the most recent 100 for `all`.
        let tick = fired.iter().filter(|f| f.schedule == id).map(|f| f.created_at).min().unwrap();
        let due_at_tick: Vec<i64> = (0..).map(|k| first + k * every).take_while(|t| *t <= tick).collect();
        let want: Vec<i64> = match policy {
            "all" => due_at_tick[due_at_tick.len().saturating_sub(sluice_core::schedule::CATCHUP_ALL_MAX)..]
                .to_vec(),
            "latest" => vec![*due_at_tick.last().unwrap()],
            _ => vec![],
        };
        // An occurrence due within a second of that tick may be on time: the policies treat it
        // as current. Compare what was missed before it.
        let cut = |v: Vec<i64>| v.into_iter().filter(|t| *t < tick - 1_000).collect::<Vec<_>>();
        let caught_at_tick: Vec<i64> = fired
            .iter()
            .filter(|f| f.schedule == id && f.scheduled_for <= tick)
            .map(|f| f.scheduled_for)
            .collect();
        assert_eq!(cut(caught_at_tick), cut(want), "{name} ({policy})");
        let s = show(&node, name);
        eprintln!("{name}: {} missed, {} caught up; skipped {}", missed.len(), caught.len(), s["skipped"]);
        assert!(
            s["skipped"].as_u64().unwrap() + caught.len() as u64 >= missed.len() as u64 - 2,
            "{name}: the rest counted as skipped: {s}"
        );
    }
}
