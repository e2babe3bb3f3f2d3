"""ChatSession: the conversation, its template, KV-cache reuse, context trimming and /commands.

No I/O happens here (no terminal, no rich, no click): the REPL in ``cli/chat_cmd.py`` reads lines,
hands them to :meth:`ChatSession.ask` or :meth:`ChatSession.command`, and prints what comes back.
Each turn re-renders the whole conversation, and ``Model.generate`` evaluates only the tokens
that are not already in the KV cache, so a follow-up question costs its own tokens, not the
history's.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ContextOverflowError, GgufrunError
from .settings import FIELDS, Settings, coerce
from .generation import classify_stops
from .images import chat_tokens_with_images, pictures_in, read_picture, session_blocks
from .reasoning import ANSWER, THINKING, ThinkBudget, ThinkFormat, ThinkSplitter, detect, plan_reply
from .templates import ChatTemplate, chat_tokens, select_template

if TYPE_CHECKING:
    from .generation import GenStats
    from .runtime import Model

SAVE_FORMAT = "ggufrun-chat"
# Settings /set may change while the model stays loaded; the rest need a reload.
SETTABLE = tuple(name for name, f in FIELDS.items() if f.sampling) + ("seed", "template")

HELP = """Commands:
  /help               this list
  /reset              forget the conversation (the system prompt stays)
  /system [TEXT]      show or replace the system prompt (TEXT may be @NAME or a file)
  /set [KEY VALUE]    show settings, or change one: {keys}
  /save FILE          write the conversation to a JSON file
  /load FILE          restore a conversation written by /save
  /stats              token counts, KV-cache reuse and speed
  /think [on|off]     a reasoning model: show, or turn on or off, its thinking before it answers
  /image FILE         a vision model: show it this image with your next message
  /exit               leave (Ctrl-D does too)
Multi-line input: end a line with \\ to continue it, or wrap the text in \"\"\" lines.
Ctrl-C stops a reply and keeps the session."""


@dataclass
class CommandResult:
    """What a /command produced: text to show, and whether the session should end."""

    text: str = ""
    exit: bool = False


class Reply:
    """One assistant reply, streamed: iterate for the answer's text pieces as tokens arrive, or
    :meth:`parts` for ("thinking" | "answer", text) pieces (a reasoning model's thinking apart).

    ``notice`` is set before the first piece when older turns were dropped to make room.
    :meth:`cancel` (safe from a signal handler) stops after the current token; the text produced
    so far stays in the conversation. ``stats`` is filled as generation goes.
    """

    def __init__(self, session: ChatSession, tokens: list[int], notice: str | None, think: ThinkBudget | None = None) -> None:
        from .generation import GenStats

        self.notice = notice
        self.stats: GenStats = GenStats()
        self.text = ""
        self.thinking = ""
        self.cancelled = False
        self._session = session
        self._tokens = tokens
        self._think = think
        self._stream = self._generate()

    def __iter__(self) -> Iterator[str]:
        return (text for kind, text in self._stream if kind == ANSWER)

    def parts(self) -> Iterator[tuple[str, str]]:
        return self._stream

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        """Stop generating (if still running) and record the reply in the conversation."""
        self._stream.close()

    def _generate(self) -> Generator[tuple[str, str], None, None]:
        session = self._session
        model = session.model
        gen = model.start(self._tokens, session._sampler.params, max_tokens=session.settings.max_tokens,
                          stop=session._text_stops, stop_ids=session._stop_ids, think=self._think)
        self.stats = gen.stats
        parts: list[str] = []
        thoughts: list[str] = []
        stream = model.stream(gen, self._tokens)
        splitter = ThinkSplitter(self._think.fmt, self._think.start) if self._think is not None else None
        try:
            for _tok, piece in stream:  # the hot loop: one sample, one accept and a yield per token
                if piece:
                    if splitter is None:
                        parts.append(piece)
                        yield ANSWER, piece
                    else:
                        for kind, text in splitter.feed(piece):
                            (thoughts if kind == THINKING else parts).append(text)
                            yield kind, text
                if self.cancelled:
                    break
            for kind, text in splitter.finish() if splitter is not None else ():
                (thoughts if kind == THINKING else parts).append(text)
                yield kind, text
        finally:
            stream.close()
            self.text, self.thinking = "".join(parts), "".join(thoughts)
            session._record(self)


class ChatSession:
    """A conversation with one loaded model; does no I/O.

    ``family`` is the registry's template family (or one guessed from the file) used when the
    GGUF has no template of its own; ``settings.template`` overrides both.
    """

    def __init__(self, model: Model, settings: Settings, *, family: str | None = None, system: str | None = None,
                 model_name: str = "", vision: Any = None) -> None:
        self.model = model
        self.settings = settings
        self.family = family
        self.system = system
        self.model_name = model_name or model.path.name
        self.history: list[dict[str, str]] = []
        self.last_stats: GenStats | None = None
        self.totals = {"turns": 0, "prompt_tokens": 0, "cached_tokens": 0, "gen_tokens": 0, "gen_seconds": 0.0}
        self._sampler: Any = None
        self.thinking = settings.reasoning_budget != 0  # /think on|off, for a reasoning model
        self.reasoning: ThinkFormat | None = None
        self.template = self._select_template(settings.template)
        self._new_sampler()
        self.vision = vision  # llama.vision.Projector of a vision model (images.py)
        self.pending_images: list[Any] = []  # pictures that go with the next message
        self._held: list[Any] = []  # the embeddings the conversation's image tokens name

    # ---- templates and sampling --------------------------------------------------------

    def _select_template(self, name: str) -> ChatTemplate:
        model = self.model
        bos = model.detokenize([model.bos_id], special=True) if model.bos_id >= 0 else ""
        eos = model.detokenize([model.eos_id], special=True) if model.eos_id >= 0 else ""
        template = select_template(model.chat_template, self.family, name, bos_token=bos, eos_token=eos)
        # A stop string that is one token in this vocabulary is matched by id (cheap, and control
        # tokens print as nothing); longer ones are matched in the text.
        self._stop_ids, self._text_stops = classify_stops(model, template.stop)
        self.reasoning = detect(template.jinja_source, self.settings.reasoning_format)
        return template

    def _new_sampler(self) -> None:
        from .runtime import Sampler

        if self._sampler is not None:
            self._sampler.close()
        self._sampler = Sampler.from_settings(self.model, self.settings)

    # ---- the conversation ----------------------------------------------------------------

    def messages(self, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation (or ``history``) as the template sees it: the system prompt first, if any."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if history is None else history)

    def tokens(self, history: list[dict[str, str]] | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The conversation (or ``history`` after the system prompt) rendered and tokenized, with
        BOS added where the model wants one, once."""
        fmt = self.reasoning
        variables = {"enable_thinking": self.thinking} if fmt is not None and fmt.toggle else None
        messages = self.messages(history)
        if self.vision is not None and pictures_in(messages):
            blocks, self._held = session_blocks(self.vision, self.model, messages)
            return chat_tokens_with_images(self.template, self.model, messages, blocks,
                                           add_generation_prompt=add_generation_prompt, variables=variables)
        return chat_tokens(self.template, self.model, messages, add_generation_prompt=add_generation_prompt,
                           variables=variables)

    def _think_plan(self, tokens: list[int]) -> tuple[list[int], ThinkBudget | None]:
        """The prompt with thinking turned off where the template cannot, and where the reply starts."""
        fmt = self.reasoning
        if fmt is None:
            return tokens, None
        tokens, _, think = plan_reply(self.model, tokens, fmt, self.thinking, self.settings.reasoning_budget)
        return tokens, think

    def reply_room(self) -> int:
        """Context kept free for the reply when deciding whether the history must be trimmed."""
        return min(self.settings.max_tokens or 256, self.model.n_ctx // 4)

    def ask(self, text: str) -> Reply:
        """Add a user message and start the reply; drop the oldest turns when the conversation would
        not fit. Raise ContextOverflowError (the message is not kept) when it alone is too long."""
        content: Any = text if not self.pending_images else [
            *({"type": "image", "picture": p} for p in self.pending_images), {"type": "text", "text": text}]
        kept = self.history + [{"role": "user", "content": content}]
        limit = self.model.n_ctx - self.reply_room()
        dropped = 0
        while True:
            tokens = self.tokens(kept)
            if len(tokens) <= limit:
                break
            if len(kept) == 1:
                raise ContextOverflowError(
                    f"That message needs {len(tokens)} tokens with the conversation's template; the context holds "
                    f"{self.model.n_ctx}, {self.reply_room()} of them kept for the reply.",
                    "Shorten it, or restart with a larger --n-ctx.", n_tokens=len(tokens), n_ctx=self.model.n_ctx,
                )
            # Drop the oldest exchange: a user turn and the reply that followed it.
            del kept[0]
            if kept[0]["role"] == "assistant":
                del kept[0]
            dropped += 1
        self.history = kept
        self.pending_images = []
        notice = None
        if dropped:
            what = "turn" if dropped == 1 else f"{dropped} turns"
            notice = f"The conversation passed the {self.model.n_ctx}-token context: dropped the oldest {what}" + (
                " (the system prompt stays)." if self.system else ".")
        self._sampler.reset()
        tokens, think = self._think_plan(tokens)
        return Reply(self, tokens, notice, think)

    def _record(self, reply: Reply) -> None:
        """Called when a reply ends (finished, stopped or cancelled): keep it and count it."""
        if reply.text or reply.thinking:
            turn = {"role": "assistant", "content": reply.text}
            if reply.thinking:  # the template renders it back where it keeps thinking (most drop it)
                turn["reasoning_content"] = reply.thinking
            self.history.append(turn)
        elif self.history and self.history[-1]["role"] == "user":
            self.history.pop()  # nothing was said: forget the question rather than leave it unanswered
        st = reply.stats
        self.last_stats = st
        t = self.totals
        t["turns"] += 1
        t["prompt_tokens"] += st.prompt_tokens
        t["cached_tokens"] += st.cached_tokens
        t["gen_tokens"] += st.gen_tokens
        t["gen_seconds"] += st.gen_seconds

    def reset(self) -> None:
        """Forget the conversation (not the system prompt) and clear the KV cache."""
        self.history.clear()
        self.model.reset(0)

    # ---- /commands ------------------------------------------------------------------------

    @staticmethod
    def is_command(line: str) -> bool:
        return line.startswith("/") and not line.startswith("//")

    def command(self, line: str) -> CommandResult:
        """Run one /command; raise a GgufrunError (one line) for bad input, leaving the session as it was."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return CommandResult(exit=True)
        if name in ("/help", "/?"):
            return CommandResult(HELP.format(keys=", ".join(SETTABLE)))
        if name == "/reset":
            self.reset()
            return CommandResult("Conversation cleared.")
        if name == "/system":
            return self._cmd_system(arg)
        if name == "/set":
            return self._cmd_set(arg)
        if name == "/save":
            return CommandResult(f"Saved {len(self.history)} messages to {self.save(_one_path(arg, '/save'))}.")
        if name == "/load":
            path = self.load(_one_path(arg, "/load"))
            return CommandResult(f"Loaded {len(self.history)} messages from {path}.")
        if name == "/stats":
            return CommandResult(self.stats_text())
        if name == "/think":
            return self._cmd_think(arg)
        if name == "/image":
            pic = self.attach_image(_one_path(arg, "/image"))
            return CommandResult(f"Image attached ({pic.width}x{pic.height}): it goes with your next message.")
        raise ConfigError(f"Unknown command '{name}'.", "Type /help for the list.")

    def attach_image(self, path: Path) -> Any:
        """Read an image file for the next message; raise ImageError (not an image, too large) or
        NoVisionError (a model without a projector)."""
        pic = read_picture(path, self.vision, self.model_name)
        self.pending_images.append(pic)
        return pic

    def _cmd_system(self, arg: str) -> CommandResult:
        from .prompts import resolve_system

        if not arg:
            return CommandResult(f"System prompt: {self.system}" if self.system else "No system prompt.")
        self.system = resolve_system(arg)
        return CommandResult("System prompt set.")

    def _cmd_think(self, arg: str) -> CommandResult:
        if self.reasoning is None:
            raise ConfigError(f"{self.model_name} does not reason: its chat template has no thinking block.",
                              "Restart with --reasoning-format deepseek if it writes <think> blocks anyway.")
        if arg.lower() not in ("", "on", "off"):
            raise ConfigError(f"/think takes on or off, not '{arg}'.")
        if arg:
            self.thinking = arg.lower() == "on"
        return CommandResult(f"Thinking {'on' if self.thinking else 'off'}.")

    def _cmd_set(self, arg: str) -> CommandResult:
        if not arg:
            return CommandResult("\n".join(f"  {k} = {getattr(self.settings, k)}" for k in SETTABLE))
        key, _, value = arg.partition(" ")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not value:
            raise ConfigError(f"/set {key} needs a value.", "Example: /set temperature 0.3")
        checked = coerce(key, value, "/set")  # unknown keys and bad values fail here, as for flags
        if key not in SETTABLE:
            raise ConfigError(f"'{key}' cannot change while the model is loaded.", f"Restart with --{key.replace('_', '-')}; /set takes {', '.join(SETTABLE)}.")
        settings = replace(self.settings, **{key: checked})
        if key == "template":
            self.template = self._select_template(checked)
        self.settings = settings
        if key != "template":
            self._new_sampler()
        if key == "template":
            return CommandResult(f"Template: {self.template.describe()}.")
        return CommandResult(f"{key} = {checked}")

    def stats_text(self) -> str:
        """The /stats report: the conversation's size, KV-cache reuse and the last reply's speed."""
        m, t = self.model, self.totals
        lines = [
            f"model: {self.model_name} ({m.description}), template: {self.template.describe()}",
            f"conversation: {len(self.history)} messages; KV cache: {m.seq_len(0)} of {m.n_ctx} tokens",
        ]
        st = self.last_stats
        if st is not None:
            lines.append(f"last reply: {format_stats(st)}")
        if t["turns"]:
            reused = 100.0 * t["cached_tokens"] / t["prompt_tokens"] if t["prompt_tokens"] else 0.0
            rate = t["gen_tokens"] / t["gen_seconds"] if t["gen_seconds"] > 0 else 0.0
            lines.append(f"session: {t['turns']} {'reply' if t['turns'] == 1 else 'replies'}, {t['prompt_tokens']} prompt tokens of which {t['cached_tokens']} "
                         f"({reused:.0f}%) reused from the KV cache, {t['gen_tokens']} generated, {rate:.1f} tok/s")
        return "\n".join(lines)

    # ---- transcripts ----------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write the conversation as JSON; raise GgufrunError when the file cannot be written."""
        data = {"format": SAVE_FORMAT, "version": 1, "model": self.model_name, "template": self.template.name,
                "system": self.system, "messages": [without_pictures(m) for m in self.history]}
        try:
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise GgufrunError(f"Cannot write {path}: {exc.strerror}.") from None
        return path

    def load(self, path: Path) -> Path:
        """Replace the conversation (and system prompt) with a /save file; raise GgufrunError."""
        from .textfile import check_utf8, read_text

        text = read_text(path, "saved chat")  # a FIFO, device, huge or binary file: one-line error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GgufrunError(f"{path} is not a saved chat (not JSON: {exc}).") from None
        except RecursionError:
            raise GgufrunError(f"{path} is not a saved chat (JSON nested too deeply).") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or any(
            not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise GgufrunError(f"{path} is not a saved chat: expected {{\"messages\": [{{\"role\": \"user\", \"content\": ...}}, ...]}}.")
        system = data.get("system")
        for i, m in enumerate(messages):  # a JSON "\ud800" escape cannot be tokenised later
            check_utf8(m["content"], f"{path}: message {i + 1}")
            if isinstance(m.get("reasoning_content"), str):  # rendered back by templates that keep thinking
                check_utf8(m["reasoning_content"], f"{path}: message {i + 1}'s thinking")
        if isinstance(system, str):
            check_utf8(system, f"{path}: the system prompt")
        self.system = system if isinstance(system, str) and system else None
        self.history = [{"role": m["role"], "content": m["content"],
                         **({"reasoning_content": m["reasoning_content"]} if isinstance(m.get("reasoning_content"), str) else {})}
                        for m in messages]
        return path


def without_pictures(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a /save file: its images as an "[image WxH]" note (the pixels are not saved)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    text = "".join(p["text"] if p.get("type") == "text" else f"[image {p['picture'].width}x{p['picture'].height}] "
                   for p in content)
    return {**message, "content": text}


def _one_path(arg: str, command: str) -> Path:
    try:
        parts = shlex.split(arg)
    except ValueError:
        parts = []
    if len(parts) != 1:
        raise ConfigError(f"{command} needs one file name.", f"Example: {command} chat.json")
    return Path(parts[0]).expanduser()


def format_stats(st: GenStats) -> str:
    """One line as `ollama run --verbose` reports a reply: prompt, generated, first token, speed."""
    prompt = f"{st.prompt_tokens} prompt tokens"
    if st.cached_tokens:
        prompt += f" ({st.cached_tokens} cached)"
    thought = f" ({st.reasoning_tokens} thinking)" if st.reasoning_tokens else ""
    return (f"{prompt} · {st.gen_tokens} generated{thought} · first token {st.ttft_seconds:.2f} s"
            f" · {st.gen_tps:.1f} tok/s")
