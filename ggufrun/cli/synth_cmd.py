"""`ggufrun synth`: write a random-weight GGUF in a real architecture's shape."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError


@click.command("synth")
@click.option("--shape", default="tiny", show_default=True,
              help="tiny, tiny-llama, tiny-gemma, tiny-gemma3, tiny-qwen3, tiny-qwen3-reranker, qwen3-reranker-0.6b, "
                   "qwen2-0.5b, qwen2-7b, gemma-2-9b, "
                   "or ARCH:layers=N,dim=N,heads=N,kv_heads=N,ff=N,vocab=N.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--arch", default=None, help="Override the shape's architecture: qwen2, qwen3, llama, gemma (gemma2), gemma3.")
@click.option("--quant", default="q4_k_m", show_default=True,
              help="f32, f16, q8_0, q5_0, q4_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (the same seed writes the same file).")
@click.option("--no-template", is_flag=True, help="Write no chat template (the registry family then applies).")
@click.option("--fim", type=click.Choice(["qwen", "basic"]), default=None,
              help="Add fill-in-the-middle tokens: Qwen2.5-Coder's six (repo-level FIM too) or prefix/suffix/middle only.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--projector", default=None,
              help="Also write a vision projector for OUT: smolvlm-tiny, smolvlm-small, smolvlm, gemma3-tiny, gemma3, "
                   "qwen25vl-tiny, qwen25vl-small, qwen25vl, qwen3vl-tiny, qwen3vl (OUT gets its image tokens; qwen25vl "
                   "wants a qwen2vl shape such as tiny-qwen2vl, qwen3vl a qwen3vl one with as many deepstack layers).")
@click.option("--mmproj-out", default=None, type=click.Path(dir_okay=False),
              help="Where the projector goes (default: mmproj-NAME.gguf beside OUT).")
@click.option("--inert", is_flag=True, help="Speculative-decoding pairs: layers that add nothing, so the next token follows "
              "from the last one through embedding and output matrices drawn from --seed alone; inert files of one shape "
              "and seed (any --layers) predict alike.")
@click.option("--layers", type=click.IntRange(1), default=None, help="Override the shape's layer count (a cheap draft: 1).")
@click.option("--perturb", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="With --inert: share of output rows drawn anew, so a draft disagrees on about that share of tokens.")
def synth_command(shape: str, out: str, arch: str | None, quant: str, seed: int, no_template: bool, fim: str | None,
                  force: bool, projector: str | None, mmproj_out: str | None, inert: bool, layers: int | None,
                  perturb: float) -> None:
    """Write a random-weight GGUF with a real architecture's exact tensor layout, tokenizer and
    chat template. It loads and runs like the real model (speed depends on shapes and quant
    types, not on values) but says nothing meaningful.

    \b
    Examples:
      ggufrun synth --shape qwen2-7b --out q7.gguf
      ggufrun synth --shape gemma-2-9b --quant q5_k_m --out g9.gguf
      ggufrun synth --shape llama:layers=4,dim=256,heads=4,kv_heads=2,ff=512,vocab=2000 --out small.gguf
      ggufrun synth --shape qwen2-7b --inert --out target.gguf
      ggufrun synth --shape qwen2-7b --inert --layers 1 --perturb 0.5 --out draft.gguf
      ggufrun synth --shape tiny --fim qwen --no-template --out coder.gguf    # for /infill
      ggufrun synth --shape tiny-qwen3-reranker --out rerank.gguf             # for /v1/rerank
      ggufrun synth --shape tiny-llama --projector smolvlm-tiny --out vlm.gguf  # for images
    """
    from ..cache import human_size
    from ..gguf_info import inspect
    from ..synthetic import write_synthetic
    from .inspect_cmd import human_count
    from .progress import RichProgress

    from ..synthetic import parse_shape
    from ..synthetic_vision import VISION_TOKENS, projector_spec, write_projector

    if mmproj_out and not projector:
        raise click.UsageError("--mmproj-out names where the projector goes: give --projector too.")
    spec = projector_spec(projector) if projector else None
    target = mmproj_out or str(Path(out).with_name(f"mmproj-{projector}.gguf"))
    if spec is not None and Path(target).exists() and not force:
        raise ConfigError(f"{target} already exists.", "Choose another --mmproj-out, or allow replacing it (--force).")
    with RichProgress() as progress:
        path = write_synthetic(out, shape, arch=arch, quant=quant, seed=seed, chat_template=not no_template,
                               overwrite=force, fim=fim, progress=lambda done, total: progress(f"writing {out}", done, total),
                               extra_tokens=VISION_TOKENS[spec.kind] if spec else (),
                               inert=inert, layers=layers, perturb=perturb)
    if spec is not None:
        mm = write_projector(target, spec, parse_shape(shape, arch).n_embd, seed=seed)
        click.echo(f"Wrote {mm}: {spec.projector_type} projector for a text width of {parse_shape(shape, arch).n_embd}.")
    info = inspect(path)
    click.echo(f"Wrote {path}: {info.architecture} {shape}, {info.file_type}, {human_count(info.parameter_count)} "
               f"parameters, {human_size(info.file_size)}.")
