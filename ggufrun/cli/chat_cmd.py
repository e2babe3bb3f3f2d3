"""`ggufrun chat`: the terminal REPL and one-shot mode over ggufrun.chat.ChatSession."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from .common import cli_settings, load_registry, settings_options

if TYPE_CHECKING:
    from rich.console import Console

    from ..chat import ChatSession, Reply

CHAT_SETTINGS = ("n_gpu_layers", "n_ctx", "flash_attn", "cache_type_k", "cache_type_v", "threads", "batch_size", "seed", "temperature", "top_p",
                 "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "repeat_last_n", "max_tokens",
                 "template", "reasoning_format", "reasoning_budget", "rpc", "split_mode", "tensor_split", "main_gpu", "mmproj",
                 "spec", "draft_model", "draft_max", "draft_min", "draft_p_min")


@click.command("chat")
@click.argument("model", required=False, default="default")
@click.option("-p", "--prompt", default=None, help="Answer this prompt, print only the reply, and exit.")
@click.option("-s", "--system", default=None, metavar="@NAME|FILE|TEXT",
              help="System prompt: @assistant, @translator, @json (or your own in $GGUFRUN_HOME/prompts), a file, or the text.")
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which template is used and how the model loaded.")
@click.option("--show-thinking/--hide-thinking", "show_thinking", default=None,
              help="A reasoning model's thinking, dimmed before its answer (default: shown in the chat, hidden with -p; "
                   "with -p it goes to stderr). /think on|off turns the thinking itself on or off.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Show a vision model this image (PNG, JPEG, WebP, GIF, BMP) with the first message (repeatable).")
@settings_options(*CHAT_SETTINGS)
@click.pass_context
def chat_command(ctx: click.Context, model: str, prompt: str | None, system: str | None, verbose: bool,
                 show_thinking: bool | None, images: tuple[str, ...], **kwargs: Any) -> None:
    """Chat with MODEL (default: the registry's `default`, SmolLM2 135M Instruct) in the terminal, or answer one prompt (-p, or text piped on stdin).

    \b
    Examples:
      ggufrun chat qwen2-7b-q5 --n-gpu-layers -1 --n-ctx 4096 --flash-attn on
      ggufrun chat gemma-2-9b-it:Q5_K_M --system @translator --temperature 0.3
      ggufrun chat -p "What is the capital of France?"
      echo "Summarise: ..." | ggufrun chat qwen2-7b-q5
      ggufrun chat smolvlm --image cat.jpg -p "What is in this picture?"
    """
    from rich.console import Console

    from .. import loader, prompts
    from ..chat import ChatSession
    from .progress import download_progress

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    system_text = prompts.resolve_system(system)  # a bad --system fails before a model loads
    from ..textfile import check_utf8

    once = check_utf8(prompt, "The prompt (-p)") if prompt is not None else (None if sys.stdin.isatty() else _read_stdin())
    flags, registry = cli_settings(kwargs, *CHAT_SETTINGS), load_registry(ctx)
    with download_progress(err) as progress:
        loaded = loader.open_model(model, registry, flags, progress=progress, report=progress.report)
    if system is None and loaded.spec.system:  # the registry entry's own default system prompt
        system_text = prompts.resolve_system(loaded.spec.system)
    session = ChatSession(loaded.model, loaded.settings, family=loaded.family, system=system_text, model_name=loaded.spec.name,
                          vision=loaded.vision)
    for image in images:  # a bad image fails here, before any reply
        session.attach_image(Path(image))
    if verbose:
        err.print(f"model: {loaded.model.path} ({loaded.model.description}), loaded in {loaded.model.load_seconds:.2f} s, "
                  f"n_ctx {loaded.model.n_ctx}, threads {loaded.settings.effective_threads()}", markup=False, style="dim")
        err.print(f"template: {session.template.describe()}", markup=False, style="dim")
    if once is not None:
        _answer_once(session, once, err, verbose, sys.stderr if show_thinking else None)
    else:
        Repl(session, err, show_thinking is not False).run()


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}).") from None
    if not text.strip():
        raise click.UsageError("Nothing on stdin: pipe a prompt in, or pass -p TEXT.")
    return text


def _answer_once(session: ChatSession, text: str, err: Console, verbose: bool, thinking: TextIO | None) -> None:
    """One-shot mode: only the reply goes to stdout (stats with --verbose, and thinking with
    --show-thinking, on stderr)."""
    from ..chat import format_stats

    from ..errors import ExitStatus

    reply = session.ask(text)
    ended = stream_reply(reply, sys.stdout, thinking)
    if not ended:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        err.print(format_stats(reply.stats), markup=False, style="dim")
    if reply.cancelled:  # Ctrl-C: the part of the reply that came is kept, and a script sees the interruption
        err.print("Interrupted.", markup=False, highlight=False)
        sys.exit(ExitStatus.INTERRUPTED)


# Control characters a model may emit (ESC sequences above all) are not sent to a terminal.
_TERMINAL_UNSAFE = {c: None for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]}


_DIM, _PLAIN = "\x1b[2m", "\x1b[0m"


def _writer(out: TextIO) -> Any:
    if out.isatty():
        raw_write, table = out.write, _TERMINAL_UNSAFE
        return lambda piece: raw_write(piece.translate(table))
    return out.write


def stream_reply(reply: Reply, out: TextIO, thinking: TextIO | None = None) -> bool:
    """Write a reply as it is generated; Ctrl-C stops it (not the program). True if it ended in a
    newline. A reasoning model's thinking goes to ``thinking`` (dimmed on a terminal), or nowhere."""
    write = _writer(out)
    think_write = _writer(thinking) if thinking is not None else None
    dim = thinking is not None and thinking.isatty()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: reply.cancel())
    last = "\n"
    in_thought = False
    try:
        for kind, piece in reply.parts():
            if kind == "thinking":
                if think_write is None or thinking is None:
                    continue
                if not in_thought and dim:
                    thinking.write(_DIM)
                in_thought = True
                think_write(piece)
                thinking.flush()
                continue
            if in_thought and thinking is not None:  # the thinking is over: the answer starts on its own line
                thinking.write((_PLAIN if dim else "") + "\n\n")
                thinking.flush()
                in_thought = False
            write(piece)
            out.flush()
            last = piece
    finally:
        if in_thought and thinking is not None:
            thinking.write((_PLAIN if dim else "") + "\n")
        signal.signal(signal.SIGINT, previous)
        reply.close()
    return last.endswith("\n")


class Repl:
    """The interactive loop: readline history, multi-line input, /commands, streamed replies."""

    def __init__(self, session: ChatSession, err: Console, show_thinking: bool = True) -> None:
        self.session = session
        self.err = err
        self.show_thinking = show_thinking

    def run(self) -> None:
        from .. import paths

        history = paths.home() / "chat_history"
        readline = _setup_readline(history)
        s = self.session
        self.err.print(f"{s.model_name} · template {s.template.name} · /help for commands · Ctrl-D or /exit to leave",
                       markup=False, style="dim")
        try:
            while self.turn():
                pass
        finally:
            if readline is not None:
                try:
                    history.parent.mkdir(parents=True, exist_ok=True)
                    readline.write_history_file(str(history))
                except OSError:
                    pass  # history is a convenience: never fail a session over it

    def turn(self) -> bool:
        """Read one message or command and act on it; False when the session should end."""
        from ..errors import GgufrunError
        from ..textfile import check_utf8

        try:
            text = read_message()
        except UnicodeDecodeError as exc:  # invalid UTF-8 typed or pasted: say so, keep the session
            self.err.print(f"Error: that line is not UTF-8 text ({exc.reason}); nothing was sent.", markup=False, style="red")
            return True
        except EOFError:
            sys.stdout.write("\n")
            return False
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            self.err.print("(Ctrl-D or /exit to leave)", style="dim")
            return True
        if not text.strip():
            return True
        try:
            check_utf8(text, "That line")
            if self.session.is_command(text):
                result = self.session.command(text)
                if result.text:
                    self.err.print(result.text, markup=False)
                return not result.exit
            self.reply(text)
        except GgufrunError as exc:
            self.err.print(f"Error: {exc}", markup=False, style="red")
        return True

    def reply(self, text: str) -> None:
        from ..chat import format_stats

        reply = self.session.ask(text)
        if reply.notice:
            self.err.print(reply.notice, markup=False, style="yellow")
        ended = stream_reply(reply, sys.stdout, sys.stdout if self.show_thinking else None)
        sys.stdout.write("" if ended else "\n")
        sys.stdout.flush()
        if reply.cancelled:
            self.err.print("(stopped)", style="dim")
        self.err.print(format_stats(reply.stats), markup=False, style="dim")


def read_message(prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line; lines ending in \\ continue it; a \"\"\" line opens a block closed by \"\"\"."""
    line = input(prompt)
    if line.lstrip().startswith('"""'):
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            line = input(more)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    lines.append(line)
    return "\n".join(lines)


def _setup_readline(history: Any) -> Any:
    """Line editing and history through Python's readline, where the platform has it."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline
        return None
    try:
        readline.read_history_file(str(history))
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline
