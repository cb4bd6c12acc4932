//! The control plane under a flood: one tenant's `read` key looping `/v1` is refused past its
//! rate and its share of requests in flight, while another tenant's key is still served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Node, guests};

/// Creates `tenant` and a `read` key for it as admin; returns the key.
fn read_key(node: &Node, tenant: &str) -> String {
    let admin = node.client();
    let res = admin
        .post(format!("{}/v1/tenants", node.url))
        .bearer_auth(&node.token)
        .json(&json!({ "name": tenant }))
        .send()
        .unwrap();
    assert!(res.status().is_success(), "creating {tenant}: {}", res.status());
    let res = admin
        .post(format!("{}/v1/tenants/{tenant}/keys", node.url))
        .bearer_auth(&node.token)
        .json(&json!({ "scopes": ["read"] }))
        .send()
        .unwrap();
    assert!(res.status().is_success(), "minting a key of {tenant}: {}", res.status());
    res.json::<Value>().unwrap()["key"].as_str().unwrap().to_string()
}

#[test]
fn a_read_key_flooding_the_control_api_is_refused_past_its_share_and_others_are_served() {
    let node = Node::start(&["--api-rate", "50", "--api-burst", "50", "--api-tenant-inflight-max", "2"]);
    let mallory = read_key(&node, "mallory");
    let acme = read_key(&node, "acme");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited, concurrency, other) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let flood_began = Instant::now();
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (url, key, stop) = (node.url.clone(), mallory.clone(), stop.clone());
            let (ok, limited, concurrency, other) =
                (ok.clone(), limited.clone(), concurrency.clone(), other.clone());
            std::thread::spawn(move || {
                let client = crate::harness::http();
                while !stop.load(Ordering::Relaxed) {
                    let res = client
                        .get(format!("{url}/v1/invocations?tenant=mallory&limit=1000"))
                        .bearer_auth(&key)
                        .send()
                        .unwrap();
                    match (
                        res.status().as_u16(),
                        res.headers().get("sluice-error").map(|v| v.to_str().unwrap().to_string()),
                    ) {
                        (200, _) => ok.fetch_add(1, Ordering::Relaxed),
                        (429, Some(code)) => {
                            assert!(
                                res.headers().contains_key("retry-after"),
                                "a 429 says when to come back"
                            );
                            match code.as_str() {
                                "rate_limited" => limited.fetch_add(1, Ordering::Relaxed),
                                "concurrency_limited" => concurrency.fetch_add(1, Ordering::Relaxed),
                                c => panic!("unexpected refusal {c}"),
                            }
                        }
                        (status, code) => {
                            eprintln!("unexpected answer {status} {code:?}");
                            other.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();

    // While mallory floods (and is being refused), acme's key is served every time.
    crate::harness::wait_until("mallory's flood to be refused", || {
        limited.load(Ordering::Relaxed) + concurrency.load(Ordering::Relaxed) > 0
    });
    let client = node.client();
    let began = Instant::now();
    for _ in 0..10 {
        let res = client
            .get(format!("{}/v1/invocations?tenant=acme&limit=10", node.url))
            .bearer_auth(&acme)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200, "acme was refused while mallory flooded: {}", res.text().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let flooded = flood_began.elapsed();
    let (ok, limited, concurrency, other) = (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        concurrency.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    eprintln!(
        "in {:?}: mallory {ok} served, {limited} over its rate, {concurrency} over its share, {other} other",
        began.elapsed()
    );
    assert_eq!(other, 0, "every refusal is a 429 of the key's or the tenant's bound");
    assert!(limited > 0, "mallory's key was never refused for its rate ({ok} served)");
    // 50/s with a burst of 50: at most 50 + 50 per second of the flood (and a few for rounding).
    let allowed = 50.0 + 50.0 * flooded.as_secs_f64() + 5.0;
    assert!(ok as f64 <= allowed, "mallory's key was served {ok} times in {flooded:?}, over its rate");
}

/// A stub downstream that answers every request at once and records when each arrived.
fn recording_server() -> (u16, Arc<std::sync::Mutex<Vec<Instant>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let arrivals = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let arrivals = arrivals.clone();
            std::thread::spawn(move || {
                if crate::harness::read_request(&mut stream).is_some() {
                    arrivals.lock().unwrap().push(Instant::now());
                    let _ = std::io::Write::write_all(
                        &mut stream,
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                }
            });
        }
    });
    (port, seen)
}

/// The control API runs on a runtime of its own: while every `/v1` thread is held by slow API
/// requests (`--test-api-stall`: each holds its thread for a second, as a CPU-bound handler
/// would), async calls are still accepted and run at once, because the queue writer and the
/// scheduler (and the heartbeats beside them) run on the control runtime, which API work never
/// reaches.
#[test]
fn slow_api_requests_do_not_delay_the_queue_writer_or_the_scheduler() {
    let (port, arrivals) = recording_server();
    let node = Node::start(&["--test-api-stall", "1s", "--outbound-allow-private"]);
    let target = format!("127.0.0.1:{port}");
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &target]);

    // Twelve clients loop an API read with the admin key (no rate limit, no tenant share).
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..12)
        .map(|_| {
            let (url, token, stop, served) =
                (node.url.clone(), node.token.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let client = crate::harness::http();
                while !stop.load(Ordering::Relaxed) {
                    let res = client
                        .get(format!("{url}/v1/tenants/default/functions"))
                        .bearer_auth(&token)
                        .send()
                        .unwrap();
                    assert_eq!(res.status(), 200, "{}", res.text().unwrap());
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Until the API runtime has served (and stalled on) a few of them: its handlers have used and
    // dropped store connections by then, which is what once held the scheduler up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while served.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < deadline, "the flood was never served");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let began = Instant::now();
        node.enqueue(&format!("/fn/default/tg/fetch?url=http%3A%2F%2F127.0.0.1%3A{port}%2F{i}"), &[]);
        let accepted = began.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrivals.lock().unwrap().len() <= i {
            assert!(Instant::now() < deadline, "async call {i} never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ran = arrivals.lock().unwrap()[i] - began;
        eprintln!("async call {i}: accepted in {accepted:?}, ran after {ran:?}");
        worst = worst.max(ran);
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    eprintln!("the flood was served {served} times; the slowest async call ran after {worst:?}");
    assert!(served >= 3, "the API was not flooded ({served} requests served)");
    // Behind a second of API work per request on the control runtime's two threads, each call
    // would wait for several of them (the API requests queue before the writer and the
    // scheduler); on their own runtime, a call is accepted and run in milliseconds.
    assert!(worst < Duration::from_millis(800), "an async call ran {worst:?} after it was sent");
}
