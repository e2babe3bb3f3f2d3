"""Bisect the GPU-only crash of `ggufrun serve` (llama_model::print_info on the engine thread).

python3 bench/gpu/serve_probe.py MODEL.gguf MODE, where MODE is one of:
  pool-main    the server's ModelPool._load on the main thread (no HTTP server)
  pool-thread  the same on a fresh thread
  engine       a real Engine thread (as the server starts it), no HTTP server
"""
import sys
import threading

if "--libstdcxx-global" in sys.argv:
    # Test: make the system libstdc++ win symbol lookups over copies exported by libggml-cuda.
    import ctypes

    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    sys.argv.remove("--libstdcxx-global")

from ggufrun import registry
from ggufrun.server.metrics import Metrics
from ggufrun.server.models import ModelPool, single_model_config

path, mode = sys.argv[1], sys.argv[2]
config = single_model_config(path, (), {"n_gpu_layers": -1, "threads": 8})
pool = ModelPool(config, registry.load(), Metrics())
cfg = config.models[0]
if mode == "pool-main":
    pool._load(cfg, 1)
elif mode == "pool-thread":
    t = threading.Thread(target=pool._load, args=(cfg, 1))
    t.start()
    t.join()
elif mode == "engine":
    import asyncio

    async def main() -> None:
        engine = pool.preload(cfg)
        await engine.wait_ready()

    asyncio.run(main())
print("loaded", mode, flush=True)
