\set e random(1, 100)
\set a random(1, 10)
SELECT dispatch_policy.stage('bench_rr', '{"url": "https://example.com/hook", "n": 1}',
                             jsonb_build_object('endpoint_id', 'e' || :e, 'account_id', 'a' || :a));
