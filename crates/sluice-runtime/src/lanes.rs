//! CPU lanes: short calls never wait behind long ones.
//!
//! Every call starts on a *fast lane*: a sync call on the HTTP worker runtime of the core that
//! accepted it, an async call on the slow lane's threads but without holding one of its slots.
//! The guest's epoch callback (every [`crate::EPOCH_TICK`]) checks how long the call has been on
//! a thread; once that passes the fast-lane slice, and the thread's CPU clock confirms that the
//! call itself is using the CPU (not a neighbour that the OS ran in the middle of its poll), it
//! asks to be moved. The future that drives the
//! guest ([`LaneFuture`]) sees the request when the guest yields and hands the guest's future —
//! it is `Send` — to the *slow lane*: a multi-thread runtime whose threads run at `SCHED_IDLE`
//! (or, where that is refused, nice 19), so the kernel gives them only the CPU that the HTTP
//! workers, the control runtime and every other normal thread leave over. On the slow lane a call
//! first takes a slot of its group (the tenant) and then a slot of the node; both are bounded, and
//! waiting for them counts against the call's wall-clock timeout like everything else. Inside a
//! group each member (a function) has a share of the group's slots: a member may hold more than
//! its share only while no other member of its group waits, and gives the extra slots back at
//! its next yield (every epoch tick) when one does, so one function's long calls cannot hold all
//! of its tenant's slots until their timeouts.
//!
//! A slot is for using the CPU, not for waiting: a call on the slow lane that waits for something
//! outside (a downstream's answer, a timer, a permit of a downstream's limit) gives its slots
//! back and waits for them again once it is woken, at the back. A call that yields at an epoch
//! tick keeps them. Holding a slot while waiting would let two bounded things wait on each other:
//! a call moved here while its request held one of a downstream's permits waits for a slot, and
//! the calls holding the slots wait for that permit (with two slots per tenant and a new
//! downstream limit of two, for ever, or until an async call's 15-minute timeout).
//!
//! Time on a thread is measured per poll of the guest's future: with the monotonic clock on the
//! fast lane (a thread CPU clock read costs about a microsecond here, a third of a whole hello
//! call), with the thread CPU clock on the slow lane, where a low-priority thread may be
//! preempted in the middle of a poll and a read per millisecond slice costs nothing. Wall time
//! is an upper bound of CPU time, so the fast lane reads the thread CPU clock only once a call's
//! wall time has passed the slice: from then on its polls are measured on the CPU clock, and it is
//! moved only after half a slice more of its own CPU time. A 30 µs call preempted for 5 ms by
//! the OS is therefore never moved (it would wait behind its tenant's long calls for a slot).
//!
//! This module must not know tenants: a group is an opaque string chosen by the caller.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
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
    /// A member's (function's) share of its group's slots: it holds more only while no other
    /// member of the group waits for one.
    pub slow_slots_per_member_share: usize,
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
            slow_slots_per_member_share: cores.div_ceil(2),
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
        if self.slow_slots_max == 0
            || self.slow_slots_per_group_max == 0
            || self.slow_slots_per_member_share == 0
        {
            return Err("slow-lane slots (per node, per tenant and per function) must be at least 1".into());
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
    /// One entry per group. Groups are tenants, which the store bounds; an entry is small.
    groups: Mutex<HashMap<Arc<str>, Arc<Group>>>,
    demoted_total: AtomicU64,
    slow_waiting: Arc<AtomicUsize>,
    slow_running: Arc<AtomicUsize>,
    priority: Arc<Mutex<&'static str>>,
    guest_cpu_ns: Arc<AtomicU64>,
}

/// A group's slots and its members' use of them.
struct Group {
    slots: Arc<Semaphore>,
    /// Calls of the group waiting for one of its slots.
    waiting: AtomicUsize,
    /// Members with calls on the slow lane. An entry is dropped when its last call leaves, so
    /// the map holds at most the members with calls there now.
    members: Mutex<HashMap<Arc<str>, Arc<Member>>>,
}

/// One member's (function's) calls on the slow lane.
#[derive(Default)]
struct Member {
    /// Calls of this member waiting for a slot of the group.
    waiting: AtomicUsize,
    /// Slots of the group this member holds.
    holding: AtomicUsize,
}

impl Group {
    fn member(&self, name: &Arc<str>) -> Arc<Member> {
        let mut members = self.members.lock().expect("lane member lock");
        members.entry(name.clone()).or_default().clone()
    }

    /// Whether a call of `member` should give back a slot it holds beyond its share: another
    /// member of the group waits for one.
    fn others_wait(&self, member: &Member) -> bool {
        self.waiting.load(Ordering::Relaxed) > member.waiting.load(Ordering::Relaxed)
    }
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
            groups: Mutex::default(),
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

    fn group(&self, group: &Arc<str>) -> Arc<Group> {
        let mut map = self.groups.lock().expect("lane group lock");
        map.entry(group.clone())
            .or_insert_with(|| {
                Arc::new(Group {
                    slots: Arc::new(Semaphore::new(self.config.slow_slots_per_group_max)),
                    waiting: AtomicUsize::new(0),
                    members: Mutex::default(),
                })
            })
            .clone()
    }

    /// Moves a guest's future to the slow lane: it waits for a slot of its group, then of the
    /// node, and runs there with its thread CPU time added to `meter`. A call holding more than
    /// its member's share gives its slots back when another member of the group waits, and then
    /// waits again.
    fn demote<F>(
        &self,
        group: &Arc<str>,
        member: &Arc<str>,
        meter: Arc<Meter>,
        fut: Pin<Box<F>>,
    ) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.demoted_total.fetch_add(1, Ordering::Relaxed);
        let group = self.group(group);
        let name = member.clone();
        let node_slots = self.node_slots.clone();
        let waiting = self.slow_waiting.clone();
        let running = self.slow_running.clone();
        let total = self.guest_cpu_ns.clone();
        let share = self.config.slow_slots_per_member_share;
        self.handle.spawn(async move {
            let leave = Leave { member: Some(group.member(&name)), group: group.clone(), name };
            let member = leave.member();
            let wakeup = Arc::new(Wakeup::default());
            let mut fut = fut;
            loop {
                let began = meter.origin.elapsed().as_nanos() as u64;
                meter.wait_began_ns.store(began, Ordering::Relaxed);
                let waiting_guard = Counted::new(&waiting);
                let group_waiting = Counted::new(&group.waiting);
                let member_waiting = Counted::new(&member.waiting);
                // The group's slot first: a tenant whose own slots are taken must not sit on node
                // slots that other tenants could use.
                let group_permit = group.slots.clone().acquire_owned().await;
                drop((member_waiting, group_waiting));
                let group_permit = group_permit.expect("lane semaphores are never closed");
                let node_permit =
                    node_slots.clone().acquire_owned().await.expect("lane semaphores are never closed");
                drop(waiting_guard);
                let waited = (meter.origin.elapsed().as_nanos() as u64).saturating_sub(began);
                meter.waited_ns.fetch_add(waited, Ordering::Relaxed);
                meter.wait_began_ns.store(u64::MAX, Ordering::Relaxed);
                let slot_held = Counted::new(&running);
                let holding = Holding::new(member);
                let run = SlowRun {
                    fut: &mut fut,
                    meter: &meter,
                    total: &total,
                    group: &group,
                    holding,
                    share,
                    wakeup: &wakeup,
                    _permits: (group_permit, node_permit),
                };
                // Its own statement: the slots (in `run`) and the running count go back before
                // the call waits below.
                let step = run.await;
                drop(slot_held);
                match step {
                    Step::Done(out) => return out,
                    // Gave its slots to another member of the group: wait again, at the back.
                    Step::Gave => {}
                    // Waits for something outside (a downstream's answer, a timer, a permit of a
                    // downstream's limit) without its slots, which are for using the CPU: a call
                    // holding a slot while it waited for a downstream permit that a call waiting
                    // for that slot held would wait for ever (until its timeout, 15 min for an
                    // async call). Once woken it waits for its slots again, at the back.
                    Step::Waits => wakeup.woken().await,
                }
            }
        })
    }
}

/// A call's membership in a group: the member's entry is forgotten when its last call leaves
/// the slow lane (however it leaves: an aborted task drops this too).
struct Leave {
    group: Arc<Group>,
    name: Arc<str>,
    member: Option<Arc<Member>>,
}

impl Leave {
    fn member(&self) -> &Member {
        self.member.as_deref().expect("a member until dropped")
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        drop(self.member.take());
        let mut members = self.group.members.lock().expect("lane member lock");
        if members.get(&self.name).is_some_and(|m| Arc::strong_count(m) == 1) {
            members.remove(&self.name);
        }
    }
}

/// A slot of a group held by a member: counted in the member's `holding` while held.
struct Holding<'a> {
    member: &'a Member,
    counted: bool,
}

impl<'a> Holding<'a> {
    fn new(member: &'a Member) -> Self {
        member.holding.fetch_add(1, Ordering::Relaxed);
        Self { member, counted: true }
    }

    /// Gives up this slot if the member holds more than `share` of them: true when it does (the
    /// permits go when the caller drops them).
    fn yield_if_over(&mut self, share: usize) -> bool {
        let over = self
            .member
            .holding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n > share).then(|| n - 1))
            .is_ok();
        if over {
            self.counted = false;
        }
        over
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.member.holding.fetch_sub(1, Ordering::Relaxed);
        }
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

/// One more in a gauge while it lives: lowered when dropped, however the holder ends (an aborted
/// task too).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Counted<'_> {
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

fn thread_cpu_ns() -> u64 {
    thread_cpu_now().as_nanos() as u64
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
    /// The call's wall time on the fast lane passed the slice: its polls are now measured on the
    /// thread's CPU clock, which decides whether it moves.
    cpu_checked: AtomicBool,
    /// Thread CPU time since `cpu_checked` was set, in finished polls.
    checked_cpu_ns: AtomicU64,
    /// The thread's CPU clock when the current poll began (or when `cpu_checked` was set in its
    /// middle); `u64::MAX`: not measured. Start and end are read in one poll, on one thread.
    poll_cpu_began_ns: AtomicU64,
    /// Set by the epoch callback: this call has used its fast-lane slice.
    demote: AtomicBool,
    /// The call holds a slow-lane slot: nothing more to decide.
    slow: AtomicBool,
    /// Set by the epoch callback when it yields (tokio's `yield_now` wakes the task only after
    /// the poll): the slow lane keeps a yielding call's slot, and takes it from a waiting one.
    yielded: AtomicBool,
}

impl Meter {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            busy_ns: AtomicU64::new(0),
            poll_began_ns: AtomicU64::new(u64::MAX),
            waited_ns: AtomicU64::new(0),
            wait_began_ns: AtomicU64::new(u64::MAX),
            cpu_checked: AtomicBool::new(false),
            checked_cpu_ns: AtomicU64::new(0),
            poll_cpu_began_ns: AtomicU64::new(u64::MAX),
            demote: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            yielded: AtomicBool::new(false),
        }
    }

    /// Called from the epoch callback when it makes the guest yield: this poll's pending is a
    /// yield, not a wait.
    pub(crate) fn yielding(&self) {
        self.yielded.store(true, Ordering::Relaxed);
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

    /// Called from the epoch callback (inside a poll, on the polling thread): asks for the move
    /// once the call has used its slice. Wall time first, which is cheap to read and an upper
    /// bound of CPU time; past the slice, the thread's CPU clock must confirm with half a slice
    /// more of the call's own CPU time, so time the OS gave to another thread in the middle of
    /// this call's poll never moves it.
    pub(crate) fn check_slice(&self, slice: Duration) {
        if self.slow.load(Ordering::Relaxed) || self.demote.load(Ordering::Relaxed) {
            return;
        }
        if !self.cpu_checked.load(Ordering::Relaxed) {
            if self.busy() >= slice {
                self.cpu_checked.store(true, Ordering::Relaxed);
                self.poll_cpu_began_ns.store(thread_cpu_ns(), Ordering::Relaxed);
            }
            return;
        }
        let mut cpu_ns = self.checked_cpu_ns.load(Ordering::Relaxed);
        let began = self.poll_cpu_began_ns.load(Ordering::Relaxed);
        if began != u64::MAX {
            cpu_ns += thread_cpu_ns().saturating_sub(began);
        }
        if Duration::from_nanos(cpu_ns) >= slice / 2 {
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
    member: Arc<str>,
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
    /// `group` is the tenant, `member` the function within it.
    pub(crate) fn new(
        fut: F,
        meter: Arc<Meter>,
        lanes: Arc<Lanes>,
        group: Arc<str>,
        member: Arc<str>,
    ) -> Self {
        Self { state: State::Fast(Box::pin(fut)), meter, lanes, group, member }
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
                    // Measured on the CPU clock from its start only once the call is checked.
                    let checked = meter.cpu_checked.load(Ordering::Relaxed);
                    if checked {
                        meter.poll_cpu_began_ns.store(thread_cpu_ns(), Ordering::Relaxed);
                    }
                    let began = meter.origin.elapsed().as_nanos() as u64;
                    meter.poll_began_ns.store(began, Ordering::Relaxed);
                    let polled = fut.as_mut().poll(cx);
                    let ended = meter.origin.elapsed().as_nanos() as u64;
                    meter.poll_began_ns.store(u64::MAX, Ordering::Relaxed);
                    let mut used = ended.saturating_sub(began);
                    let cpu_began = meter.poll_cpu_began_ns.swap(u64::MAX, Ordering::Relaxed);
                    if cpu_began != u64::MAX {
                        let cpu = thread_cpu_ns().saturating_sub(cpu_began);
                        meter.checked_cpu_ns.fetch_add(cpu, Ordering::Relaxed);
                        // A poll measured on the CPU clock from its start is charged its CPU
                        // time; the poll in which the check began keeps its wall time.
                        if checked {
                            used = cpu;
                        }
                    }
                    meter.busy_ns.fetch_add(used, Ordering::Relaxed);
                    this.lanes.guest_cpu_ns.fetch_add(used, Ordering::Relaxed);
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
                            let handle =
                                this.lanes.demote(&this.group, &this.member, this.meter.clone(), fut);
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

/// How a guest's turn with a slow-lane slot ended.
enum Step<T> {
    /// The guest finished.
    Done(T),
    /// Its member held more than its share and another member of the group waited: the slot went
    /// to that member.
    Gave,
    /// The guest waits for something that was not there yet (it did not just yield at an epoch
    /// tick): it waits without a slot until [`Wakeup::woken`].
    Waits,
}

/// Whether a guest's future was woken since its last poll: the slow lane polls it with a waker
/// that sets this and wakes the task, so it can tell a yield (woken before its poll returned)
/// from a wait for something outside (not woken yet), and wait for the wake without a slot.
#[derive(Default)]
struct Wakeup {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Wakeup {
    /// Ready once the guest's future was woken (at once if it was already).
    fn woken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.task.register(cx.waker());
            if self.woken.swap(false, Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
        })
    }
}

/// A guest's future on the slow lane while it holds its slots: adds thread CPU time to the meter,
/// and ends early when its member holds more than its share of the group's slots and another
/// member of the group waits ([`Step::Gave`]), or when the guest waits for something outside
/// ([`Step::Waits`]).
struct SlowRun<'a, F: Future> {
    fut: &'a mut Pin<Box<F>>,
    meter: &'a Meter,
    /// The lanes' total of guest time.
    total: &'a AtomicU64,
    group: &'a Group,
    holding: Holding<'a>,
    share: usize,
    wakeup: &'a Arc<Wakeup>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl<F: Future> Future for SlowRun<'_, F> {
    type Output = Step<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Step<F::Output>> {
        let this = self.get_mut();
        // Between two polls the guest is at a yield point (an epoch tick or a host call): the
        // place to hand a slot beyond its share to another member of the group.
        if this.group.others_wait(this.holding.member) && this.holding.yield_if_over(this.share) {
            return Poll::Ready(Step::Gave);
        }
        this.meter.slow.store(true, Ordering::Relaxed);
        this.wakeup.task.register(cx.waker());
        this.wakeup.woken.store(false, Ordering::Release);
        this.meter.yielded.store(false, Ordering::Relaxed);
        let waker = Waker::from(this.wakeup.clone());
        let began = thread_cpu_now();
        let polled = this.fut.as_mut().poll(&mut Context::from_waker(&waker));
        let used = thread_cpu_now().saturating_sub(began);
        this.meter.busy_ns.fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        this.total.fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
        match polled {
            Poll::Ready(out) => Poll::Ready(Step::Done(out)),
            // A yield at an epoch tick (its wake comes after the poll), or woken already (a
            // cooperative yield, an answer that came during the poll): the task runs again soon,
            // with its slot.
            Poll::Pending
                if this.meter.yielded.load(Ordering::Relaxed)
                    || this.wakeup.woken.load(Ordering::Acquire) =>
            {
                Poll::Pending
            }
            Poll::Pending => Poll::Ready(Step::Waits),
        }
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
            slow_slots_per_member_share: slots,
        };
        Arc::new(Lanes::new(config).unwrap())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_short_call_stays_on_the_thread_that_polls_it() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        let fut = LaneFuture::new(
            Burn { polls: 3, work: Duration::ZERO },
            meter.clone(),
            lanes,
            "t".into(),
            "f".into(),
        );
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
        let ran_on = LaneFuture::new(checked, meter.clone(), lanes.clone(), "t".into(), "f".into()).await;
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
            LaneFuture::new(
                Burn { polls: u32::MAX, work: Duration::ZERO },
                meter,
                lanes.clone(),
                "t".into(),
                "f".into(),
            )
        };
        // Polled once: moved to the slow lane, where it takes the only slot and never ends.
        let timed_out = tokio::time::timeout(Duration::from_millis(50), forever).await;
        assert!(timed_out.is_err());
        // The next demoted call gets the slot.
        let meter = Arc::new(Meter::new());
        meter.demote.store(true, Ordering::Relaxed);
        let next = LaneFuture::new(
            Burn { polls: 1, work: Duration::ZERO },
            meter.clone(),
            lanes,
            "t".into(),
            "f".into(),
        );
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
            slow_slots_per_member_share: 1,
        };
        let lanes = Arc::new(Lanes::new(config).unwrap());
        let demoted = |group: &str, polls: u32| {
            let meter = Arc::new(Meter::new());
            meter.demote.store(true, Ordering::Relaxed);
            LaneFuture::new(
                Burn { polls, work: Duration::ZERO },
                meter,
                lanes.clone(),
                group.into(),
                "f".into(),
            )
        };
        // Group a's only slot is held forever; a second call of a waits, a call of b runs.
        let hog = tokio::spawn(demoted("a", u32::MAX));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second_a = tokio::time::timeout(Duration::from_millis(100), demoted("a", 1)).await;
        assert!(second_a.is_err(), "a second call of group a waited for a's slot");
        tokio::time::timeout(Duration::from_secs(5), demoted("b", 1)).await.expect("group b ran");
        hog.abort();
    }

    /// Stands in for the epoch callback: checks the slice before every poll of `inner`.
    async fn checked<F: Future>(meter: Arc<Meter>, inner: F) -> F::Output {
        let mut inner = std::pin::pin!(inner);
        std::future::poll_fn(|cx| {
            meter.check_slice(Duration::from_millis(2));
            inner.as_mut().poll(cx)
        })
        .await
    }

    /// A call that is off the CPU in the middle of its polls (as when the OS runs another
    /// thread): `off` of wall time per poll without using the CPU, checked as the epoch callback
    /// would be after it.
    struct Preempted {
        polls: u32,
        off: Duration,
        meter: Arc<Meter>,
    }

    impl Future for Preempted {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            std::thread::sleep(self.off);
            self.meter.check_slice(Duration::from_millis(2));
            if self.polls == 0 {
                return Poll::Ready(());
            }
            self.polls -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_short_call_kept_off_the_cpu_by_the_os_is_not_moved() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        // 3 polls of 5 ms wall each and almost no CPU: far past the 2 ms slice on the wall clock.
        let call = Preempted { polls: 2, off: Duration::from_millis(5), meter: meter.clone() };
        LaneFuture::new(call, meter.clone(), lanes.clone(), "t".into(), "hello".into()).await;
        assert!(meter.busy() < Duration::from_millis(15), "charged CPU, not wall: {:?}", meter.busy());
        assert!(!meter.demoted(), "moved to the slow lane for time it spent off the CPU");
        assert_eq!(lanes.stats().demoted_total, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_over_its_cpu_slice_in_one_poll_moves_at_its_next_yield() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        // 4 ms of CPU per poll: the first poll passes the slice by itself.
        let burn = Burn { polls: 3, work: Duration::from_millis(4) };
        let ran_on =
            LaneFuture::new(checked(meter.clone(), burn), meter.clone(), lanes, "t".into(), "f".into()).await;
        assert!(meter.demoted());
        assert_ne!(ran_on, std::thread::current().id(), "finished on a slow-lane thread");
    }

    fn lanes_with_share(group_slots: usize, share: usize) -> Arc<Lanes> {
        let config = LaneConfig {
            fast_slice: Duration::from_millis(2),
            slow_threads: 1,
            slow_slots_max: 8,
            slow_slots_per_group_max: group_slots,
            slow_slots_per_member_share: share,
        };
        Arc::new(Lanes::new(config).unwrap())
    }

    fn demoted(lanes: &Arc<Lanes>, member: &str, polls: u32) -> LaneFuture<Burn> {
        let meter = Arc::new(Meter::new());
        meter.demote.store(true, Ordering::Relaxed);
        let burn = Burn { polls, work: Duration::from_micros(200) };
        LaneFuture::new(burn, meter, lanes.clone(), "t".into(), member.into())
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < give_up, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_function_alone_uses_all_its_tenants_slots_and_gives_one_back_when_another_waits() {
        let lanes = lanes_with_share(2, 1);
        // Two endless calls of `spin` take both of the tenant's slots: nobody else waits.
        let hogs = [
            tokio::spawn(demoted(&lanes, "spin", u32::MAX)),
            tokio::spawn(demoted(&lanes, "spin", u32::MAX)),
        ];
        until("both spin calls hold a slot", || lanes.stats().slow_running == 2).await;
        // A third call of `spin` waits: the tenant has no slot left.
        let third = tokio::time::timeout(Duration::from_millis(100), demoted(&lanes, "spin", 1)).await;
        assert!(third.is_err(), "a third call of spin waited for the tenant's slots");
        // A call of `hello`, another function of the same tenant, gets the slot that `spin` holds
        // beyond its share at spin's next yield, not when a spin call ends (never, here).
        tokio::time::timeout(Duration::from_secs(5), demoted(&lanes, "hello", 1))
            .await
            .expect("hello got a slot while spin's calls still ran");
        // Once hello is gone, spin takes both slots again.
        until("spin holds both slots again", || lanes.stats().slow_running == 2).await;
        for hog in hogs {
            hog.abort();
        }
        until("the slots are free", || lanes.stats().slow_running == 0).await;
        let groups = lanes.groups.lock().unwrap();
        assert!(
            groups["t"].members.lock().unwrap().is_empty(),
            "members are forgotten when their calls leave"
        );
    }

    /// A slot is for using the CPU, not for waiting: a call that held its slot while it waited
    /// for a downstream's permit, held by a call that waited for that slot, waited for ever (the
    /// chaos test's stall: two slots per tenant, an initial downstream limit of two).
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_waiting_for_something_outside_holds_no_slot() {
        let lanes = lanes(1);
        let downstream = Arc::new(Semaphore::new(1));
        let (go_b, b_may_go) = tokio::sync::oneshot::channel::<()>();
        // B is moved at once, takes the only slot and waits, first for `go_b`, then for the
        // downstream's permit.
        let b = {
            let meter = Arc::new(Meter::new());
            meter.demote.store(true, Ordering::Relaxed);
            let downstream = downstream.clone();
            let call = async move {
                b_may_go.await.unwrap();
                let _permit = downstream.acquire_owned().await.unwrap();
            };
            tokio::spawn(LaneFuture::new(call, meter, lanes.clone(), "t".into(), "b".into()))
        };
        until("b was moved and waits", || lanes.stats().demoted_total == 1).await;
        until("b waits without its slot", || lanes.stats().slow_running == 0).await;
        // A takes the downstream's permit on the fast lane, uses its slice, and is moved while
        // its request is still out: it needs a slot to go on and give the permit back.
        let a = {
            let meter = Arc::new(Meter::new());
            let downstream = downstream.clone();
            let asked = meter.clone();
            let call = async move {
                let _permit = downstream.acquire_owned().await.unwrap();
                asked.demote.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            tokio::spawn(LaneFuture::new(call, meter, lanes.clone(), "t".into(), "a".into()))
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        go_b.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            a.await.unwrap();
            b.await.unwrap();
        })
        .await
        .expect("both calls finished: neither held a slot while it waited for the other");
        assert_eq!(lanes.stats().demoted_total, 2);
    }

    /// A call that yields at an epoch tick keeps its slot: tokio's `yield_now` wakes the task
    /// only after the poll, so the slow lane must not take it for a wait.
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_yielding_at_an_epoch_tick_keeps_its_slot() {
        let lanes = lanes(1);
        let meter = Arc::new(Meter::new());
        meter.demote.store(true, Ordering::Relaxed);
        let ticks = meter.clone();
        let hog = async move {
            loop {
                let until = thread_cpu_now() + Duration::from_micros(200);
                while thread_cpu_now() < until {
                    std::hint::spin_loop();
                }
                ticks.yielding();
                tokio::task::yield_now().await;
            }
        };
        let hog = tokio::spawn(LaneFuture::new(hog, meter, lanes.clone(), "t".into(), "spin".into()));
        until("the hog holds the slot", || lanes.stats().slow_running == 1).await;
        let second = tokio::time::timeout(Duration::from_millis(100), demoted(&lanes, "spin", 1)).await;
        assert!(second.is_err(), "a second call of the same function waited for the hog's slot");
        hog.abort();
    }
}
