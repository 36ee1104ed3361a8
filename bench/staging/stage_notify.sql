\set e random(1, 100)
-- Not stage(): the raw insert plus the NOTIFY stage() sends, to price the NOTIFY alone.
WITH ins AS (
  INSERT INTO bench.raw_jobs (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
  VALUES (nextval('bench.raw_ids'), 'bench_throttle', 'default', 0, '{"url": "https://example.com/hook", "n": 1}',
          jsonb_build_object('queue_name', 'default', 'priority', 0, 'endpoint_id', 'e' || :e), NULL, NULL, NULL)
  RETURNING id
)
SELECT id, pg_notify('dispatch_policy_staged', 'bench_throttle') FROM ins;
