INSERT INTO bench.raw_jobs (id, policy, queue, priority, args, context, dedupe_key, round_robin_key, not_before)
SELECT nextval('bench.raw_ids'), 'bench_throttle', 'default', 0, j -> 'args',
       jsonb_build_object('queue_name', 'default', 'priority', 0) || (j -> 'context'), NULL, NULL, NULL
FROM bench.payload p, jsonb_array_elements(p.jobs) j;
