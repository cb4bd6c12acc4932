//! End-to-end tests: the real `sluice` binary on 127.0.0.1:0, driven over HTTP and through its
//! CLI, as a user would. One test binary, one module per area (wasmtime's `tests/all` layout).

mod harness;

mod admission;
mod api;
mod bounds;
mod chaos;
mod cluster;
mod code;
mod completions;
mod control;
mod credentials;
mod deploy;
mod lanes;
mod languages;
mod limits;
mod logs;
mod metrics;
mod new;
mod output;
mod queue;
mod quotas;
mod reuse;
mod rollout;
mod schedules;
mod scheduling;
mod serve;
mod tenancy;
mod tls;
mod top;
mod traces;
mod triggers;
mod versions;
