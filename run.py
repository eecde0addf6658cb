#!/usr/bin/env python3
"""Developer entry point: needs only Python 3.10+, sets up its own virtual environment.

    python3 run.py demo     # run the demo (SQLite by default; DATABASE_URL=... for PostgreSQL)
    python3 run.py test     # run the test suite (extra arguments go to pytest)
    python3 run.py lint     # ruff + mypy --strict
    python3 run.py docs     # build the documentation site (strict) and serve it locally
    python3 run.py docs --build        # only build it, into build/site (what CI runs)
    python3 run.py docs --zensical     # build it with Zensical instead of MkDocs
    python3 run.py bench    # micro-benchmark (extra arguments: a script and its options)
    python3 run.py bench --peers [options]   # peer comparison (benchmarks/peers/run.py)

The environment lives in .venv/ (the peer comparison's in .venv-peers/, see
benchmarks/README.md). Dependencies are (re)installed when pyproject.toml changes;
the project itself is reinstalled (non-editable, from a freshly built wheel) on every run, so
the tests exercise what users install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")

EXTRAS = {
    "demo": "demo",
    "test": "test",
    "lint": "test,lint",
    "bench": "test,bench",
    "docs": "docs",
}
PEERS_VENV = ROOT / ".venv-peers"
PEERS_REQUIREMENTS = ROOT / "benchmarks" / "peers" / "requirements.txt"


def sh(*args: str | Path, **kwargs: object) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def ensure_env(extras: str) -> None:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras.replace(',', '_')}"
    if not stamp.exists() or stamp.read_text() != digest:
        sh(PY, "-m", "pip", "install", "--quiet", f".[{extras}]")
        stamp.write_text(digest)
    install_checkout(PY)


def install_checkout(py: Path) -> None:
    """Reinstall this checkout into ``py``'s venv from a fresh wheel (no dependency resolution)."""
    sh(
        py,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--force-reinstall",
        "--no-cache-dir",
        ".",
    )


def ensure_peers_env() -> Path:
    """.venv-peers/: the pinned peers of benchmarks/peers/requirements.txt + this checkout."""
    py = PEERS_VENV / PY.relative_to(VENV)
    if not py.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(PEERS_VENV)
        sh(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    digest = hashlib.sha256(PEERS_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = PEERS_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != digest:
        sh(py, "-m", "pip", "install", "--quiet", "-r", PEERS_REQUIREMENTS)
        stamp.write_text(digest)
    install_checkout(py)
    return py


def docs(options: list[str], env: dict[str, str]) -> None:
    if "--zensical" in options:
        sh(BIN / "zensical", "build", "--clean", "--strict", env=env)
        return
    sh(PY, "-m", "mkdocs", "build", "--strict", env=env)
    print(f"built: {ROOT / 'build' / 'site' / 'index.html'}", flush=True)
    if "--build" not in options:
        print("serving on http://127.0.0.1:8000/ (Ctrl+C stops)", flush=True)
        sh(PY, "-m", "mkdocs", "serve", "--strict", "--dev-addr", "127.0.0.1:8000", env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "bench" and rest[:1] == ["--peers"]:
        try:
            sh(ensure_peers_env(), "benchmarks/peers/run.py", *rest[1:])
        except subprocess.CalledProcessError as exc:
            return exc.returncode
        except KeyboardInterrupt:
            return 130
        return 0
    ensure_env(EXTRAS[command])
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        if command == "demo":
            sh(PY, "examples/demo_app.py", *rest, env=env)
        elif command == "test":
            sh(PY, "-m", "pytest", *rest, env=env)
        elif command == "lint":
            sh(PY, "-m", "ruff", "check", ".")
            sh(PY, "-m", "ruff", "format", "--check", ".")
            sh(PY, "-m", "mypy")
        elif command == "bench":
            sh(PY, *(rest or ["benchmarks/session_lookup.py"]), env=env)
        elif command == "docs":
            docs(rest, {**env, "NO_MKDOCS_2_WARNING": "1"})
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
