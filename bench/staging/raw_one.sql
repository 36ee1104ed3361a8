\set e random(1, 100)
INSERT INTO bench.raw_jobs (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
VALUES (nextval('bench.raw_ids'), 'bench_throttle', 'default', 0, '{"url": "https://example.com/hook", "n": 1}',
        jsonb_build_object('queue_name', 'default', 'priority', 0, 'endpoint_id', 'e' || :e), NULL, NULL, NULL)
RETURNING id;
