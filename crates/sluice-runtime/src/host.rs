//! The per-store state a guest's host calls see ([`Host`]), and the limiter that enforces a
//! function's memory limit and records that it fired.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::{lanes, outbound};

/// Table elements a guest table may grow to.
pub(crate) const TABLE_ELEMENTS_MAX: usize = 100_000;

/// The per-store state a guest's host calls see.
pub(crate) struct Host {
    pub(crate) table: ResourceTable,
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) hooks: outbound::OutboundPolicy,
    pub(crate) limiter: Limiter,
    pub(crate) deadline: Instant,
    /// This call's time on threads, checked against the fast-lane slice at every epoch tick.
    pub(crate) meter: Arc<lanes::Meter>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Enforces the function's memory limit and records that it fired, so a memory kill is reported
/// as `memory_limit` without parsing the trap message (Spin's approach).
pub(crate) struct Limiter {
    pub(crate) memory_bytes_max: usize,
    pub(crate) memory_limit_hit: bool,
    /// The instance's linear memories, in bytes, summed (a memory's creation counts as growth
    /// from 0): what a warm instance holds while it waits.
    pub(crate) memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            self.memory_limit_hit = true;
            return Ok(false);
        }
        self.memory_bytes = self.memory_bytes.saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }
}
