-- Migration 6: retiring old versions (issue 10).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- A version older than the newest few of its function is deleted unless an invocation that has
-- not finished names it; this index makes that check a lookup instead of a scan of the
-- function's whole history.
CREATE INDEX invocations_pending_version ON invocations (tenant, function, version)
    WHERE status IN ('queued', 'failed', 'running');
