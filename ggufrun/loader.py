"""Name -> loaded model, the same way for chat, serve and bench: resolve, fetch, merge settings, load."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .settings import Settings, resolve

if TYPE_CHECKING:
    from .registry import ModelSpec, Registry
    from .runtime import Model
    from .sources import ProgressFn


@dataclass
class LoadedModel:
    model: Model
    spec: ModelSpec
    settings: Settings
    family: str  # template family used when the GGUF has no template: the registry's, else guessed
    vision: Any = None  # llama.vision.Projector when the model has a projector (it sees images)

    def close(self) -> None:
        if self.vision is not None:
            self.vision.close()
        self.model.close()


def open_model(
    name: str,
    registry: Registry,
    cli_settings: Mapping[str, Any] | None = None,
    *,
    offline: bool | None = None,
    progress: ProgressFn | None = None,
    report: Callable[[str], None] | None = None,
    n_seq_max: int = 1,
    kv_cells: int = 0,
) -> LoadedModel:
    """Resolve ``name``, pull the file when it is not cached, merge the settings layers and load it.

    Raises UnknownModelError / UnknownQuantError (name), ConfigError (a setting, or n_ctx beyond
    the model's), NotCachedError / DownloadError (fetch), InvalidGGUFError, ModelLoadError.
    """
    from .fetch import ensure_local
    from .runtime import Model
    from .templates import guess_family

    spec = registry.resolve(name)
    settings = resolve(spec.defaults, cli_settings)  # bad flags fail before a download starts
    from .speculative import check_tuning

    check_tuning(settings, [(f"models.toml entry '{spec.name}'", spec.defaults), ("command line", cli_settings)])
    path = ensure_local(spec, offline=offline, progress=progress, report=report, n_ctx=settings.n_ctx)
    from .gguf_info import validate
    from .trial import trial_load

    # a crafted header is refused before its numbers are trusted; once, for the trial, the plan and the load
    # (gemma3's 262k-token vocabulary takes ~0.25 s to parse)
    info = validate(path)
    trial_load(path, validated=True)  # a file that makes llama.cpp abort kills a child process, not this one
    if settings.n_gpu_layers == "auto":
        from dataclasses import replace

        from .offload import decide

        n_ctx = settings.n_ctx or info.context_length or 4096
        plan = decide(info, n_ctx, spec.name, n_ubatch=settings.ubatch_size, kv_cells=max(kv_cells, n_ctx),
                      cache_types=(settings.cache_type_k, settings.cache_type_v))
        settings = replace(settings, n_gpu_layers=plan.n_gpu_layers)
        if plan.devices and report is not None:  # a CPU-only build: nothing worth saying
            report(plan.describe())
    model = Model.load(path, settings, n_seq_max=n_seq_max, kv_cells=kv_cells, validate=False)  # validated above
    model.gguf_info = info  # the header as parsed once (llama/text_rows.py reads its tensor table)
    if settings.spec != "off" or settings.draft_model:
        _speculate(model, spec.name, settings, registry, cli_settings, offline, n_seq_max, kv_cells)
    family = spec.family or guess_family(model.metadata)
    try:
        from .vision import load_projector

        vision = load_projector(model, spec, settings, offline=offline, progress=progress, report=report)
    except BaseException:
        model.close()
        raise
    return LoadedModel(model=model, spec=spec, settings=settings, family=family, vision=vision)


def _speculate(model: Model, name: str, settings: Settings, registry: Registry, cli_settings: Mapping[str, Any] | None,
               offline: bool | None, n_seq_max: int, kv_cells: int) -> None:
    """Attach the speculator the settings ask for to ``model``; a draft model is opened as any
    model is (resolved, fetched, offloaded by the same auto rule), with the target's context and
    sequences. A refusal frees the target."""
    from . import speculative

    keep = ("n_gpu_layers", "flash_attn", "threads", "batch_size", "ubatch_size", "rpc", "split_mode", "tensor_split", "main_gpu")
    draft_cli = {k: v for k, v in (cli_settings or {}).items() if k in keep}
    draft_cli.update(n_ctx=settings.n_ctx or model.n_ctx, spec="off", draft_model="")  # the draft drafts nothing itself

    def load_draft(draft_name: str) -> Model:
        return open_model(draft_name, registry, draft_cli, offline=offline, n_seq_max=n_seq_max, kv_cells=kv_cells).model

    try:
        model.speculator = speculative.build(model, settings, name, load_draft)
    except BaseException:
        model.close()
        raise
