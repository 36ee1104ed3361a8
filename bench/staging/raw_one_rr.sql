\set e random(1, 100)
\set a random(1, 10)
INSERT INTO bench.raw_jobs (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
VALUES (nextval('bench.raw_ids'), 'bench_rr', 'default', 0, '{"url": "https://example.com/hook", "n": 1}',
        jsonb_build_object('queue_name', 'default', 'priority', 0, 'endpoint_id', 'e' || :e, 'account_id', 'a' || :a), NULL, 'a' || :a, NULL)
RETURNING id;
