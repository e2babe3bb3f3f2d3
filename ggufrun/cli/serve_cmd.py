"""`ggufrun serve`: parse flags into a ServeConfig and run the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..settings import FIELDS
from .common import cli_settings, settings_options

SETTINGS = tuple(FIELDS)


@click.command("serve")
@click.argument("name", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Serve config TOML: several models, loaded on demand.")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1; 0.0.0.0 listens on every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default 13003; 0 picks a free one, printed at start-up).")
@click.option("--served-model-name", "served_names", multiple=True, help="Name clients use for the model (repeatable); the registry name works too.")
@click.option("-s", "--system", default=None, metavar="@NAME|FILE|TEXT",
              help="Default system prompt for requests that bring none (default: the registry entry's; \"\" for none).")
@click.option("--max-loaded", type=click.IntRange(1), default=None,
              help="Models resident at once, at most; the least recently used idle one is unloaded for another, as it "
                   "is when the next one's memory estimate does not fit beside them (default 3).")
@click.option("--keep-alive", "keep_alive", envvar="GGUFRUN_KEEP_ALIVE", default=None, metavar="DURATION",
              help="Unload a model idle this long: 30s, 5m, 1h, 0 (right after each reply) or -1 (never); an Ollama "
                   "request's keep_alive overrides it for its model (default 5m, as Ollama).")
@click.option("--max-num-ctx", "max_num_ctx", type=click.IntRange(0), default=None, metavar="TOKENS",
              help="An Ollama request's options.num_ctx above --n-ctx reloads the model with it (once its running "
                   "requests end), up to TOKENS; the model keeps the larger context until unloaded (default 0: such "
                   "a request is a 400 naming the limit).")
@click.option("--parallel", type=click.IntRange(1, 256), default=None, help="Requests decoded together per model (default 4).")
@click.option("--max-queue", type=click.IntRange(0), default=None, help="Requests waiting for a slot before 503 (default 64).")
@click.option("--api-key", envvar="GGUFRUN_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health. Visible in `ps`: prefer "
                   "GGUFRUN_API_KEY or --api-key-file.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the API key from this file (its first line), keeping it off the command line.")
@click.option("--cors", "cors", multiple=True, help="Allow browser requests from ORIGIN (repeatable; off by default).")
@click.option("--allowed-hosts", "allowed_hosts", multiple=True,
              help="Also answer requests whose Host header is NAME (repeatable or comma-separated; '*' for any). "
                   "By default only loopback names and the bound address, against DNS rebinding.")
@click.option("--allow-image-urls", "allow_image_urls", is_flag=True, default=None,
              help="Fetch http(s) image URLs that requests name (off: only data: URLs and base64, so requests cannot "
                   "make the server reach its own network).")
@settings_options(*SETTINGS, helps={"max_tokens": "Most tokens a reply generates when the request sets no limit: the model's "
                                                  "models.toml default, else 2048 (0 = until end of turn or the context). "
                                                  "A request may ask for more, up to its context."})
@click.pass_context
def serve_command(ctx: click.Context, name: str | None, config_path: Path | None, served_names: tuple[str, ...],
                  system: str | None, **kwargs: Any) -> None:
    """Serve NAME (default: the registry's `default`, as `ggufrun chat`) over the OpenAI, Anthropic
    and Ollama APIs with continuous batching, and a chat page at the URL printed at start-up.

    A request that sets no limit (max_tokens, max_output_tokens, num_predict) generates at most
    --max-tokens tokens: the model's own default in models.toml, else 2048 (0: until the end of
    turn or the context). A request may ask for more, up to its context (--n-ctx). Requests
    without a system prompt or sampling fields get the model's: --system, else its models.toml
    `system`, and its settings.

    \b
    Examples:
      ggufrun serve
      ggufrun serve gemma3-270m
      ggufrun serve qwen2-7b-q5 --port 13003 --served-model-name qwen2:7b --n-ctx 8192
      ggufrun serve --config serve.toml --max-loaded 2 --keep-alive 30m
      GGUFRUN_API_KEY=... ggufrun serve gemma3-270m --host 0.0.0.0
      ggufrun serve gemma3-270m --host 0.0.0.0 --api-key-file ~/.config/ggufrun/key
    """
    from ..server import is_loopback, run
    from ..server.models import keep_alive_setting, read_serve_config, single_model_config

    settings = cli_settings(kwargs, *SETTINGS)
    if kwargs["keep_alive"] is not None:
        kwargs["keep_alive"] = keep_alive_setting(kwargs["keep_alive"], "--keep-alive")
    key_file = kwargs.pop("api_key_file")
    if key_file is not None:
        if kwargs["api_key"] is not None:
            raise click.UsageError("Give the API key once: --api-key (or GGUFRUN_API_KEY) or --api-key-file.")
        kwargs["api_key"] = read_api_key(key_file)
    if name is not None and config_path is not None:
        raise click.UsageError("Give a model NAME or --config FILE, not both.")
    if config_path is None and name is None:
        name = "default"  # as `ggufrun chat` with no name
    if config_path is not None and served_names:
        raise click.UsageError("--served-model-name names the model given as NAME; in --config use served_model_name.")
    if config_path is not None and system is not None:
        raise click.UsageError("--system is the system prompt of the model given as NAME; in --config use system per model.")
    if config_path is not None:
        config = read_serve_config(config_path).with_settings(settings)
    else:
        config = single_model_config(name, served_names, settings, system)  # type: ignore[arg-type]
    hosts = tuple(h.strip() for value in kwargs.pop("allowed_hosts") for h in value.split(",") if h.strip())
    config = config.with_overrides(cors=tuple(kwargs.pop("cors")) or None, allowed_hosts=hosts or None,
                                   models_file=_models_file(ctx), **kwargs)
    if not is_loopback(config.host) and not config.api_key:
        click.echo(f"Warning: listening on {config.host} without --api-key: anyone who can reach this port can use the models.", err=True)
    run(config, preload=name is not None)


def read_api_key(path: Path) -> str:
    """The key on the first line of ``path``; ConfigError when the file cannot be read or is empty."""
    from ..errors import ConfigError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read --api-key-file {path}: {getattr(exc, 'strerror', None) or exc}.") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {path} is empty.", "Write the key on its first line.")
    return key


def _models_file(ctx: click.Context) -> Path | None:
    models_file = (ctx.find_root().obj or {}).get("models_file")
    return Path(models_file) if models_file else None
