SELECT cardinality(dispatch_policy.stage_many('bench_throttle', p.jobs)) FROM bench.payload p;
