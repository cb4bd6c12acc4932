-- Migration 2: XFaaS scheduling (see SQLite migration 8).
CREATE TABLE tenant_quotas (
    tenant   TEXT   PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    reserved BIGINT NOT NULL CHECK (reserved >= 0),
    weight   BIGINT NOT NULL CHECK (weight >= 1)
);
CREATE TRIGGER tenant_quotas_changed AFTER INSERT OR UPDATE OR DELETE ON tenant_quotas
    FOR EACH ROW EXECUTE FUNCTION sluice_notify_change();

CREATE OR REPLACE FUNCTION sluice_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed RECORD;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"keys"}');
    ELSIF TG_TABLE_NAME IN ('tenant_limits', 'tenant_quotas') THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"limits"}');
    ELSIF TG_TABLE_NAME = 'functions' THEN
        PERFORM pg_notify('sluice_changes', json_build_object(
            'kind', 'function', 'tenant', changed.tenant, 'function', changed.name)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE INDEX invocations_tenant_plain ON invocations (tenant, criticality, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NULL;
CREATE INDEX invocations_tenant_windowed ON invocations (tenant, criticality, deadline, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;

ALTER TABLE invocations ADD COLUMN waits TEXT;
