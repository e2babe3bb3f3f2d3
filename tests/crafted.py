"""Hostile GGUF files for tests: a valid synthetic model copied with its metadata or tensors altered.

Written with the gguf package (the same writer llama.cpp's converters use), so the file is
structurally valid GGUF and only the architecture-level lie is left for ggufrun to catch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_DROP = object()


def craft(src: Path, dest: Path, *, kv: dict[str, Any] | None = None, drop_tensors: tuple[str, ...] = (),
          reshape: dict[str, tuple[int, ...]] | None = None, arch: str | None = None,
          zero_tensors: tuple[str, ...] = ()) -> Path:
    """Copy ``src`` to ``dest`` with metadata ``kv`` replaced (value ``None`` removes the key),
    tensors named in ``drop_tensors`` left out, tensors in ``reshape`` given a new numpy shape
    (the data is cut or zero-padded to fit) and those in ``zero_tensors`` all zeros (zero bytes
    are zero in every quant type); ``arch`` renames general.architecture."""
    import gguf
    import numpy as np

    kv = dict(kv or {})
    reshape = reshape or {}
    reader = gguf.GGUFReader(src)
    old_arch = str(reader.fields["general.architecture"].contents())
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(dest, new_arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.replace(f"{old_arch}.", f"{new_arch}.", 1) if name.startswith(f"{old_arch}.") else name
        if key in kv:
            continue
        vtype = f.types[0]
        value = f.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        data = np.asarray(t.data)
        if t.name in zero_tensors:
            data = np.zeros_like(data)
        raw_dtype = gguf.GGMLQuantizationType(t.tensor_type)
        if t.name in reshape:
            if raw_dtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ValueError(f"reshape supports F32/F16 tensors only, not {t.name} ({raw_dtype.name})")
            shape = reshape[t.name]
            n = int(np.prod(shape))
            flat = data.reshape(-1)[:n]
            data = np.concatenate([flat, np.zeros(n - flat.size, flat.dtype)]).reshape(shape)
            writer.add_tensor(t.name, data)
        elif raw_dtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, data)
        else:
            writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def patch_tensor(src: Path, dest: Path, name: str, *, type_id: int | None = None, offset: int | None = None) -> Path:
    """Copy ``src`` with tensor ``name``'s type id or data offset overwritten in its tensor info,
    byte for byte (F16 -> I16 keeps the size, so the file stays well-formed: the lie is the type)."""
    import struct

    import gguf

    reader = gguf.GGUFReader(src)
    tensor = next(t for t in reader.tensors if t.name == name)
    pos = tensor.field.offset + 8 + len(name.encode()) + 4 + 8 * len(tensor.shape)
    data = bytearray(src.read_bytes())
    if type_id is not None:
        data[pos : pos + 4] = struct.pack("<I", type_id)
    if offset is not None:
        data[pos + 4 : pos + 12] = struct.pack("<Q", offset)
    dest.write_bytes(bytes(data))
    return dest


def kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    """One raw GGUF key/value: the key, its type id and the encoded value."""
    import struct

    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


def string_payload(text: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(text)) + text


def nested_array_payload(depth: int) -> bytes:
    """An array of arrays ``depth`` deep, the innermost holding one uint32: what gguf-py can not
    write (its writer recurses), so it is encoded here."""
    import struct

    inner = struct.pack("<IQI", 4, 1, 7)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


def insert_kv(src: Path, dest: Path, *raw_kvs: bytes) -> Path:
    """Copy ``src`` with raw key/values (kv_bytes) added at the front of its metadata. A padding
    string key keeps the insertion a multiple of the alignment, so the tensor data still lines up."""
    import struct

    data = src.read_bytes()
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    extra = b"".join(raw_kvs)
    pad_fixed = len(kv_bytes("crafted.pad", 8, string_payload(b"")))
    pad = kv_bytes("crafted.pad", 8, string_payload(b" " * (-(len(extra) + pad_fixed) % 32)))
    out = data[:16] + struct.pack("<Q", n_kv + len(raw_kvs) + 1) + extra + pad + data[24:]
    dest.write_bytes(out)
    return dest


def set_string_kv(src: Path, dest: Path, key: str, value: str) -> Path:
    """Copy ``src`` with the string metadata ``key`` set to ``value`` (replaced, or added last), as
    gguf-new-metadata does, but byte for byte: the other keys and the tensor infos are copied as they
    are and the tensor data after them, re-aligned (gguf-py reads and writes a 49k-token vocabulary
    element by element: seconds for SmolLM2, where this takes a copy's time)."""
    import mmap
    import shutil
    import struct

    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        def string_end(pos: int) -> int:
            return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]

        def value_end(vtype: int, pos: int) -> int:
            if vtype in fixed:
                return pos + fixed[vtype]
            if vtype == 8:
                return string_end(pos)
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in fixed:
                return pos + count * fixed[etype]
            for _ in range(count):
                pos = value_end(etype, pos)
            return pos

        assert buf[:4] == b"GGUF"
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos, kvs, alignment, found = 24, [], 32, False
        for _ in range(n_kv):
            start, name_end = pos, string_end(pos)
            name = bytes(buf[pos + 8 : name_end]).decode()
            vtype = struct.unpack_from("<I", buf, name_end)[0]
            pos = value_end(vtype, name_end + 4)
            if name == "general.alignment":
                alignment = struct.unpack_from("<I", buf, name_end + 4)[0]
            if name == key:
                kvs.append(kv_bytes(key, 8, string_payload(value.encode())))
                found = True
            else:
                kvs.append(bytes(buf[start:pos]))
        if not found:
            kvs.append(kv_bytes(key, 8, string_payload(value.encode())))
        infos_start = pos
        for _ in range(n_tensors):
            pos = string_end(pos)
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            pos += 4 + 8 * n_dims + 4 + 8
        data_start = -(-pos // alignment) * alignment
        head = buf[:16] + struct.pack("<Q", len(kvs)) + b"".join(kvs) + buf[infos_start:pos]
        with open(dest, "wb") as out:
            out.write(head + b"\0" * (-len(head) % alignment))
            fh.seek(data_start)
            shutil.copyfileobj(fh, out, 1 << 22)
    return dest


def patch_bytes(src: Path, dest: Path, offset: int, data: bytes) -> Path:
    """Copy ``src`` with ``data`` written over the bytes at ``offset`` (header counts, random flips)."""
    raw = bytearray(src.read_bytes())
    raw[offset : offset + len(data)] = data
    dest.write_bytes(bytes(raw))
    return dest


def fuzz_cases(arch: str = "qwen2", n_flips: int = 40, seed: int = 20) -> dict[str, Any]:
    """Hostile variants of a synthetic ``arch`` model (F16, from ggufrun.synthetic), by name:
    ``builder(src, dest) -> dest``. Metadata values and types, array nesting, sizes and counts,
    tokenizer arrays, tensor types and offsets, and seeded random byte flips in the header. The
    names are stable, so a test can pick a subset."""
    import random
    import struct

    cases: dict[str, Any] = {"valid_copy": lambda s, d: craft(s, d)}
    keys = [f"{arch}.{k}" for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                    "attention.head_count", "attention.head_count_kv",
                                    "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.type",
                                    "rope.scaling.factor", "rope.dimension_count")]
    keys += ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.alignment", "general.file_type",
             "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"]
    values: dict[str, Any] = {"zero": 0, "minus1": -1, "i32max": 2**31, "i64max": 2**63 - 1, "nan": float("nan"),
                              "inf": float("inf"), "neg": -1.0, "fzero": 0.0, "huge": 1e30, "empty": "",
                              "garbage": "garbage\u00ff", "true": True}
    for key in keys:
        for vname, value in values.items():
            cases[f"kv-{key}-{vname}"] = lambda s, d, k=key, v=value: craft(s, d, kv={k: v})
    for depth in (2, 4, 5, 100, 3000):
        cases[f"nest-{depth}"] = lambda s, d, n=depth: insert_kv(s, d, kv_bytes("x.nest", 9, nested_array_payload(n)))
    cases["nest-tokens-3000"] = lambda s, d: insert_kv(s, d, kv_bytes("tokenizer.ggml.tokens", 9, nested_array_payload(3000)))
    cases["string-2mb"] = lambda s, d: insert_kv(s, d, kv_bytes("general.name", 8, string_payload(b"n" * 2_000_000)))
    cases["string-claims-2^62"] = lambda s, d: insert_kv(s, d, kv_bytes("x.s", 8, struct.pack("<Q", 2**62)))
    cases["array-claims-2^60"] = lambda s, d: insert_kv(s, d, kv_bytes("x.a", 9, struct.pack("<IQ", 4, 2**60)))
    cases["key-claims-2^40"] = lambda s, d: patch_bytes(s, d, 24, struct.pack("<Q", 2**40))
    cases["n_kv-2^40"] = lambda s, d: patch_bytes(s, d, 16, struct.pack("<Q", 2**40))
    cases["n_tensors-2^40"] = lambda s, d: patch_bytes(s, d, 8, struct.pack("<Q", 2**40))
    cases["n_tensors-0"] = lambda s, d: patch_bytes(s, d, 8, struct.pack("<Q", 0))
    cases["version-1"] = lambda s, d: patch_bytes(s, d, 4, struct.pack("<I", 1))
    cases["unknown-value-type"] = lambda s, d: insert_kv(s, d, kv_bytes("x.t", 99, b""))
    n_vocab = 512
    tokens: dict[str, Any] = {
        "none": [], "empty": [""] * n_vocab, "duplicate": ["a"] * n_vocab, "short": [f"t{i}" for i in range(100)],
        "long": [f"t{i}" for i in range(1000)], "ints": list(range(n_vocab)),
        "one-empty": [f"t{i}" if i != 7 else "" for i in range(n_vocab)],
    }
    for tname, toks in tokens.items():
        cases[f"tokens-{tname}"] = lambda s, d, t=toks: craft(s, d, kv={"tokenizer.ggml.tokens": t})
    cases["token_type-short"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.token_type": [1] * 10})
    cases["token_type-99"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.token_type": [99] * n_vocab})
    cases["scores-short"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.scores": [0.5] * 10})
    cases["scores-nan"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.scores": [float("nan")] * n_vocab})
    cases["merges-garbage"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["a b c", "x", ""]})
    cases["gpt2-no-merges"] = lambda s, d: craft(s, d, kv={"tokenizer.ggml.model": "gpt2"})
    for tensor in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight", "output_norm.weight",
                   "blk.1.ffn_down.weight"):
        for type_id in (0, 1, 2, 8, 24, 25, 26, 27, 28, 30, 99):
            cases[f"type-{tensor}-{type_id}"] = lambda s, d, t=tensor, i=type_id: patch_tensor(s, d, t, type_id=i)
        for off in (0, 1, 32, 2**40, 2**64 - 32):
            cases[f"offset-{tensor}-{off}"] = lambda s, d, t=tensor, o=off: patch_tensor(s, d, t, offset=o)
    rng = random.Random(seed)
    for i in range(n_flips):
        flips = [(rng.randrange(8, 2048), rng.randrange(256)) for _ in range(rng.randint(1, 4))]

        def flip(s: Path, d: Path, flips: list[tuple[int, int]] = flips) -> Path:
            raw = bytearray(s.read_bytes())
            for pos, byte in flips:
                raw[pos] = byte
            d.write_bytes(bytes(raw))
            return d

        cases[f"flip-{i}"] = flip
    return cases
