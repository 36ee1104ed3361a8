\set e random(1, 100)
\set k random(1, 1000000000000)
SELECT dispatch_policy.stage('bench_throttle', '{"url": "https://example.com/hook", "n": 1}',
                             jsonb_build_object('endpoint_id', 'e' || :e), dedupe_key => 'k' || :k);
