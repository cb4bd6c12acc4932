-- Migration 4: per-tenant usage limits (see SQLite migration 10).
-- Never edit a migration that has shipped: append a new numbered file instead.
CREATE TABLE tenant_usage_limits (
    tenant               TEXT   PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    queued_max           BIGINT CHECK (queued_max >= 0),
    queued_bytes_max     BIGINT CHECK (queued_bytes_max >= 0),
    components_bytes_max BIGINT CHECK (components_bytes_max >= 0),
    functions_max        BIGINT CHECK (functions_max >= 0),
    versions_max         BIGINT CHECK (versions_max >= 0)
);

ALTER TABLE invocations ADD COLUMN request_bytes BIGINT;
UPDATE invocations SET request_bytes = octet_length(request_body) + octet_length(request_headers)
    WHERE status IN ('queued', 'failed', 'running') AND mode = 'async';

DROP INDEX invocations_pending_version;
CREATE INDEX invocations_pending_version ON invocations (tenant, function, version, request_bytes)
    WHERE status IN ('queued', 'failed', 'running');

-- Other nodes reload limits when a tenant's usage limits change, as for its rate and quota.
CREATE OR REPLACE FUNCTION sluice_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed RECORD;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"keys"}');
    ELSIF TG_TABLE_NAME IN ('tenant_limits', 'tenant_quotas', 'tenant_usage_limits') THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"limits"}');
    ELSIF TG_TABLE_NAME = 'functions' THEN
        PERFORM pg_notify('sluice_changes', json_build_object(
            'kind', 'function', 'tenant', changed.tenant, 'function', changed.name)::text);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tenant_usage_limits_changed AFTER INSERT OR UPDATE OR DELETE ON tenant_usage_limits
    FOR EACH ROW EXECUTE FUNCTION sluice_notify_change();
