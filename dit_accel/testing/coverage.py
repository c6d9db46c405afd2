"""The model-coverage report: every transformer class of the installed diffusers, and what dit_accel does with it.

Each class is one of:

* **supported** — an adapter (:mod:`dit_accel.adapters`) and a tiny offline pipeline
  (:mod:`dit_accel.testing`) that ``tests/test_conformance.py`` runs: the full matrix for the tier-1
  families it names, the light set (off/remove bit-exact, state reset, every caching method, sparse
  attention where it applies) for every other registered family;
* **generic** — no adapter, but its blocks are in diffusers' ``TransformerBlockRegistry``, so
  ``accelerate(model, policy, blocks=[...])`` has the metadata it needs (not tested here);
* **not supported** — with the reason.

``python -m dit_accel.testing.coverage --write docs/models.md --readme README.md`` regenerates the report
and the README's model paragraph (between its ``<!-- models -->`` markers); ``tests/test_coverage.py`` checks
both equal :func:`render` / :func:`readme_section` for the installed diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters.base import REFUSED as ADAPTER_REFUSED

__all__ = ["REASONS", "REFUSED", "Row", "readme_section", "render", "replace_readme_section", "rows", "summary",
           "transformer_classes"]

# Why a class has no adapter (diffusers 0.42.1). Classes missing here fall back to a generic reason.
REASONS: dict[str, str] = {
    # not an image/video denoiser with a visual token grid
    "AceStepTransformer1DModel": "audio (music) model",
    "MiniMaxMusic3Transformer1DModel": "audio (music) model",
    "MiniMaxMusic3RVQDepthDecoder": "audio codec decoder, not a denoiser",
    "StableAudioDiTModel": "audio model",
    "StableAudio3DiTModel": "audio model",
    "LongCatAudioDiTTransformer": "audio model",
    "T5FilmDecoder": "spectrogram (music) decoder",
    "RFD4ProteinaTransformer": "protein structure model",
    "PriorTransformer": "unCLIP / Kandinsky prior over image embeddings (no token grid)",
    "TransformerTemporalModel": "a UNet component (temporal layers of AnimateDiff / SVD UNets), not a denoiser",
    "Transformer2DModel": "a UNet component (legacy PixArt-α checkpoints load as PixArtTransformer2DModel)",
    # multi-stream or multi-stage designs the runtime cannot describe yet
    "LatteTransformer3DModel": "spatial and temporal block lists run interleaved (an adapter's groups run one "
                               "after the other)",
    "Cosmos3OmniTransformer": "omni (vision-language + generation) model with a mixture-of-transformers decoder",
    "HiDreamImageTransformer2DModel": "double/single blocks take per-layer Llama states (4 text encoders) and a "
                                      "mixture-of-experts FFN; no tiny pipeline yet",
    "ZImageTransformer2DModel": "blocks take lists of variable-length samples (x, cap_feats lists) and their "
                                "input is named x (diffusers' block metadata says hidden_states); the unified "
                                "sequence needs a list-aware token layout",
    "LuminaNextDiT2DModel": "Lumina-Next: no tiny pipeline yet (Gemma text states, per-sample masks)",
    "EasyAnimateTransformer3DModel": "the tiny pipeline trips an assertion of the pipeline (text-mask layout); "
                                     "adapter not added untested",
    "HunyuanVideo15Transformer3DModel": "text tokens in the blocks include ByT5 and image tokens the transformer "
                                        "concatenates; no tiny pipeline yet",
    "HunyuanImageTransformer2DModel": "as HunyuanVideo 1.5 (ByT5 + OCR guider); no tiny pipeline yet",
    "Kandinsky5Transformer3DModel": "no tiny pipeline yet (Qwen2.5-VL + CLIP embeddings, cu_seqlens)",
    "Kandinsky6Transformer3DModel": "no tiny pipeline yet",
    "Kandinsky6SRTransformer3DModel": "super-resolution stage of a multi-stage pipeline; no tiny pipeline yet",
    "CosmosTransformer3DModel": "Cosmos pipelines require the cosmos_guardrail safety checker (not offline)",
    "LongCatImageTransformer2DModel": "LongCatImagePipeline needs its text processor even with prompt_embeds",
    "HunyuanVideoFramepackTransformer3DModel": "image-to-video with history latents and SigLIP image embeds; no "
                                               "tiny pipeline yet",
    "WanAnimateTransformer3DModel": "face adapter cross-attention between blocks and pose/face inputs; no tiny "
                                    "pipeline yet",
    "WanAnimate2Transformer3DModel": "as Wan-Animate; no tiny pipeline yet",
    "ChronoEditTransformer3DModel": "image-edit pipeline needs a CLIP image encoder and an input image; no tiny "
                                    "pipeline yet",
    "ConsisIDTransformer3DModel": "needs face embeddings (insightface) as input",
}
REASONS.update({name: why + "; refused at accelerate, also with blocks=[...]" for name, why in
                ADAPTER_REFUSED.items()})  # multi-stream blocks (dit_accel.adapters.base.REFUSED)
GENERIC_REASON = "no adapter yet"
# Not offered the generic adapter although diffusers knows their blocks: it would gate them wrongly (interleaved
# or multi-stream blocks, a block argument the metadata misnames) or they are no visual denoiser.
REFUSED = frozenset({*ADAPTER_REFUSED, "LatteTransformer3DModel", "ZImageTransformer2DModel", "PriorTransformer",
                     "TransformerTemporalModel", "Cosmos3OmniTransformer"})


@dataclass(frozen=True)
class Row:
    """One transformer class: ``status`` is "supported", "generic" or "not supported"."""

    name: str
    module: str
    status: str
    family: str = ""
    tier: int = 0
    cfg: str = ""
    sparse: str = ""
    block_lists: tuple[str, ...] = ()
    why: str = ""


def transformer_classes() -> dict[str, type]:
    """Every model class defined in ``diffusers.models.transformers`` (ModelMixin subclasses), by name."""
    import diffusers.models.transformers as package
    from diffusers import ModelMixin

    out: dict[str, type] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj.__module__ == module.__name__:
                out[name] = obj
    return dict(sorted(out.items()))


def _block_lists(cls: type) -> tuple[tuple[str, ...], bool]:
    """The ``nn.ModuleList`` attributes of ``cls.__init__`` and whether every block class is in diffusers'
    ``TransformerBlockRegistry`` (read from the source: nothing is instantiated)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    registered = {c.__name__ for c in TransformerBlockRegistry._registry}
    source = inspect.getsource(cls.__init__)
    found = re.findall(r"self\.(\w+)\s*=\s*nn\.ModuleList\(\s*\[?\s*(\w+)\(", source)
    lists = tuple(name for name, block in found if block.endswith("Block") or block in registered)
    blocks = [block for _, block in found if block.endswith("Block") or block in registered]
    return lists, bool(blocks) and all(b in registered for b in blocks)


def rows() -> list[Row]:
    """The report's rows, one per class of :func:`transformer_classes`."""
    from ..adapters import ADAPTERS
    from .registry import family_names, get_family

    families = {get_family(name).transformer_class: get_family(name) for name in family_names(tier=None)}
    out = []
    for name, cls in transformer_classes().items():
        module = cls.__module__.rsplit(".", 1)[-1]
        lists, registered = _block_lists(cls)
        if name in ADAPTERS and name in families:
            adapter, record = ADAPTERS[name], families[name]
            sparse = "yes" if adapter.sparse_unsupported is None else "no: " + adapter.sparse_unsupported
            out.append(Row(name, module, "supported", adapter.family, record.tier, adapter.cfg_layout, sparse,
                           adapter.block_groups, adapter.notes))
        elif registered and name not in REFUSED:
            why = "`blocks=" + repr(list(lists)) + "` (block metadata from TransformerBlockRegistry; not tested)"
            out.append(Row(name, module, "generic", block_lists=lists,
                           why=why + ("; no adapter: " + REASONS[name] if name in REASONS else "")))
        else:
            out.append(Row(name, module, "not supported", block_lists=lists, why=REASONS.get(name, GENERIC_REASON)))
    return out


def summary(report: list[Row] | None = None) -> str:
    """A compact Markdown table of the supported families (the README's model table)."""
    report = rows() if report is None else report
    lines = ["| family | diffusers class | CFG | sparse attention |", "|---|---|---|---|"]
    for row in sorted((r for r in report if r.status == "supported"), key=lambda r: (r.tier, r.family)):
        lines.append(f"| `{row.family}` | `{row.name}` | {row.cfg} | {'yes' if row.sparse == 'yes' else 'no'} |")
    return "\n".join(lines)


README_START, README_END = "<!-- models: generated by dit_accel.testing.coverage -->", "<!-- /models -->"
_NOT_DENOISERS = ("audio", "music", "protein", "UNet", "prior", "codec", "spectrogram")


def _short(name: str) -> str:
    return re.sub(r"(Transformer|Model|\dD)+$", "", name.replace("Transformer", "", 1)) or name


def _wrap(text: str, width: int = 118) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_on_hyphens=False)


def readme_section(report: list[Row] | None = None) -> str:
    """The README's model paragraph: the supported families by tier, the generic ones, what is not supported."""
    report = rows() if report is None else report
    supported = [r for r in report if r.status == "supported"]
    tiers = {t: ", ".join(f"`{f}`" for f in sorted(r.family for r in supported if r.tier == t)) for t in (1, 2)}
    generic = ", ".join(_short(r.name) for r in report if r.status == "generic")
    missing = [r for r in report if r.status == "not supported"]
    other = [r for r in missing if any(word in r.why for word in _NOT_DENOISERS)]
    dits = [r for r in missing if r not in other]
    text = (f"{len(supported)} diffusion-transformer families pass the conformance suite on CPU: tier 1 ({tiers[1]}: "
            f"full method matrix, presets) and tier 2 ({tiers[2]}). Generic adapter only (`blocks=[...]`, not "
            f"tested): {generic}. Not supported: {len(dits)} transformers without an adapter yet "
            f"({', '.join(_short(r.name) for r in dits)}) and {len(other)} classes that are not image or video "
            "denoisers (audio, protein, UNet parts, priors). Each class with its block groups, CFG layout, "
            "sparse-attention support or reason: [docs/models.md](docs/models.md).")
    return "\n".join([README_START, *_wrap(text), README_END])


def replace_readme_section(readme: str, report: list[Row] | None = None) -> str:
    """``readme`` with its model paragraph (between the markers) regenerated."""
    start, end = readme.index(README_START), readme.index(README_END) + len(README_END)
    return readme[:start] + readme_section(report) + readme[end:]


def render(report: list[Row] | None = None) -> str:
    """docs/models.md for the installed diffusers."""
    import diffusers

    report = rows() if report is None else report
    counts = {status: sum(r.status == status for r in report) for status in ("supported", "generic", "not supported")}
    parts = [
        "# Model coverage",
        "",
        "<!-- generated by `python -m dit_accel.testing.coverage --write docs/models.md --readme README.md`; "
        "tests/test_coverage.py checks it is current -->",
        "",
        f"diffusers {diffusers.__version__}: {len(report)} transformer classes in `diffusers.models.transformers`; "
        f"**{counts['supported']} supported** (an adapter and a tiny offline pipeline that the conformance suite "
        f"runs), {counts['generic']} usable through the generic adapter (`blocks=[...]`, blocks known to "
        f"diffusers' `TransformerBlockRegistry`, not tested here), {counts['not supported']} not supported.",
        "",
        "Tier 1 families run the conformance suite's full matrix on CPU (`tests/test_conformance.py`, or its "
        "light set where their record opts out); tier 2 families run its light set: `none` and `remove` "
        "bit-exact with no footprint, a call after a call with other steps equal to a fresh call, every caching "
        "method once (reusing, statistics consistent with what ran), and block-sparse attention on the sparse "
        "path where the family has softmax self-attention over the visual grid. `tests/test_adapters.py` checks "
        "each adapter against its model: blocks in execution order, the modulated input equal to what the first "
        "attention receives, the token layout equal to the attention's sequence. No published TeaCache/MagCache "
        "coefficients ship for the tier 2 families: `dit_accel.calibrate` fits them.",
        "",
        "## Supported",
        "",
        summary(report),
        "",
        "| family | tier | block groups (execution order) | notes |",
        "|---|---|---|---|",
    ]
    for row in sorted((r for r in report if r.status == "supported"), key=lambda r: (r.tier, r.family)):
        notes = "; ".join(x for x in (row.why, "" if row.sparse == "yes" else "sparse attention " + row.sparse) if x)
        parts.append(f"| `{row.family}` | {row.tier} | {', '.join(f'`{g}`' for g in row.block_lists)} | {notes} |")
    parts += ["", "## Pipelines with several transformers or stages", "",
              "Wan 2.2 A14B (WanPipeline, WanImageToVideoPipeline, WanVACEPipeline, LucyEditPipeline with "
              "`transformer_2`): every denoiser of a pipeline gets its own runtime, with its own steps and caches "
              "(each expert's steps from the pipeline's `boundary_ratio`); `accelerate` validates both before the "
              "first hook, so an expert it cannot take (or the same module twice) leaves nothing attached. A "
              "pipeline that runs a diffusers transformer in another component (Ideogram4Pipeline's "
              "`unconditional_transformer`) is refused rather than half accelerated; accelerate its transformers "
              "themselves. LTX-2 (audio-video blocks; its pipelines add a latent-upsampler stage) and the Sana-WM "
              "LTX-2 refiner are refused at `accelerate`, also with `blocks=[...]`. A stage without a denoising "
              "transformer (LTXLatentUpsamplePipeline, LTX2LatentUpsamplePipeline) is refused with the "
              "no-transformer error; a refining denoising pass with the same transformer in another pipeline "
              "(LTX-Video's second stage) is a new generation of that transformer's runtime. Refiner *blocks* "
              "inside a transformer (Lumina 2's context and noise refiners, Wan VACE's control blocks) run "
              "uncached before the cached groups. `tests/test_coverage.py` checks each of these on tiny models."]
    parts += ["", "## Generic adapter", "", "| class | module | how |", "|---|---|---|"]
    parts += [f"| `{r.name}` | `{r.module}` | {r.why} |" for r in report if r.status == "generic"]
    parts += ["", "## Not supported", "", "| class | module | why |", "|---|---|---|"]
    parts += [f"| `{r.name}` | `{r.module}` | {r.why} |" for r in report if r.status == "not supported"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_accel.testing.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="PATH", help="write the report there (default: print it)")
    parser.add_argument("--readme", metavar="PATH", help="regenerate that README's model paragraph")
    args = parser.parse_args(argv)
    report = rows()
    text = render(report)
    if args.write:
        Path(args.write).write_text(text)
    elif not args.readme:
        print(text, end="")
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_readme_section(path.read_text(), report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
