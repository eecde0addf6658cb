#!/usr/bin/env python3
"""Developer entry point: needs only Python 3.11+, sets up its own virtual environment.

    python3 run.py demo     # run the demo (SQLite by default; DATABASE_URL=... for PostgreSQL)
    python3 run.py test     # run the test suite (extra arguments go to pytest)
    python3 run.py lint     # ruff + mypy --strict
    python3 run.py docs     # build the documentation site (strict) and serve it locally
    python3 run.py docs --build        # only build it, into build/site (what CI runs)
    python3 run.py docs --zensical     # build it with Zensical instead of MkDocs
    python3 run.py bench    # micro-benchmark (extra arguments: a script and its options)
    python3 run.py bench --peers [options]   # peer comparison (benchmarks/peers/run.py)
    python3 run.py matrix [LEG...] [-- pytest args]   # the support matrix (legs below)

The environment lives in .venv/ (the peer comparison's in .venv-peers/, see
benchmarks/README.md). Dependencies are (re)installed when pyproject.toml changes;
the project itself is reinstalled (non-editable, from a freshly built wheel) on every run, so
the tests exercise what users install.

RUN_PY_PYTHON=/path/to/python uses that interpreter as it is (installing nothing) instead of
.venv/; the tests start the demo that way.

The support matrix: `python3 run.py test` is the Python 3.11 leg with the latest
dependencies. `matrix` runs the other legs, each in its own virtual environment:
py3.12 and py3.13 (latest dependencies) and lowest (Python 3.11 with every `>=` floor of
pyproject.toml pinned exactly, through a pip constraints file). Each leg runs the whole test
suite on two backends, SQLite and PostgreSQL with asyncpg (SQLA_CONTEXT_BACKENDS), with
pytest -n 2. A Python it cannot find is skipped with a message, or fails the run when
CI=true. The interpreters are looked up as pythonX.Y on PATH and under ~/.pyenv/versions.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
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
# The legs' environments are kept outside the checkout, keyed by what they were built from,
# so that a fresh clone (CI) reuses them: rebuilding the three took ~4 of CI's ~25 minutes.
MATRIX_ROOT = Path(
    os.environ.get("SQLA_CONTEXT_MATRIX_VENVS")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sqla-context" / "matrix"
)
#: leg -> (Python version, install the floors of pyproject.toml instead of the latest)
LEGS = {"py3.12": ("3.12", False), "py3.13": ("3.13", False), "lowest": ("3.11", True)}
#: The backends every leg runs on (tests/conftest.py BACKENDS ids).
MATRIX_BACKENDS = "sqlite,pg-asyncpg"
PEERS_VENV = ROOT / ".venv-peers"
PEERS_REQUIREMENTS = ROOT / "benchmarks" / "peers" / "requirements.txt"


def sh(*args: str | Path, **kwargs: object) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def say(message: str) -> None:
    print(f"run.py: {message}", flush=True)


def ensure_env(extras: str) -> None:
    if not PY.exists():
        say(f"creating {VENV.name}/ (first run only)")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras.replace(',', '_')}"
    if not stamp.exists() or stamp.read_text() != digest:
        # pip shows its progress: on a fresh machine this takes a minute or more.
        say(f"installing .[{extras}] into {VENV.name}/ (pip's progress follows)")
        sh(PY, "-m", "pip", "install", "--progress-bar", "on", f".[{extras}]")
        stamp.write_text(digest)
    say("installing this checkout (a fresh wheel)")
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


# -- the support matrix ---------------------------------------------------------------------


def find_python(version: str) -> Path | None:
    """An interpreter of ``version`` ("3.12"): pythonX.Y on PATH, else the newest pyenv one."""
    candidates: list[Path] = []
    if found := shutil.which(f"python{version}"):
        candidates.append(Path(found))
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        releases = [
            p for p in pyenv.iterdir() if re.fullmatch(rf"{re.escape(version)}\.\d+", p.name)
        ]
        releases.sort(key=lambda p: int(p.name.rsplit(".", 1)[1]), reverse=True)
        candidates += [p / "bin" / f"python{version}" for p in releases]
    for candidate in candidates:
        try:  # a pyenv shim of a version that is not active exits non-zero
            out = subprocess.run(
                [str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return candidate
    return None


def floor_constraints() -> str:
    """A pip constraints file pinning every ``name>=X`` requirement of pyproject.toml to X."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(
            r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([^\s,;]+)\s*", requirement
        )
        if match is None:  # sqla-context[...] itself, or a requirement without a floor
            continue
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        if pins.setdefault(name, match[2]) != match[2]:
            raise SystemExit(
                f"run.py: pyproject.toml gives {name} two floors: {pins[name]}, {match[2]}"
            )
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def ensure_leg(leg: str, python: Path) -> Path:
    """A virtual environment for ``leg`` with .[test] (the floors for "lowest"), then this
    checkout; built once per pyproject.toml, constraints and interpreter (and per day for
    the latest-dependencies legs, so that "latest" is re-resolved daily)."""
    lowest = LEGS[leg][1]
    constraints = floor_constraints() if lowest else ""
    key = (ROOT / "pyproject.toml").read_bytes() + constraints.encode() + str(python).encode()
    if not lowest:
        key += time.strftime("%Y-%m-%d", time.gmtime()).encode()
    home = MATRIX_ROOT / f"{leg}-{hashlib.sha256(key).hexdigest()[:12]}"
    py = home / PY.relative_to(VENV)
    stamp = home / ".installed"
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same one
        if not stamp.exists():
            say(f"{leg}: creating {home} with {python}")
            sh(python, "-m", "venv", "--clear", home)
            args: list[str | Path] = [py, "-m", "pip", "install", "--progress-bar=off", ".[test]"]
            if lowest:
                pins = home / "constraints.txt"
                pins.write_text(constraints, encoding="utf-8")
                say(f"{leg}: the floors of pyproject.toml, pinned:\n{constraints}")
                args += ["--constraint", pins]
            say(f"{leg}: installing .[test] (pip's progress follows)")
            sh(*args)
            stamp.touch()
        else:
            say(f"{leg}: reusing {home}")
            os.utime(home)  # last used: see _prune_legs()
    _prune_legs(leg, keep=home)
    install_checkout(py)
    return py


def _prune_legs(leg: str, keep: Path) -> None:
    """Remove this leg's other environments not used for two days (built from an older
    pyproject.toml, or on an earlier day)."""
    cutoff = time.time() - 2 * 86400
    for old in MATRIX_ROOT.glob(f"{leg}-*"):
        if old != keep and old.is_dir() and old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def matrix(argv: list[str]) -> int:
    """Run the requested legs (all by default) one after another; report each one's time."""
    legs, pytest_args = argv, []
    if "--" in argv:
        at = argv.index("--")
        legs, pytest_args = argv[:at], argv[at + 1 :]
    unknown = [leg for leg in legs if leg not in LEGS]
    if unknown:
        print(f"run.py matrix: unknown leg(s) {unknown}; legs: {', '.join(LEGS)}")
        return 2
    in_ci = os.environ.get("CI", "").lower() == "true"
    results: list[tuple[str, str, float]] = []
    for leg in legs or list(LEGS):
        version = LEGS[leg][0]
        python = find_python(version)
        if python is None:
            message = f"{leg}: no Python {version} found (python{version} on PATH or in pyenv)"
            if in_ci:
                say(f"ERROR: {message}; CI=true requires every leg")
                results.append((leg, "missing Python", 0.0))
                continue
            say(f"skipping {message}")
            results.append((leg, "skipped", 0.0))
            continue
        started = time.monotonic()
        try:
            py = ensure_leg(leg, python)
            say(f"{leg}: running the tests (backends {MATRIX_BACKENDS})")
            env = {
                **os.environ,
                "PYTHONDONTWRITEBYTECODE": "1",
                "SQLA_CONTEXT_BACKENDS": MATRIX_BACKENDS,
            }
            sh(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", *pytest_args, env=env)
            outcome = "passed"
        except subprocess.CalledProcessError as exc:
            outcome = f"FAILED (exit {exc.returncode})"
        results.append((leg, outcome, time.monotonic() - started))
    say("support matrix:")
    for leg, outcome, seconds in results:
        version = LEGS[leg][0]
        deps = "lowest" if LEGS[leg][1] else "latest"
        print(f"  {leg:8} Python {version}, {deps} dependencies: {outcome} ({seconds:.0f} s)")
    return 0 if all(o in ("passed", "skipped") for _, o, _ in results) else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["matrix"]:
        try:
            return matrix(argv[1:])
        except KeyboardInterrupt:
            return 130
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
    if os.environ.get("RUN_PY_PYTHON"):  # an environment of your own: used as it is
        global PY
        PY = Path(os.environ["RUN_PY_PYTHON"])
    else:
        ensure_env(EXTRAS[command])
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        if command == "demo":
            # Become the server: a SIGTERM or SIGINT sent to this process then reaches uvicorn
            # itself, and nothing is left behind holding the port.
            demo = ROOT / "examples" / "demo_app.py"
            print("+", PY, demo, *rest, flush=True)
            if os.name == "nt":  # no exec there: wait for the child instead
                return subprocess.run([str(PY), str(demo), *rest], env=env, check=False).returncode
            os.chdir(ROOT)  # as before: ./demo.db lives in the checkout
            os.execve(PY, [str(PY), str(demo), *rest], env)
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
