"""`ggufrun rpc-worker`: serve this host's devices to other ggufrun/llama.cpp processes over TCP."""

from __future__ import annotations

from pathlib import Path

import click

_WARNING = ("WARNING: llama.cpp's RPC protocol has no authentication and no encryption: anyone who can "
            "reach {where} can run computations on this worker's devices and read their memory. Use a "
            "private, trusted network only; never expose it to the internet.")
_LOOPBACK = "Note: llama.cpp's RPC protocol has no authentication; this worker listens on 127.0.0.1 only."


@click.command("rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True, help="IPv4 address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="TCP port.")
@click.option("--device", "device", metavar="NAMES", help="Comma list of devices to serve, e.g. CUDA0 or CPU "
              "(default: every GPU, else the CPU).")
@click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=Path),
              help="Keep tensors sent by clients here, so reloading a model skips the transfer.")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="CPU threads when serving the CPU (0 = physical cores).")
def rpc_worker_command(host: str, port: int, device: str | None, cache: Path | None, threads: int) -> None:
    """Run llama.cpp's RPC server on this host's devices.

    Clients offload layers to it with --rpc HOST:PORT on chat, serve and bench. It needs
    llama-cpp-python built with -DGGML_RPC=ON. It listens on 127.0.0.1 unless --host says
    otherwise; the protocol has no authentication, so use private networks only.

    \b
    Examples:
      ggufrun rpc-worker --port 50052
      ggufrun rpc-worker --host 10.0.0.2 --port 50052 --device CUDA0 --cache ~/.cache/ggufrun/rpc
      ggufrun chat qwen2-7b-q5 --rpc 10.0.0.2:50052,10.0.0.3:50052 --n-gpu-layers -1
    """
    from ..llama import ggml
    from ..settings import physical_cores

    def announce(line: str) -> None:  # after the checks, so a refused start prints only its error
        if host == "127.0.0.1":
            click.echo(_LOOPBACK, err=True)
        else:
            click.secho(_WARNING.format(where=f"{host}:{port}"), err=True, fg="red", bold=True)
        click.echo(line, err=True)

    names = [d.strip() for d in device.split(",") if d.strip()] if device else []
    ggml.start_worker(host, port, names, str(cache.expanduser()) if cache else None, threads or physical_cores(), announce)
