"""`<run>/report.md` and `<run>/report.png`, built from results.json alone (plus the run's
config.yaml and each stage's metrics.json for the text).

The picture: retention (y) against decode tokens/s (x, log scale), one labelled point per
record, the Pareto front (no other point both faster and better) drawn; and retention
against size on disk. Written at the end of every `compress run`; `compress report RUN`
rebuilds both.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress import results as results_mod
from compress.records import Record

MARKERS = {"torch": "o", "onnxruntime": "s", "gptq": "D", "llama.cpp": "^"}
COLORS = {"teacher": "tab:blue", "student": "tab:orange"}


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.png for a run; return their paths."""
    run_dir = Path(run_dir)
    res = results_mod.load(run_dir)
    res["records"] = [Record.from_dict(r).to_dict() for r in res["records"]]  # runs of older versions too
    png = plot(res["records"], run_dir / "report.png", title=f"{run_dir.name}: {_cpu(res)}")
    md = run_dir / "report.md"
    md.write_text(markdown(run_dir, res, png.name))
    return md, png


def _cpu(res: dict) -> str:
    hw = res.get("header", {}).get("hardware", {})
    return f"{hw.get('gpu') or hw.get('cpu', '?')}, {hw.get('torch_threads', '?')} threads"


def label(r: dict) -> str:
    """`stage: model (variant)`: the name the user gave, and the form measured (the backend is in the variant
    or the marker)."""
    variant = f" ({r['variant']})" if r.get("variant") else ""
    return f"{r.get('stage')}: {r.get('model')}{variant}"


# --------------------------------------------------------------------------- the picture


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both coordinates (larger is better on both), by x descending."""
    front, best_y = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def plot(records: list[dict], path: Path, title: str = "") -> Path:
    """Two panels: retention vs decode tok/s (log x) and retention vs size MB (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, size) = plt.subplots(1, 2, figsize=(14, 6))
    pts = [r for r in records if r.get("retention") is not None]
    _panel(speed, pts, "decode_tok_s", "decode tokens/s (batch 1, log scale)", lambda x: x)
    _panel(size, pts, "size_mb", "size on disk (MB, log scale)", lambda x: -x)
    speed.set_title("retention vs decode speed")
    size.set_title("retention vs size")
    if not pts:
        for ax in (speed, size):
            ax.text(0.5, 0.5, "no accuracy measured\n(eval.accuracy=false or no task labels)",
                    ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    _place_labels(speed, pts, "decode_tok_s")
    _place_labels(size, pts, "size_mb")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax, records: list[dict], key: str, xlabel: str, better) -> None:
    """Scatter `key` (x) against retention, label every point and draw the Pareto front
    (`better(x)` is larger for a better x: speed as is, size negated)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    pts = [r for r in records if r.get(key)]
    for r in pts:
        ax.scatter(r[key], r["retention"], s=70, marker=MARKERS.get(r.get("backend"), "o"),
                   color=COLORS.get(r.get("role"), "tab:gray"), edgecolor="black", zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("retention (accuracy / reference teacher)")
    if pts:
        xs = [r[key] for r in pts]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.2)
        ys = [r["retention"] for r in pts] + [1.0]
        pad = max(0.05, (max(ys) - min(ys)) * 0.15)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    front = [(better(x), y) for x, y in pareto([(better(r[key]), r["retention"]) for r in pts])]
    if front:
        xs, ys = zip(*front)
        ax.scatter(xs, ys, s=190, facecolor="none", edgecolor="tab:green", linewidth=1.5, zorder=2)
        ax.step(xs, ys, where="post", color="tab:green", linestyle="--", alpha=0.8, zorder=2)
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=role)
               for role, c in COLORS.items()]
    handles += [Line2D([], [], marker=m, linestyle="", color="white", markeredgecolor="black", label=b)
                for b, m in MARKERS.items() if any(r.get("backend") == b for r in pts) and b != "torch"]
    handles += [Line2D([], [], color="tab:green", linestyle="--", marker="o", markerfacecolor="none",
                       label="Pareto front"),
                Line2D([], [], color="gray", linestyle=":", label="reference teacher (retention 1)")]
    ax.legend(handles=handles, loc="best", fontsize=8)


def _place_labels(ax, pts: list[dict], key: str) -> None:
    """Label every point (after the layout is final): the first spot (right or left, above or below, then
    further out) whose box stays in the axes and overlaps no marker and no label placed so far; a label
    away from its point gets a leader line."""
    from matplotlib.transforms import Bbox

    pts = [r for r in pts if r.get(key)]
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [Bbox.from_bounds(px - 6, py - 6, 12, 12)  # the markers: no label covers one
             for px, py in ax.transData.transform([(r[key], r["retention"]) for r in pts])] if pts else []
    spots = [(dx, dy) for d in (8, 22, 36, 50) for dx in (8, -8) for dy in (d, -d)]
    for x, y, text in _labels(pts, key):
        for dx, dy in spots:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                               va="bottom" if dy > 0 else "top", ha="left" if dx > 0 else "right",
                               arrowprops=dict(arrowstyle="-", color="gray", lw=0.6) if abs(dy) > 8 else None)
            box = note.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                break
            note.remove()
        else:
            note = ax.annotate(text, (x, y), xytext=(8, 8), textcoords="offset points", fontsize=9)
            box = note.get_window_extent(renderer)
        boxes.append(box)


def _labels(pts: list[dict], key: str) -> list[tuple[float, float, str]]:
    """One label per point; points that (nearly) coincide share one label, one name per line."""
    groups: list[list] = []
    for r in sorted(pts, key=lambda r: r[key]):
        x, y = r[key], r["retention"]
        for g in groups:
            if abs(g[0] / x - 1) < 0.04 and abs(g[1] - y) < 0.01:
                g[2].append(label(r))
                break
        else:
            groups.append([x, y, [label(r)]])
    return [(x, y, "\n".join(names)) for x, y, names in groups]


# --------------------------------------------------------------------------- the text


def markdown(run_dir: Path, res: dict, png_name: str) -> str:
    header = res.get("header", {})
    versions = ", ".join(f"{k} {v}" for k, v in header.get("versions", {}).items())
    lines = [f"# compress report: {run_dir.name}", "",
             f"Created {header.get('created', '?')} on {_cpu(res)}. {versions}.", "",
             _reference_line(header), "", "## Results", "", *md_table(res["records"]), "",
             f"![retention against decode speed and size]({png_name})", "", "## Stages", "",
             *stage_lines(run_dir), "", "## Configuration", "", "```yaml"]
    config = run_dir / "config.yaml"
    lines += [config.read_text().rstrip() if config.is_file() else "# config.yaml missing", "```", ""]
    return "\n".join(lines)


def _reference_line(header: dict) -> str:
    ref, base = header.get("reference"), header.get("base_teacher")
    if not ref and not base:
        return "No teacher was measured: retention and speed-up are not defined."
    parts = []
    if ref:
        variant = f" ({ref['variant']})" if ref.get("variant") else ""
        parts.append(f"retention = accuracy / the reference teacher `{ref['model']}`{variant} of stage `{ref['stage']}` "
                     f"(accuracy {_fmt(ref.get('accuracy'), '{:.3f}')})")
    if base:
        parts.append(f"retention_base = accuracy / the base teacher's ({_fmt(base.get('accuracy'), '{:.3f}')}); "
                     f"speed-up = decode tok/s / the base teacher's {_fmt(base.get('decode_tok_s'), '{:.1f}')} "
                     "tok/s, measured in this run")
    return "; ".join(parts) + "."


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def md_table(records: list[dict]) -> list[str]:
    keep = results_mod.shown(records)
    heads = [results_mod.COLUMNS[i][1] for i in keep]
    rows = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    return rows + ["| " + " | ".join(results_mod.cells(r)[i] for i in keep) + " |" for r in records]


def _plain(v) -> str:
    if isinstance(v, dict):
        return "(" + ", ".join(f"{k} {x}" for k, x in v.items()) + ")"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stage_lines(run_dir: Path) -> list[str]:
    """One line per finished stage folder: what the stage does, its wall time, its own metrics."""
    lines = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit() and "_" in p.name):
        name = d.name.split("_", 1)[1]
        if not (d / "DONE").exists():
            lines.append(f"- `{d.name}`: not finished")
            continue
        metrics = json.loads((d / "metrics.json").read_text())
        summary = metrics.get("summary", f"stage {name}")
        extra = [f"{k} {_plain(v)}" for k, v in metrics.items() if k not in ("records", "reference", "roles", "wall_s",
                                                                             "summary")
                 and v is not None and not isinstance(v, list)]
        wall = metrics.get("wall_s")
        lines.append(f"- `{d.name}` ({_fmt(wall, '{:.0f}')} s): {summary}." + (f" {'; '.join(extra)}." if extra else ""))
    return lines
