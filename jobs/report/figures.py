"""The page's charts, drawn by matplotlib as inline SVG: the page needs no script and no network to show them.

matplotlib is imported inside the functions (and never pyplot: no global state, no GUI backend), so importing
the package stays cheap and a driver without matplotlib still finishes its run (the page is then not written).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.report.stats import STAGES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SCATTER_POINTS = 5000  # per series: keeps the page small for big nights (a random sample beyond)
THIS_RUN, PREVIOUS = "#1f77b4", "#9a9a9a"


def _svg(figure: Figure, name: str) -> str:
    """A matplotlib Figure as inline SVG markup (ids salted per chart, so several can share one page)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"vit3d-{name}"}):
        figure.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float = 9.0, height: float = 3.2) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(width, height), dpi=100)
    return figure, figure.add_subplot()


def charts(data: dict[str, Any]) -> dict[str, str]:
    """name -> inline SVG of each chart the data allows (a chart without data is left out, the page says so)."""
    out = {}
    if data["mode"] == "score" and data["results_rows"]:
        fig, ax = _figure()
        s = data["scores"]
        edges = np.asarray(s["edges"])
        counts = np.asarray(s["counts"], np.float64)
        ax.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge", color=THIS_RUN, alpha=0.8,
               label=f"this run ({int(counts.sum())} scans)")  # fmt: skip
        prev = np.asarray(s["previous_counts"], np.float64)
        if prev.sum():
            ax.step(edges, np.append(prev / prev.sum(), 0), where="post", color="black", linewidth=1.5,
                    label=f"previous {len(data['previous_runs'])} runs ({int(prev.sum())} scans)")  # fmt: skip
        ax.set_xlabel("score")
        ax.set_ylabel("fraction of scans")
        ax.set_xlim(0, 1)
        ax.legend(frameon=False)
        out["scores"] = _svg(fig, "scores")
    if data["throughput"]:
        t = data["throughput"]
        fig, ax = _figure()
        edges = np.asarray(t["edges_s"])
        rate = np.asarray(t["counts"], np.float64) / t["bin_s"]
        ax.bar(edges[:-1], rate, width=np.diff(edges), align="edge", color=THIS_RUN, label="scans/s")
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel(f"scans/s ({t['bin_s']} s bins)")
        twin = ax.twinx()
        twin.plot(edges[1:], np.cumsum(t["counts"]), color="black", linewidth=1.5, label="scans done")
        twin.set_ylabel("scans done")
        twin.set_ylim(bottom=0)
        if data.get("startup_s"):
            ax.axvline(data["startup_s"], color="#667085", linestyle="--", linewidth=1)
            ax.annotate("first result ", (data["startup_s"], 0.98), xycoords=("data", "axes fraction"), va="top",
                        ha="right", color="#667085")  # fmt: skip
        out["throughput"] = _svg(fig, "throughput")
    stages = [s for s in STAGES if data["stages"].get(s)]
    if stages:
        fig, ax = _figure(9.0, 2.6)
        y = np.arange(len(stages))
        for offset, key, color in ((-0.25, "p50", THIS_RUN), (0.0, "p90", "#ff7f0e"), (0.25, "p99", "#d62728")):
            ax.barh(y + offset, [data["stages"][s][key] * 1000 for s in stages], height=0.25, color=color, label=key)
        ax.set_yticks(y, stages)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds per scan")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        out["stages"] = _svg(fig, "stages")
    projection = data.get("projection")
    if projection:
        fig, ax = _figure(8.0, 5.0)
        rng = np.random.default_rng(0)
        for key, color, label in (("previous_points", PREVIOUS, "previous runs"), ("points", THIS_RUN, "this run")):
            points = np.asarray(projection.get(key) or [], np.float64).reshape(-1, 2)
            if len(points) > SCATTER_POINTS:
                points = points[rng.choice(len(points), SCATTER_POINTS, replace=False)]
            if len(points):
                ax.scatter(points[:, 0], points[:, 1], s=12, color=color, label=f"{label} ({len(points)})")
        ratio = projection["explained_variance_ratio"]
        ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
        ax.legend(frameon=False)
        out["embedding"] = _svg(fig, "embedding")
    return out
