"""`ggufrun list | pull | path | rm`: the registry and the local cache."""

from __future__ import annotations

import json

import click

from .common import load_registry
from .progress import download_progress


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """List the registry's models with their quants, the files in the cache, and the files bench made
    (quants derived with --derive-from, synthetic models).

    \b
    Examples:
      ggufrun list
      ggufrun list --json | jq '.cached[].path'
    """
    from .. import fetch
    from ..bench import derived_files
    from ..cache import human_size

    reg = load_registry(ctx)
    files = fetch.cached()
    made = derived_files()
    if as_json:
        models = [{"name": e.name, "aliases": list(e.aliases), "quants": list(e.quants), "default_quant": e.default_quant,
                   "family": e.family, "description": e.description,
                   "sources": [s.describe() for s in e.sources_for(e.default_quant or "")] if e.default_quant else []}
                  for e in reg.entries.values()]
        cached = [{"path": str(f.path), "size": f.size, "cache_key": f.cache_key, "filename": f.filename} for f in files]
        derived = [{"path": str(d.path), "size": d.size, "derived_from": d.derived_from or None, "synthetic": d.synthetic}
                   for d in made]
        click.echo(json.dumps({"models": models, "cached": cached, "derived": derived}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    models_table = Table("model", "aliases", "quants (default first)", "sources", title="Registry")
    for e in reg.entries.values():
        quants = [q for q in e.quants if q != e.default_quant]
        models_table.add_row(e.name, ", ".join(e.aliases), ", ".join(([e.default_quant] if e.default_quant else []) + quants),
                             " > ".join(s["hub"] for s in e.sources))
    cached_table = Table("model", "file", "size", "path", title=f"Cached ({len(files)})")
    for f in files:
        cached_table.add_row(f.cache_key, f.filename, human_size(f.size), str(f.path))
    console = Console(highlight=False)
    console.print(models_table)
    console.print(cached_table)
    if made:  # quantiser output and random weights: not hub files, so apart from the cache
        derived_table = Table("file", "size", "made from", title=f"Made by bench ({len(made)})")
        for d in made:
            origin = ("random weights" if d.synthetic else "not recorded") if not d.derived_from else d.derived_from
            derived_table.add_row(str(d.path), human_size(d.size), origin + (" (synthetic)" if d.synthetic else ""))
        console.print(derived_table)


@click.command("pull")
@click.argument("names", nargs=-1)
@click.option("--offline", is_flag=True, help="Use only the cache (also GGUFRUN_OFFLINE=1 or HF_HUB_OFFLINE=1).")
@click.option("--force", is_flag=True, help="Download again even if cached (the cached copy is kept until the new one "
              "is verified), and even if the model's header says it cannot run here.")
@click.option("--locked", "locked", is_flag=False, flag_value="ggufrun.lock", default=None, metavar="[FILE]",
              help="Fetch exactly the files in ggufrun.lock (or FILE), refusing any that differ.")
@click.pass_context
def pull_command(ctx: click.Context, names: tuple[str, ...], offline: bool, force: bool, locked: str | None) -> None:
    """Download models into the cache: each source in order, verified by size and sha256.

    A hub file that is not cached has its header read first (HTTP range requests) and is refused
    when it cannot run on this machine (--force pulls anyway).

    \b
    Examples:
      ggufrun pull qwen2-7b-q5
      ggufrun pull gemma-2-9b-it:Q4_K_M
      ggufrun pull hf:bartowski/gemma-2-9b-it-GGUF:Q5_K_M
      ggufrun pull hf:Qwen/Qwen2-0.5B-Instruct-GGUF/qwen2-0_5b-instruct-q4_0.gguf
      ggufrun pull --locked
    """
    from pathlib import Path

    from .. import fetch
    from ..cache import human_size
    from ..vision import projector_spec

    reg = load_registry(ctx)
    if locked is not None:
        if names or force or offline:
            raise click.UsageError("--locked fetches what the lock file names: give no NAME, --force or --offline with it.")
        from ..lock import pull_locked

        with download_progress() as progress:
            results = pull_locked(Path(locked), reg, progress=progress, report=progress.report)
        for r in results:
            click.echo(f"{r.path} {'is cached' if r.cached else f'{human_size(r.bytes)} from {r.source}'}, as locked")
        return
    if not names:
        raise click.UsageError("Give a model NAME (or --locked).")
    for name in names:
        spec = reg.resolve(name)
        with download_progress() as progress:
            result = fetch.pull(spec, force=force, offline=offline or None, progress=progress, report=progress.report)
            pspec = projector_spec(spec, offline=offline or None, report=progress.report)  # a vision model's projector
            extra = [fetch.pull(pspec, force=force, offline=offline or None, progress=progress, report=progress.report,
                                fit=False)] if pspec is not None else []
        for what, r in ((spec.name, result), *((f"{spec.name} projector", r) for r in extra)):
            if r.cached:
                click.echo(f"{what} is cached: {r.path}")
            else:
                click.echo(f"{what}: {human_size(r.bytes)} from {r.source} in {r.seconds:.1f} s -> {r.path}")


@click.command("path")
@click.argument("name")
@click.pass_context
def path_command(ctx: click.Context, name: str) -> None:
    """Print the cached file's path; exit 3 if it is not cached. Never downloads.

    \b
    Example:
      llama-cli -m "$(ggufrun path qwen2-7b-q5)"
    """
    from .. import fetch

    click.echo(fetch.ensure_local(load_registry(ctx).resolve(name), offline=True))


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm_command(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove models from the cache (and any partial download of them); exit 3 if one was not cached.

    \b
    Example:
      ggufrun rm qwen2-7b-q5
    """
    from .. import fetch
    from ..errors import NotCachedError

    reg = load_registry(ctx)
    for name in names:
        spec = reg.resolve(name)
        removed = fetch.remove(spec)
        if not removed:
            raise NotCachedError(f"'{spec.name}' is not in the cache.", "See `ggufrun list`.")
        click.echo(f"Removed {spec.name}: {spec.cache_path()}")


@click.command("lock")
@click.argument("names", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=None), default="ggufrun.lock", show_default=True,
              help="The lock file to write.")
@click.pass_context
def lock_command(ctx: click.Context, names: tuple[str, ...], output: str) -> None:
    """Write a lock file with the exact files behind NAMES: source, repo, revision, file, size, sha256.

    `ggufrun pull --locked` then fetches exactly those files and refuses any that differ.

    \b
    Examples:
      ggufrun lock smollm2 qwen2-7b-q5 hf:bartowski/gemma-2-9b-it-GGUF:Q5_K_M
      ggufrun pull --locked
    """
    from pathlib import Path

    from .. import lock

    with download_progress() as progress:
        entries = lock.lock(list(names), load_registry(ctx), report=progress.report)
    path = lock.write(entries, Path(output))
    click.echo(f"{path}: {len(entries)} file(s) locked")
