"""Instruction counts per request of the sqla-context peer app, for ``valgrind --tool=callgrind``.

Deterministic where timings are noisy: compares the library's per-request cost before and
after a change (telemetry off). Runs ``N`` requests of ``/nodb`` or ``/read`` in process
(as ``peers/inprocess.py`` does), after a warm-up. Run it twice with different ``N`` under
callgrind and divide the difference of the instruction counts by the difference of ``N``::

    for n in 200 1200; do
      BENCH_TABLE=bench_cg valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \\
        python benchmarks/callgrind_overhead.py /read $n
    done

The table (``BENCH_TABLE``, default ``bench_cg``) is created and filled if missing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BENCH_TABLE", "bench_cg")

from benchmarks.peers import inprocess
from benchmarks.peers.apps import _common
from sqlalchemy import text


async def _prepare() -> None:
    from sqla_context import Database

    db = Database(_common.DB_URL)
    async with db.engine.begin() as conn:
        await conn.run_sync(_common.items.metadata.create_all)
        if not (await conn.execute(text(f"SELECT count(*) FROM {_common.TABLE}"))).scalar():
            await conn.execute(
                text(f"INSERT INTO {_common.TABLE} (id, name) VALUES (:id, 'n')"),
                [{"id": i} for i in range(1, _common.ROWS + 1)],
            )
    await db.dispose()


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    inprocess._loop.run_until_complete(_prepare())
    inprocess.time_request(20, "sqla-context", path)  # warm-up: imports, pool, caches
    inprocess.time_request(count, "sqla-context", path)


if __name__ == "__main__":
    main()
