//! How a failed call is described: classified once, by type, never by message text.

use std::time::Duration;

use sluice_core::{ErrorKind, SluiceError};
use wasmtime::Trap;

/// A wait for a slow-lane slot, to the millisecond, if it lasted one.
pub(crate) fn waited_ms(waited: Duration) -> Option<String> {
    let ms = Duration::from_millis(waited.as_millis() as u64);
    (!ms.is_zero()).then(|| sluice_core::units::format_duration(ms))
}

pub(crate) fn timeout_error(timeout: Duration, waited: Duration) -> SluiceError {
    let mut message = format!(
        "the function did not finish within its timeout of {}",
        sluice_core::units::format_duration(timeout)
    );
    if let Some(waited) = waited_ms(waited) {
        message.push_str(&format!(" (of which it waited {waited} for a slow-lane slot)"));
    }
    SluiceError::new(ErrorKind::Timeout, message)
}

/// Classifies a failed guest call once, by type, never by message text.
pub(crate) fn classify(
    err: &wasmtime::Error,
    memory_hit: bool,
    memory_bytes: u64,
    timeout: Duration,
    waited: Duration,
) -> SluiceError {
    if memory_hit {
        return SluiceError::new(
            ErrorKind::MemoryLimit,
            format!("the function exceeded its memory limit of {memory_bytes} bytes"),
        );
    }
    if err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        return SluiceError::new(ErrorKind::Overloaded, "no free instance slot on this node").retry_after(1);
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => timeout_error(timeout, waited),
        // The kind of trap only: the caller of a function learns that it failed and how, not
        // its internals. The whole chain goes to the invocation's logs (`trap_detail`).
        Some(trap) => SluiceError::new(ErrorKind::Trap, format!("the function trapped ({trap})")),
        None => SluiceError::new(ErrorKind::Trap, "the function failed in a host call"),
    }
}

/// What the logs say about a failed call beyond its [`SluiceError`]: the error chain of a trap.
pub(crate) fn trap_detail(err: &wasmtime::Error) -> Option<String> {
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => None,
        _ => Some(format!("{err:#}")),
    }
}
