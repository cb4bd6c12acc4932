-- Migration 4: CPU time per invocation (the CPU lanes of issue 7).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- Microseconds the invocation spent on a thread, summed over its attempts: instantiation, guest
-- code and the host calls it made. NULL for rows recorded before this migration.
ALTER TABLE invocations ADD COLUMN cpu_us INTEGER CHECK (cpu_us IS NULL OR cpu_us >= 0);
