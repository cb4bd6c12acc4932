//! The control plane under a flood: one tenant's `read` key looping `/v1` is refused past its
//! rate and its share of requests in flight, while another tenant's key is still served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Node;

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
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (url, key, stop) = (node.url.clone(), mallory.clone(), stop.clone());
            let (ok, limited, concurrency, other) =
                (ok.clone(), limited.clone(), concurrency.clone(), other.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
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

    // While mallory floods, acme's key is served every time.
    std::thread::sleep(Duration::from_millis(300));
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
    // 50/s with a burst of 50 over about 1.3 s: at most about 115 served.
    assert!(ok <= 130, "mallory's key was served {ok} times, over its rate");
}
