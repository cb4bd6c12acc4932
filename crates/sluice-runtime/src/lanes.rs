//! CPU lanes: short calls never wait behind long ones.
//!
//! Every call starts on a *fast lane*: a sync call on the HTTP worker runtime of the core that
//! accepted it, an async call on the slow lane's threads but without holding one of its slots.
//! The guest's epoch callback (every [`crate::EPOCH_TICK`]) checks how long the call has been on
//! a thread; once that passes the fast-lane slice it asks to be moved. The future that drives the
//! guest ([`LaneFuture`]) sees the request when the guest yields and hands the guest's future —
//! it is `Send` — to the *slow lane*: a multi-thread runtime whose threads run at `SCHED_IDLE`
//! (or, where that is refused, nice 19), so the kernel gives them only the CPU that the HTTP
//! workers, the control runtime and every other normal thread leave over. On the slow lane a call
//! first takes a slot of its group (the tenant) and then a slot of the node; both are bounded, and
//! waiting for them counts against the call's wall-clock timeout like everything else.
//!
//! Time on a thread is measured per poll of the guest's future: with the monotonic clock on the
//! fast lane (a thread CPU clock read costs about a microsecond here, a third of a whole hello
//! call), with the thread CPU clock on the slow lane, where a low-priority thread may be
//! preempted in the middle of a poll and a read per millisecond slice costs nothing.
//!
//! This module must not know tenants: a group is an opaque string chosen by the caller.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Settings of the lanes.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// Time a call may spend on a thread before it is moved off the fast lane.
    pub fast_slice: Duration,
    /// Threads of the slow lane. They run at low OS priority, so more threads than cores only
    /// adds interleaving, not CPU.
    pub slow_threads: usize,
    /// Calls holding a slow-lane slot at once on this node.
    pub slow_slots_max: usize,
    /// Calls of one group (tenant) holding a slow-lane slot at once.
    pub slow_slots_per_group_max: usize,
}

impl LaneConfig {
    /// Defaults for a node with `cores` cores.
    pub fn for_cores(cores: usize) -> Self {
        let cores = cores.max(1);
        Self {
            fast_slice: Duration::from_millis(2),
            slow_threads: cores,
            slow_slots_max: 4 * cores,
            slow_slots_per_group_max: cores,
        }
    }

    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.fast_slice.is_zero() || self.fast_slice > Duration::from_secs(1) {
            return Err(format!("the fast-lane slice must be between 1µs and 1s, got {:?}", self.fast_slice));
        }
        if !(1..=1024).contains(&self.slow_threads) {
            return Err(format!("slow-lane threads must be between 1 and 1024, got {}", self.slow_threads));
        }
        if self.slow_slots_max == 0 || self.slow_slots_per_group_max == 0 {
            return Err("slow-lane slots (per node and per tenant) must be at least 1".into());
        }
        Ok(())
    }
}

/// What the lanes did so far, for reports and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Calls moved to the slow lane since start.
    pub demoted_total: u64,
    /// Calls waiting for a slow-lane slot now.
    pub slow_waiting: usize,
    /// Calls holding a slow-lane slot now.
    pub slow_running: usize,
    /// How the slow lane's threads were lowered: `idle` (SCHED_IDLE), `nice` or `none`.
    pub slow_priority: &'static str,
    /// Time guests spent on threads since start, both lanes, in nanoseconds: what the scheduler
    /// measures the node's utilization with.
    pub guest_cpu_ns: u64,
}

/// The slow lane: its runtime and its slots.
pub(crate) struct Lanes {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    config: LaneConfig,
    node_slots: Arc<Semaphore>,
    /// One semaphore per group. Groups are tenants, which the store bounds; an entry is small.
    group_slots: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    demoted_total: AtomicU64,
    slow_waiting: Arc<AtomicUsize>,
    slow_running: Arc<AtomicUsize>,
    priority: Arc<Mutex<&'static str>>,
    guest_cpu_ns: Arc<AtomicU64>,
}

impl Lanes {
    pub(crate) fn new(config: LaneConfig) -> std::io::Result<Self> {
        config.validate().map_err(std::io::Error::other)?;
        let priority = Arc::new(Mutex::new("none"));
        let seen = priority.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.slow_threads)
            .thread_name("sluice-slow")
            .on_thread_start(move || {
                let how = lower_this_thread();
                *seen.lock().expect("lane priority lock") = how;
            })
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
            node_slots: Arc::new(Semaphore::new(config.slow_slots_max)),
            group_slots: Mutex::default(),
            config,
            demoted_total: AtomicU64::new(0),
            slow_waiting: Arc::default(),
            slow_running: Arc::default(),
            priority,
            guest_cpu_ns: Arc::default(),
        })
    }

    pub(crate) fn config(&self) -> &LaneConfig {
        &self.config
    }

    /// The slow lane's runtime: async calls start here.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    pub(crate) fn stats(&self) -> LaneStats {
        LaneStats {
            demoted_total: self.demoted_total.load(Ordering::Relaxed),
            slow_waiting: self.slow_waiting.load(Ordering::Relaxed),
            slow_running: self.slow_running.load(Ordering::Relaxed),
            slow_priority: *self.priority.lock().expect("lane priority lock"),
            guest_cpu_ns: self.guest_cpu_ns.load(Ordering::Relaxed),
        }
    }

    fn group(&self, group: &Arc<str>) -> Arc<Semaphore> {
        let mut map = self.group_slots.lock().expect("lane group lock");
        map.entry(group.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.slow_slots_per_group_max)))
            .clone()
    }

    /// Moves a guest's future to the slow lane: it waits for a slot of its group, then of the
    /// node, and runs there with its thread CPU time added to `meter`.
    fn demote<F>(&self, group: &Arc<str>, meter: Arc<Meter>, fut: Pin<Box<F>>) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.demoted_total.fetch_add(1, Ordering::Relaxed);
        let group_slots = self.group(group);
        let node_slots = self.node_slots.clone();
        let waiting = self.slow_waiting.clone();
        let running = self.slow_running.clone();
        let total = self.guest_cpu_ns.clone();
        self.handle.spawn(async move {
            meter.wait_began_ns.store(meter.origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
            waiting.fetch_add(1, Ordering::Relaxed);
            let waiting_guard = Counted(waiting);
            // The group's slot first: a tenant whose own slots are taken must not sit on node
            // slots that other tenants could use.
            let group_permit = group_slots.acquire_owned().await.expect("lane semaphores are never closed");
            let node_permit = node_slots.acquire_owned().await.expect("lane semaphores are never closed");
            drop(waiting_guard);
            meter.waited_ns.store(meter.waited().as_nanos() as u64, Ordering::Relaxed);
            meter.wait_began_ns.store(u64::MAX, Ordering::Relaxed);
            running.fetch_add(1, Ordering::Relaxed);
            let _running = Counted(running);
            SlowRun { fut, meter, total, _permits: (group_permit, node_permit) }.await
        })
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // A runtime may not be dropped (blocking) inside another runtime's context, which is
        // where a node's last reference usually goes.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Decrements a gauge when dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lowers the calling thread's scheduling priority: `SCHED_IDLE` where allowed, else nice 19.
#[allow(unsafe_code)]
fn lower_this_thread() -> &'static str {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on the calling thread (pid 0) with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return "idle";
    }
    // SAFETY: as above; on Linux the nice value is per thread and `who` 0 is the caller.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0 {
        return "nice";
    }
    "none"
}

/// Sets the calling thread's nice value (the compile pool's threads run at 10: a compile takes
/// what the calls leave, but still finishes under load, unlike `SCHED_IDLE`).
#[allow(unsafe_code)]
pub(crate) fn nice_this_thread(nice: i32) {
    // SAFETY: a plain syscall; on Linux the nice value is per thread and `who` 0 is the caller.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::debug!(nice, "could not lower a compile thread's priority");
    }
}

/// CPU time of the calling thread.
#[allow(unsafe_code)]
fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One call's time on threads, shared by the future that drives the guest and the guest's epoch
/// callback (which runs inside that future's poll, on the same thread).
#[derive(Debug)]
pub(crate) struct Meter {
    origin: Instant,
    /// Time on a thread in finished polls.
    busy_ns: AtomicU64,
    /// When the current fast-lane poll began, as nanoseconds since `origin`; `u64::MAX`: none.
    poll_began_ns: AtomicU64,
    /// Time spent waiting for slow-lane slots, in finished waits.
    waited_ns: AtomicU64,
    /// When the current wait for a slot began, as nanoseconds since `origin`; `u64::MAX`: none.
    wait_began_ns: AtomicU64,
    /// Set by the epoch callback: this call has used its fast-lane slice.
    demote: AtomicBool,
    /// The call holds a slow-lane slot: nothing more to decide.
    slow: AtomicBool,
}

impl Meter {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            busy_ns: AtomicU64::new(0),
            poll_began_ns: AtomicU64::new(u64::MAX),
            waited_ns: AtomicU64::new(0),
            wait_began_ns: AtomicU64::new(u64::MAX),
            demote: AtomicBool::new(false),
            slow: AtomicBool::new(false),
        }
    }

    /// Time on a thread so far, including the poll in progress.
    pub(crate) fn busy(&self) -> Duration {
        let mut ns = self.busy_ns.load(Ordering::Relaxed);
        let began = self.poll_began_ns.load(Ordering::Relaxed);
        if began != u64::MAX {
            ns += (self.origin.elapsed().as_nanos() as u64).saturating_sub(began);
        }
        Duration::from_nanos(ns)
    }

    /// Time spent waiting for a slow-lane slot, including a wait in progress (a call that times
    /// out while waiting).
    pub(crate) fn waited(&self) -> Duration {
        let mut ns = self.waited_ns.load(Ordering::Relaxed);
        let began = self.wait_began_ns.load(Ordering::Relaxed);
        if began != u64::MAX {
            ns += (self.origin.elapsed().as_nanos() as u64).saturating_sub(began);
        }
        Duration::from_nanos(ns)
    }

    /// Whether the call was moved to the slow lane.
    pub(crate) fn demoted(&self) -> bool {
        self.demote.load(Ordering::Relaxed)
    }

    /// Called from the epoch callback: asks for the move once the slice is used.
    pub(crate) fn check_slice(&self, slice: Duration) {
        if !self.slow.load(Ordering::Relaxed) && !self.demote.load(Ordering::Relaxed) && self.busy() >= slice
        {
            self.demote.store(true, Ordering::Relaxed);
        }
    }
}

/// Drives a guest's future: inline on whatever runtime polls it while the call is short, then —
/// once the epoch callback asked for it — on the slow lane. Dropping it (a timeout, a client that
/// went away) aborts the slow-lane task, which drops the guest and frees its slots.
pub(crate) struct LaneFuture<F: Future> {
    state: State<F>,
    meter: Arc<Meter>,
    lanes: Arc<Lanes>,
    group: Arc<str>,
}

enum State<F: Future> {
    Fast(Pin<Box<F>>),
    Slow(JoinHandle<F::Output>),
    Done,
}

impl<F> LaneFuture<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    pub(crate) fn new(fut: F, meter: Arc<Meter>, lanes: Arc<Lanes>, group: Arc<str>) -> Self {
        Self { state: State::Fast(Box::pin(fut)), meter, lanes, group }
    }
}

impl<F> Future for LaneFuture<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Fast(fut) => {
                    let meter = &this.meter;
                    let began = meter.origin.elapsed().as_nanos() as u64;
                    meter.poll_began_ns.store(began, Ordering::Relaxed);
                    let polled = fut.as_mut().poll(cx);
                    let ended = meter.origin.elapsed().as_nanos() as u64;
                    meter.poll_began_ns.store(u64::MAX, Ordering::Relaxed);
                    meter.busy_ns.fetch_add(ended.saturating_sub(began), Ordering::Relaxed);
                    this.lanes.guest_cpu_ns.fetch_add(ended.saturating_sub(began), Ordering::Relaxed);
                    match polled {
                        Poll::Ready(out) => {
                            this.state = State::Done;
                            return Poll::Ready(out);
                        }
                        Poll::Pending if !meter.demote.load(Ordering::Relaxed) => return Poll::Pending,
                        Poll::Pending => {
                            let State::Fast(fut) = std::mem::replace(&mut this.state, State::Done) else {
                                unreachable!("matched Fast above")
                            };
                            let handle = this.lanes.demote(&this.group, this.meter.clone(), fut);
                            this.state = State::Slow(handle);
                        }
                    }
                }
                State::Slow(handle) => {
                    return match Pin::new(handle).poll(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(out)) => {
                            this.state = State::Done;
                            Poll::Ready(out)
                        }
                        // The guest's future panicked on the slow lane: the same panic as if it
                        // had been polled here.
                        Poll::Ready(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        // Only the slow lane shutting down cancels its tasks; the node is going
                        // away and nobody waits for this call any more.
                        Poll::Ready(Err(_)) => Poll::Pending,
                    };
                }
                State::Done => panic!("LaneFuture polled after it finished"),
            }
        }
    }
}

impl<F: Future> Drop for LaneFuture<F> {
    fn drop(&mut self) {
        if let State::Slow(handle) = &self.state {
            handle.abort();
        }
    }
}

/// A guest's future on the slow lane: holds its slots and adds thread CPU time to the meter.
struct SlowRun<F: Future> {
    fut: Pin<Box<F>>,
    meter: Arc<Meter>,
    /// The lanes' total of guest time.
    total: Arc<AtomicU64>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl<F: Future> Future for SlowRun<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.meter.slow.store(true, Ordering::Relaxed);
        let began = thread_cpu_now();
        let polled = this.fut.as_mut().poll(cx);
        let used = thread_cpu_now().saturating_sub(began);
        this.meter.busy_ns.fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        this.total.fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that burns `work` of CPU per poll for `polls` polls, yielding in between.
    struct Burn {
        polls: u32,
        work: Duration,
    }

    impl Future for Burn {
        type Output = std::thread::ThreadId;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            // On this thread's CPU clock: a slow-lane thread preempted by a loaded machine must
            // still do all of its work (the slow lane meters thread CPU time).
            let until = thread_cpu_now() + self.work;
            while thread_cpu_now() < until {
                std::hint::spin_loop();
            }
            if self.polls == 0 {
                return Poll::Ready(std::thread::current().id());
            }
            self.polls -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn lanes(slots: usize) -> Arc<Lanes> {
        let config = LaneConfig {
            fast_slice: Duration::from_millis(2),
            slow_threads: 1,
            slow_slots_max: slots,
            slow_slots_per_group_max: slots,
        };
        Arc::new(Lanes::new(config).unwrap())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_short_call_stays_on_the_thread_that_polls_it() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        let fut = LaneFuture::new(Burn { polls: 3, work: Duration::ZERO }, meter.clone(), lanes, "t".into());
        assert_eq!(fut.await, std::thread::current().id());
        assert!(!meter.demoted());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_over_its_slice_moves_to_the_slow_lane_and_is_metered_there() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        let burn = Burn { polls: 5, work: Duration::from_millis(1) };
        // Stands in for the epoch callback, which checks the slice at every tick.
        let checked = {
            let meter = meter.clone();
            async move {
                let mut burn = std::pin::pin!(burn);
                std::future::poll_fn(|cx| {
                    meter.check_slice(Duration::from_millis(2));
                    burn.as_mut().poll(cx)
                })
                .await
            }
        };
        let ran_on = LaneFuture::new(checked, meter.clone(), lanes.clone(), "t".into()).await;
        assert_ne!(ran_on, std::thread::current().id(), "finished on a slow-lane thread");
        assert!(meter.demoted());
        assert!(meter.busy() >= Duration::from_millis(5), "{:?}", meter.busy());
        let stats = lanes.stats();
        assert_eq!((stats.demoted_total, stats.slow_running, stats.slow_waiting), (1, 0, 0));
        assert_ne!(stats.slow_priority, "none", "the slow lane's threads run at low priority");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_demoted_call_frees_its_slot() {
        let lanes = lanes(1);
        let forever = {
            let meter = Arc::new(Meter::new());
            meter.demote.store(true, Ordering::Relaxed);
            LaneFuture::new(Burn { polls: u32::MAX, work: Duration::ZERO }, meter, lanes.clone(), "t".into())
        };
        // Polled once: moved to the slow lane, where it takes the only slot and never ends.
        let timed_out = tokio::time::timeout(Duration::from_millis(50), forever).await;
        assert!(timed_out.is_err());
        // The next demoted call gets the slot.
        let meter = Arc::new(Meter::new());
        meter.demote.store(true, Ordering::Relaxed);
        let next = LaneFuture::new(Burn { polls: 1, work: Duration::ZERO }, meter.clone(), lanes, "t".into());
        tokio::time::timeout(Duration::from_secs(5), next).await.expect("the slot was freed");
        assert!(meter.waited() < Duration::from_secs(5));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_group_cannot_take_more_than_its_slots() {
        let config = LaneConfig {
            fast_slice: Duration::from_millis(2),
            slow_threads: 1,
            slow_slots_max: 4,
            slow_slots_per_group_max: 1,
        };
        let lanes = Arc::new(Lanes::new(config).unwrap());
        let demoted = |group: &str, polls: u32| {
            let meter = Arc::new(Meter::new());
            meter.demote.store(true, Ordering::Relaxed);
            LaneFuture::new(Burn { polls, work: Duration::ZERO }, meter, lanes.clone(), group.into())
        };
        // Group a's only slot is held forever; a second call of a waits, a call of b runs.
        let hog = tokio::spawn(demoted("a", u32::MAX));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second_a = tokio::time::timeout(Duration::from_millis(100), demoted("a", 1)).await;
        assert!(second_a.is_err(), "a second call of group a waited for a's slot");
        tokio::time::timeout(Duration::from_secs(5), demoted("b", 1)).await.expect("group b ran");
        hog.abort();
    }
}
