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
        if isinstance(value, bool):
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
