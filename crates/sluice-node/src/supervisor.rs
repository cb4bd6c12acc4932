//! The node's background tasks — the scheduler loop, the retention purge, the log recorder's
//! writer, the store's queue writer — each must live as long as the node. One that ends early
//! (a panic, an unexpected return) would leave the node half alive: answering 202 while nothing
//! runs the queue, or accepting logs that are never written. The [`Supervisor`] watches them and
//! reports the first unexpected end, so `sluice serve` can stop loudly instead.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// How often a task the supervisor does not own (it only has its [`AbortHandle`]) is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Default)]
struct State {
    stopping: AtomicBool,
    /// The first unexpected end, as a sentence.
    failure: watch::Sender<Option<String>>,
}

/// Watches the node's background tasks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Supervisor {
    state: Arc<State>,
}

impl Supervisor {
    /// Spawns `task` on the current runtime and watches it.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.watch(name, tokio::spawn(task));
    }

    /// Watches a task spawned elsewhere.
    pub fn watch(&self, name: &'static str, task: JoinHandle<()>) {
        let state = self.state.clone();
        tokio::spawn(async move {
            let how = match task.await {
                Ok(()) => "returned".to_string(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                Err(_) => "was cancelled".to_string(),
            };
            state.ended(name, &how);
        });
    }

    /// Watches a task whose `JoinHandle` its owner keeps (to await it at shutdown): it is only
    /// known to have ended, not how — the panic hook has printed the panic already.
    pub fn watch_handle(&self, name: &'static str, task: AbortHandle) {
        let state = self.state.clone();
        tokio::spawn(async move {
            while !task.is_finished() {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            state.ended(name, "ended");
        });
    }

    /// The node is shutting down: tasks that end from now on end as planned.
    pub fn stopping(&self) {
        self.state.stopping.store(true, Ordering::Release);
    }

    /// Resolves with a description of the first task that ended while the node was not stopping.
    pub async fn failed(&self) -> String {
        let mut failure = self.state.failure.subscribe();
        loop {
            if let Some(f) = failure.borrow_and_update().clone() {
                return f;
            }
            // The sender lives in `self.state`, which outlives this call.
            let _ = failure.changed().await;
        }
    }
}

impl State {
    fn ended(&self, name: &str, how: &str) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let failure = format!("background task `{name}` {how}");
        tracing::error!("{failure}");
        self.failure.send_if_modified(|first| {
            let new = first.is_none();
            if new {
                *first = Some(failure);
            }
            new
        });
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "(a non-string panic payload)".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_reported_unless_the_node_is_stopping() {
        let supervisor = Supervisor::default();
        supervisor.spawn("forever", std::future::pending());
        supervisor.spawn("doomed", async { panic!("on purpose") });
        let failure = tokio::time::timeout(Duration::from_secs(5), supervisor.failed()).await.unwrap();
        assert_eq!(failure, "background task `doomed` panicked: on purpose");

        let supervisor = Supervisor::default();
        let owned = tokio::spawn(async {});
        supervisor.watch_handle("owned", owned.abort_handle());
        let failure = tokio::time::timeout(Duration::from_secs(5), supervisor.failed()).await.unwrap();
        assert_eq!(failure, "background task `owned` ended");

        let supervisor = Supervisor::default();
        supervisor.stopping();
        supervisor.spawn("finishing", async {});
        let quiet = tokio::time::timeout(Duration::from_millis(300), supervisor.failed()).await;
        assert!(quiet.is_err(), "an end during shutdown is not a failure");
    }
}
