"""``dit-accel demo``: baseline vs accelerated on an offline pipeline, as a table (and an image grid).

The default model is the project's trained CIFAR-10 class-conditional DiT (``dit_accel.zoo``)
when its weights are installed, else the tiny random-weight DiT pipeline from
``dit_accel.testing``. Every policy runs with the same seeds as the baseline; time is the
median of ``repeats`` calls after a warm-up call; PSNR compares with the baseline output.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import api
from .policy import load_policy, preset_names


@dataclass
class DemoModel:
    name: str
    pipe: Any
    call: Callable[..., torch.Tensor]  # one generation (steps=None: the model's); images/latents as floats
    is_image: bool
    policies: tuple[str, ...]  # what the demo compares by default


def _zoo_model(name: str, steps: int | None, batch: int) -> DemoModel:
    from . import zoo

    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, zoo.TextToVideoPipeline):  # one clip of 8 frames, shown frame by frame
        conditions = {"prompt": [zoo.text.digits_prompt([3, 7])], "num_frames": 8}
    else:
        conditions = zoo.class_conditions(pipe, [i % 10 for i in range(batch)])

    def call(override: int | None = None) -> torch.Tensor:
        return zoo.generate_images(pipe, conditions, num_inference_steps=override or steps,
                                   generator=torch.Generator().manual_seed(0))
    calibrated = tuple(p for p in (f"{name}-teacache", f"{name}-magcache") if p in preset_names())
    return DemoModel(name, pipe, call, is_image=True, policies=("fbcache", "fora", *calibrated))


def _tiny_model(family: str, steps: int | None) -> DemoModel:
    from .testing import tiny_generate, tiny_pipeline

    # millisecond-sized ops: a second CPU thread only adds hand-off stalls (seen: 17 ms -> 0.7 s)
    torch.set_num_threads(1)
    pipe = tiny_pipeline(family)

    def call(override: int | None = None) -> torch.Tensor:
        chosen = override or steps
        return tiny_generate(pipe, family, **({"num_inference_steps": chosen} if chosen else {}))
    return DemoModel(f"tiny-{family} (random weights)", pipe, call, is_image=False, policies=("fbcache", "fora"))


def default_model_name() -> str:
    try:
        from . import zoo

        if "cifar10_dit" in zoo.available():
            return "cifar10_dit"
    except ImportError:
        pass
    return "tiny-dit"


def load_demo_model(name: str, steps: int | None = None, batch: int = 4) -> DemoModel:
    """A zoo model (``cifar10_dit``, ``cifar10_mmdit``, ``digits_wan``) or ``tiny-FAMILY`` (e.g. ``tiny-flux``)."""
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


def _timed(call: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """The output of the first call and the median time of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        out = result if out is None else out
    return out, statistics.median(times)


def run_demo(model: str | None = None, policies: Sequence[str] | None = None, steps: int | None = None,
             repeats: int = 1, out_dir: str | Path | None = "dit_accel_demo", batch: int = 4) -> list[dict]:
    """Run the demo and return one row per variant (also printed as a table).

    ``policies`` default to the model's comparison set (for the reference model: FBCache, FORA
    and the TeaCache/MagCache presets calibrated for it). A 2-step call warms up first.
    """
    demo = load_demo_model(model or default_model_name(), steps, batch)
    policies = demo.policies if policies is None else policies
    print(f"model: {demo.name}")
    demo.call(2)
    reference, base_time = _timed(demo.call, repeats)
    rows = [{"policy": "baseline", "seconds": base_time, "speedup": 1.0, "psnr_db": float("inf"),
             "blocks_saved": 0.0}]
    outputs = {"baseline": reference}
    for name in policies:
        policy = load_policy(name)
        with api.accelerated(demo.pipe, policy):
            out, seconds = _timed(demo.call, repeats)
            stats = api.stats(demo.pipe)
        outputs[policy.name] = out
        rows.append({"policy": policy.name, "seconds": seconds, "speedup": base_time / seconds,
                     "psnr_db": psnr(out, reference), "blocks_saved": stats.saved_share})
    print(format_table(rows))
    if out_dir is not None and demo.is_image:
        path = save_grid(outputs, Path(out_dir) / "demo_grid.png")
        print(f"image grid (rows: {', '.join(outputs)}): {path}")
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(16, *(len(r["policy"]) for r in rows))
    lines = [f"{'policy':<{width}} {'time (s)':>9} {'speedup':>8} {'PSNR vs base (dB)':>18} {'blocks saved':>13}"]
    for r in rows:
        lines.append(f"{r['policy']:<{width}} {r['seconds']:>9.3f} {r['speedup']:>7.2f}x {r['psnr_db']:>18.2f} "
                     f"{100 * r['blocks_saved']:>12.1f}%")
    return "\n".join(lines)


def save_grid(outputs: dict[str, torch.Tensor], path: Path, scale: int = 3) -> Path:
    """One row per variant, images in [0, 1] as [B, C, H, W]; upscaled ``scale``× (nearest)."""
    from PIL import Image

    rows = [torch.cat(list(images.clamp(0, 1)), dim=-1) for images in outputs.values()]
    grid = torch.cat(rows, dim=-2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
