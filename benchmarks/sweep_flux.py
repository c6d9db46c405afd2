"""Speed sweep on a full-size FLUX.1-dev-shaped transformer (random weights) through the eval harness.

The model is diffusers' ``FluxTransformer2DModel`` with its default config (11.9B parameters) in bf16, inside a
real ``FluxPipeline`` without text encoders or VAE: prompt embeddings (1, 512, 4096) and pooled embeddings
(1, 768) are drawn at random from a seed derived from the prompt, and the output is the latent. With random
weights, residual gates (fbcache/dbcache) essentially never fire, so they measure their overhead; FORA's fixed
schedule measures what skipping buys. Fidelity is PSNR / relative L2 of the latents vs the full-step baseline.

    python benchmarks/sweep_flux.py                       # benchmarks/sweeps/flux.yaml, on a CUDA machine
    python benchmarks/sweep_flux.py --out benchmarks/results/flux_sweep_h100

``build`` is also usable from any sweep file as ``py:benchmarks/sweep_flux.py:build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dit_accel.eval.models import EvalModel, generator  # noqa: E402


def build(device: torch.device, dtype: torch.dtype | None = None, resolution: int = 1024, text_len: int = 512,
          guidance_scale: float = 3.5, **transformer_config) -> EvalModel:
    """A FluxPipeline around a random-weight FluxTransformer2DModel (default config unless overridden)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    dtype = dtype or torch.bfloat16
    with torch.device(device):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**transformer_config).to(dtype).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    cfg = transformer.config

    def embeddings(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        g = generator(seed)
        embeds = torch.randn(1, text_len, cfg.joint_attention_dim, generator=g)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
        return embeds.to(device, dtype), pooled.to(device, dtype)

    def generate(condition, seed: int, steps: int) -> torch.Tensor:
        embeds, pooled = embeddings(str(condition))
        with torch.inference_mode():
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=resolution, width=resolution,
                        num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator(seed),
                        output_type="latent").images.float()

    return EvalModel("flux-shaped", pipe, generate, output="latent", device=torch.device(device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(REPO / "benchmarks" / "sweeps" / "flux.yaml"), help="sweep file")
    ap.add_argument("--store", default="/tmp/dit_accel_flux_store", help="results store folder")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "flux_sweep"),
                    help="where the report, plot and rows go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args()

    from dit_accel.eval.report import write_report
    from dit_accel.eval.runner import run_sweep
    from dit_accel.eval.store import ResultStore

    summary = run_sweep(args.spec, args.store, progress=not args.no_progress)
    print(summary)
    out = Path(args.out)
    paths = write_report(args.store, out)
    rows = ResultStore(args.store)
    with open(out / "rows.jsonl", "w") as f:  # the store's rows, merged (outputs stay behind)
        for table in ("config", "sample"):
            for row in rows.rows(table):
                f.write(json.dumps(row) + "\n")
    shutil.copy(args.spec, out / Path(args.spec).name)
    print((out / "report.md").read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
