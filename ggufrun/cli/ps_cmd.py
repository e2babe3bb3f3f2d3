"""`ggufrun ps | stop`: a running server's loaded models, over its HTTP API (remote.py)."""

from __future__ import annotations

import json

import click

from ..remote import DEFAULT_PORT


def _endpoint_options(f):  # type: ignore[no-untyped-def]
    f = click.option("--api-key", envvar="GGUFRUN_API_KEY", default=None,
                     help="The server's --api-key (or GGUFRUN_API_KEY).")(f)
    f = click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
                     help="The server's port.")(f)
    return click.option("--host", default="127.0.0.1", show_default=True, help="The server's address (as given to serve --host).")(f)


@click.command("ps")
@_endpoint_options
@click.option("--json", "as_json", is_flag=True, help="Print /api/ps's JSON.")
def ps_command(host: str, port: int, api_key: str | None, as_json: bool) -> None:
    """List the models a running `ggufrun serve` has loaded: memory, where it is (CPU/GPU),
    context per request and when an idle model unloads (its keep_alive), as `ollama ps`.

    \b
    Examples:
      ggufrun ps
      ggufrun ps --port 8080 --json
    """
    from ..cache import human_size
    from ..remote import Endpoint, processor, running, until

    models = running(Endpoint(host, port, api_key))
    if as_json:
        click.echo(json.dumps({"models": models}, indent=2))
        return
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    rows += [(str(m.get("name")), human_size(int(m.get("size") or 0)), processor(m), str(m.get("context_length") or ""),
              until(m)) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.command("stop")
@click.argument("model")
@_endpoint_options
def stop_command(model: str, host: str, port: int, api_key: str | None) -> None:
    """Unload MODEL from a running `ggufrun serve`, as `ollama stop`; a model in use unloads when
    its requests end. Exit 3 when it is not loaded.

    \b
    Examples:
      ggufrun stop gemma3-270m
      ggufrun stop qwen2:7b --port 8080
    """
    from ..remote import Endpoint, stop

    if not stop(Endpoint(host, port, api_key), model):
        click.echo(f"'{model}' is in use; it unloads when its requests end.", err=True)
