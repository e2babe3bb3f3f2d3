"""llama-server's slots: ``GET /slots`` (each slot of a model's engine, idle or processing) and
``POST /slots/{id}?action=save|restore|erase``: a slot's KV cache (its prompt cache) written to a
file, read back, or dropped, through llama.cpp's state-sequence functions on the engine thread.

Files live in ``$GGUFRUN_HOME/slots/<model>/`` (llama-server's ``--slot-save-path``, one folder a
model so that a restore cannot read another model's cells: see ``folder_name``). A file name is a
plain name: no folder, no leading dot; a save replaces a file atomically, so a failed save loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import home
from .api_errors import ApiError, invalid
from .models import ModelConfig

if TYPE_CHECKING:
    from .core import Server

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PLAIN_ID = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,63}")
ACTIONS = ("save", "restore", "erase")


def folder(cfg: ModelConfig) -> Path:
    """Where the model's slot files are kept."""
    return home() / "slots" / folder_name(cfg.id)


def folder_name(model_id: str) -> str:
    """One folder name per served id, never another id's, never outside slots/.

    A short lower-case plain id ("smollm2", "gemma3-270m") is its own name. Any other id gets a
    readable stem and, after a '%' (which no plain id has), a digest of the exact id: "a/b" and
    "a_b", or "Qwen" and "qwen" on a disk that ignores case, once shared a folder, so one model's
    saved slot could be restored into the other."""
    if _PLAIN_ID.fullmatch(model_id):
        return model_id
    stem = re.sub(r"[^a-z0-9_.-]+", "_", model_id.lower()).strip("._")[:48]
    digest = hashlib.blake2b(model_id.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()
    return f"{stem}%{digest}"


def check_filename(value: Any) -> str:
    """A slot file name: letters, digits, ``_ . -``, at most 128, not starting with a dot, no ``..``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise invalid("filename", "expected a plain file name (letters, digits, '_', '.', '-'; at most 128; "
                      "no folders, no leading dot).")
    return value


def check_id(server: Server, cfg: ModelConfig, value: Any, param: str) -> int | None:
    """A slot id of the model (None for -1, any slot); a 400 for one it does not have."""
    if value is None or value == -1:
        return None
    parallel = cfg.parallel or server.config.parallel
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < parallel:
        raise invalid(param, f"model '{cfg.id}' has slots 0 to {parallel - 1} (--parallel {parallel}); -1 picks an idle one.")
    return value


async def states(server: Server, model: str | None, fail_on_no_slot: str | None) -> list[dict[str, Any]]:
    """GET /slots: each slot of the model's engine; a 503 with ``fail_on_no_slot`` when none is idle."""
    cfg = server.lookup(model)
    engine = await server.acquire(cfg)
    try:
        backend = engine.backend
        assert backend is not None
        sampling = backend.settings.sampling(seed=True)
        out = [{"id": seq_id, "id_task": -1, "n_ctx": backend.n_ctx_seq, "speculative": False, "is_processing": busy,
                "n_cached": cached,
                "params": {k: sampling.get(k) for k in ("seed", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                         "repeat_last_n", "presence_penalty", "frequency_penalty")}}
               for seq_id, busy, cached in engine.slot_states()]
    finally:
        server.pool.release(engine)
    if fail_on_no_slot not in (None, "", "0") and all(s["is_processing"] for s in out):
        raise ApiError(503, "no slot available", kind="unavailable_error", headers={"Retry-After": "1"})
    return out


async def act(server: Server, raw_id: str, action: str | None, body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """POST /slots/{id}?action=...: save, restore or erase that slot's cache."""
    if action not in ACTIONS:
        raise invalid("action", f"expected one of {', '.join(ACTIONS)} (got {action!r}).")
    allowed = {"model"} | ({"filename"} if action != "erase" else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied to /slots ({action}): '{unknown[0]}'.", param=unknown[0])
    if body.get("model") is not None:
        if not isinstance(body["model"], str):
            raise invalid("model", "expected a string.")
        model = body["model"]
    cfg = server.lookup(model)
    slot = check_id(server, cfg, int(raw_id) if re.fullmatch(r"[0-9]{1,9}", raw_id) else raw_id, "id_slot")
    if slot is None:
        raise invalid("id_slot", "name a slot (0 or more) in the path.")
    name = check_filename(body.get("filename")) if action != "erase" else ""
    path = folder(cfg) / name if name else None
    if action == "restore" and path is not None and not path.is_file():
        raise ApiError(404, f"No saved slot file '{name}' for model '{cfg.id}'.", param="filename", kind="not_found_error")
    if action == "save":
        await asyncio.to_thread(lambda: folder(cfg).mkdir(parents=True, exist_ok=True))
    engine = await server.acquire(cfg)
    try:
        started = time.perf_counter()
        future = engine.call_on_slot(slot, _work(action, path))
    finally:
        server.pool.release(engine)
    n_tokens, n_bytes = await asyncio.wrap_future(future)
    ms = (time.perf_counter() - started) * 1e3
    if action == "save":
        return {"id_slot": slot, "filename": name, "n_saved": n_tokens, "n_written": n_bytes, "timings": {"save_ms": ms}}
    if action == "restore":
        return {"id_slot": slot, "filename": name, "n_restored": n_tokens, "n_read": n_bytes, "timings": {"restore_ms": ms}}
    return {"id_slot": slot, "n_erased": n_tokens}


def _work(action: str, path: Path | None) -> Any:
    """What runs on the engine thread, on the idle slot's sequence: (tokens, bytes)."""
    def save(model: Any, seq_id: int) -> tuple[int, int]:
        assert path is not None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            result = model.save_seq(seq_id, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return result

    def restore(model: Any, seq_id: int) -> tuple[int, int]:
        assert path is not None
        try:
            return model.load_seq(seq_id, path)
        except Exception as exc:  # llama.cpp refused the file: the client's (the slot is left empty)
            raise ApiError(400, f"Slot file '{path.name}' could not be restored: {exc}", param="filename") from None

    def erase(model: Any, seq_id: int) -> tuple[int, int]:
        n = model.seq_len(seq_id)
        model.reset(seq_id)
        return n, 0

    return {"save": save, "restore": restore, "erase": erase}[action]
