//! Schedules, for any backend: created, listed, paused and deleted with their function; and the
//! promise the ticker stands on: of concurrent firings of one occurrence, exactly one commits,
//! and an occurrence's idempotency key stores it once whatever path enqueues it.

use sluice_core::schedule::When;
use sluice_core::{Catchup, FunctionConfig, Overlap, UnixMs};
use sluice_store::{
    Fired, Firing, IdempotencyKey, InvocationFilter, NewInvocation, NewSchedule, SCHEDULE_CALLER, Schedule,
    Store, StoreError, schedule_key,
};

use super::{ManualClock, invocation};

async fn fixture(store: &dyn Store) {
    store.create_tenant("acme").await.unwrap();
    let digest = sluice_core::ids::sha256_hex(b"component");
    store.put_blob("acme", &digest, b"component").await.unwrap();
    store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
    store.create_version("acme", "other", &digest, &FunctionConfig::default(), true).await.unwrap();
}

fn every(name: &str, function: &str, every_ms: u64, next_fire_at: UnixMs) -> NewSchedule {
    NewSchedule {
        tenant: "acme".into(),
        name: name.into(),
        function: function.into(),
        alias: "latest".into(),
        when: When::Every { every_ms },
        flex_ms: 0,
        overlap: Overlap::Allow,
        catchup: Catchup::All,
        path: "/report?x=1".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: b"{\"x\":1}".to_vec(),
        next_fire_at: Some(next_fire_at),
    }
}

/// The invocation of occurrence `t` of schedule `s`, with the schedule's key.
fn occurrence(s: &Schedule, t: UnixMs, id: &str) -> (UnixMs, NewInvocation) {
    let key = Some(IdempotencyKey { key: schedule_key(s.id, t), caller: SCHEDULE_CALLER.into() });
    (t, NewInvocation { idempotency_key: key, run_after: t, ..invocation(id) })
}

fn firing(s: &Schedule, enqueue: Vec<(UnixMs, NewInvocation)>, next_fire_at: UnixMs) -> Firing {
    Firing {
        id: s.id,
        revision: s.revision,
        next_fire_at: Some(next_fire_at),
        buffered_for: None,
        enqueue,
        skipped: 0,
        last_error: None,
    }
}

/// Commits one firing alone: how many invocations it stored, `None` if it changed nothing.
async fn fire(store: &dyn Store, firing: &Firing) -> Option<u64> {
    let fired = store.fire_schedules(std::slice::from_ref(firing)).await.unwrap();
    fired.committed[0].then_some(fired.inserted)
}

async fn stored_keys(store: &dyn Store) -> Vec<String> {
    let filter = InvocationFilter { tenant: "acme".into(), limit: 1_000, ..InvocationFilter::default() };
    let mut keys = Vec::new();
    for listed in store.list_invocations(&filter).await.unwrap() {
        let inv = store.get_invocation(&listed.id).await.unwrap().unwrap();
        keys.push(inv.idempotency_key.expect("a schedule's invocation carries its key"));
    }
    keys.sort();
    keys
}

pub async fn schedules_are_created_listed_paused_and_deleted_with_their_function(
    store: &dyn Store,
    clock: &ManualClock,
) {
    fixture(store).await;
    clock.set(1_000);
    let cron = NewSchedule {
        when: When::Cron { expr: "*/5 * * * *".into(), tz: "Europe/Berlin".into() },
        overlap: Overlap::BufferOne,
        catchup: Catchup::None,
        flex_ms: 600_000,
        ..every("b-cron", "hello", 1_000, 300_000)
    };
    let created = store.create_schedule(&cron).await.unwrap();
    assert_eq!(
        (created.when.clone(), created.overlap, created.catchup, created.flex_ms),
        (cron.when.clone(), Overlap::BufferOne, Catchup::None, 600_000)
    );
    assert_eq!(
        (created.path.clone(), created.headers.clone(), created.body.clone()),
        (cron.path.clone(), cron.headers.clone(), cron.body.clone())
    );
    assert_eq!(
        (created.next_fire_at, created.paused, created.fires, created.created_at),
        (Some(300_000), false, 0, 1_000)
    );
    store.create_schedule(&every("a-every", "other", 1_000, 2_000)).await.unwrap();
    let once = NewSchedule { when: When::At { at: 9_000 }, ..every("c-once", "hello", 1, 9_000) };
    store.create_schedule(&once).await.unwrap();

    let err = store.create_schedule(&every("a-every", "hello", 1_000, 2_000)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "a name is unique in its tenant: {err}");
    let err = store.create_schedule(&every("d", "missing", 1_000, 2_000)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    let names: Vec<String> =
        store.list_schedules("acme").await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a-every", "b-cron", "c-once"]);
    assert_eq!(store.count_schedules("acme").await.unwrap(), 3);
    assert!(store.list_schedules("beta").await.unwrap().is_empty());

    // Paused: not due, whatever its time; resumed from the time the caller says.
    clock.set(5_000);
    let paused = store.set_schedule_paused("acme", "a-every", true, None).await.unwrap().unwrap();
    assert!(paused.paused && paused.revision > 0);
    assert_eq!(paused.next_fire_at, Some(2_000), "pausing keeps the next occurrence");
    let due: Vec<String> =
        store.due_schedules(10_000, 10_000, 100, 1).await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(due, ["c-once"]);
    let resumed = store.set_schedule_paused("acme", "a-every", false, Some(6_000)).await.unwrap().unwrap();
    assert_eq!((resumed.paused, resumed.next_fire_at), (false, Some(6_000)));
    assert!(store.set_schedule_paused("acme", "nope", true, None).await.unwrap().is_none());

    assert!(store.delete_schedule("acme", "c-once").await.unwrap());
    assert!(!store.delete_schedule("acme", "c-once").await.unwrap());
    // Deleting a function deletes its schedules, and only its.
    assert!(store.delete_function("acme", "hello").await.unwrap());
    let names: Vec<String> =
        store.list_schedules("acme").await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a-every"]);
}

pub async fn concurrent_firings_of_one_occurrence_enqueue_it_once(store: &dyn Store, clock: &ManualClock) {
    fixture(store).await;
    clock.set(1_000);
    const SCHEDULES: usize = 10;
    const RACERS: usize = 4;
    let mut schedules = Vec::new();
    for i in 0..SCHEDULES {
        schedules.push(store.create_schedule(&every(&format!("s{i}"), "hello", 1_000, 2_000)).await.unwrap());
    }
    // Every "node" read the same revision of every schedule and decided the same occurrences
    // (2000 and 3000), each under invocation ids of its own, and fires them all in one tick.
    let ticks: Vec<Vec<Firing>> = (0..RACERS)
        .map(|node| {
            schedules
                .iter()
                .map(|s| {
                    let enqueue = vec![
                        occurrence(s, 2_000, &format!("n{node}-{}-a", s.name)),
                        occurrence(s, 3_000, &format!("n{node}-{}-b", s.name)),
                    ];
                    firing(s, enqueue, 4_000)
                })
                .collect()
        })
        .collect();
    clock.set(3_100);
    let results = futures::future::join_all(ticks.iter().map(|t| store.fire_schedules(t))).await;
    let results: Vec<Fired> = results.into_iter().map(Result::unwrap).collect();
    for i in 0..SCHEDULES {
        let committed = results.iter().filter(|r| r.committed[i]).count();
        assert_eq!(committed, 1, "schedule {i} fired by one node: {results:?}");
    }
    assert_eq!(results.iter().map(|r| r.inserted).sum::<u64>(), 2 * SCHEDULES as u64, "{results:?}");

    let mut expected: Vec<String> =
        schedules.iter().flat_map(|s| [schedule_key(s.id, 2_000), schedule_key(s.id, 3_000)]).collect();
    expected.sort();
    assert_eq!(stored_keys(store).await, expected, "each occurrence once");
    let after = store.get_schedule("acme", "s0").await.unwrap().unwrap();
    assert_eq!((after.next_fire_at, after.fires, after.last_fired_for), (Some(4_000), 2, Some(3_000)));
    assert!(after.last_invocation.as_deref().unwrap().ends_with("-s0-b"));
    assert!(store.due_schedules(3_999, 3_999, 100, 1).await.unwrap().is_empty(), "advanced past what fired");
    assert_eq!(store.due_schedules(4_000, 4_000, 100, 1).await.unwrap().len(), SCHEDULES);

    // A stale firing (a node that read before the commit and comes late) changes nothing.
    let stale = firing(&schedules[0], vec![occurrence(&schedules[0], 4_000, "late")], 5_000);
    assert_eq!(fire(store, &stale).await, None);
    // A backfill over fired occurrences stores only the new one: the key holds the others.
    let s0 = &schedules[0];
    let backfill =
        [occurrence(s0, 1_000, "bf-1"), occurrence(s0, 2_000, "bf-2"), occurrence(s0, 3_000, "bf-3")];
    assert_eq!(store.backfill_schedule(s0.id, &backfill).await.unwrap(), 1);
    assert_eq!(stored_keys(store).await.len(), expected.len() + 1);
    assert_eq!(store.get_schedule("acme", "s0").await.unwrap().unwrap().fires, 3);
    // A paused schedule is not fired, even by a firing that read it before the pause.
    let current = store.get_schedule("acme", "s1").await.unwrap().unwrap();
    store.set_schedule_paused("acme", "s1", true, None).await.unwrap();
    let racing = firing(&current, vec![occurrence(&current, 4_000, "paused")], 5_000);
    assert_eq!(fire(store, &racing).await, None);
}

pub async fn buffered_occurrences_are_due_until_fired(store: &dyn Store, clock: &ManualClock) {
    fixture(store).await;
    clock.set(1_000);
    let s = store.create_schedule(&every("buffered", "hello", 1_000, 2_000)).await.unwrap();
    // The tick enqueued 2000 and buffered 3000 (the first was still running).
    let first =
        Firing { buffered_for: Some(3_000), ..firing(&s, vec![occurrence(&s, 2_000, "one")], 10_000) };
    assert_eq!(fire(store, &first).await, Some(1));
    let s = store.get_schedule("acme", "buffered").await.unwrap().unwrap();
    assert_eq!(s.buffered_for, Some(3_000));
    assert_eq!(store.due_schedules(5_000, 5_000, 10, 1).await.unwrap().len(), 1, "due while it holds one");
    let second = Firing {
        skipped: 2,
        last_error: Some("why".into()),
        ..firing(&s, vec![occurrence(&s, 3_000, "two")], 10_000)
    };
    assert_eq!(fire(store, &second).await, Some(1));
    let s = store.get_schedule("acme", "buffered").await.unwrap().unwrap();
    assert_eq!((s.buffered_for, s.fires, s.skipped, s.last_error.as_deref()), (None, 2, 2, Some("why")));
    assert!(store.due_schedules(5_000, 5_000, 10, 1).await.unwrap().is_empty());
}

pub async fn occurrences_fired_ahead_are_read_once_and_taken_back_by_pause_and_delete(
    store: &dyn Store,
    clock: &ManualClock,
) {
    fixture(store).await;
    clock.set(1_000);
    let ahead = store.create_schedule(&every("ahead", "hello", 1_000, 10_000)).await.unwrap();
    let skip = NewSchedule { overlap: Overlap::Skip, ..every("skip", "hello", 5_000, 5_000) };
    let skip = store.create_schedule(&skip).await.unwrap();
    let due_names = |now: UnixMs, until: UnixMs| async move {
        let due = store.due_schedules(now, until, 100, 1).await.unwrap();
        due.into_iter().map(|s| s.name).collect::<Vec<_>>()
    };
    assert!(due_names(4_000, 4_000).await.is_empty());
    assert_eq!(due_names(6_000, 11_000).await, ["skip", "ahead"], "within the window, oldest first");

    // `skip` fires its occurrence at 5000, which stays queued: its next one (10000) is held back
    // from firing ahead until that call finishes, and read only when due.
    clock.set(5_000);
    assert_eq!(fire(store, &firing(&skip, vec![occurrence(&skip, 5_000, "skip-5")], 10_000)).await, Some(1));
    // `ahead` fires 10000 ahead, at 6000; its next (11000) is within the window too, but one
    // occurrence ahead is the most: it is not read again until 10000 is due.
    clock.set(6_000);
    assert_eq!(fire(store, &firing(&ahead, vec![occurrence(&ahead, 10_000, "a-1")], 11_000)).await, Some(1));
    assert!(due_names(6_000, 11_000).await.is_empty(), "one ahead at most, skip's call unfinished");
    assert_eq!(due_names(10_000, 11_000).await, ["skip", "ahead"]);

    // Pausing before 10000 takes the occurrence back: its invocation and key are gone, and it is
    // the next occurrence again.
    clock.set(7_000);
    let paused = store.set_schedule_paused("acme", "ahead", true, None).await.unwrap().unwrap();
    assert_eq!(
        (paused.next_fire_at, paused.fires, paused.last_fired_for, paused.last_invocation),
        (Some(10_000), 0, None, None)
    );
    assert!(store.get_invocation("a-1").await.unwrap().is_none());
    // Resumed before it, it fires again, and is stored: the key was freed with it.
    let resumed = store.set_schedule_paused("acme", "ahead", false, Some(10_000)).await.unwrap().unwrap();
    assert_eq!(
        fire(store, &firing(&resumed, vec![occurrence(&resumed, 10_000, "a-2")], 11_000)).await,
        Some(1)
    );
    // Once runnable, it has fired: a pause leaves it.
    clock.set(10_000);
    let paused = store.set_schedule_paused("acme", "ahead", true, None).await.unwrap().unwrap();
    assert_eq!((paused.next_fire_at, paused.last_invocation.as_deref()), (Some(11_000), Some("a-2")));
    assert!(store.get_invocation("a-2").await.unwrap().is_some());

    // Deleting the schedule takes back what it fired ahead, and only that.
    let resumed = store.set_schedule_paused("acme", "ahead", false, Some(20_000)).await.unwrap().unwrap();
    clock.set(16_000);
    assert_eq!(
        fire(store, &firing(&resumed, vec![occurrence(&resumed, 20_000, "a-3")], 21_000)).await,
        Some(1)
    );
    assert!(store.delete_schedule("acme", "ahead").await.unwrap());
    assert!(store.get_invocation("a-3").await.unwrap().is_none());
    assert!(store.get_invocation("a-2").await.unwrap().is_some());
    assert!(store.get_invocation("skip-5").await.unwrap().is_some());
}
