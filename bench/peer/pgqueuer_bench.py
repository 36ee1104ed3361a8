"""The peer side of dispatch-policy-bench's peer figure: pgqueuer.

Enqueues a backlog, runs one pgqueuer QueueManager on it for a fixed time,
and prints one JSON line: completions per second after a warm-up, and the
most handlers that ran at once (one process, so every handler is seen here).

  python pgqueuer_bench.py --dsn DSN --jobs N --seconds T [--limit 5] [--job-ms 20]

--limit 0 is no limit (the entrypoint's concurrency_limit); pgqueuer's code
is installed from PyPI into bench/.venv by bench/run, never committed.
"""

import argparse
import asyncio
import datetime
import json
import time

import asyncpg
from pgqueuer import Queries, QueueManager


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--job-ms", type=float, default=0)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()

    setup = await asyncpg.connect(args.dsn)
    queries = Queries.from_asyncpg_connection(setup)
    if not await queries.schema_is_installed():
        await queries.install()
    await queries.clear_queue()
    remaining = args.jobs
    while remaining > 0:
        n = min(1000, remaining)
        await queries.enqueue(["job"] * n, [None] * n, [0] * n)
        remaining -= n

    conn = await asyncpg.connect(args.dsn)
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    running = 0
    most = 0
    finished: list[float] = []

    @qm.entrypoint("job", concurrency_limit=args.limit)
    async def job(_job) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            if args.job_ms > 0:
                await asyncio.sleep(args.job_ms / 1000)
        finally:
            running -= 1
            finished.append(time.monotonic())

    start = time.monotonic()

    async def stop() -> None:
        await asyncio.sleep(args.seconds)
        qm.shutdown.set()

    await asyncio.gather(qm.run(batch_size=args.batch_size, dequeue_timeout=datetime.timedelta(seconds=1)), stop())
    end = start + args.seconds
    done = sum(1 for t in finished if start + args.warmup <= t < end)
    print(json.dumps({
        "rate": done / (args.seconds - args.warmup),
        "most_running": most,
        "completed": len(finished),
    }))
    await conn.close()
    await setup.close()


if __name__ == "__main__":
    asyncio.run(main())
