//! A value read from the store at most once in a while, however many ask for it.

use std::time::Duration;

/// The shortest time between two reads of the queue's depth from the store, however often and
/// by however many the node is scraped.
pub const STORE_READ_EVERY: Duration = Duration::from_secs(1);

/// A value read at most once per `every`, shared by concurrent readers (who wait for one read
/// instead of each making their own).
pub struct Recent<T> {
    every: Duration,
    slot: tokio::sync::Mutex<Option<(tokio::time::Instant, T)>>,
}

impl<T: Clone> Recent<T> {
    pub fn new(every: Duration) -> Self {
        Self { every, slot: tokio::sync::Mutex::new(None) }
    }

    pub async fn get<E, F: Future<Output = Result<T, E>>>(&self, read: impl FnOnce() -> F) -> Result<T, E> {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = &*slot
            && at.elapsed() < self.every
        {
            return Ok(value.clone());
        }
        let value = read().await?;
        *slot = Some((tokio::time::Instant::now(), value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recent_value_is_read_once_per_period_however_many_ask() {
        let reads = std::sync::atomic::AtomicU32::new(0);
        let read = || async { Ok::<_, ()>(reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1) };
        let kept = Recent::new(Duration::from_secs(3600));
        let got = futures::future::join_all((0..20).map(|_| kept.get(read))).await;
        assert!(got.iter().all(|v| *v == Ok(1)), "{got:?}");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        let every_time = Recent::new(Duration::ZERO);
        every_time.get(read).await.unwrap();
        every_time.get(read).await.unwrap();
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
