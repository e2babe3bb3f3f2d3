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
