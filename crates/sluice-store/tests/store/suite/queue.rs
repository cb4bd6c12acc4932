//! The async queue's promises (DESIGN.md section 3), for any backend: durable enqueue with
//! idempotency keys, leases in criticality and deadline order, start windows, fencing of stale
//! owners, retries until attempts or age run out, re-drives, listing and purging.

use std::collections::HashSet;

use super::ended;
use sluice_core::UnixMs;
use sluice_store::{
    AttemptResult, Completion, Criticality, Enqueued, IDEMPOTENCY_WINDOW_MS, IdempotencyKey, InOrder,
    Invocation, InvocationFilter, InvocationStatus, LeaseAsk, LeaseClass, LogStream, NewInvocation,
    OwnUsageLimits, QueuedUsage, Quota, Store, StoredRequest, StoredResponse, SyncRecord,
};

use super::ManualClock;

/// The lease every test takes unless it says otherwise.
pub const LEASE_MS: u64 = 30_000;
const MAX_AGE_MS: u64 = 6 * 60 * 60 * 1000;

pub fn request(body: &[u8]) -> StoredRequest {
    StoredRequest {
        method: "POST".into(),
        path_and_query: "/sub/path?x=1&y=%20".into(),
        headers: vec![
            ("content-type".into(), b"text/plain".to_vec()),
            // Header values are bytes: not UTF-8, with a zero byte, must come back unchanged.
            ("x-binary".into(), vec![0xff, 0x00, 0x80, b'a']),
            ("x-repeated".into(), b"1".to_vec()),
            ("x-repeated".into(), b"2".to_vec()),
        ],
        body: body.to_vec(),
    }
}

/// An invocation of acme/hello, runnable at once, 3 attempts, 6 h max age.
pub fn invocation(id: &str) -> NewInvocation {
    NewInvocation {
        id: id.to_owned(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 1,
        request: request(b"payload"),
        idempotency_key: None,
        criticality: Criticality::Normal,
        run_after: 0,
        deadline: None,
        attempts_max: 3,
        max_age_ms: MAX_AGE_MS,
        in_order: None,
    }
}

/// `key` as `caller` sends it.
pub fn keyed_by(key: &str, caller: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey { key: key.into(), caller: caller.into() })
}

fn response(status: u16, body: &[u8]) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body.to_vec(),
    }
}

pub fn success(status: u16) -> AttemptResult {
    AttemptResult::Succeeded { response: response(status, b"{\"ok\":true}") }
}

pub fn failure(kind: &str, retry_at: Option<UnixMs>) -> AttemptResult {
    AttemptResult::Failed { error_kind: kind.into(), status_code: None, response: None, retry_at }
}

async fn get(store: &dyn Store, id: &str) -> Invocation {
    store.get_invocation(id).await.unwrap().unwrap_or_else(|| panic!("{id} exists"))
}

async fn status(store: &dyn Store, id: &str) -> InvocationStatus {
    get(store, id).await.status
}

async fn enqueue(store: &dyn Store, inv: &NewInvocation) {
    assert_eq!(store.enqueue(inv).await.unwrap(), Enqueued::Created, "{}", inv.id);
}

fn leased_ids(leased: &[sluice_store::Leased]) -> Vec<&str> {
    leased.iter().map(|l| l.id.as_str()).collect()
}

fn all_of(tenant: &str) -> InvocationFilter {
    InvocationFilter { tenant: tenant.into(), limit: 1_000, ..InvocationFilter::default() }
}

pub async fn async_invocations_run_and_keep_their_response(store: &dyn Store, clock: &ManualClock) {
    clock.set(1_000);
    let mut inv = invocation("inv-1");
    inv.version = 4;
    inv.request.body = vec![0, 1, 2, 255, 0];
    inv.criticality = Criticality::High;
    inv.deadline = Some(9_000);
    enqueue(store, &inv).await;

    let queued = get(store, "inv-1").await;
    let expected = Invocation {
        id: "inv-1".into(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 4,
        mode: "async".into(),
        status: InvocationStatus::Queued,
        attempts: 0,
        created_at: 1_000,
        started_at: None,
        finished_at: None,
        status_code: None,
        error_kind: None,
        cpu_us: None,
        waits: None,
        idempotency_key: None,
    };
    assert_eq!(queued, expected);
    assert_eq!(store.get_response("inv-1").await.unwrap(), None);

    clock.set(2_000);
    let leased = store.lease("node-a", 2_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    let lease = &leased[0];
    assert_eq!(
        (lease.id.as_str(), lease.tenant.as_str(), lease.function.as_str(), lease.version),
        ("inv-1", "acme", "hello", 4)
    );
    assert_eq!(lease.request, inv.request, "the request comes back byte for byte");
    assert_eq!((lease.attempt, lease.attempts_max), (1, 3));
    assert_eq!((lease.created_at, lease.max_age_ms), (1_000, MAX_AGE_MS));
    assert_eq!((lease.criticality, lease.deadline), (Criticality::High, Some(9_000)));
    assert_eq!(store.lease("node-b", 2_000, LEASE_MS, 10).await.unwrap(), vec![], "leased once");

    let running = get(store, "inv-1").await;
    assert_eq!(
        (running.status, running.attempts, running.started_at),
        (InvocationStatus::Running, 1, Some(2_000))
    );

    let answer = StoredResponse {
        status: 201,
        headers: vec![("x-binary".into(), vec![0xfe, 0x00]), ("x-empty".into(), vec![])],
        body: b"\x00created".to_vec(),
    };
    let logs =
        vec![(LogStream::Stdout, "one".to_owned(), 2_001), (LogStream::Stderr, "two".to_owned(), 2_002)];
    let done = AttemptResult::Succeeded { response: answer.clone() };
    assert!(
        store
            .complete(Completion { logs: &logs, cpu_us: 1_500, ..ended("inv-1", "node-a", 1, &done, 2_500) })
            .await
            .unwrap()
    );

    let finished = get(store, "inv-1").await;
    let expected = Invocation {
        status: InvocationStatus::Succeeded,
        attempts: 1,
        started_at: Some(2_000),
        finished_at: Some(2_500),
        status_code: Some(201),
        cpu_us: Some(1_500),
        // The lease records how long the call waited for its start (from its run_after, 0).
        waits: Some(r#"{"queued_ms":2000}"#.into()),
        ..expected
    };
    assert_eq!(finished, expected);
    assert_eq!(store.get_response("inv-1").await.unwrap(), Some(answer));
    let lines = store.invocation_logs("inv-1").await.unwrap();
    let got: Vec<_> = lines.iter().map(|l| (l.stream, l.line.as_str(), l.at)).collect();
    assert_eq!(got, [(LogStream::Stdout, "one", 2_001), (LogStream::Stderr, "two", 2_002)]);
    let tail = store.function_logs("acme", "hello", None, 10).await.unwrap();
    assert_eq!(tail.len(), 2);

    // Recorded exactly once: a second report of the same attempt changes nothing.
    let again = AttemptResult::Succeeded { response: response(500, b"no") };
    assert!(
        !store
            .complete(Completion { logs: &logs, ..ended("inv-1", "node-a", 1, &again, 3_000) })
            .await
            .unwrap()
    );
    assert_eq!(get(store, "inv-1").await, expected);
    assert_eq!(store.invocation_logs("inv-1").await.unwrap().len(), 2);
    assert_eq!(store.lease("node-a", 99_000, LEASE_MS, 10).await.unwrap(), vec![]);

    // An empty request round-trips too.
    let mut empty = invocation("inv-2");
    empty.request =
        StoredRequest { method: "GET".into(), path_and_query: "/".into(), headers: vec![], body: vec![] };
    enqueue(store, &empty).await;
    let leased = store.lease("node-a", 99_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased[0].request, empty.request);
}

pub async fn idempotency_keys_return_the_first_invocation(store: &dyn Store, clock: &ManualClock) {
    let keyed = |id: &str, tenant: &str, function: &str, key: &str| NewInvocation {
        tenant: tenant.into(),
        function: function.into(),
        idempotency_key: keyed_by(key, "key_a"),
        ..invocation(id)
    };
    clock.set(1_000);
    enqueue(store, &keyed("inv-1", "acme", "hello", "k1")).await;
    let repeat = store.enqueue(&keyed("inv-2", "acme", "hello", "k1")).await.unwrap();
    assert_eq!(repeat, Enqueued::Existing("inv-1".into()));
    assert_eq!(store.get_invocation("inv-2").await.unwrap(), None, "nothing stored");

    // Keys are per tenant and function; an invocation without a key is always new.
    enqueue(store, &keyed("inv-3", "acme", "other", "k1")).await;
    enqueue(store, &keyed("inv-4", "beta", "hello", "k1")).await;
    enqueue(store, &keyed("inv-5", "acme", "hello", "k2")).await;
    enqueue(store, &invocation("inv-6")).await;
    enqueue(store, &invocation("inv-7")).await;

    // The first invocation keeps its key after it finished...
    let leased = store.lease("node-a", 1_000, LEASE_MS, 100).await.unwrap();
    let first = leased.iter().find(|l| l.id == "inv-1").unwrap();
    assert!(store.complete(ended("inv-1", "node-a", first.attempt, &success(200), 1_100)).await.unwrap());
    clock.set(1_000 + IDEMPOTENCY_WINDOW_MS - 1);
    let repeat = store.enqueue(&keyed("inv-8", "acme", "hello", "k1")).await.unwrap();
    assert_eq!(repeat, Enqueued::Existing("inv-1".into()));

    // ... for the window, and no longer: then the key starts over with a new first invocation.
    clock.set(1_000 + IDEMPOTENCY_WINDOW_MS);
    enqueue(store, &keyed("inv-9", "acme", "hello", "k1")).await;
    let repeat = store.enqueue(&keyed("inv-10", "acme", "hello", "k1")).await.unwrap();
    assert_eq!(repeat, Enqueued::Existing("inv-9".into()));
    assert_eq!(store.get_invocation("inv-10").await.unwrap(), None);
    assert_eq!(status(store, "inv-1").await, InvocationStatus::Succeeded);
}

/// A key belongs to its caller: another caller's same key is another invocation, so no caller
/// can turn someone else's call into a replay of its own. And a key names one request: the same
/// caller sending it with a different method, path or body is refused, and nothing is stored.
pub async fn idempotency_keys_belong_to_their_caller_and_their_request(
    store: &dyn Store,
    clock: &ManualClock,
) {
    let keyed = |id: &str, caller: &str, body: &[u8]| NewInvocation {
        idempotency_key: keyed_by("evt_124", caller),
        request: request(body),
        ..invocation(id)
    };
    clock.set(1_000);
    enqueue(store, &keyed("forged", "anonymous", b"forged")).await;
    enqueue(store, &keyed("real", "key_a", b"real")).await;
    enqueue(store, &keyed("other", "key_b", b"forged")).await;
    let again = store.enqueue(&keyed("again", "key_a", b"real")).await.unwrap();
    assert_eq!(again, Enqueued::Existing("real".into()), "same caller, same request");

    let body = store.enqueue(&keyed("body", "key_a", b"real, changed")).await.unwrap();
    assert_eq!(body, Enqueued::KeyReused { first: "real".into(), differs: vec!["body"] });
    let mut put = keyed("put", "key_a", b"real");
    put.request.method = "PUT".into();
    put.request.path_and_query = "/sub/path?x=2".into();
    let put = store.enqueue(&put).await.unwrap();
    assert_eq!(put, Enqueued::KeyReused { first: "real".into(), differs: vec!["method", "path"] });
    for refused in ["again", "body", "put"] {
        assert_eq!(store.get_invocation(refused).await.unwrap(), None, "{refused} stored nothing");
    }
    // Headers are not part of the fingerprint (a retry may carry a new date or trace).
    let mut traced = keyed("traced", "anonymous", b"forged");
    traced.request.headers.push(("traceparent".into(), b"00-01-02-01".to_vec()));
    assert_eq!(store.enqueue(&traced).await.unwrap(), Enqueued::Existing("forged".into()));

    // Two requests of one caller with one key in the same group commit: the first is created,
    // the other compared with it.
    let pair = [keyed("one", "key_c", b"1"), keyed("two", "key_c", b"2")];
    let results = futures::future::join_all(pair.iter().map(|inv| store.enqueue(inv))).await;
    let results: Vec<Enqueued> = results.into_iter().map(Result::unwrap).collect();
    let created: Vec<&str> = pair
        .iter()
        .zip(&results)
        .filter(|(_, r)| **r == Enqueued::Created)
        .map(|(i, _)| i.id.as_str())
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    let loser = if created[0] == "one" { 1 } else { 0 };
    let expected = Enqueued::KeyReused { first: created[0].into(), differs: vec!["body"] };
    assert_eq!(results[loser], expected);

    // Out of the window the key starts over, for a new request too.
    clock.set(1_000 + IDEMPOTENCY_WINDOW_MS);
    enqueue(store, &keyed("next-day", "key_a", b"another")).await;
}

pub async fn concurrent_enqueues_with_one_key_create_one_invocation(store: &dyn Store, _clock: &ManualClock) {
    const CALLS: usize = 40;
    let invocations: Vec<NewInvocation> = (0..CALLS)
        .map(|i| NewInvocation {
            idempotency_key: keyed_by("same", "key_a"),
            ..invocation(&format!("inv-{i:02}"))
        })
        .collect();
    let results: Vec<Enqueued> = futures::future::join_all(invocations.iter().map(|inv| store.enqueue(inv)))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let created: Vec<&NewInvocation> = invocations
        .iter()
        .zip(&results)
        .filter(|(_, r)| **r == Enqueued::Created)
        .map(|(inv, _)| inv)
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    let winner = &created[0].id;
    for result in &results {
        assert!(*result == Enqueued::Created || *result == Enqueued::Existing(winner.clone()), "{result:?}");
    }
    let stored = store.list_invocations(&all_of("acme")).await.unwrap();
    assert_eq!(leased_ids_of(&stored), [winner.as_str()]);
}

fn leased_ids_of(invocations: &[Invocation]) -> Vec<&str> {
    invocations.iter().map(|i| i.id.as_str()).collect()
}

pub async fn leases_follow_criticality_then_deadline_then_run_after(store: &dyn Store, _clock: &ManualClock) {
    let with = |id: &str, criticality: Criticality, deadline: Option<UnixMs>, run_after: UnixMs| {
        NewInvocation { criticality, deadline, run_after, ..invocation(id) }
    };
    // Enqueued in an order unrelated to the lease order.
    let all = [
        with("low-b", Criticality::Low, None, 0),
        with("normal-late", Criticality::Normal, None, 10),
        with("future", Criticality::High, None, 10_000),
        with("normal-far-deadline", Criticality::Normal, Some(1_000_000), 20),
        with("low-a", Criticality::Low, None, 0),
        with("normal-early", Criticality::Normal, None, 5),
        with("normal-near-deadline", Criticality::Normal, Some(500_000), 30),
        with("high", Criticality::High, None, 40),
    ];
    for inv in &all {
        enqueue(store, inv).await;
    }
    let first = store.lease("node-a", 100, LEASE_MS, 3).await.unwrap();
    assert_eq!(leased_ids(&first), ["high", "normal-near-deadline", "normal-far-deadline"]);
    let rest = store.lease("node-a", 100, LEASE_MS, 100).await.unwrap();
    assert_eq!(leased_ids(&rest), ["normal-early", "normal-late", "low-a", "low-b"]);
    // `run_after` is a floor: not a millisecond early.
    assert_eq!(store.lease("node-a", 9_999, LEASE_MS, 100).await.unwrap(), vec![]);
    let later = store.lease("node-a", 10_000, LEASE_MS, 100).await.unwrap();
    assert_eq!(leased_ids(&later), ["future"]);
    assert_eq!(store.lease("node-a", 10_000, LEASE_MS, 0).await.unwrap(), vec![]);
}

pub async fn a_closed_start_window_expires_the_invocation(store: &dyn Store, clock: &ManualClock) {
    // One that failed an attempt and waits for its retry also expires with its window.
    enqueue(store, &NewInvocation { deadline: Some(2_000), ..invocation("retrying") }).await;
    let leased = store.lease("node-a", 0, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased_ids(&leased), ["retrying"]);
    assert!(
        store.complete(ended("retrying", "node-a", 1, &failure("trap", Some(1_500)), 100)).await.unwrap()
    );

    clock.set(100);
    enqueue(store, &NewInvocation { deadline: Some(1_000), ..invocation("late") }).await;
    enqueue(store, &NewInvocation { deadline: Some(5_000), ..invocation("in-time") }).await;
    enqueue(store, &NewInvocation { deadline: Some(3_000), ..invocation("edge") }).await;

    let leased = store.lease("node-a", 2_500, LEASE_MS, 1).await.unwrap();
    assert_eq!(leased_ids(&leased), ["edge"]);
    let late = get(store, "late").await;
    assert_eq!(
        (late.status, late.attempts, late.started_at, late.finished_at, late.error_kind.as_deref()),
        (InvocationStatus::Expired, 0, None, Some(2_500), Some("expired"))
    );
    let retrying = get(store, "retrying").await;
    assert_eq!((retrying.status, retrying.attempts), (InvocationStatus::Expired, 1));
    // The deadline itself is still inside the window.
    let leased = store.lease("node-a", 5_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased_ids(&leased), ["in-time"]);
    assert_eq!(status(store, "late").await, InvocationStatus::Expired, "final");
}

pub async fn an_expired_lease_is_reclaimed_and_its_old_owner_fenced(store: &dyn Store, _clock: &ManualClock) {
    enqueue(store, &invocation("inv-1")).await;
    let a = store.lease("node-a", 0, 1_000, 10).await.unwrap();
    assert_eq!(a[0].attempt, 1);

    // A heartbeat keeps the lease; it names the leases the owner does not hold: another owner's,
    // an unknown id, and the right id with another attempt (the fencing token).
    let lease = |id: &str, attempt: u32| (id.to_string(), attempt);
    let not_held =
        store.heartbeat("node-a", &[lease("inv-1", 1), lease("nope", 1)], 1_000, 1_000).await.unwrap();
    assert_eq!(not_held, [lease("nope", 1)]);
    assert_eq!(
        store.heartbeat("node-b", &[lease("inv-1", 1)], 1_000, 8_000).await.unwrap(),
        [lease("inv-1", 1)]
    );
    assert_eq!(
        store.heartbeat("node-a", &[lease("inv-1", 2)], 1_000, 8_000).await.unwrap(),
        [lease("inv-1", 2)]
    );
    assert_eq!(store.lease("node-b", 1_500, 1_000, 10).await.unwrap(), vec![]);
    assert_eq!(store.lease("node-b", 2_000, 1_000, 10).await.unwrap(), vec![], "held up to its end");

    let b = store.lease("node-b", 2_001, 1_000, 10).await.unwrap();
    assert_eq!(leased_ids(&b), ["inv-1"]);
    assert_eq!(b[0].attempt, 2, "the lost attempt counts");
    assert_eq!(
        store.heartbeat("node-a", &[lease("inv-1", 1)], 2_001, 7_000).await.unwrap(),
        [lease("inv-1", 1)]
    );
    // Node-b holds attempt 2: attempt 1's token renews nothing, even for node-b.
    assert_eq!(
        store.heartbeat("node-b", &[lease("inv-1", 1)], 2_001, 7_000).await.unwrap(),
        [lease("inv-1", 1)]
    );
    assert!(store.heartbeat("node-b", &[lease("inv-1", 2)], 2_001, 1_000).await.unwrap().is_empty());

    // The old owner's report is refused, whatever it says; so is a wrong attempt number.
    assert!(!store.complete(ended("inv-1", "node-a", 1, &success(200), 2_100)).await.unwrap());
    assert!(!store.complete(ended("inv-1", "node-b", 1, &success(200), 2_100)).await.unwrap());
    assert!(!store.complete(ended("inv-1", "node-a", 2, &success(200), 2_100)).await.unwrap());
    let running = get(store, "inv-1").await;
    assert_eq!((running.status, running.attempts), (InvocationStatus::Running, 2));
    assert_eq!(store.get_response("inv-1").await.unwrap(), None);

    let logs = [(LogStream::Stdout, "done".to_owned(), 2_200)];
    assert!(
        store
            .complete(Completion { logs: &logs, ..ended("inv-1", "node-b", 2, &success(200), 2_200) })
            .await
            .unwrap()
    );
    let done = get(store, "inv-1").await;
    assert_eq!((done.status, done.attempts, done.started_at), (InvocationStatus::Succeeded, 2, Some(0)));
    assert_eq!(store.invocation_logs("inv-1").await.unwrap().len(), 1);
}

pub async fn a_reclaimed_invocation_past_its_deadline_expires(store: &dyn Store, _clock: &ManualClock) {
    enqueue(store, &NewInvocation { deadline: Some(5_000), attempts_max: 3, ..invocation("late") }).await;
    enqueue(store, &NewInvocation { deadline: Some(50_000), attempts_max: 3, ..invocation("in-time") }).await;
    assert_eq!(store.lease("node-a", 0, 1_000, 10).await.unwrap().len(), 2);
    // Node-a died; when the leases are reclaimed, one start window has closed.
    let again = store.lease("node-b", 6_000, 1_000, 10).await.unwrap();
    assert_eq!(leased_ids(&again), ["in-time"], "a new attempt would start past the deadline");
    let late = get(store, "late").await;
    assert_eq!(
        (late.status, late.attempts, late.error_kind.as_deref(), late.finished_at),
        (InvocationStatus::Expired, 1, Some("expired"), Some(6_000))
    );
}

pub async fn concurrent_reports_of_one_attempt_are_recorded_once(store: &dyn Store, _clock: &ManualClock) {
    enqueue(store, &invocation("inv-1")).await;
    store.lease("node-a", 0, LEASE_MS, 10).await.unwrap();
    let first = [(LogStream::Stdout, "first".to_owned(), 1)];
    let second = [(LogStream::Stdout, "second".to_owned(), 2)];
    let (ok, created) = (success(200), success(201));
    let (one, two) = futures::join!(
        store.complete(Completion { logs: &first, ..ended("inv-1", "node-a", 1, &ok, 10) }),
        store.complete(Completion { logs: &second, ..ended("inv-1", "node-a", 1, &created, 10) }),
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert!(one ^ two, "exactly one report is recorded: {one} {two}");
    let lines = store.invocation_logs("inv-1").await.unwrap();
    assert_eq!(lines.len(), 1);
    let code = get(store, "inv-1").await.status_code;
    let winner = if one { ("first", Some(200)) } else { ("second", Some(201)) };
    assert_eq!((lines[0].line.as_str(), code), winner, "logs and state come from the same report");
}

pub async fn failed_attempts_are_retried_until_attempts_run_out(store: &dyn Store, clock: &ManualClock) {
    enqueue(store, &invocation("inv-1")).await;
    assert_eq!(store.lease("node-a", 0, LEASE_MS, 10).await.unwrap()[0].attempt, 1);
    let with_response = AttemptResult::Failed {
        error_kind: "trap".into(),
        status_code: Some(500),
        response: Some(response(500, b"oops")),
        retry_at: Some(1_000),
    };
    assert!(store.complete(ended("inv-1", "node-a", 1, &with_response, 100)).await.unwrap());
    let failed = get(store, "inv-1").await;
    assert_eq!(
        (
            failed.status,
            failed.attempts,
            failed.status_code,
            failed.error_kind.as_deref(),
            failed.finished_at
        ),
        (InvocationStatus::Failed, 1, Some(500), Some("trap"), None)
    );
    assert_eq!(store.get_response("inv-1").await.unwrap(), Some(response(500, b"oops")));

    assert_eq!(store.lease("node-a", 999, LEASE_MS, 10).await.unwrap(), vec![], "not before retry_at");
    let second = store.lease("node-b", 1_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(second[0].attempt, 2);
    assert!(
        store.complete(ended("inv-1", "node-b", 2, &failure("timeout", Some(3_000)), 1_500)).await.unwrap()
    );
    // The stored response is the last attempt's, and this one had none.
    assert_eq!(store.get_response("inv-1").await.unwrap(), None);
    assert_eq!(get(store, "inv-1").await.error_kind.as_deref(), Some("timeout"));

    let third = store.lease("node-a", 3_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(third[0].attempt, 3);
    // A retry asked for with no attempt left is not granted: dead now.
    assert!(store.complete(ended("inv-1", "node-a", 3, &failure("trap", Some(5_000)), 3_500)).await.unwrap());
    let dead = get(store, "inv-1").await;
    assert_eq!(
        (dead.status, dead.attempts, dead.finished_at, dead.error_kind.as_deref()),
        (InvocationStatus::Dead, 3, Some(3_500), Some("trap"))
    );
    assert_eq!(store.lease("node-a", 99_000, LEASE_MS, 10).await.unwrap(), vec![]);

    // A failure without retry_at is dead at once.
    clock.set(100_000);
    enqueue(store, &invocation("inv-2")).await;
    store.lease("node-a", 100_000, LEASE_MS, 10).await.unwrap();
    assert!(
        store.complete(ended("inv-2", "node-a", 1, &failure("bad_request", None), 100_001)).await.unwrap()
    );
    let dead = get(store, "inv-2").await;
    assert_eq!((dead.status, dead.attempts), (InvocationStatus::Dead, 1));

    // So is one whose retry would start after the invocation is too old.
    enqueue(store, &NewInvocation { max_age_ms: 10_000, ..invocation("inv-3") }).await;
    store.lease("node-a", 100_000, LEASE_MS, 10).await.unwrap();
    assert!(
        store.complete(ended("inv-3", "node-a", 1, &failure("trap", Some(200_000)), 100_001)).await.unwrap()
    );
    assert_eq!(status(store, "inv-3").await, InvocationStatus::Dead);
}

pub async fn attempts_never_exceed_attempts_max_when_leases_are_lost(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    enqueue(store, &NewInvocation { attempts_max: 2, ..invocation("lost") }).await;
    assert_eq!(store.lease("node-a", 0, 100, 10).await.unwrap()[0].attempt, 1);
    assert_eq!(store.lease("node-b", 101, 100, 10).await.unwrap()[0].attempt, 2);
    assert_eq!(store.lease("node-a", 202, 100, 10).await.unwrap(), vec![]);
    let dead = get(store, "lost").await;
    assert_eq!(
        (dead.status, dead.attempts, dead.finished_at, dead.error_kind.as_deref()),
        (InvocationStatus::Dead, 2, Some(202), Some("lease_lost"))
    );
    assert!(!store.complete(ended("lost", "node-b", 2, &success(200), 203)).await.unwrap());

    // A lost last attempt after a real failure keeps the failure's kind.
    enqueue(store, &NewInvocation { attempts_max: 2, ..invocation("trapped") }).await;
    store.lease("node-a", 1_000, 100, 10).await.unwrap();
    assert!(
        store.complete(ended("trapped", "node-a", 1, &failure("trap", Some(1_000)), 1_000)).await.unwrap()
    );
    assert_eq!(store.lease("node-a", 1_000, 100, 10).await.unwrap()[0].attempt, 2);
    assert_eq!(store.lease("node-b", 1_101, 100, 10).await.unwrap(), vec![]);
    let dead = get(store, "trapped").await;
    assert_eq!(
        (dead.status, dead.attempts, dead.error_kind.as_deref()),
        (InvocationStatus::Dead, 2, Some("trap"))
    );
}

pub async fn invocations_past_their_max_age_die(store: &dyn Store, _clock: &ManualClock) {
    enqueue(store, &NewInvocation { max_age_ms: 1_000, run_after: 5_000, ..invocation("waiting") }).await;
    enqueue(store, &NewInvocation { max_age_ms: 1_000, ..invocation("running") }).await;
    enqueue(store, &NewInvocation { run_after: 1_000, ..invocation("young") }).await;
    assert_eq!(leased_ids(&store.lease("node-a", 0, 500, 10).await.unwrap()), ["running"]);
    // `running` lost its lease and is too old to start again; `waiting` never got to start.
    let leased = store.lease("node-b", 1_001, 500, 10).await.unwrap();
    assert_eq!(leased_ids(&leased), ["young"]);
    for id in ["waiting", "running"] {
        let dead = get(store, id).await;
        assert_eq!(
            (dead.status, dead.error_kind.as_deref(), dead.finished_at),
            (InvocationStatus::Dead, Some("max_age"), Some(1_001)),
            "{id}"
        );
    }
    assert_eq!(store.lease("node-b", 1_200, 500, 10).await.unwrap(), vec![], "dead is final");
}

pub async fn released_leases_do_not_count_as_attempts(store: &dyn Store, _clock: &ManualClock) {
    enqueue(store, &invocation("inv-1")).await;
    enqueue(store, &invocation("inv-2")).await;
    assert_eq!(store.lease("node-a", 0, LEASE_MS, 10).await.unwrap().len(), 2);
    store.release("node-a", &[("inv-1".into(), 1), ("nope".into(), 1)]).await.unwrap();
    store.release("node-b", &[("inv-2".into(), 1)]).await.unwrap();
    store.release("node-a", &[("inv-2".into(), 2)]).await.unwrap();
    store.release("node-a", &[]).await.unwrap();

    let released = get(store, "inv-1").await;
    assert_eq!(
        (released.status, released.attempts, released.started_at),
        (InvocationStatus::Queued, 0, None)
    );
    assert_eq!(status(store, "inv-2").await, InvocationStatus::Running, "not node-b's to release");
    assert!(!store.complete(ended("inv-1", "node-a", 1, &success(200), 10)).await.unwrap());

    let again = store.lease("node-b", 10, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased_ids(&again), ["inv-1"]);
    assert_eq!(again[0].attempt, 1);
    assert!(store.complete(ended("inv-1", "node-b", 1, &success(200), 20)).await.unwrap());
}

pub async fn dead_and_expired_invocations_can_be_redriven(store: &dyn Store, clock: &ManualClock) {
    enqueue(store, &NewInvocation { attempts_max: 1, max_age_ms: 1_000, ..invocation("dead") }).await;
    enqueue(store, &NewInvocation { deadline: Some(50), run_after: 100, ..invocation("expired") }).await;
    enqueue(store, &invocation("done")).await;
    let leased = store.lease("node-a", 0, LEASE_MS, 10).await.unwrap();
    assert_eq!(leased_ids(&leased), ["dead", "done"]);
    let with_response = AttemptResult::Failed {
        error_kind: "trap".into(),
        status_code: Some(500),
        response: Some(response(500, b"oops")),
        retry_at: None,
    };
    assert!(store.complete(ended("dead", "node-a", 1, &with_response, 10)).await.unwrap());
    assert!(store.complete(ended("done", "node-a", 1, &success(200), 10)).await.unwrap());
    assert_eq!(store.lease("node-a", 100, LEASE_MS, 10).await.unwrap(), vec![]);
    assert_eq!(status(store, "expired").await, InvocationStatus::Expired);
    let sync = SyncRecord {
        id: "sync".into(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 1,
        status: InvocationStatus::Dead,
        status_code: Some(500),
        error_kind: Some("trap".into()),
        started_at: 0,
        finished_at: 5,
        cpu_us: 0,
        logs: vec![],
    };
    store.record_sync(&[sync]).await.unwrap();

    // Long after both would be too old: a re-drive starts the age over.
    clock.set(1_000_000);
    assert!(store.retry_dead("dead", 1_000_000).await.unwrap());
    assert!(store.retry_dead("expired", 1_000_000).await.unwrap());
    assert!(!store.retry_dead("dead", 1_000_000).await.unwrap(), "already queued");
    assert!(!store.retry_dead("done", 1_000_000).await.unwrap());
    assert!(!store.retry_dead("sync", 1_000_000).await.unwrap(), "a sync call has no request to replay");
    assert!(!store.retry_dead("nope", 1_000_000).await.unwrap());

    let redriven = get(store, "dead").await;
    assert_eq!(
        (
            redriven.status,
            redriven.attempts,
            redriven.started_at,
            redriven.finished_at,
            redriven.status_code,
            redriven.error_kind
        ),
        (InvocationStatus::Queued, 0, None, None, None, None)
    );
    assert_eq!(store.get_response("dead").await.unwrap(), None);
    assert_eq!(store.lease("node-a", 999_999, LEASE_MS, 10).await.unwrap(), vec![], "run_after is now");
    let leased = store.lease("node-a", 1_000_500, LEASE_MS, 10).await.unwrap();
    let mut ids = leased_ids(&leased);
    ids.sort_unstable();
    assert_eq!(ids, ["dead", "expired"]);
    assert!(leased.iter().all(|l| l.attempt == 1 && l.deadline.is_none()));
    assert!(leased.iter().all(|l| l.created_at + l.max_age_ms as i64 > 1_000_500), "{leased:?}");
    assert!(store.complete(ended("dead", "node-a", 1, &success(200), 1_000_600)).await.unwrap());
}

pub async fn invocations_are_listed_newest_first_by_filter_and_page(store: &dyn Store, _clock: &ManualClock) {
    for i in 1..=10 {
        let function = if i % 2 == 0 { "even" } else { "odd" };
        enqueue(store, &NewInvocation { function: function.into(), ..invocation(&format!("inv-{i:02}")) })
            .await;
    }
    enqueue(store, &NewInvocation { tenant: "beta".into(), ..invocation("inv-99") }).await;
    let sync = SyncRecord {
        id: "inv-00".into(),
        tenant: "acme".into(),
        function: "even".into(),
        version: 1,
        status: InvocationStatus::Succeeded,
        status_code: Some(200),
        error_kind: None,
        started_at: 0,
        finished_at: 1,
        cpu_us: 0,
        logs: vec![],
    };
    store.record_sync(&[sync]).await.unwrap();
    let leased = store.lease("node-a", 0, LEASE_MS, 3).await.unwrap();
    for l in &leased {
        assert!(store.complete(ended(&l.id, "node-a", 1, &success(200), 5)).await.unwrap());
    }

    let list = |filter: InvocationFilter| async move { store.list_invocations(&filter).await.unwrap() };
    let everything = list(all_of("acme")).await;
    let expected: Vec<String> = (0..=10).rev().map(|i| format!("inv-{i:02}")).collect();
    assert_eq!(leased_ids_of(&everything), expected);
    assert_eq!(everything[0], get(store, "inv-10").await);
    assert_eq!(leased_ids_of(&list(all_of("beta")).await), ["inv-99"]);
    assert_eq!(list(all_of("nope")).await, vec![]);

    let even = list(InvocationFilter { function: Some("even".into()), ..all_of("acme") }).await;
    assert_eq!(leased_ids_of(&even), ["inv-10", "inv-08", "inv-06", "inv-04", "inv-02", "inv-00"]);
    let succeeded =
        list(InvocationFilter { status: Some(InvocationStatus::Succeeded), ..all_of("acme") }).await;
    let mut done: Vec<&str> = leased.iter().map(|l| l.id.as_str()).collect();
    done.push("inv-00");
    done.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(leased_ids_of(&succeeded), done);
    let odd_queued = list(InvocationFilter {
        function: Some("odd".into()),
        status: Some(InvocationStatus::Queued),
        ..all_of("acme")
    })
    .await;
    assert!(odd_queued.iter().all(|i| i.function == "odd" && i.status == InvocationStatus::Queued));
    assert_eq!(odd_queued.len(), 5 - leased.iter().filter(|l| l.function == "odd").count());

    // Pages with the cursor add up to the whole list, each at most `limit` long.
    let mut paged = Vec::new();
    let mut before_id = None;
    loop {
        let page = list(InvocationFilter { before_id: before_id.clone(), limit: 4, ..all_of("acme") }).await;
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        before_id = Some(last.id.clone());
        paged.extend(page);
    }
    assert_eq!(paged, everything);
    assert_eq!(list(InvocationFilter { limit: 0, ..all_of("acme") }).await, vec![]);
}

pub async fn purge_deletes_finished_invocations_before_the_cutoff(store: &dyn Store, clock: &ManualClock) {
    enqueue(store, &NewInvocation { idempotency_key: keyed_by("k1", "key_a"), ..invocation("done") }).await;
    enqueue(store, &invocation("running")).await;
    store.lease("node-a", 0, LEASE_MS, 10).await.unwrap();
    let logs = [(LogStream::Stdout, "bye".to_owned(), 90)];
    assert!(
        store
            .complete(Completion { logs: &logs, ..ended("done", "node-a", 1, &success(200), 100) })
            .await
            .unwrap()
    );
    enqueue(store, &NewInvocation { deadline: Some(150), ..invocation("expired") }).await;
    store.lease("node-a", 200, LEASE_MS, 0).await.unwrap();
    assert_eq!(status(store, "expired").await, InvocationStatus::Expired);
    let sync = |id: &str, finished_at: UnixMs| SyncRecord {
        id: id.into(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 1,
        status: InvocationStatus::Succeeded,
        status_code: Some(200),
        error_kind: None,
        started_at: finished_at - 5,
        finished_at,
        cpu_us: 0,
        logs: vec![(LogStream::Stdout, format!("{id} says hi"), finished_at)],
    };
    store.record_sync(&[sync("sync-old", 50), sync("sync-new", 500)]).await.unwrap();

    clock.set(1_000);
    assert_eq!(store.purge(300, 2).await.unwrap(), 2, "at most `limit`, oldest first");
    assert_eq!(store.get_invocation("sync-old").await.unwrap(), None);
    assert_eq!(store.get_invocation("done").await.unwrap(), None);
    assert_eq!(store.invocation_logs("done").await.unwrap(), vec![]);
    assert_eq!(store.invocation_logs("sync-old").await.unwrap(), vec![]);
    assert_eq!(store.get_response("done").await.unwrap(), None);
    assert_eq!(store.purge(300, 100).await.unwrap(), 1);
    assert_eq!(store.get_invocation("expired").await.unwrap(), None);
    assert_eq!(store.purge(300, 100).await.unwrap(), 0);
    // Unfinished and newer rows stay.
    assert_eq!(status(store, "running").await, InvocationStatus::Running);
    assert_eq!(store.invocation_logs("sync-new").await.unwrap().len(), 1);

    // The key outlives its purged invocation for the window, then goes.
    let repeat = NewInvocation { idempotency_key: keyed_by("k1", "key_a"), ..invocation("repeat") };
    assert_eq!(store.enqueue(&repeat).await.unwrap(), Enqueued::Existing("done".into()));
    clock.set(IDEMPOTENCY_WINDOW_MS);
    assert_eq!(store.purge(0, 100).await.unwrap(), 1, "the key");
    assert_eq!(store.purge(0, 100).await.unwrap(), 0);
    enqueue(store, &repeat).await;
}

pub async fn many_concurrent_enqueues_are_all_stored(store: &dyn Store, _clock: &ManualClock) {
    const CALLS: usize = 500;
    let invocations: Vec<NewInvocation> = (0..CALLS).map(|i| invocation(&format!("inv-{i:04}"))).collect();
    let results = futures::future::join_all(invocations.iter().map(|inv| store.enqueue(inv))).await;
    assert!(results.into_iter().all(|r| r.unwrap() == Enqueued::Created));
    let listed = store.list_invocations(&all_of("acme")).await.unwrap();
    assert_eq!(listed.len(), CALLS);
    assert!(listed.iter().all(|i| i.status == InvocationStatus::Queued));

    // And they all run, each once.
    let mut seen = HashSet::new();
    let ok = success(200);
    loop {
        let leased = store.lease("node-a", 0, LEASE_MS, 128).await.unwrap();
        if leased.is_empty() {
            break;
        }
        let done = futures::future::join_all(
            leased.iter().map(|l| store.complete(ended(&l.id, "node-a", l.attempt, &ok, 1))),
        )
        .await;
        assert!(done.into_iter().all(|d| d.unwrap()));
        for l in leased {
            assert!(seen.insert(l.id));
        }
    }
    assert_eq!(seen.len(), CALLS);
    let succeeded = store
        .list_invocations(&InvocationFilter { status: Some(InvocationStatus::Succeeded), ..all_of("acme") })
        .await
        .unwrap();
    assert_eq!(succeeded.len(), CALLS);
}

pub async fn an_enqueue_with_a_taken_id_fails_alone(store: &dyn Store, _clock: &ManualClock) {
    const CALLS: usize = 50;
    enqueue(store, &invocation("taken")).await;
    let mut invocations: Vec<NewInvocation> =
        (0..CALLS).map(|i| invocation(&format!("inv-{i:02}"))).collect();
    // In the middle of a burst, so that it most likely shares a transaction with the others.
    invocations[CALLS / 2] = NewInvocation { version: 9, ..invocation("taken") };
    let results = futures::future::join_all(invocations.iter().map(|inv| store.enqueue(inv))).await;
    for (inv, result) in invocations.iter().zip(results) {
        if inv.id == "taken" {
            assert!(matches!(result, Err(sluice_store::StoreError::Conflict(_))), "{result:?}");
        } else {
            assert_eq!(result.unwrap(), Enqueued::Created);
        }
    }
    assert_eq!(get(store, "taken").await.version, 1, "the first one is untouched");
    assert_eq!(store.list_invocations(&all_of("acme")).await.unwrap().len(), CALLS);
}

/// An invocation of `tenant/function` with a deadline (or none) and a criticality.
fn of(
    id: &str,
    tenant: &str,
    function: &str,
    criticality: Criticality,
    deadline: Option<UnixMs>,
) -> NewInvocation {
    NewInvocation {
        tenant: tenant.into(),
        function: function.into(),
        criticality,
        deadline,
        ..invocation(id)
    }
}

fn ask(tenant: &str, class: LeaseClass, limit: u32) -> LeaseAsk {
    LeaseAsk { tenant: tenant.into(), function: None, exclude: vec![], class, limit }
}

pub async fn lease_asks_take_one_tenants_class_in_its_order(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let now = 1_000;
    let ahead = 10_000; // due: a deadline at or before 11_000
    for inv in [
        of("plain-low", "acme", "f", Criticality::Low, None),
        of("plain-high", "acme", "f", Criticality::High, None),
        of("plain-other-fn", "acme", "g", Criticality::High, None),
        of("due-late", "acme", "f", Criticality::High, Some(11_000)),
        of("due-early", "acme", "f", Criticality::Low, Some(5_000)),
        of("window-low", "acme", "f", Criticality::Low, Some(50_000)),
        of("window-high", "acme", "f", Criticality::High, Some(900_000)),
        of("beta-plain", "beta", "f", Criticality::High, None),
    ] {
        enqueue(store, &inv).await;
    }
    let demand = store.queue_demand(now, ahead, 100).await.unwrap();
    let counts: Vec<(&str, u32, u32, u32)> =
        demand.tenants.iter().map(|d| (d.tenant.as_str(), d.due, d.plain, d.deferrable)).collect();
    assert_eq!(counts, [("acme", 2, 3, 2), ("beta", 0, 1, 0)]);
    // Counts stop at the cap.
    let capped = store.queue_demand(now, ahead, 1).await.unwrap();
    assert_eq!((capped.tenants[0].due, capped.tenants[0].plain, capped.tenants[0].deferrable), (1, 1, 1));
    assert!(demand.running.is_empty());

    // Due: earliest deadline first, whatever the criticality. Plain: criticality order, here
    // without function g. Deferrable: criticality then deadline.
    let mut plain = ask("acme", LeaseClass::Plain, 10);
    plain.exclude = vec!["g".into()];
    let got = store
        .lease_asks(
            "node-a",
            now,
            LEASE_MS,
            ahead,
            &[ask("acme", LeaseClass::Due, 1), plain, ask("acme", LeaseClass::Deferrable, 10)],
        )
        .await
        .unwrap();
    let ids: Vec<Vec<&str>> = got.iter().map(|l| leased_ids(l)).collect();
    assert_eq!(ids, [vec!["due-early"], vec!["plain-high", "plain-low"], vec!["window-high", "window-low"]]);
    // Only g's call and the later due one are left of acme's; a function ask takes only its own.
    let only_g = LeaseAsk { function: Some("g".into()), ..ask("acme", LeaseClass::Plain, 10) };
    let got = store.lease_asks("node-a", now, LEASE_MS, ahead, &[only_g]).await.unwrap();
    assert_eq!(leased_ids(&got[0]), ["plain-other-fn"]);
    let demand = store.queue_demand(now, ahead, 100).await.unwrap();
    let counts: Vec<(&str, u32, u32, u32)> =
        demand.tenants.iter().map(|d| (d.tenant.as_str(), d.due, d.plain, d.deferrable)).collect();
    assert_eq!(counts, [("acme", 1, 0, 0), ("beta", 0, 1, 0)]);
    assert_eq!(demand.running, [("acme".to_string(), "f".to_string(), 5), ("acme".into(), "g".into(), 1)]);
    let queue = store.tenant_queue("acme", now).await.unwrap();
    assert_eq!((queue.running, queue.runnable, queue.runnable_windowed, queue.later), (6, 1, 1, 0));
    // The cluster's depth by (status, criticality), for /metrics.
    let depth: Vec<(String, Criticality, u64)> = store.queue_depth().await.unwrap();
    assert_eq!(
        depth,
        [
            ("queued".to_string(), Criticality::High, 2),
            ("running".to_string(), Criticality::High, 3),
            ("running".to_string(), Criticality::Low, 3),
        ]
    );

    // Why they waited is recorded for the attempt that was leased, and only for it.
    store
        .record_waits(&[
            ("due-early".into(), 1, r#"{"queued_ms":5,"quota_ms":3}"#.into()),
            ("plain-low".into(), 2, r#"{"queued_ms":9}"#.into()),
        ])
        .await
        .unwrap();
    assert_eq!(get(store, "due-early").await.waits.as_deref(), Some(r#"{"queued_ms":5,"quota_ms":3}"#));
    // The other attempt keeps what its lease recorded: how long it waited, no reasons.
    let lease_recorded = get(store, "plain-low").await.waits.unwrap();
    assert!(
        lease_recorded.starts_with(r#"{"queued_ms":"#) && !lease_recorded.contains("quota"),
        "{lease_recorded}"
    );
}

pub async fn tenant_quotas_are_set_replaced_and_cleared(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    assert_eq!(store.tenant_quotas().await.unwrap(), vec![]);
    store.set_tenant_quota("acme", Some(Quota { reserved: 4, weight: 2 })).await.unwrap();
    store.set_tenant_quota("beta", Some(Quota { reserved: 0, weight: 5 })).await.unwrap();
    store.set_tenant_quota("acme", Some(Quota { reserved: 8, weight: 1 })).await.unwrap();
    assert_eq!(
        store.tenant_quotas().await.unwrap(),
        vec![
            ("acme".to_string(), Quota { reserved: 8, weight: 1 }),
            ("beta".into(), Quota { reserved: 0, weight: 5 })
        ]
    );
    store.set_tenant_quota("beta", None).await.unwrap();
    assert_eq!(store.tenant_quotas().await.unwrap().len(), 1);
    let err = store.set_tenant_quota("nobody", Some(Quota::default())).await.unwrap_err();
    assert!(matches!(err, sluice_store::StoreError::NotFound(_)), "{err:?}");
}

pub async fn tenant_usage_limits_are_set_replaced_and_cleared(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    assert_eq!(store.tenant_usage_limits().await.unwrap(), vec![]);
    let acme = OwnUsageLimits { queued_max: Some(20), queued_bytes_max: Some(1 << 20), ..Default::default() };
    let beta = OwnUsageLimits {
        components_bytes_max: Some(i64::MAX as u64),
        functions_max: Some(0),
        versions_max: Some(7),
        ..Default::default()
    };
    store
        .set_tenant_usage_limits("acme", &OwnUsageLimits { queued_max: Some(1), ..Default::default() })
        .await
        .unwrap();
    store.set_tenant_usage_limits("acme", &acme).await.unwrap();
    store.set_tenant_usage_limits("beta", &beta).await.unwrap();
    assert_eq!(
        store.tenant_usage_limits().await.unwrap(),
        vec![("acme".to_string(), acme), ("beta".to_string(), beta)],
        "the second set replaced the first whole"
    );
    store.set_tenant_usage_limits("beta", &OwnUsageLimits::default()).await.unwrap();
    assert_eq!(store.tenant_usage_limits().await.unwrap(), vec![("acme".to_string(), acme)]);
    let err = store.set_tenant_usage_limits("nobody", &acme).await.unwrap_err();
    assert!(matches!(err, sluice_store::StoreError::NotFound(_)), "{err:?}");
}

/// What each node re-reads for its queued quotas: unfinished invocations (queued, running,
/// waiting for a retry) by tenant, with the bytes the gateway counted for each request.
pub async fn queued_usage_counts_unfinished_invocations_and_their_bytes(
    store: &dyn Store,
    clock: &ManualClock,
) {
    clock.set(1_000);
    assert_eq!(store.queued_usage().await.unwrap(), vec![]);
    let mut bytes = 0;
    for (id, body) in
        [("a-done", &b"x"[..]), ("a-retry", &[7u8; 300][..]), ("a-running", b"abc"), ("a-queued", b"")]
    {
        let inv = NewInvocation { request: request(body), ..invocation(id) };
        if id != "a-done" {
            bytes += inv.request.quota_bytes();
        }
        enqueue(store, &inv).await;
    }
    let beta = NewInvocation { tenant: "beta".into(), request: request(&[1; 10]), ..invocation("b-queued") };
    enqueue(store, &beta).await;
    // Three leased in enqueue order: one succeeds, one fails and waits for its retry, one runs.
    let leased = store.lease("n", 1_000, LEASE_MS, 3).await.unwrap();
    assert_eq!(leased.len(), 3);
    let attempt = |id: &str| leased.iter().find(|l| l.id == id).map(|l| l.attempt);
    assert!(
        store.complete(ended("a-done", "n", attempt("a-done").unwrap(), &success(200), 1_000)).await.unwrap()
    );
    let retry = failure("trap", Some(60_000));
    assert!(store.complete(ended("a-retry", "n", attempt("a-retry").unwrap(), &retry, 1_000)).await.unwrap());
    assert_eq!(status(store, "a-retry").await, InvocationStatus::Failed);
    let usage = store.queued_usage().await.unwrap();
    assert_eq!(
        usage,
        vec![
            QueuedUsage { tenant: "acme".into(), invocations: 3, bytes },
            QueuedUsage { tenant: "beta".into(), invocations: 1, bytes: beta.request.quota_bytes() },
        ]
    );
    // Body plus header names and values: `request` has 4 headers of 12+10, 8+4, 10+1, 10+1 bytes.
    assert_eq!(beta.request.quota_bytes(), 10 + 22 + 12 + 11 + 11);
}

pub async fn ordered_invocations_run_one_at_a_time_per_key(store: &dyn Store, clock: &ManualClock) {
    clock.set(1_000);
    let ordered = |id: &str, key: &str, seq: i64| NewInvocation {
        in_order: Some(InOrder { key: key.into(), seq }),
        ..invocation(id)
    };
    // Enqueued out of order, one at a time and in one batch: the order is the key's sequence.
    enqueue(store, &ordered("a2", "A", 2)).await;
    enqueue(store, &ordered("a1", "A", 1)).await;
    let batch = [ordered("a3", "A", 3), ordered("b1", "B", 1), invocation("plain")];
    let done = futures::future::join_all(batch.iter().map(|inv| store.enqueue(inv))).await;
    assert!(done.into_iter().all(|d| d.unwrap() == Enqueued::Created));
    // a2 came first and was its key's head until a1 came: it was released, so a1 waits behind
    // it. What runs first is whoever the store released first; from then on, one at a time.
    let mut first: Vec<String> = leased_ids(&store.lease("node", 1_000, LEASE_MS, 10).await.unwrap())
        .into_iter()
        .map(String::from)
        .collect();
    first.sort();
    assert_eq!(first, ["a2", "b1", "plain"], "one per key, and the unordered call");
    assert_eq!(store.lease("node", 1_000, LEASE_MS, 10).await.unwrap(), vec![], "the rest wait");

    // A failed attempt with a retry keeps its key: the next waits for the retry.
    assert!(store.complete(ended("a2", "node", 1, &failure("trap", Some(2_000)), 1_100)).await.unwrap());
    assert_eq!(store.lease("node", 1_500, LEASE_MS, 10).await.unwrap(), vec![], "a1 waits for a2's retry");
    assert_eq!(leased_ids(&store.lease("node", 2_000, LEASE_MS, 10).await.unwrap()), ["a2"]);
    assert!(store.complete(ended("a2", "node", 2, &success(200), 2_100)).await.unwrap());
    // Released at the completion, runnable from then.
    assert_eq!(leased_ids(&store.lease("node", 2_100, LEASE_MS, 10).await.unwrap()), ["a1"]);
    assert_eq!(status(store, "a3").await, InvocationStatus::Queued);
    // Dead (no retry) also ends its turn.
    assert!(store.complete(ended("a1", "node", 1, &failure("bad_request", None), 2_200)).await.unwrap());
    assert_eq!(status(store, "a1").await, InvocationStatus::Dead);
    assert_eq!(leased_ids(&store.lease("node", 2_200, LEASE_MS, 10).await.unwrap()), ["a3"]);
    assert!(store.complete(ended("a3", "node", 1, &success(200), 2_300)).await.unwrap());

    // A head that expires before it starts (a sweep ends it, not a completion) releases the
    // next at a later lease.
    clock.set(3_000);
    enqueue(store, &NewInvocation { deadline: Some(4_000), ..ordered("c1", "C", 1) }).await;
    enqueue(store, &ordered("c2", "C", 2)).await;
    let later = store.lease("node", 6_000, LEASE_MS, 10).await.unwrap();
    assert_eq!(status(store, "c1").await, InvocationStatus::Expired);
    let later =
        if later.is_empty() { store.lease("node", 7_100, LEASE_MS, 10).await.unwrap() } else { later };
    assert_eq!(leased_ids(&later), ["c2"], "released once its head expired");
}
