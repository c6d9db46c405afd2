"""``dit-accel demo``: baseline vs accelerated on an offline pipeline, as a table (and a labelled image grid).

The default model is the project's trained CIFAR-10 class-conditional DiT (``dit_accel.zoo``)
when its weights are installed, else the tiny random-weight DiT pipeline from
``dit_accel.testing``. The reference models run with the settings of the README's numbers
(``cifar10_dit``: class labels 0, 3, 5, 8 — airplane, cat, dog, ship — seed 0, the model's 50 steps).

Every variant runs with the same seed as the baseline; after a 2-step warm-up call, the variants are
timed in interleaved rounds (baseline, policy 1, policy 2, … then again), ``repeats`` rounds: time is
the median ± half the min–max range. Each row also shows the share of block evaluations the policy
computed (``dit_accel.stats``) and the speed-up that share bounds (1 / share: skipping blocks cannot
buy more, apart from what is outside the blocks); a speed-up above that bound, or one whose time
range overlaps the baseline's, is flagged as timing noise. PSNR compares with the baseline output.
Every policy and the model name are checked before the baseline runs.
"""

from __future__ import annotations

import difflib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import api
from .config import PolicyError
from .policy import load_policy, preset_names

#: class labels (and seed) of the README's / docs/methods.md's cifar10_dit numbers (tests/test_quality.py)
README_LABELS = (0, 3, 5, 8)
SEED = 0


@dataclass
class DemoModel:
    name: str
    pipe: Any
    call: Callable[..., torch.Tensor]  # one generation (steps=None: the model's); images/latents as floats
    is_image: bool
    policies: tuple[str, ...]  # what the demo compares by default
    columns: tuple[str, ...] = ()  # grid column labels (class names, or frames)
    settings: str = ""  # what one call generates, for the header line


def _labels(batch: int) -> list[int]:
    """The README's labels first, then the remaining classes in order (batch > 4), or a prefix (batch < 4)."""
    rest = [c for c in range(10) if c not in README_LABELS]
    return [*README_LABELS, *rest][:batch] if batch <= 10 else [i % 10 for i in range(batch)]


def _zoo_model(name: str, steps: int | None, batch: int) -> DemoModel:
    from . import zoo

    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, zoo.TextToVideoPipeline):  # one clip of 8 frames, shown frame by frame
        prompt = zoo.text.digits_prompt([3, 7])
        conditions: dict = {"prompt": [prompt], "num_frames": 8}
        columns = tuple(f"frame {i + 1}" for i in range(8))
        what = f"one clip, {prompt!r}"
    else:
        labels = _labels(batch)
        conditions = zoo.class_conditions(pipe, labels)
        names = zoo.class_names(pipe)
        columns = tuple(names[c] for c in labels)
        what = f"class labels {labels} ({', '.join(columns)})"
    default_steps = getattr(pipe, "defaults", {}).get("num_inference_steps")

    def call(override: int | None = None) -> torch.Tensor:
        return zoo.generate_images(pipe, conditions, num_inference_steps=override or steps,
                                   generator=torch.Generator().manual_seed(SEED))
    calibrated = tuple(p for p in (f"{name}-teacache", f"{name}-magcache") if p in preset_names())
    return DemoModel(name, pipe, call, is_image=True, policies=("fbcache", "fora", *calibrated), columns=columns,
                     settings=f"{what}, seed {SEED}, {steps or default_steps} steps")


def _tiny_model(family: str, steps: int | None) -> DemoModel:
    from .testing import tiny_generate, tiny_pipeline

    # millisecond-sized ops: a second CPU thread only adds hand-off stalls (seen: 17 ms -> 0.7 s)
    torch.set_num_threads(1)
    pipe = tiny_pipeline(family)

    def call(override: int | None = None) -> torch.Tensor:
        chosen = override or steps
        return tiny_generate(pipe, family, **({"num_inference_steps": chosen} if chosen else {}))
    return DemoModel(f"tiny-{family} (random weights)", pipe, call, is_image=False, policies=("fbcache", "fora"),
                     settings=f"seed {SEED}" + (f", {steps} steps" if steps else ", the family's default steps"))


def _zoo_names() -> list[str]:
    try:
        from . import zoo
    except ImportError:
        return []
    return zoo.available()


def _tiny_names() -> list[str]:
    from .testing import FAMILIES

    return [f"tiny-{family}" for family in FAMILIES]


def model_names() -> list[str]:
    """What ``--model`` accepts: the installed reference models, then ``tiny-FAMILY``."""
    return [*_zoo_names(), *_tiny_names()]


def check_model_name(name: str) -> str:
    """``name`` if the demo knows it, else a :class:`PolicyError` naming the closest model and all valid names."""
    valid = model_names()
    if name in valid:
        return name
    guesses = [f"tiny-{name}"] if f"tiny-{name}" in valid else difflib.get_close_matches(name, valid, n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(g) for g in guesses)}?)" if guesses else ""
    kind = "tiny model" if name.startswith("tiny-") else "model"
    raise PolicyError(f"unknown {kind} {name!r}{hint}; choose one of: {', '.join(valid)} "
                      "(the reference models are trained, tiny-FAMILY pipelines have random weights)")


def default_model_name() -> str:
    return "cifar10_dit" if "cifar10_dit" in _zoo_names() else "tiny-dit"


def load_demo_model(name: str, steps: int | None = None, batch: int = 4) -> DemoModel:
    """A zoo model (``cifar10_dit``, ``cifar10_mmdit``, ``digits_wan``) or ``tiny-FAMILY`` (e.g. ``tiny-flux``)."""
    check_model_name(name)
    if name.startswith("tiny-"):
        return _tiny_model(name[len("tiny-"):], steps)
    return _zoo_model(name, steps, batch)


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB over the reference's value range (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if torch.equal(output, reference):
        return float("inf")
    data_range = (reference.max() - reference.min()).clamp_min(1e-8)
    return float(peak_signal_noise_ratio(output.float(), reference.float(), data_range=data_range))


class _Progress:
    """Progress lines on stderr (``dit-accel demo: ...``), one per step of the demo; silent when quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"dit-accel demo [{time.perf_counter() - self.t0:6.1f} s]: {message}", file=sys.stderr, flush=True)


def _stats_of(pipe: Any) -> tuple[float, float, bool]:
    """(share of block evaluations saved, share computed, whether guidance skipped calls) of the last call."""
    stats = api.stats(pipe)
    items = list(stats.values()) if isinstance(stats, dict) else [stats]
    computed = sum(s.blocks_computed for s in items)
    total = computed + sum(s.blocks_reused for s in items)
    guidance = any(s.guidance_skipped_calls for s in items)
    share = computed / total if total else 1.0
    return 1.0 - share, share, guidance


def run_demo(model: str | None = None, policies: Sequence[str] | None = None, steps: int | None = None,
             repeats: int = 3, out_dir: str | Path | None = "dit_accel_demo", batch: int = 4,
             progress: bool = True) -> list[dict]:
    """Run the demo and return one row per variant (also printed as a table).

    ``policies`` default to the model's comparison set (for the reference model: FBCache, FORA and the
    TeaCache/MagCache presets calibrated for it). ``repeats``: timed rounds (the reference model's baseline
    call takes about 15 s on 2 quiet CPU cores: the whole default demo about 2 minutes).
    ``progress``: progress lines (and, for the reference models, a step bar) on stderr.
    """
    say = _Progress(progress)
    if repeats < 1:
        raise PolicyError(f"--repeats must be at least 1, got {repeats}")
    name = check_model_name(model or default_model_name())
    chosen = [load_policy(p) for p in (policies or ())]  # a mistyped policy fails here, before any model runs
    say(f"loading {name}")
    demo = load_demo_model(name, steps, batch)
    if policies is None:
        chosen = [load_policy(p) for p in demo.policies]
    for policy in chosen:  # everything accelerate validates (model fit, calibration), before the baseline
        api.accelerate(demo.pipe, policy)
        api.remove(demo.pipe)
    print(f"model: {demo.name}; {demo.settings}; {repeats} timed round(s)")
    step_bar = progress and demo.is_image
    variants = ["baseline", *(p.name for p in chosen)]
    say("warm-up call (2 steps)")
    demo.call(2)
    times: dict[str, list[float]] = {v: [] for v in variants}
    outputs: dict[str, torch.Tensor] = {}
    saved: dict[str, tuple[float, float, bool]] = {"baseline": (0.0, 1.0, False)}
    for rnd in range(repeats):
        for i, variant in enumerate(variants):
            policy = chosen[i - 1] if i else None
            say(f"round {rnd + 1}/{repeats}, {variant} ({i + 1}/{len(variants)})")
            if step_bar:
                demo.pipe.set_progress_bar_config(disable=False, leave=False, desc=variant, file=sys.stderr)
            if policy is not None:
                api.accelerate(demo.pipe, policy)
            try:
                t0 = time.perf_counter()
                out = demo.call()
                times[variant].append(time.perf_counter() - t0)
                if policy is not None and variant not in saved:
                    saved[variant] = _stats_of(demo.pipe)
            finally:
                if policy is not None:
                    api.remove(demo.pipe)
                if step_bar:
                    demo.pipe.set_progress_bar_config(disable=True)
            outputs.setdefault(variant, out)
    rows = measured_rows(times, outputs, saved)
    say("done")
    print(format_table(rows))
    if out_dir is not None and demo.is_image:
        path = save_grid(outputs, Path(out_dir) / "demo_grid.png", columns=demo.columns,
                         psnr_db={r["policy"]: r["psnr_db"] for r in rows})
        print(f"image grid (rows: {', '.join(outputs)}; columns: {', '.join(demo.columns)}): {path}")
    return rows


def measured_rows(times: dict[str, list[float]], outputs: dict[str, torch.Tensor],
                  saved: dict[str, tuple[float, float, bool]]) -> list[dict]:
    """One row per variant (the first is the baseline) from its timed calls, output and block shares."""
    base_t = times["baseline"]
    base_med, base_half = statistics.median(base_t), (max(base_t) - min(base_t)) / 2
    reference = outputs["baseline"]
    rows = []
    for variant, ts in times.items():
        med, half = statistics.median(ts), (max(ts) - min(ts)) / 2
        saved_share, share, guidance = saved[variant]
        bound = None if guidance or share <= 0 else 1.0 / share  # guidance also halves calls: blocks do not say
        speedup = base_med / med
        row = {"policy": variant, "seconds": med, "spread": half, "repeats": len(ts), "speedup": speedup,
               "psnr_db": psnr(outputs[variant], reference), "blocks_saved": saved_share,
               "compute_share": share, "compute_bound": bound, "note": ""}
        if variant != "baseline":
            row["note"] = speedup_note(speedup, bound, med, half, base_med, base_half, len(ts))
        rows.append(row)
    return rows


def speedup_note(speedup: float, bound: float | None, seconds: float, spread: float, base_seconds: float,
                 base_spread: float, repeats: int, tolerance: float = 0.02) -> str:
    """What a measured speed-up can be trusted for: above its compute bound (by more than ``tolerance``) it
    is timing noise; when the variant's time range overlaps the baseline's it is within noise."""
    if bound is not None and speedup > bound * (1 + tolerance):
        return "above compute bound: timing noise"
    if repeats > 1 and abs(base_seconds - seconds) <= spread + base_spread:
        return "within noise"
    if repeats == 1:
        return "1 run: spread unknown"
    return ""


def format_table(rows: list[dict]) -> str:
    width = max(16, *(len(r["policy"]) for r in rows))
    lines = [f"{'policy':<{width}} {'time (s)':>17} {'speedup':>8} {'compute':>8} {'bound':>7} "
             f"{'PSNR vs base (dB)':>18} {'blocks saved':>13}  note"]
    for r in rows:
        time_text = f"{r['seconds']:.3f} ± {r.get('spread', 0.0):.3f}"
        bound = r.get("compute_bound")
        bound_text = "—" if bound is None else f"{bound:.2f}x"
        lines.append(f"{r['policy']:<{width}} {time_text:>17} {r['speedup']:>7.2f}x "
                     f"{100 * r.get('compute_share', 1.0):>7.0f}% {bound_text:>7} {r['psnr_db']:>18.2f} "
                     f"{100 * r['blocks_saved']:>12.1f}%  {r.get('note', '')}".rstrip())
    lines.append("time: median ± half the min-max range of the timed rounds; compute: share of block evaluations "
                 "computed (dit_accel.stats); bound: 1 / compute, the most that skipping blocks can buy")
    return "\n".join(lines)


def save_grid(outputs: dict[str, torch.Tensor], path: Path, scale: int = 3, columns: Sequence[str] = (),
              psnr_db: dict[str, float] | None = None) -> Path:
    """One row per variant (labelled with its name and PSNR vs the baseline), one column per image (labelled
    ``columns``: class names or frames); images in [0, 1] as [B, C, H, W], upscaled ``scale``× (nearest)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = {}
    for name, images in outputs.items():
        images = torch.nn.functional.interpolate(images.float().clamp(0, 1), scale_factor=scale, mode="nearest")
        tiles[name] = [(img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for img in images]
    first = next(iter(tiles.values()))
    tile_h, tile_w = first[0].shape[:2]
    n_cols = max(len(t) for t in tiles.values())
    gap, line_h = 4, 12
    labels = {name: [name, "reference" if name == "baseline" else _psnr_text((psnr_db or {}).get(name))]
              for name in tiles}
    left = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))
                   for pair in labels.values() for text in pair)
    top = line_h + 6 if columns else gap
    width = left + n_cols * (tile_w + gap)
    height = top + len(tiles) * (tile_h + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(list(columns)[:n_cols]):
        x = left + c * (tile_w + gap)
        draw.text((x + 2, 3), _fit(draw, text, font, tile_w - 4), fill="black", font=font)
    for r, (name, row_tiles) in enumerate(tiles.items()):
        y = top + r * (tile_h + gap)
        draw.text((4, y + tile_h // 2 - line_h), labels[name][0], fill="black", font=font)
        draw.text((4, y + tile_h // 2 + 1), labels[name][1], fill="dimgray", font=font)
        for c, tile in enumerate(row_tiles):
            canvas.paste(Image.fromarray(tile), (left + c * (tile_w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _psnr_text(value: float | None) -> str:
    if value is None:
        return ""
    return "identical" if value == float("inf") else f"PSNR {value:.1f} dB"


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text
