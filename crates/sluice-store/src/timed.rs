//! [`Timed`]: a [`Store`] whose every call ends within a bound.
//!
//! The SQLite store bounds its own waits where SQLite lets it (the pool's acquire timeout, the
//! busy timeout of each statement), but not everything a call can wait on: the queue writer's
//! channel, a writer stuck in a slow fsync, a batch that retries op by op. A node wraps its store
//! in this, so that a request answers 503 and a background task logs and tries again instead of
//! hanging with whatever it holds (an admission slot, a body, a lease).
//!
//! A call that times out may still complete later (a queued write is not withdrawn), so callers
//! must treat it like any other `Unavailable`: nothing was acknowledged. Trying again is safe for
//! reads and fenced writes; an enqueue tried again may be stored twice unless it carries an
//! idempotency key (at-least-once, as with any client retry).

use std::future::Future;
use std::time::Duration;

use crate::{Change, Store, StoreError, StoreResult};

/// The longest any store call may take. Longer than the SQLite store's own bounds
/// ([`crate::sqlite::POOL_ACQUIRE_TIMEOUT`] plus [`crate::sqlite::BUSY_TIMEOUT`]), so that when
/// those fire their more specific error is what the caller sees.
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A store whose calls fail with [`StoreError::Unavailable`] once they take longer than a bound.
#[derive(Debug)]
pub struct Timed<S> {
    pub(crate) inner: S,
    timeout: Duration,
}

impl<S> Timed<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    pub(crate) async fn bound<T>(
        &self,
        call: &str,
        answer: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{call} did not finish within {}",
                sluice_core::units::format_duration(self.timeout)
            ))),
        }
    }
}

/// Defines one of the store's domain traits and [`Timed`]'s implementation of it from one list of
/// methods: each forwards to the inner store under [`Timed::bound`]. So a method added to a domain
/// is written once, here, and bounded like every other.
macro_rules! store_trait {
    (
        $(#[$attr:meta])*
        pub trait $trait:ident {
            $(
                $(#[$method_attr:meta])*
                async fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;
            )*
        }
    ) => {
        $(#[$attr])*
        #[async_trait::async_trait]
        pub trait $trait: Send + Sync + 'static {
            $(
                $(#[$method_attr])*
                async fn $name(&self $(, $arg: $ty)*) -> $ret;
            )*
        }

        #[async_trait::async_trait]
        impl<S: $trait> $trait for $crate::Timed<S> {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.bound(stringify!($name), self.inner.$name($($arg),*)).await
                }
            )*
        }
    };
}

impl<S: Store> Store for Timed<S> {
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        self.inner.changes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sqlx::{ConnectOptions, Connection};

    use super::*;
    use crate::{Invocations, SqliteStore, Tenants};

    /// Another connection holds SQLite's write lock, so every write of the store waits for the
    /// busy timeout (5 s): the wrapper must answer long before that.
    #[tokio::test]
    async fn a_call_that_waits_too_long_is_unavailable_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let store = Timed::new(SqliteStore::open(&path).await.unwrap(), Duration::from_millis(200));
        let mut locker = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await.unwrap();

        let started = Instant::now();
        let err = store.create_tenant("t").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("create_tenant"), "{err}");
        // Through the queue writer too.
        let err = store.purge(0, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        locker.close().await.unwrap();
        assert!(store.list_tenants().await.is_ok(), "answers again once the lock is gone");
    }
}
