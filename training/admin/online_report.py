"""``reclora online-report``: the gateway's online metrics per version as a table and a PNG.

The data is the admin API's ``GET /admin/v1/online``: per version over the window, and per time
bucket (the PNG plots those: AUC, LogLoss, calibration as mean predicted against observed
positive rate, and the labels per bucket).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """One line per version: labels, AUC, LogLoss, mean predicted vs observed positive rate."""
    lines = [f"online metrics over the last {report['window_s']:g} s",
             f"{'version':<28}{'labels':>8}{'AUC':>9}{'LogLoss':>9}{'mean p':>9}{'pos rate':>10}"]
    for m in report["versions"]:
        lines.append(f"{m['version']:<28}{m['labels']:>8}{_num(m['auc']):>9}{_num(m['logloss']):>9}"
                     f"{_num(m['mean_predicted']):>9}{_num(m['positive_rate']):>10}")
    if not report["versions"]:
        lines.append("(no labelled served scores in the window)")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """The per-bucket metrics over time, one line per version."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for point in report["series"]:
        series.setdefault(point["version"], []).append(point)
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for version, points in sorted(series.items()):
        t = [datetime.fromtimestamp(p["start"], timezone.utc) for p in points]
        axes[0].plot(t, [p["auc"] if p["auc"] is not None else float("nan") for p in points], marker=".",
                     label=version)
        axes[1].plot(t, [p["logloss"] if p["logloss"] is not None else float("nan") for p in points], marker=".",
                     label=version)
        line, = axes[2].plot(t, [p["mean_predicted"] for p in points], marker=".", label=f"{version} mean predicted")
        axes[2].plot(t, [p["positive_rate"] for p in points], linestyle="--", color=line.get_color(),
                     label=f"{version} positive rate")
        axes[3].plot(t, [p["labels"] for p in points], marker=".", label=version)
    for ax, title in zip(axes, ("online AUC", "LogLoss", "calibration", "labels per bucket")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel(f"bucket start (UTC), {report['bucket_s']:g} s buckets")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
