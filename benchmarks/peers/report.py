"""Tables and plot of the peer comparison, from the data ``run.py`` collected.

``run.py`` calls it at the end of a run; to render ``results.json`` again (after changing
the report, say) without measuring: ``.venv-peers/bin/python benchmarks/peers/report.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from apps import APPROACHES, BY_KEY, ENDPOINTS, REFERENCE

HERE = Path(__file__).resolve().parent
GOOD_MS = 100  # goodput: responses answered within this many milliseconds


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        groups.setdefault((r["loop"], r["endpoint"]), {}).setdefault(r["approach"], []).append(r)
    for (loop, endpoint), by_approach in groups.items():
        ref = {r["round"]: r["rps"] for r in by_approach.get(REFERENCE, [])}
        for key, runs in by_approach.items():
            rps = [r["rps"] for r in runs]
            med = _median(rps)
            paired = [r["rps"] / ref[r["round"]] for r in runs if r["round"] in ref]
            good = [r["goodput"] for r in runs if r["goodput"] is not None]
            rows.append({
                "loop": loop, "endpoint": endpoint, "approach": key, "rounds": len(runs),
                "rps": med, "rps_min": min(rps), "rps_max": max(rps),
                "spread": (max(rps) - min(rps)) / med if med else float("nan"),
                "ratio": med / _median([ref[k] for k in ref]) if ref else float("nan"),
                "ratio_min": min(paired, default=float("nan")),
                "ratio_max": max(paired, default=float("nan")),
                "p50_ms": _median([r["p50_us"] for r in runs]) / 1000,
                "p99_ms": _median([r["p99_us"] for r in runs]) / 1000,
                "raw_p99_ms": _median([r["raw_p99_us"] for r in runs]) / 1000,
                "timeouts": sum(r["timeout"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "goodput": _median(good) if good else None,
                "good_share": _median([r["raw_good"] / max(r["requests"], 1) for r in runs]),
                "cpu_us": _median([r["cpu_us"] for r in runs]),
            })  # fmt: skip
    return rows


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def write_report(data: dict[str, Any], out_dir: Path) -> None:
    m, a = data["machine"], data["args"]
    v = ", ".join(f"{k} {ver}" for k, ver in data["versions"].items())
    lines = [
        "# Peer comparison: results",
        "",
        f"Measured {m['date']} at commit `{m['commit']}`"
        + (" (**--quick: smoke run, not to be quoted**)" if a["quick"] else "")
        + f", by `python3 run.py bench --peers{' ' + ' '.join(a['argv']) if a['argv'] else ''}`.",
        "",
        f"- machine: {m['cpu']}, {m['platform']}; {m['pinning']}; PostgreSQL and other jobs"
        f" unpinned; load average {data['load_before']} before, {data['load_after']} after",
        f"- Python {m['python']}; {v}",
        f"- {m['postgres']}",
    ]
    rows = data["summary"]
    if rows:
        lines += [
            f"- load: `wrk -t1 -c{a['connections']}`, {a['rounds']} rounds of {a['duration']} s"
            f" per approach and endpoint after a {a['warmup']} s warm-up; 1 uvicorn worker, new"
            " processes every round, approaches in rotating order;"
            f" pool_size={a['pool']}, max_overflow=0;"
            f" `/read_then_slow` and `/read_close_then_slow` wait {50} ms after the read",
            "- figures: median over the rounds. `spread` = (max - min) / median of req/s over the"
            " rounds. `x sqla-context` = ratio of the medians (in brackets: min-max of the"
            " per-round ratios). p50/p99 are wrk's, which wrk corrects for coordinated omission"
            " (synthetic samples for stalled connections); `raw p99` is from the real responses"
            f" only. `goodput` = responses per second answered within {GOOD_MS} ms (real"
            " responses, from wrk's histogram with the correction undone; time-outs and non-2xx"
            " answers count as misses); `good %` = their share of all responses. `errors` ="
            " socket errors + time-outs + non-2xx over all rounds (time-outs in brackets)."
            " `CPU us/req` = the server's user + system CPU time during the run / responses:"
            " steadier than req/s on a shared machine.",
        ]
    if data.get("scale"):
        lines.append(
            f"- scale: `/read`, `wrk -t1 -c10/50/200/500`, {a['scale_rounds']} round(s) of"
            f" {a['duration']} s per point after a {a['warmup']} s warm-up; one server at a"
            " time, new for every approach, pool size and worker count"
        )
    if data.get("rss"):
        lines.append(
            f"- memory: `/read` with `wrk -c{a['connections']}` until {a['rss']:,} requests"
        )
    lines.append("")
    if rows:
        lines += ["Approaches (apps in `benchmarks/peers/apps/`):", ""]
    for ap in APPROACHES:
        if any(r["approach"] == ap.key for r in rows):
            release = f"; early release: {ap.release}" if ap.release else ""
            lines.append(f"- `{ap.key}`: {ap.what}{release}")
    lines.append("")
    for loop in dict.fromkeys(r["loop"] for r in rows):
        for endpoint in ENDPOINTS:
            sel = [r for r in rows if r["loop"] == loop and r["endpoint"] == endpoint]
            if not sel:
                continue
            http = "uvloop + httptools" if loop == "uvloop" else "asyncio + h11"
            lines += [f"## `{endpoint}` ({http})", ""]
            lines += [
                "| approach | req/s | spread | x sqla-context | p50 ms | p99 ms | raw p99 ms"
                " | goodput/s | good % | errors (time-outs) | CPU us/req | early release |",
                "| --- |" + " ---: |" * 10 + " --- |",
            ]
            for r in sorted(sel, key=lambda r: -r["rps"]):
                ap = BY_KEY[r["approach"]]
                release = ap.release if endpoint == "/read_close_then_slow" else ""
                ratio = f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
                lines.append(
                    f"| {'**' + ap.key + '**' if ap.key == REFERENCE else ap.key}"
                    f" | {_fmt(r['rps'])} | {r['spread']:.0%} | {ratio}"
                    f" | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['raw_p99_ms'])}"
                    f" | {_fmt(r['goodput'])} | {r['good_share']:.0%}"
                    f" | {r['errors']} ({r['timeouts']}) | {_fmt(r['cpu_us'], 0)} | {release} |"
                )
            lines.append("")
    if data.get("in_process"):
        lines += [
            "## In process (pyperf)",
            "",
            "One request through each app called directly (no server, no socket), one at a"
            " time, each in its own task: CPU time of the event-loop thread per request"
            " (`time.thread_time`; waiting for PostgreSQL does not count), timed by pyperf:"
            " median and standard deviation over its values (3 worker processes x 3 values;"
            " the benchmarks run one after the other).",
            "",
            "| benchmark | CPU us/req (median) | stdev |",
            "| --- | ---: | ---: |",
        ]
        for name, t in data["in_process"].items():
            lines.append(f"| {name} | {t['median_us']:.1f} | {t['stdev_us']:.1f} |")
        lines.append("")
    if data.get("scale"):
        lines += [
            "## Scale: `/read`, uvloop + httptools",
            "",
            "Median req/s (goodput/s in brackets) by clients; one server at a time; 2 workers are"
            " not pinned. Plot: `results_scale.png`.",
            "",
            "| approach | workers | pool | 10 | 50 | 200 | 500 | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        scale = data["scale"]
        for key in dict.fromkeys(r["approach"] for r in scale):
            for workers in (1, 2):
                for pool in (5, 20):
                    cells, errors = [], 0
                    for clients in (10, 50, 200, 500):
                        runs = [
                            r
                            for r in scale
                            if (r["approach"], r["workers"], r["pool"], r["clients"])
                            == (key, workers, pool, clients)
                        ]
                        errors += sum(r["errors"] for r in runs)
                        rps = _median([r["rps"] for r in runs])
                        good = _median([r["goodput"] or 0 for r in runs])
                        cells.append(f"{_fmt(rps, 0)} ({_fmt(good, 0)})")
                    lines.append(f"| {key} | {workers} | {pool} | {' | '.join(cells)} | {errors} |")
        lines.append("")
    if data.get("rss"):
        lines += ["## Memory: resident set of one server over `/read` requests", ""]
        lines += ["| approach | requests | RSS before MiB | after MiB | growth MiB |"]
        lines += ["| --- | ---: | ---: | ---: | ---: |"]
        for r in data["rss"]:
            lines.append(
                f"| {r['approach']} | {r['requests']:,} | {r['before'] / 1024:.1f}"
                f" | {r['after'] / 1024:.1f} | {(r['after'] - r['before']) / 1024:+.1f} |"
            )
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines))


def plot(data: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["summary"]
    panels = [
        (loop, e)
        for loop in dict.fromkeys(r["loop"] for r in rows)
        for e in ENDPOINTS
        if any(r["loop"] == loop and r["endpoint"] == e for r in rows)
    ]
    cols = 2
    fig, axes = plt.subplots(
        (len(panels) + cols - 1) // cols, cols, figsize=(13, 3.1 * ((len(panels) + 1) // 2)),
        squeeze=False,
    )  # fmt: skip
    for ax, (loop, endpoint) in zip(axes.flat, panels, strict=False):
        sel = sorted(
            (r for r in rows if r["loop"] == loop and r["endpoint"] == endpoint),
            key=lambda r: r["rps"],
        )
        y = range(len(sel))
        colors = ["tab:red" if r["approach"] == REFERENCE else "tab:blue" for r in sel]
        ax.barh(
            y, [r["rps"] for r in sel], color=colors, alpha=0.35,
            xerr=[[r["rps"] - r["rps_min"] for r in sel], [r["rps_max"] - r["rps"] for r in sel]],
            label="req/s (min-max over rounds)",
        )  # fmt: skip
        ax.barh(
            y, [r["goodput"] or 0 for r in sel], color=colors, height=0.4,
            label=f"goodput (answered within {GOOD_MS} ms)",
        )  # fmt: skip
        ax.set_yticks(list(y), [r["approach"] for r in sel], fontsize=8)
        http = "uvloop+httptools" if loop == "uvloop" else "asyncio+h11"
        ax.set_title(f"{endpoint}  ({http})", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("requests/s", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    m, a = data["machine"], data["args"]
    fig.suptitle(
        f"sqla-context vs peers: FastAPI on uvicorn (1 worker), wrk -c{a['connections']},"
        f" PostgreSQL pool {a['pool']}, median of {a['rounds']} x {a['duration']} s"
        f"{' (QUICK: smoke run)' if a['quick'] else ''}\n"
        f"{m['date']}, {m['cpu']}, load average {data['load_before']} / {data['load_after']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=90)
    plt.close(fig)


def plot_scale(data: dict[str, Any], out_dir: Path) -> None:
    """``results_scale.png``: req/s and goodput against clients, one panel per workers x pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, clients = data["scale"], [10, 50, 200, 500]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharey=True)
    for ax, (workers, pool) in zip(axes, [(1, 5), (1, 20), (2, 5), (2, 20)], strict=True):
        for i, key in enumerate(dict.fromkeys(r["approach"] for r in scale)):
            runs = [
                r for r in scale if (r["approach"], r["workers"], r["pool"]) == (key, workers, pool)
            ]
            rps = [_median([r["rps"] for r in runs if r["clients"] == c]) for c in clients]
            good = [
                _median([r["goodput"] or 0 for r in runs if r["clients"] == c]) for c in clients
            ]
            ax.plot(clients, rps, "o-", color=f"C{i}", label=f"{key} req/s")
            ax.plot(clients, good, "x--", color=f"C{i}", label=f"{key} goodput")
        ax.set_xscale("log")
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_title(f"{workers} worker(s), pool {pool}", fontsize=10)
        ax.set_xlabel("clients (wrk -c)", fontsize=8)
    axes[0].set_ylabel("requests/s", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"/read, uvloop + httptools, {data['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "results_scale.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(sys.argv[1]).parent if len(sys.argv) > 1 else HERE
    saved = json.loads((out / "results.json").read_text())
    saved["summary"] = summarize(saved["runs"])
    write_report(saved, out)
    if saved["summary"]:
        plot(saved, out)
    if saved.get("scale"):
        plot_scale(saved, out)
    print(f"wrote {out / 'results.md'} and results.png")
