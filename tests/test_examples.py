"""Every integration example runs standalone: ``python -W error examples/x.py --selfcheck``.

Each example serves or consumes in-process (httpx's ASGITransport, aiohttp's TestServer,
taskiq's InMemoryBroker, FastStream's TestRabbitBroker, a plain asyncio loop), on a SQLite file
in the test's temporary directory, checks its own results with asserts and exits 0. The
expected failures it provokes are logged on stderr; leaked connections or never-awaited
coroutines would print "Exception ignored" there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 60

#: The lines each example must print (its stdout may hold more).
EXPECTED = {
    "litestar_app.py": [
        "POST /orders lamp x2 -> 201 {'id': 1, 'product': 'lamp', 'quantity': 2}",
        "POST /orders sofa x1 -> 404 no product 'sofa'",
        "POST /orders desk x3 -> 500 Internal Server Error",
        "GET /orders -> [{'id': 1, 'product': 'lamp', 'quantity': 2}]",
        "database: orders [('lamp', 2)] stock {'desk': 1, 'lamp': 3}",
        "connections checked out: 0",
    ],
    "aiohttp_app.py": [
        "POST /orders lamp x2 -> 201 {'id': 1, 'product': 'lamp', 'quantity': 2}",
        "POST /orders sofa x1 -> 404 no product 'sofa'",
        "POST /orders desk x3 -> 500 Internal Server Error",
        "GET /orders -> [{'id': 1, 'product': 'lamp', 'quantity': 2}]",
        "database: orders [('lamp', 2)] stock {'desk': 1, 'lamp': 3}",
        "connections checked out: 0",
    ],
    "taskiq_worker.py": [
        "place_order(lamp, 2) -> order #1",
        "place_order(sofa, 1) -> failed, rolled back: LookupError: no product 'sofa'",
        "place_order(desk, 3) -> commit failed, no result stored: stock would go negative",
        "database: orders [('lamp', 2)] stock {'desk': 1, 'lamp': 3}",
        "connections checked out: 0",
    ],
    "faststream_worker.py": [
        "sofa x1 -> handler failed, rolled back: no product 'sofa'",
        "desk x3 -> commit failed: stock would go negative",
        "lamp: ACKED",
        "sofa: REJECTED",
        "desk: NACKED",
        "shipping notices: [(1, 'lamp')]",
        "database: orders [('lamp', 2)] stock {'desk': 1, 'lamp': 3}",
        "connections checked out: 0",
    ],
    "cli_job.py": [
        "single run, max age 60 min: expired [1, 2]",
        "run 1: failed (payment provider unavailable), rolled back",
        "run 2: expired [3]",
        "run 3: nothing to do",
        "database: {1: 'expired', 2: 'expired', 3: 'expired', 4: 'pending'}",
        "holds released: [1, 2, 3]",
        "connections checked out: 0",
    ],
}

#: Settings that would point an example at a server instead of its own SQLite file/broker.
SERVER_SETTINGS = ("DATABASE_URL", "REDIS_URL", "RABBIT_URL", "PORT")


def test_every_example_is_checked() -> None:
    examples = {path.name for path in EXAMPLES.glob("*.py")}
    assert set(EXPECTED) <= examples, f"missing examples: {sorted(set(EXPECTED) - examples)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_selfcheck(name: str, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in SERVER_SETTINGS}
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), "--selfcheck"],
        cwd=tmp_path,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    report = f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"{name} exited with {result.returncode}\n{report}"
    assert "Exception ignored" not in result.stderr, f"{name} leaked\n{report}"
    lines = result.stdout.splitlines()
    for line in EXPECTED[name]:
        assert line in lines, f"{name} did not print {line!r}\n{report}"
    assert lines[-1] == "selfcheck passed", report
    assert (tmp_path / name.replace(".py", ".db")).exists(), "the SQLite file is in the cwd"
