"""Reading small text files a user points us at (config.toml, --models, /load, --system) without
trusting them: a FIFO or device must not hang us, a huge or binary file must not flood memory or
raise a decode traceback, and text that cannot be encoded as UTF-8 must not reach the tokenizer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError

MAX_TEXT_BYTES = 4 << 20  # config and saved chats are kilobytes; a few MB is already absurd


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; raise ConfigError (one line,
    naming the file) for anything else: missing, unreadable, a FIFO/device/directory, too big,
    not UTF-8."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise block before fstat can refuse it
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"Cannot read {p}: no such {what}.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read {what} {p}: {exc.strerror}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{_cap(what)} {p} is not a regular file.", "Give the path of a text file.")
        if info.st_size > max_bytes:
            raise ConfigError(f"{_cap(what)} {p} is {info.st_size:,} bytes; at most {max_bytes:,} are read.")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"Cannot read {what} {p}: {exc.strerror}.") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise ConfigError(f"{_cap(what)} {p} is larger than {max_bytes:,} bytes.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{_cap(what)} {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}).",
                          "Is it a binary file?") from None


def _cap(what: str) -> str:
    return what[:1].upper() + what[1:]


def check_utf8(text: str, what: str) -> str:
    """``text`` itself, or ConfigError when it holds lone surrogates: what Python makes of invalid
    UTF-8 in argv or a terminal, or of a JSON "\\ud800" escape. They cannot be tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid UTF-8 (character {exc.start}: {text[exc.start]!a}).",
                          "Check the terminal's or file's encoding.") from None
    return text
