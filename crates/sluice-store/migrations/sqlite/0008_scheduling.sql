-- Migration 8: XFaaS scheduling (issue 9): tenants' quotas, the per-tenant lease indexes, and why
-- an invocation waited.
-- Never edit a migration that has shipped: append a new numbered file instead.

-- A tenant's reserved concurrency (async calls that start whatever the node's load) and its
-- weight in the fair share of the capacity beyond reservations. A tenant without a row has no
-- reservation and weight 1.
CREATE TABLE tenant_quotas (
    tenant   TEXT    PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    reserved INTEGER NOT NULL CHECK (reserved >= 0),
    weight   INTEGER NOT NULL CHECK (weight >= 1)
) STRICT;

-- The scheduler leases per tenant and per class: calls without a deadline in criticality order,
-- calls with one in criticality then deadline order (the due ones, by deadline alone, walk
-- invocations_pending_deadline).
CREATE INDEX invocations_tenant_plain ON invocations (tenant, criticality, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NULL;
CREATE INDEX invocations_tenant_windowed ON invocations (tenant, criticality, deadline, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;

-- Why the last attempt waited to start, as the scheduler saw it: a JSON object of milliseconds by
-- reason (`quota`, `utilization`, `downstream`, `start_window`).
ALTER TABLE invocations ADD COLUMN waits TEXT;
