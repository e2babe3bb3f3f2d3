"""Which part of the server's set-up makes llama_model_load_from_file crash on the GPU machine?"""
import asyncio, sys, threading
from ggufrun.settings import Settings

path, mode = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:  # modules the server process imports first
    __import__(name)


if sys.argv[2] != "lazy":
    import ggufrun.runtime  # noqa: F401  (llama.cpp's libraries loaded by the main thread)


def load() -> None:
    from ggufrun.runtime import Model
    if mode == "loader":
        from ggufrun import registry
        from ggufrun.loader import open_model
        open_model(path, registry.load(), {"n_gpu_layers": -1, "n_ctx": 512})
    else:
        Model.load(path, Settings(n_gpu_layers=-1, n_ctx=512))
    print("loaded", mode, flush=True)


async def main() -> None:
    t = threading.Thread(target=load)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.05)

if mode == "uvloop":
    import uvloop
    uvloop.run(main())
elif mode in ("asyncio", "loader", "lazy"):
    asyncio.run(main())
