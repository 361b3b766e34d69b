"""`<run>/report.md` and `<run>/report.png`, built from results.json alone (plus the run's
config.yaml and each stage's metrics.json for the text).

The picture: retention (y, with its 95% interval as an error bar) against decode tokens/s (x, log
scale), one labelled point per record (labels placed apart from every marker, error bar and other label,
inside the axes), the Pareto front (no other point both faster and better) drawn; and retention against
size on disk. Baselines (the teacher measured on onnxruntime) are drawn apart from the pipeline's stages.
Written at the end of every `compress run`; `compress report RUN` rebuilds both.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress import results as results_mod
from compress import stats
from compress.records import Record, ratio

MARKERS = {"torch": "o", "onnxruntime": "s", "gptq": "D", "llama.cpp": "^"}
COLORS = {"teacher": "tab:blue", "student": "tab:orange", "baseline": "tab:purple"}
BASELINE_MARKER = "*"
DPI = 110
"""The figure's own resolution, saved as is: label placement works in its pixels."""


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


def kind(r: dict) -> str:
    """`baseline` (a teacher measured on onnxruntime, after export), else the role: how a point is drawn."""
    return "baseline" if r.get("role") == "teacher" and r.get("backend") == "onnxruntime" else str(r.get("role"))


def plot(records: list[dict], path: Path, title: str = "") -> Path:
    """Save `figure(records, title)` to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(records, title)
    fig.savefig(path, dpi="figure")
    plt.close(fig)
    return path


def figure(records: list[dict], title: str = ""):
    """Two panels: retention vs decode tok/s (log x) and retention vs size MB (log x), one legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, size) = plt.subplots(1, 2, figsize=(14, 6.5), dpi=DPI)
    pts = [r for r in records if r.get("retention") is not None]
    _panel(speed, pts, "decode_tok_s", "decode tokens/s (batch 1, log scale)", lambda x: x)
    _panel(size, pts, "size_mb", "size on disk (MB, log scale)", lambda x: -x)
    speed.set_title("retention vs decode speed")
    size.set_title("retention vs size")
    if not pts:
        for ax in (speed, size):
            ax.text(0.5, 0.5, "no accuracy measured\n(eval.accuracy=false or no task labels)",
                    ha="center", va="center", transform=ax.transAxes)
    handles = _legend(pts)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _place_labels(speed, pts, "decode_tok_s")
    _place_labels(size, pts, "size_mb")
    return fig


def _panel(ax, records: list[dict], key: str, xlabel: str, better) -> None:
    """Scatter `key` (x) against retention, with its interval as an error bar, and draw the Pareto front
    (`better(x)` is larger for a better x: speed as is, size negated)."""
    from matplotlib.ticker import FuncFormatter

    pts = [r for r in records if r.get(key)]
    for r in pts:
        color, baseline = COLORS.get(kind(r), "tab:gray"), kind(r) == "baseline"
        if r.get("retention_ci"):
            low, high = r["retention_ci"]
            ax.errorbar(r[key], r["retention"], yerr=[[r["retention"] - low], [high - r["retention"]]], fmt="none",
                        ecolor=color, elinewidth=1, capsize=3, alpha=0.8, zorder=2.5)
        ax.scatter(r[key], r["retention"], s=160 if baseline else 70, color=color, edgecolor="black", zorder=3,
                   marker=BASELINE_MARKER if baseline else MARKERS.get(r.get("backend"), "o"))
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
        ys = [y for r in pts for y in (r["retention"], *(r.get("retention_ci") or ()))] + [1.0]
        pad = max(0.05, (max(ys) - min(ys)) * 0.15)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    front = [(better(x), y) for x, y in pareto([(better(r[key]), r["retention"]) for r in pts])]
    if front:
        xs, ys = zip(*front)
        ax.scatter(xs, ys, s=190, facecolor="none", edgecolor="tab:green", linewidth=1.5, zorder=2)
        ax.step(xs, ys, where="post", color="tab:green", linestyle="--", alpha=0.8, zorder=2)
    ax.grid(True, which="both", alpha=0.3)


def _legend(pts: list[dict]) -> list:
    """One entry per kind of point drawn (teacher, student, baseline), per non-torch backend, the interval,
    the Pareto front and the reference line."""
    from matplotlib.lines import Line2D

    kinds = {kind(r) for r in pts}
    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=k)
               for k, c in COLORS.items() if k != "baseline"]
    if "baseline" in kinds:
        handles.append(Line2D([], [], marker=BASELINE_MARKER, markersize=11, linestyle="", color=COLORS["baseline"],
                              markeredgecolor="black", label="baseline (teacher on onnxruntime)"))
    handles += [Line2D([], [], marker=m, linestyle="", color="white", markeredgecolor="black", label=b)
                for b, m in MARKERS.items() if b != "torch" and any(r.get("backend") == b and kind(r) != "baseline"
                                                                      for r in pts)]
    if any(r.get("retention_ci") for r in pts):
        handles.append(Line2D([], [], color="gray", marker="|", markersize=10, label="95% interval"))
    return handles + [Line2D([], [], color="tab:green", linestyle="--", marker="o", markerfacecolor="none",
                             label="Pareto front"),
                      Line2D([], [], color="gray", linestyle=":", label="reference teacher (retention 1)")]


def _place_labels(ax, pts: list[dict], key: str) -> None:
    """Label every point (after the layout is final) at the first free spot: beside it (right or left, above
    or below), else the nearest spot of a grid over the axes, with a leader line. A free spot lies inside the
    axes, overlaps no marker, no error bar and no label placed so far, and its leader crosses no label."""
    import numpy as np

    pts = [r for r in pts if r.get(key)]
    renderer = ax.figure.canvas.get_renderer()
    f = ax.get_window_extent(renderer)
    frame = (f.x0 + 2, f.y0 + 2, f.x1 - 2, f.y1 - 2)
    marks = [_box(ax, r[key], r["retention"], r["retention"], 10) for r in pts]  # markers
    marks += [_box(ax, r[key], *r["retention_ci"], 4) for r in pts if r.get("retention_ci")]  # error bars
    labels: list[tuple] = []
    for x, y, text in _labels(pts, key):
        px, py = ax.transData.transform((x, y))
        note = ax.text(x, y, text, fontsize=9, ha="left", va="bottom", zorder=4)
        box = note.get_window_extent(renderer)
        spots = _spots(px, py, box.width, box.height, frame)
        lx, ly = spots[_first_free(spots, (px, py), box.width, box.height, frame, marks + labels, labels)]
        note.set_position(ax.transData.inverted().transform((lx, ly)))
        box = note.get_window_extent(renderer)
        labels.append((box.x0, box.y0, box.x1, box.y1))
        near = (min(max(px, box.x0), box.x1), min(max(py, box.y0), box.y1))  # the box's point nearest its point
        if np.hypot(near[0] - px, near[1] - py) > 14:
            ax.plot(*ax.transData.inverted().transform([(px, py), near]).T, color="gray", lw=0.6, zorder=2.8)


def _first_free(spots, point, w: float, h: float, frame: tuple, taken: list[tuple], labels: list[tuple]) -> int:
    """Index of the first spot (lower-left corner of a w x h box) inside `frame` that overlaps no `taken` box
    and whose leader from `point` crosses no `labels` box; else the first inside the frame, else 0."""
    import numpy as np

    ends = spots + np.array([w, h])
    ok = (spots[:, 0] >= frame[0]) & (spots[:, 1] >= frame[1]) & (ends[:, 0] <= frame[2]) & (ends[:, 1] <= frame[3])
    inside = ok.copy()
    t = np.array(taken).reshape(-1, 4) + np.array([-1, -1, 1, 1])  # (M, 4), a pixel apart
    ok &= ~((spots[:, None, 0] < t[:, 2]) & (ends[:, None, 0] > t[:, 0])
            & (spots[:, None, 1] < t[:, 3]) & (ends[:, None, 1] > t[:, 1])).any(axis=1)
    near = np.clip(np.array(point), spots, ends)  # (N, 2): where each leader meets its box
    along = np.array(point) + np.linspace(0, 1, 24)[None, :, None] * (near - np.array(point))[:, None, :]  # (N, 24, 2)
    b = np.array(labels).reshape(-1, 4)
    ok &= ~((along[:, :, None, 0] > b[:, 0]) & (along[:, :, None, 0] < b[:, 2]) & (along[:, :, None, 1] > b[:, 1])
            & (along[:, :, None, 1] < b[:, 3])).any(axis=(1, 2))
    return int(np.argmax(ok)) if ok.any() else int(np.argmax(inside))


def _box(ax, x: float, y_low: float, y_high: float, half: float) -> tuple[float, float, float, float]:
    """In pixels: the segment from (x, y_low) to (x, y_high) in data coordinates, `half` pixels around it."""
    (x0, y0), (x1, y1) = ax.transData.transform([(x, y_low), (x, y_high)])
    return (x0 - half, y0 - half, x1 + half, y1 + half)


def _spots(px: float, py: float, w: float, h: float, frame: tuple) -> "np.ndarray":
    """Lower-left corners (pixels) to try for a w x h label of the point (px, py), best first: the four
    places beside it, then every 6 pixels over the frame, nearest first."""
    import numpy as np

    beside = np.array([(px + 8, py + 3), (px + 8, py - 3 - h), (px - 8 - w, py + 3), (px - 8 - w, py - 3 - h)])
    gx, gy = np.meshgrid(np.arange(frame[0], max(frame[0], frame[2] - w) + 1, 6),
                         np.arange(frame[1], max(frame[1], frame[3] - h) + 1, 6))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    dx = np.maximum(np.maximum(grid[:, 0] - px, px - grid[:, 0] - w), 0)  # point-to-box distance
    dy = np.maximum(np.maximum(grid[:, 1] - py, py - grid[:, 1] - h), 0)
    return np.concatenate([beside, grid[np.argsort(np.hypot(dx, dy), kind="stable")]])


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
             _reference_line(header), "", "## Results", "", *md_table(res["records"]), "", *_interval_note(res),
             f"![retention against decode speed and size]({png_name})", "", *baseline_section(res["records"]),
             "## Stages", "",
             *stage_lines(run_dir), "", "## Configuration", "", "```yaml"]
    config = run_dir / "config.yaml"
    lines += [config.read_text().rstrip() if config.is_file() else "# config.yaml missing", "```", ""]
    return "\n".join(lines)


def against_baseline(records: list[dict]) -> list[dict]:
    """Each student form exported in a stage that also exported the reference teacher (`report.baselines`),
    against the teacher's fastest form there (on real models its ONNX int8: what just quantizing the teacher
    gives; measured in the same process): the difference of the primary metric, paired over the same eval
    examples with its 95% bootstrap interval, and the ratio of decode speeds. Empty when no stage measured one."""
    rows = []
    for stage in dict.fromkeys(r.get("stage") for r in records):
        here = [r for r in records if r.get("stage") == stage]
        bases = [r for r in here if kind(r) == "baseline" and r.get("decode_tok_s")]
        if not bases:
            continue
        base = max(bases, key=lambda r: r["decode_tok_s"])
        for s in (r for r in here if r.get("role") == "student" and r.get("backend") == base.get("backend")):
            metric = s.get("metric", "accuracy")
            score, base_score = s.get(metric), base.get(metric)
            paired = s.get("example_scores") and base.get("example_scores") and \
                len(s["example_scores"]) == len(base["example_scores"])
            drop, (low, high) = (stats.drop_ci(base["example_scores"], s["example_scores"]) if paired
                                 else (None, (None, None)))
            rows.append({"student": s, "baseline": base, "metric": metric,
                         "difference": None if score is None or base_score is None else score - base_score,
                         "difference_ci": None if drop is None else [0.0 - high, 0.0 - low],  # never -0.0
                         "speed_ratio": ratio(s.get("decode_tok_s"), base["decode_tok_s"])})
    return rows


def baseline_section(records: list[dict]) -> list[str]:
    """`## Distil, or just quantize the teacher?`: `against_baseline` as a table, and `verdict`."""
    rows = against_baseline(records)
    if not rows:
        return []
    base, metric = rows[0]["baseline"], rows[0]["metric"]
    lines = ["## Distil, or just quantize the teacher?", "",
             f"Against `{_form(base)}`, the reference teacher's fastest export, measured in the same stage "
             f"({metric} {_fmt(base.get(metric), '{:.3f}')}, {_fmt(base.get('decode_tok_s'), '{:.1f}')} tok/s). "
             "Differences are paired over the same eval examples; in brackets their 95% bootstrap interval.", "",
             f"| student form | {metric} | minus the teacher's | decode tok/s | x the teacher's |",
             "|---|---|---|---|---|"]
    for r in rows:
        s = r["student"]
        lines.append(f"| {_form(s)} | {_fmt(s.get(metric), '{:.3f}')} | {_difference(r)} | "
                     f"{_fmt(s.get('decode_tok_s'), '{:.1f}')} | {_fmt(r['speed_ratio'], '{:.2f}x')} |")
    line = verdict(rows)
    return lines + ([""] + [line] if line else []) + [""]


def verdict(rows: list[dict]) -> str | None:
    """One sentence on the fastest student form against the teacher's (`against_baseline` rows)."""
    fast = max((r for r in rows if r["speed_ratio"]), key=lambda r: r["speed_ratio"], default=None)
    if fast is None:
        return None
    ci = fast["difference_ci"]
    what = ("" if ci is None else " (no measured loss: the interval holds 0)" if ci[0] <= 0 <= ci[1] else
            " (a measured loss: the interval is below 0)" if ci[1] < 0 else " (a measured gain)")
    return (f"The fastest student form, {_form(fast['student'])}, decodes {fast['speed_ratio']:.2f}x as fast as the "
            f"teacher's fastest export, {_form(fast['baseline'])}, for {_difference(fast)} {fast['metric']}{what}.")


def _form(r: dict) -> str:
    return f"{r.get('model')} ({r.get('variant')})" if r.get("variant") else str(r.get("model"))


def _difference(row: dict) -> str:
    d, ci = row["difference"], row["difference_ci"]
    if d is None:
        return "-"
    return f"{d:+.3f}" + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")


def _interval_note(res: dict) -> list[str]:
    if not any(r.get("score_ci") for r in res["records"]):
        return []
    return ["In brackets: 95% bootstrap intervals over the eval examples (retention's paired with the reference "
            "teacher on the same examples).", ""]


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
