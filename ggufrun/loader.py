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

    def close(self) -> None:
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
    path = ensure_local(spec, offline=offline, progress=progress, report=report, n_ctx=settings.n_ctx)
    from .trial import trial_load

    trial_load(path)  # a file that makes llama.cpp abort kills a child process, not this one
    if settings.n_gpu_layers == "auto":
        from dataclasses import replace

        from .gguf_info import validate
        from .offload import decide

        info = validate(path)  # a crafted header is refused before its numbers are trusted
        n_ctx = settings.n_ctx or info.context_length or 4096
        plan = decide(info, n_ctx, spec.name, n_ubatch=settings.ubatch_size, kv_cells=max(kv_cells, n_ctx),
                      cache_types=(settings.cache_type_k, settings.cache_type_v))
        settings = replace(settings, n_gpu_layers=plan.n_gpu_layers)
        if plan.devices and report is not None:  # a CPU-only build: nothing worth saying
            report(plan.describe())
    model = Model.load(path, settings, n_seq_max=n_seq_max, kv_cells=kv_cells)
    family = spec.family or guess_family(model.metadata)
    return LoadedModel(model=model, spec=spec, settings=settings, family=family)
