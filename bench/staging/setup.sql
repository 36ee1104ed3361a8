-- Staging benchmark: policies and the raw baseline tables.
-- Run after the migrations, in the benchmark database.
SELECT dispatch_policy.declare_policy('bench_throttle', '{
  "gates": [{"type": "throttle", "name": "per_endpoint", "rate": 100, "per": 1, "partition_by": "{endpoint_id}"}]
}');
SELECT dispatch_policy.declare_policy('bench_rr', '{
  "gates": [{"type": "throttle", "name": "per_endpoint", "rate": 100, "per": 1, "partition_by": "{endpoint_id}"}],
  "round_robin_by": "{account_id}"
}');

DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE SEQUENCE bench.raw_ids AS bigint;
-- Same columns, defaults, CHECK constraints, primary key and partial indexes
-- as dispatch_policy.staged_jobs, and the same autovacuum settings.
CREATE TABLE bench.raw_jobs (LIKE dispatch_policy.staged_jobs INCLUDING ALL);
DO $$
BEGIN
  EXECUTE format('ALTER TABLE bench.raw_jobs SET (%s)',
                 (SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = 'dispatch_policy.staged_jobs'::regclass));
END
$$;
-- The 1,000-job payload of the multi-row benchmarks, as a client would send it.
CREATE TABLE bench.payload (jobs jsonb);
INSERT INTO bench.payload
SELECT jsonb_agg(jsonb_build_object('args', jsonb_build_object('url', 'https://example.com/hook', 'n', i),
                                    'context', jsonb_build_object('endpoint_id', 'e' || (i % 100), 'account_id', 'a' || (i % 10)))
                 ORDER BY i)
FROM generate_series(1, 1000) i;
