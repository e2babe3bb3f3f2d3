"""Entry point: the lazy command group and the one error boundary."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .. import __version__

# command name -> (module under ggufrun.cli, one-line help shown by `ggufrun --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("models_cmd", "List registry models, their quants and what is cached."),
    "show": ("inspect_cmd", "Show GGUF facts read from the file header."),
    "pull": ("models_cmd", "Download a model into the cache."),
    "path": ("models_cmd", "Print a cached model's path (exit 3 if absent)."),
    "rm": ("models_cmd", "Remove a model from the cache."),
    "lock": ("models_cmd", "Write ggufrun.lock: the exact files behind model names."),
    "synth": ("synth_cmd", "Write a random-weight GGUF in a real architecture's shape."),
    "chat": ("chat_cmd", "Chat with a model in the terminal, or answer one prompt."),
    "serve": ("serve_cmd", "Serve models over an OpenAI-compatible HTTP API."),
    "ps": ("ps_cmd", "List the models a running server has loaded."),
    "stop": ("ps_cmd", "Unload a model from a running server."),
    "bench": ("bench_cmd", "Benchmark speed, memory and quality per quantisation."),
    "quantize": ("bench_cmd", "Quantise a GGUF file to other types with llama.cpp."),
    "rpc-worker": ("rpc_cmd", "Serve this host's devices to --rpc clients (llama.cpp RPC)."),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs, so `--help` stays instant."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"ggufrun.cli.{COMMANDS[name][0]}")
        return getattr(module, f"{name.replace('-', '_')}_command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggufrun")
@click.option("--models", "models_file", type=click.Path(dir_okay=False), default=None,
              help="Extra models.toml overlaid on the registry.")
@click.pass_context
def cli(ctx: click.Context, models_file: str | None) -> None:
    """Find, fetch, chat with, serve and benchmark llama.cpp GGUF models.

    \b
    Examples:
      ggufrun chat -p "What is the capital of France?"
      ggufrun pull qwen2-7b-q5
      ggufrun serve qwen2-7b-q5 --port 13003 --served-model-name qwen2:7b
      ggufrun bench gemma3-270m --threads 1,2
    """
    ctx.ensure_object(dict)
    ctx.obj["models_file"] = models_file


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI; the core's typed errors become one line on stderr and a named exit code."""
    from ..errors import ExitStatus, GgufrunError
    from .. import paths

    try:
        return cli.main(args=argv, prog_name="ggufrun", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted.", err=True)
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(ExitStatus.INTERRUPTED)
    except GgufrunError as exc:
        if paths.debug():
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_status)
    except OSError as exc:
        if paths.debug():
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"Error: {exc.strerror or exc}{where}. Set GGUFRUN_DEBUG=1 for a traceback.", err=True)
        sys.exit(ExitStatus.ERROR)


if __name__ == "__main__":
    main()
