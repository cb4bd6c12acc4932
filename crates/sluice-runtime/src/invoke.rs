//! Running one invocation: [`Runtime::invoke`] builds the call's store (or takes a warm one),
//! starts the guest on its lane, and turns how it ended into the call's [`Outcome`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use bytes::Bytes;
use sluice_core::{Clock, ErrorKind, LogStream, SluiceError, SystemClock};
use tokio::sync::oneshot;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::Error as BodyError;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use crate::call::{Call, CancelOnDrop, Lane, Outcome, Running, cancelled};
use crate::classify::{classify, timeout_error, trap_detail, waited_ms};
use crate::code::Prepared;
use crate::host::{Host, Limiter};
use crate::logs::LogCapture;
use crate::runtime::Runtime;
use crate::{heavy, lanes, outbound, trace, warm};

/// The request header that carries the invocation id to the guest.
pub const INVOCATION_ID_HEADER: &str = "sluice-invocation-id";

/// Host-side resources (streams, bodies, pollables) a guest may hold at once.
const RESOURCE_TABLE_CAPACITY_MAX: usize = 10_000;

impl Runtime {
    /// A fresh store for `call`: its guest's stdout and stderr go to `logs`, its outbound
    /// requests through `hooks`; its epoch callback stops it at its deadline and moves it off the
    /// fast lane once it used its slice.
    fn new_store(
        &self,
        engine: &Engine,
        call: &Call,
        logs: &LogCapture,
        hooks: outbound::OutboundPolicy,
        deadline: Instant,
        meter: Arc<lanes::Meter>,
    ) -> Store<Host> {
        let fast_slice = self.lanes.config().fast_slice;
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(logs.stream(LogStream::Stdout))
            .stderr(logs.stream(LogStream::Stderr))
            .envs(&call.config.env)
            .envs(call.config.secrets.expose())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(RESOURCE_TABLE_CAPACITY_MAX);
        let host = Host {
            table,
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks,
            limiter: Limiter {
                memory_bytes_max: call.config.memory_bytes as usize,
                memory_limit_hit: false,
                memory_bytes: 0,
            },
            deadline,
            meter,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limiter);
        store.epoch_deadline_callback(move |ctx| {
            let host = ctx.data();
            if Instant::now() >= host.deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            host.meter.check_slice(fast_slice);
            host.meter.yielding();
            // The yield is where a call that used its slice leaves the fast lane (`LaneFuture`
            // sees the request when this future returns pending), and where a call that did not
            // lets its neighbours on this thread run.
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        });
        store
    }

    /// Starts one invocation in a fresh store (or a warm one, see [`warm`]). A [`Lane::Sync`] call starts on the current
    /// runtime (the HTTP worker of its core) so a short call never leaves it; a [`Lane::Async`]
    /// call, and a sync call of a heavy component, starts on the slow lane's threads. Either moves to a slow-lane slot once it has used
    /// its fast-lane slice. The request gets `sluice-invocation-id` (and a `Host` if it has none)
    /// here, for every caller.
    pub fn invoke<B>(&self, prepared: &Arc<Prepared>, mut call: Call, request: http::Request<B>) -> Running
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BodyError>,
    {
        let mut request = request;
        let headers = request.headers_mut();
        // The guest contract: every attempt sees the invocation id — sluice's, replacing any a
        // client sent — and wasi:http needs an authority, so a request without `Host` gets one.
        let id = http::HeaderValue::from_str(&call.invocation_id).expect("invocation ids are ASCII");
        headers.insert(INVOCATION_ID_HEADER, id);
        if !headers.contains_key(http::header::HOST) {
            headers.insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
        }
        let run_span = call
            .trace
            .as_ref()
            .and_then(|p| trace::RunSpan::start(&p.cx, &call.invocation_id, &call.function, p.attempt));
        let propagation = trace::Propagation::for_guest(run_span.as_ref(), headers);
        let started_at = SystemClock.now_ms();
        let deadline = Instant::now() + call.timeout;
        let meter = Arc::new(lanes::Meter::new());
        let fast_slice = self.lanes.config().fast_slice;
        // A warm instance of this version (`deploy --reuse`), or a fresh one.
        let warm = call.reuse.as_ref().and_then(|r| self.warm.take(&r.key, &call.config));
        let logs = match &warm {
            Some(w) => w.logs.clone(),
            None => LogCapture::new(self.config.log_bytes_per_invocation_max),
        };
        let hooks = outbound::OutboundPolicy::new(
            call.config.clone(),
            self.config.outbound_allow_private,
            self.config.outbound.clone(),
            self.egress.clone(),
            logs.clone(),
            outbound::DownstreamScope {
                registry: self.downstreams.clone(),
                tenant: call.group.clone(),
                function: call.function.clone(),
            },
            propagation,
        );
        // A heavy component's fresh instance takes the pool slot its permit reserved; a warm one
        // already holds its own.
        let fresh_slot = call.instance.as_mut().and_then(|p| p.heavy_slot.take());
        let (mut store, proxy, served, heavy_slot) = match warm {
            Some(warm::Warm { mut store, proxy, calls, heavy_slot, .. }) => {
                drop(fresh_slot);
                // What belongs to this call; the guest's own state (memory, resources it kept)
                // stays.
                let host = store.data_mut();
                host.hooks = hooks;
                host.limiter.memory_limit_hit = false;
                host.deadline = deadline;
                host.meter = meter.clone();
                (store, Some(proxy), calls, heavy_slot)
            }
            None => {
                let store = self.new_store(&prepared.engine, &call, &logs, hooks, deadline, meter.clone());
                (store, None, 0, fresh_slot)
            }
        };
        store.set_epoch_deadline(1);
        let reusable = call.reuse.is_some() && served + 1 < call.config.reuse_calls;

        let (head_tx, head_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let status = Arc::new(AtomicU16::new(0));
        let status_seen = status.clone();
        let heavy = prepared.heavy();
        let prepared = prepared.clone();
        // The guest's part of the call, which may move between lanes: it owns the store, so
        // wherever it ends (or is dropped) the instance is freed there.
        // One value, so that however the future below ends (even unpolled) the store drops
        // before its slot.
        let held = Held { store, heavy_slot };
        let run = async move {
            let mut held = held;
            let store = &mut held.store;
            let result = async {
                let req = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
                let out = store.data_mut().http().new_response_outparam_from_callback(move |res| {
                    if let Ok(r) = &res {
                        status_seen.store(r.status().as_u16(), Ordering::Relaxed);
                    }
                    let _ = head_tx.send(res);
                })?;
                let proxy = match proxy {
                    Some(proxy) => proxy,
                    None => prepared.pre.instantiate_async(&mut *store).await?,
                };
                proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out).await?;
                Ok(proxy)
            }
            .await;
            let memory_hit = store.data().limiter.memory_limit_hit;
            match result {
                // Kept for the task to decide whether it serves again, when it may.
                Ok(proxy) if reusable => Ran { result: Ok(()), memory_hit, kept: Some((held, proxy)) },
                result => {
                    // Dropping the store at once frees its slot and drops an unset response
                    // outparam, which tells the waiting caller that no response is coming.
                    drop(held);
                    Ran { result: result.map(drop), memory_hit, kept: None }
                }
            }
        };
        let guest = lanes::LaneFuture::new(
            run,
            meter.clone(),
            self.lanes.clone(),
            call.group.clone(),
            call.function.clone(),
        );
        let invocation_id = call.invocation_id.clone();
        let memory_bytes = call.config.memory_bytes;
        let lane = call.lane;
        let warm_pools = self.warm.clone();
        let instance_permit = call.instance;
        let task = async move {
            let _instance_permit = instance_permit;
            // The epoch callback stops a guest that computes past its deadline; this outer bound
            // stops one that waits in a host call (a sleep, a slow downstream) or for a slot.
            let ended = tokio::select! {
                biased;
                () = cancelled(cancel_rx) => Ended::Cancelled,
                r = tokio::time::timeout_at(deadline.into(), guest) => match r {
                    Ok(ran) => Ended::Ran(ran),
                    Err(_elapsed) => Ended::TimedOut,
                },
            };
            let status_code = match status.load(Ordering::Relaxed) {
                0 => None,
                s => Some(s),
            };
            let mut detail = None;
            let mut kept = None;
            let error = match ended {
                Ended::Cancelled => Some(SluiceError::new(
                    ErrorKind::ClientClosed,
                    "the client closed the connection before the response was complete",
                )),
                Ended::TimedOut => Some(timeout_error(call.timeout, meter.waited())),
                Ended::Ran(Ran { result: Ok(()), .. }) if status_code.is_none() => Some(SluiceError::new(
                    ErrorKind::NoResponse,
                    "the function returned without setting a response",
                )),
                Ended::Ran(Ran { result: Ok(()), memory_hit, kept: k }) => {
                    // A guest that coped with a refused memory.grow is not reused either: it
                    // hit a limit.
                    if !memory_hit {
                        kept = k;
                    }
                    None
                }
                Ended::Ran(Ran { result: Err(e), memory_hit, .. }) => {
                    detail = trap_detail(&e);
                    Some(classify(&e, memory_hit, memory_bytes, call.timeout, meter.waited()))
                }
            };
            if meter.demoted() {
                // Says why a call took longer than its neighbours, and what it waited for.
                let mut line = format!(
                    "used its fast-lane slice of {}; moved to a slow-lane slot",
                    sluice_core::units::format_duration(fast_slice)
                );
                if let Some(waited) = waited_ms(meter.waited()) {
                    line.push_str(&format!(", where it waited {waited} for a slot"));
                }
                logs.system(line);
            }
            if let Some(e) = &error {
                let said = detail.as_deref().unwrap_or(&e.message);
                logs.system(format!("invocation failed ({}): {said}", e.kind));
            }
            if let Some(reuse) = &call.reuse
                && served > 0
            {
                // A call on a warm instance: some guests cannot serve a second call.
                let failed = error.as_ref().is_some_and(|e| e.kind != ErrorKind::ClientClosed);
                if warm_pools.warm_call_ended(&reuse.key, failed) {
                    let line = format!(
                        "{} calls in a row failed on reused instances of this version: it gets a \
                         fresh instance for every call from now on (this function's instances \
                         cannot serve more than one call; deploy it without --reuse)",
                        warm::WARM_FAILURES_MAX
                    );
                    tracing::warn!(tenant = %reuse.key.tenant, function = %reuse.key.function, version = reuse.key.version, "{line}");
                    logs.system(line);
                }
            }
            let cpu_us = meter.busy().as_micros() as u64;
            if let Some(span) = run_span {
                span.end(status_code, error.as_ref(), cpu_us);
            }
            let outcome = Outcome {
                invocation_id,
                error,
                status_code,
                logs: logs.take(),
                started_at,
                finished_at: SystemClock.now_ms(),
                cpu_us,
            };
            // Only after its lines were taken: the next call on this instance starts with none.
            let served = served + 1;
            if let Some(reuse) = &call.reuse {
                if let Some((Held { store, heavy_slot }, proxy)) = kept {
                    warm_pools.put(
                        reuse.key.clone(),
                        warm::Warm::new(store, proxy, call.config.clone(), logs, served, heavy_slot),
                    );
                }
                warm_pools.ended();
            }
            if let Some(on_done) = call.on_done {
                on_done(&outcome);
            }
            let _ = done_tx.send(outcome);
        };
        // A heavy component's sync call starts on the slow lane's threads too: its instances are
        // bounded per version, and on the accepting core's worker two of them could share one
        // core while the other waited (Python fresh: 414 req/s there, 655-689 here; BENCHMARKS.md).
        // Most of its calls outlast the fast-lane slice anyway.
        match lane {
            Lane::Sync if !heavy => drop(tokio::spawn(task)),
            _ => drop(self.lanes.handle().spawn(task)),
        }
        Running { head: head_rx, done: done_rx, cancel: CancelOnDrop(Some(cancel_tx)) }
    }
}

/// How the guest's task ended.
enum Ended {
    Ran(Ran),
    TimedOut,
    Cancelled,
}

/// A guest that ran to its end (or its trap).
struct Ran {
    result: wasmtime::Result<()>,
    /// A `memory.grow` was refused by the function's limit.
    memory_hit: bool,
    /// The instance, after a clean return: it may serve again.
    kept: Option<(Held, wasmtime_wasi_http::p2::bindings::Proxy)>,
}

/// A call's store and the heavy pool slot it occupies, if any: fields drop in order, so the slot
/// is given back only after the store (and its instance) is gone.
struct Held {
    store: Store<Host>,
    heavy_slot: Option<heavy::HeavySlot>,
}
