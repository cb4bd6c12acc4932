//! The node's wasm runtime ([`Runtime`]): its engines, code cache, CPU lanes, warm pools,
//! downstream limits and outbound egress, built once from the [`RuntimeConfig`], and the bounds
//! on instances alive at once. What it does with them lives beside it: loading and compiling
//! code in `artifacts`, running a call in `invoke`.

use std::sync::Arc;
use std::time::Instant;

use sluice_core::{FunctionConfig, SluiceError};

use crate::code::{self, Prepared};
use crate::config::RuntimeConfig;
use crate::downstream::Downstreams;
use crate::engine::{EngineSet, pool_config};
use crate::lanes::{self, LaneStats};
use crate::{dns, heavy, outbound, warm};

/// The node's wasm runtime.
pub struct Runtime {
    /// Light components: memory images mapped copy-on-write.
    pub(crate) light: EngineSet,
    /// Heavy components: memory images copied into resident pages (see
    /// [`RuntimeConfig::heavy_memory_keep_resident_bytes`]).
    pub(crate) heavy: EngineSet,
    /// Room in the heavy engine's pool, shared out per tenant.
    heavy_slots: Arc<heavy::HeavySlots>,
    pub(crate) config: RuntimeConfig,
    pub(crate) lanes: Arc<lanes::Lanes>,
    pub(crate) code: code::CodeCache,
    pub(crate) downstreams: Arc<Downstreams>,
    /// Where guests' outbound requests resolve names and connect.
    pub(crate) egress: outbound::Egress,
    pub(crate) warm: Arc<warm::WarmPools>,
    instance_limits: warm::InstanceLimits,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        // A Rust wasip2 component instantiates a few core instances (the program plus shims)
        // with one memory and a few tables; a componentize-py one a dozen, sharing one memory.
        // The heavy pool is small, so its room per instance is generous: slots cost address
        // space, not memory, until they are used.
        let light_pool =
            pool_config(config.instances_max, (4, 2), &config, config.memory_keep_resident_bytes);
        let light = EngineSet::new(light_pool, true)?;
        let heavy_pool =
            pool_config(config.heavy_slots_max, (64, 4), &config, config.heavy_memory_keep_resident_bytes);
        let heavy = EngineSet::new(heavy_pool, false)?;
        let heavy_slots_max = config.heavy_slots_max as usize;
        let heavy_slots = heavy::HeavySlots::new(
            heavy_slots_max,
            sluice_core::share::TenantShares::share_of(heavy_slots_max, config.heavy_tenant_share),
        );
        std::fs::create_dir_all(&config.artifact_dir)?;
        let lanes = Arc::new(lanes::Lanes::new(config.lanes.clone())?);
        let code = code::CodeCache::new(config.code.clone())?;
        let downstreams = Arc::new(Downstreams::new());
        let resolver = dns::Resolver::from_system(&config.dns)?;
        let egress = outbound::Egress::system(resolver, config.dns.lookups_per_tenant_max);
        let warm = warm::WarmPools::new(config.warm);
        Ok(Self {
            light,
            heavy,
            heavy_slots,
            config,
            lanes,
            code,
            downstreams,
            egress,
            warm,
            instance_limits: Default::default(),
        })
    }

    /// What the CPU lanes are doing.
    pub fn lane_stats(&self) -> LaneStats {
        self.lanes.stats()
    }

    /// What the warm pools hold and have done.
    pub fn warm_stats(&self) -> warm::WarmStats {
        self.warm.stats()
    }

    /// How many instances of `prepared` with `config` may be alive at once on this node: the
    /// function's own `instances_max`, else [`RuntimeConfig::heavy_instances_max`] for a heavy
    /// component, else no bound.
    pub fn instances_max(&self, prepared: &Prepared, config: &FunctionConfig) -> Option<u32> {
        config.instances_max.or_else(|| {
            prepared.heavy().then(|| {
                self.config.heavy_instances_max.unwrap_or_else(|| {
                    let n = self.config.heavy_memory_max / prepared.initial_memory_bytes.max(1);
                    u32::try_from(n).unwrap_or(u32::MAX).max(1)
                })
            })
        })
    }

    /// Waits, until `deadline`, for room for one more instance of version `key` (`None` when the
    /// version is not bounded). The permit goes in the call's [`Call::instance`](crate::Call::instance).
    pub async fn instance_permit(
        &self,
        key: &warm::WarmKey,
        prepared: &Prepared,
        config: &FunctionConfig,
        deadline: Instant,
    ) -> Result<Option<warm::InstancePermit>, SluiceError> {
        let Some(max) = self.instances_max(prepared, config) else { return Ok(None) };
        let mut permit = self.instance_limits.acquire(key, max, deadline).await?;
        if prepared.heavy() {
            permit.heavy_slot = Some(self.heavy_slot(&key.tenant, deadline).await?);
        }
        Ok(Some(permit))
    }

    /// A slot of the heavy engine's pool for a call of `tenant`, waiting until `deadline` (a
    /// tenant under its share before one beyond it: `heavy`). Idle warm instances of heavy
    /// components give theirs up first: a call that needs a fresh instance comes before one
    /// that may never come.
    async fn heavy_slot(&self, tenant: &str, deadline: Instant) -> Result<heavy::HeavySlot, SluiceError> {
        self.heavy_slots.acquire(tenant, deadline, || self.warm.drop_idle_heavy()).await
    }

    /// The concurrency limits of every function's downstreams on this node: the scheduler and
    /// the gateway ask it whether a function may start, the API shows it.
    pub fn downstreams(&self) -> &Arc<Downstreams> {
        &self.downstreams
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Identifies the engines' code generation settings (light and heavy); part of every
    /// artifact's file name.
    pub fn engine_fingerprint(&self) -> String {
        format!("{}+{}", self.light.fingerprint, self.heavy.fingerprint)
    }

    /// The engine for components whose instances start with `initial_memory_bytes`.
    pub(crate) fn engine_for(&self, heavy: bool) -> &EngineSet {
        if heavy { &self.heavy } else { &self.light }
    }

    /// Heavy instances alive now, and at most.
    pub fn heavy_slots(&self) -> (u32, u32) {
        let max = self.config.heavy_slots_max;
        (self.heavy_slots.in_use() as u32, max)
    }
}
