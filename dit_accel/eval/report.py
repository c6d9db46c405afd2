"""``dit-accel report STORE``: a Markdown and an HTML report with a table and Pareto plots per model.

Each model gets a table (one row per configuration: speed-up, latency, memory, share of blocks computed,
attention density, FID, CLIP, PSNR, SSIM, LPIPS) and one PNG with a panel per metric: speed-up on x, the
metric on y, policies as points, the *fewer-steps* competitor as its own curve, the Pareto front marked.
The column "vs fewer steps" says, per fidelity/quality metric, whether a policy beats simply taking fewer
denoising steps at the same speed-up (the fewer-steps curve interpolated linearly at the policy's
speed-up; outside the curve's range only dominance decides, else "?").
"""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from .store import ResultStore

# column -> (title, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "fid": ("FID", False), "clip": ("CLIP", True), "psnr": ("PSNR (dB)", True), "ssim": ("SSIM", True),
    "lpips": ("LPIPS", False), "rel_l2": ("rel. L2", False),
}
PERFECT = {"psnr": math.inf, "ssim": 1.0, "lpips": 0.0, "rel_l2": 0.0}  # the baseline against itself


def load_configs(store: ResultStore | str | Path):
    """Config rows as a DataFrame: the latest row of each (sweep, model, variant, steps, reference steps)."""
    import pandas as pd

    store = store if isinstance(store, ResultStore) else ResultStore(store)
    df = store.frame("config")
    if df.empty:
        return df
    df = df.sort_values("time").drop_duplicates(["sweep", "model", "variant", "steps", "ref_steps"], keep="last")
    for name in METRICS:
        if name not in df:
            df[name] = np.nan
        df[name] = pd.to_numeric(df[name], errors="coerce")
    return df.reset_index(drop=True)


def metric_values(df, name: str) -> np.ndarray:
    """The metric column, with the baseline's fidelity filled in as perfect (it is the reference)."""
    values = df[name].to_numpy(dtype=float).copy()
    if name in PERFECT:
        values[(df["kind"] == "baseline").to_numpy()] = PERFECT[name]
    return values


def pareto_front(speedup: np.ndarray, values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Mask of points no other point beats on both speed-up and the metric (NaN values are never on it)."""
    v = values if higher_is_better else -values
    ok = ~np.isnan(v)
    front = np.zeros(len(v), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (np.arange(len(v)) != i)
        dominated = others & (speedup >= speedup[i]) & (v >= v[i]) & ((speedup > speedup[i]) | (v > v[i]))
        front[i] = not dominated.any()
    return front


def versus_fewer_steps(speedup: float, value: float, curve: list[tuple[float, float]],
                       higher_is_better: bool) -> str:
    """'✓' if the point beats the fewer-steps curve at its speed-up, '✗' if it loses, '?' if undecided.

    ``curve``: (speed-up, value) of the baseline and the fewer-steps runs. Inside the curve's speed-up range
    the curve is interpolated linearly (for PSNR, which is +inf at the baseline, in MSE terms: 10^(-PSNR/10));
    outside it only dominance decides.
    """
    pts = sorted((s, v) for s, v in curve if not math.isnan(v))
    if not pts or math.isnan(value):
        return "?"
    if any(math.isinf(v) for _, v in pts) or math.isinf(value):  # PSNR: compare MSE ratios instead
        pts = [(s, 10 ** (-v / 10)) for s, v in pts]
        value, higher_is_better = 10 ** (-value / 10), not higher_is_better
    sign = 1 if higher_is_better else -1
    xs = [s for s, _ in pts]
    if xs[0] <= speedup <= xs[-1]:
        ref = float(np.interp(speedup, xs, [v for _, v in pts]))
        return "✓" if sign * (value - ref) > 0 else "✗"
    for s, v in pts:  # outside the curve: dominance only
        if s >= speedup and sign * (v - value) >= 0:
            return "✗"
        if s <= speedup and sign * (value - v) > 0:
            return "✓"
    return "?"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞ (identical)" if value > 0 else "-∞"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _metric_title(name: str, settings: dict | None) -> str:
    title = METRICS[name][0]
    if name == "lpips" and settings and settings.get("lpips"):
        cfg = settings["lpips"]
        if str(cfg.get("net", "")).startswith("stlpips"):
            title = f"ST-LPIPS ({cfg['net'][len('stlpips-'):]})"
        elif "backbone" in cfg:
            title = "LPIPS (custom backbone)"
        else:
            title = f"LPIPS ({cfg.get('net')})"
    return title


def model_table(df) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, formatted rows and the metrics present, for one model's configurations (sorted by speed-up)."""
    df = df.sort_values(["kind", "speedup"], key=lambda c: c.map({"baseline": 0, "policy": 1, "fewer-steps": 2})
                        if c.name == "kind" else c).reset_index(drop=True)
    settings = df["settings"].iloc[0] if "settings" in df else None
    present = [m for m in METRICS if df[m].notna().any()]
    speed = df["speedup"].to_numpy(dtype=float)
    fronts = {m: pareto_front(speed, metric_values(df, m), METRICS[m][1]) for m in present}
    curves = {m: [(s, v) for s, v, k in zip(speed, metric_values(df, m), df["kind"]) if k != "policy"]
              for m in present}
    header = ["variant", "kind", "steps", "speed-up", "latency ms (±)", "transformer ms/step", "peak mem GiB",
             "blocks computed", "attn density", *[_metric_title(m, settings) for m in present], "n",
             "Pareto", "vs fewer steps"]
    rows = []
    for i, r in df.iterrows():
        on_front = [METRICS[m][0] for m in present if fronts[m][i]]
        verdict = []
        if r["kind"] == "policy":
            for m in present:
                v = metric_values(df.iloc[[i]], m)[0]
                verdict.append(f"{versus_fewer_steps(r['speedup'], v, curves[m], METRICS[m][1])} {METRICS[m][0]}")
        rows.append([
            str(r["variant"]), str(r["kind"]), str(r["steps"]), f"{r['speedup']:.2f}×",
            f"{r['e2e_ms']:.1f} ± {r['e2e_ms_spread']:.1f}", _fmt(r.get("transformer_ms_per_step")),
            _fmt(r.get("peak_memory_gib")), _fmt_share(r.get("blocks_computed_share")),
            _fmt_share(r.get("attention_density")), *[_fmt(r[m]) for m in present], str(r["n_samples"]),
            "★ " + ", ".join(on_front) if on_front else "", ", ".join(verdict)])
    return header, rows, present


def _fmt_share(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def plot_model(df, present: list[str], path: Path, title: str) -> Path:
    """One panel per metric: speed-up vs metric, policies, fewer-steps curve, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = df["settings"].iloc[0] if "settings" in df else None
    cols = min(3, len(present))
    nrows = -(-len(present) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    speed = df["speedup"].to_numpy(dtype=float)
    kinds = df["kind"].to_numpy()
    for ax, m in zip(axes.flat, present):
        values = metric_values(df, m)
        finite = values[np.isfinite(values)]
        top = (finite.max() + 0.3 * (np.ptp(finite) or 1.0)) if finite.size else 1.0
        shown = np.where(np.isposinf(values), top, values)  # identical outputs drawn on the top edge
        front = pareto_front(speed, values, METRICS[m][1])
        few = np.flatnonzero(kinds == "fewer-steps")
        base = np.flatnonzero(kinds == "baseline")
        order = few[np.argsort(speed[few])]
        line = np.concatenate([base, order]) if not np.isnan(shown[base]).all() else order
        ax.plot(speed[line], shown[line], "s--", color="tab:orange", label="fewer steps (naive)")
        pol = np.flatnonzero(kinds == "policy")
        ax.scatter(speed[pol], shown[pol], color="tab:blue", zorder=3, label="policies")
        ax.scatter(speed[base], shown[base], marker="*", s=160, color="black", zorder=4, label="baseline")
        ax.scatter(speed[front], shown[front], s=180, facecolors="none", edgecolors="tab:red", linewidths=1.8,
                   zorder=5, label="Pareto front")
        fo = np.flatnonzero(front & np.isfinite(shown))
        fo = fo[np.argsort(speed[fo])]
        ax.plot(speed[fo], shown[fo], ":", color="tab:red")
        for i in pol:
            if not np.isnan(shown[i]):
                ax.annotate(str(df["variant"].iloc[i]), (speed[i], shown[i]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if np.isposinf(values).any():
            ax.axhline(top, color="grey", lw=0.5)
            ax.text(ax.get_xlim()[0], top, " ∞ (identical)", fontsize=7, va="bottom", color="grey")
        ax.set_xlabel("speed-up (×, end to end)")
        ax.set_ylabel(_metric_title(m, settings) + (" ↑" if METRICS[m][1] else " ↓"))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def markdown_to_html(text: str) -> str:
    """The subset of Markdown the report writes, as HTML: ``#``/``##`` headings, pipe tables (``\\|`` inside a
    cell), ``![alt](src)`` images, ``- `` lists, paragraphs; inline ``code``, ``**bold**`` and ``[text](url)``."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif match := re.match(r"(#{1,6}) (.*)", line):
            level = len(match.group(1))
            out.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
            i += 1
        elif (match := re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line)):
            out.append(f'<p><img src="{html.escape(match.group(2))}" alt="{html.escape(match.group(1))}"></p>')
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(_cells(lines[i]))
                i += 1
            header, body = block[0], [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:]
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part, quote=False)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', part)
        out.append(part)
    return "".join(out)


def _notes(df) -> list[str]:
    settings = df["settings"].iloc[0] if "settings" in df and len(df) else {}
    timing = df["timing_settings"].iloc[0] if "timing_settings" in df and len(df) else {}
    notes = [
        f"Timing: end-to-end latency per generation, median of {timing.get('repeats', '?')} timed calls after "
        f"{timing.get('warmup', '?')} warm-up round(s), all configurations of a model interleaved in the same "
        "rounds on one device; ± is half the min–max range. Speed-up = baseline median / configuration median "
        "from the same rounds. Transformer ms/step = time inside the transformer forward calls ÷ steps.",
        "Fidelity (PSNR, SSIM, LPIPS, rel. L2) compares each output with the baseline output of the same "
        "model, condition and seed at the full step count; PSNR averages finite values, bit-identical outputs "
        "are shown as ∞. Blocks computed: share of transformer-block evaluations not skipped (dit_accel.stats).",
    ]
    if settings.get("fid"):
        fid = settings["fid"]
        notes.append(f"FID: feature network `{fid.get('feature')}`, reference `{fid.get('reference', 'baseline')}` "
                     "(`baseline`: the unaccelerated outputs of the same seeds); n samples per configuration as "
                     "in the table. FID is biased upward at small n: compare only at equal n and feature network.")
    if settings.get("lpips") and str(settings["lpips"].get("net", "")).startswith("stlpips"):
        notes.append("ST-LPIPS is the shift-tolerant LPIPS of Ghildyal & Liu (ECCV 2022): a different metric, "
                     "not comparable with published LPIPS numbers.")
    if settings.get("clip"):
        notes.append(f"CLIP score: 100·max(cos, 0) with `{settings['clip'].get('model')}`, mean over samples "
                     "(class-conditional models are scored against 'a photo of a <class>').")
    return notes


def write_report(store: ResultStore | str | Path, out_dir: str | Path | None = None,
                 formats: tuple[str, ...] = ("md", "html")) -> dict[str, Path]:
    """Write ``report.md`` / ``report.html`` and one PNG per model into ``out_dir`` (default STORE/report)."""
    root = store.root if isinstance(store, ResultStore) else Path(store)
    out = Path(out_dir) if out_dir is not None else root / "report"
    df = load_configs(store)
    if df.empty:
        raise ValueError(f"no configuration rows in the results store {str(root)!r}: run a sweep first")
    md = ["# dit_accel evaluation report", "",
          f"Store `{root}`, generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Sweeps: "
          + ", ".join(f"`{s}`" for s in df["sweep"].unique()) + "."]
    devices = sorted(set(df.get("device_name", df.get("device")).astype(str)))
    versions = sorted({f"torch {r['torch']}, diffusers {r['diffusers']}" for _, r in df.iterrows() if "torch" in r})
    md += ["", f"Devices: {', '.join(devices)}; {'; '.join(versions)}.", ""]
    md += [f"- {n}" for n in _notes(df)]
    written: dict[str, Path] = {}
    for (sweep, model), part in df.groupby(["sweep", "model"], sort=False):
        header, rows, present = model_table(part)
        title = f"{model} — sweep {sweep}"
        md += ["", f"## {title}", "", _md_table(header, rows)]
        if present:
            png = plot_model(part.reset_index(drop=True), present, out / f"{_slug(sweep)}__{_slug(model)}.png", title)
            written[f"png:{sweep}:{model}"] = png
            md += ["", f"![{title}]({png.name})"]
    out.mkdir(parents=True, exist_ok=True)
    if "md" in formats:
        written["md"] = out / "report.md"
        written["md"].write_text("\n".join(md) + "\n")
    if "html" in formats:
        written["html"] = out / "report.html"
        style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
                 "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
        written["html"].write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>dit_accel report"
                                   f"</title><style>{style}</style></head><body>\n{markdown_to_html(chr(10).join(md))}\n"
                                   "</body></html>\n")
    return written
