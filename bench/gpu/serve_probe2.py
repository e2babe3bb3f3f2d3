"""Second bisection step for the serve crash: which step of ModelPool._load matters."""
import sys
from pathlib import Path

from ggufrun import registry
from ggufrun.settings import Settings

path, mode = sys.argv[1], sys.argv[2]
reg = registry.load()
if mode == "open_model":
    from ggufrun.loader import open_model
    open_model(path, reg, {"n_gpu_layers": -1, "threads": 8, "n_ctx": 4096})
elif mode == "abs":
    from ggufrun.runtime import Model
    Model.load(Path(path).resolve(), Settings(n_gpu_layers=-1, threads=8, n_ctx=4096))
elif mode == "pool_then_load":
    from ggufrun.runtime import Model
    from ggufrun.server.metrics import Metrics
    from ggufrun.server.models import ModelPool, single_model_config
    ModelPool(single_model_config(path, (), {"n_gpu_layers": -1}), reg, Metrics())
    Model.load(path, Settings(n_gpu_layers=-1, threads=8, n_ctx=4096))
elif mode == "templates_then_load":
    from ggufrun.runtime import Model
    from ggufrun.templates import select_template  # noqa: F401
    Model.load(path, Settings(n_gpu_layers=-1, threads=8, n_ctx=4096))
print("ok", mode, flush=True)
