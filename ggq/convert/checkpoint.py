"""Reading a Hugging Face checkpoint lazily: config, and one tensor at a time.

A checkpoint is a folder with ``config.json`` plus ``*.safetensors`` (optionally sharded with
``model.safetensors.index.json``) or ``pytorch_model*.bin``. Safetensors files are memory-mapped:
:meth:`TensorSource.load` touches only that tensor's bytes, so a converter that loads, converts
and writes one tensor at a time keeps its peak memory near the largest tensor.
"""

from __future__ import annotations

import contextlib

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ggq.errors import GGQError, show

# safetensors dtype name -> (numpy dtype of the stored bytes, itemsize)
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    # float8 weights and UE8M0 scales, loaded as their raw bytes (ggq.convert.quantized.fp8 decodes them)
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns, any shape -> float32 of the same shape (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass
class TensorSource:
    """One tensor of a checkpoint, not yet read.

    ``name``: the Hugging Face name (``model.layers.0.self_attn.q_proj.weight``).
    ``shape``: torch order, e.g. ``(out_features, in_features)``.
    ``dtype``: the stored type: ``"F32"``, ``"F16"``, ``"BF16"`` (floats), or another name for
    integer or packed tensors (``"I32"``; a quantized import's own tag such as ``"GPTQ"``).
    ``loader``: returns the values as a numpy array of ``shape`` (float32 for BF16 and packed
    sources, the stored dtype otherwise).
    ``native``: optional; ``native(qtype)`` returns uint8 ``(rows, row_bytes)`` block bytes that
    encode this tensor exactly in ggml type ``qtype``, or None when it cannot (used by GPTQ/AWQ
    imports to keep their integer codes).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    loader: Callable[[], np.ndarray]
    native: Callable[[object], np.ndarray | None] | None = None
    origin: str = ""
    releaser: Callable[[], None] | None = None

    def load(self) -> np.ndarray:
        return self.loader()

    def release(self) -> None:
        """Drop this tensor's pages from memory (they stay on disk); a no-op for most sources."""
        if self.releaser is not None:
            self.releaser()

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class _SafetensorsFile:
    """A memory-mapped ``.safetensors`` file with its header validated against the file size."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise GGQError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise GGQError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
                raw = f.read(n)
        except OSError as e:
            raise GGQError(f"{path}: cannot read ({e.strerror})") from None
        depth = _json_depth(raw)
        if depth > 4:  # {name: {"shape": [...]}} is 3 deep; __metadata__ is a flat string map
            raise GGQError(f"{path}: corrupt safetensors header (JSON nested {depth} levels deep)")
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise GGQError(f"{path}: corrupt safetensors header ({show(str(e))})") from None
        meta = header.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        self.base = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
                if not (isinstance(dtype, str) and isinstance(shape, list) and len(shape) <= 8
                        and all(type(x) is int and x >= 0 for x in [*shape, start, end])):
                    raise TypeError
                shape = tuple(shape)
            except (KeyError, TypeError, ValueError):
                raise GGQError(f"{path}: corrupt safetensors header entry for {show(name)}") from None
            if dtype not in _ST_DTYPES:
                raise GGQError(f"{path}: tensor {show(name)} has unsupported dtype {show(dtype)}")
            nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
            if end - start != nbytes:
                raise GGQError(f"{path}: corrupt safetensors header: {show(name)} spans {end - start} bytes, "
                               f"its shape {list(shape)} needs {nbytes}")
            if self.base + end > size:
                raise GGQError(f"{path}: truncated safetensors file: tensor {show(name)} ends at byte {self.base + end}, "
                               f"the file has {size}")
            self.entries[name] = (dtype, shape, start, end)
        spans = sorted((start, end, name) for name, (_, _, start, end) in self.entries.items() if end > start)
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GGQError(f"{path}: corrupt safetensors header: tensors {show(an)} and {show(bn)} overlap")
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self.entries[name]
        arr = np.frombuffer(self._map(), dtype=_ST_DTYPES[dtype], count=(end - start) // np.dtype(_ST_DTYPES[dtype]).itemsize,
                            offset=self.base + start).reshape(shape)
        return bf16_to_f32(arr) if dtype == "BF16" else arr

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from our resident set (:func:`ggq.runtime.memory.release_range`)."""
        from ggq.runtime.memory import release_range

        _dtype, _shape, start, end = self.entries[name]
        release_range(self._mm, self.base + start, end - start)


# a string, or an unclosed one up to the end (so an unclosed string is scanned once, not once per quote)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text ``raw`` (strings skipped), found without
    parsing, so a hostile header cannot exhaust the parser's recursion."""
    depth = best = 0
    for c in _JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS):
        if c in (0x5B, 0x7B):
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


def _torch_file_sources(path: Path) -> dict[str, TensorSource]:
    try:
        import torch
    except ImportError:
        raise GGQError(f"{path}: reading pytorch .bin checkpoints needs torch (pip install torch)") from None
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles
        msg = str(e)
        why = ("it holds objects other than tensors (not unpickled: that could run code)" if "Weights only" in msg
               else "not a zip archive as torch.save writes it (damaged, truncated, or the legacy format)"
               if "zip" in msg or "mmap" in msg or "central directory" in msg else "damaged or not a torch.save file")
        raise GGQError(f"{path}: cannot read the pytorch checkpoint: {why}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise GGQError(f"{path}: the pytorch checkpoint is not a dict of named tensors")
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

    def loader(t):
        def load():
            if t.dtype == torch.bfloat16:
                return t.float().numpy()
            return t.numpy()
        return load

    return {k: TensorSource(k, tuple(v.shape), names.get(v.dtype, str(v.dtype).replace("torch.", "").upper()), loader(v), origin=str(path))
            for k, v in sd.items()}


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint folder: its ``config`` and its ``tensors`` by HF name."""

    path: Path
    config: dict
    tensors: dict[str, TensorSource] = field(default_factory=dict)

    @property
    def float_type(self) -> str:
        """The checkpoint's own float type, "F32", "F16" or "BF16" (majority of 2-D float tensors;
        config.torch_dtype/dtype when no tensor says)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in ("F32", "F16", "BF16") and len(t.shape) >= 2:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.n_elements
        if counts:
            return max(counts, key=counts.get)
        dt = str(self.config.get("torch_dtype") or self.config.get("dtype") or "float32")
        return {"float16": "F16", "bfloat16": "BF16"}.get(dt, "F32")


def read_json_object(folder: Path, name: str, what: str) -> dict:
    """Parse ``folder/name`` as a JSON object; GGQError (one line naming the file) if it is missing
    (``what``: the kind of folder that should hold it), unreadable, not JSON or not an object."""
    p = folder / name
    if not p.is_file():
        raise GGQError(f"{folder}: no {name} (not {what})")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GGQError(f"{p}: invalid JSON ({show(str(e))})") from None
    except OSError as e:
        raise GGQError(f"{p}: cannot read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise GGQError(f"{p}: invalid {name} (not a JSON object)")
    return cfg


def read_config(model_dir: Path) -> dict:
    """Parse ``model_dir/config.json``; GGQError if missing or not a JSON object."""
    cfg = read_json_object(model_dir, "config.json", "a Hugging Face checkpoint folder")
    # Like llama.cpp's converter, read the config through transformers when it knows the model type:
    # that fills in defaults (head_dim, rope_parameters, ...) the JSON may omit.
    try:
        import logging

        from transformers import AutoConfig

        with quiet_transformers():
            full = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).to_dict()
        logging.getLogger(__name__).debug("config read through transformers")
        full.setdefault("architectures", cfg.get("architectures"))
        if "quantization_config" in cfg:
            full["quantization_config"] = cfg["quantization_config"]
    except Exception:
        full = cfg
    return _with_text_config(full)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' log at error level only, for the duration (its warnings about a checkpoint's
    config would otherwise interleave with ggq's output)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _with_text_config(cfg: dict) -> dict:
    """A multimodal config (Gemma 3's) with its ``text_config`` values at the top level, as llama.cpp's
    TextModel merges them (the top-level ``architectures`` kept)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    return {**cfg, **text, "architectures": cfg.get("architectures")}


def open_checkpoint(model_dir: Path) -> Checkpoint:
    """Read ``config.json`` and index every tensor of the folder without loading any.

    Safetensors files (``model*.safetensors``, or any ``*.safetensors`` when none is named so) are
    preferred over ``pytorch_model*.bin``. Raises GGQError for a missing or
    invalid config, no weight files, a shard named in the index but missing, or a corrupt or
    truncated weight file.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    ck = Checkpoint(model_dir, cfg)
    # like llama.cpp's converter, read model*.safetensors when there are any: Mistral repos also ship
    # the same weights as consolidated.safetensors (Mistral's own names), which must not be read twice
    st_files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map is not a map of file names")
        except (ValueError, KeyError, TypeError, RecursionError, OSError, UnicodeDecodeError) as e:
            raise GGQError(f"{index}: invalid index ({show(str(e))})") from None
        for s in wm.values():
            if Path(s).name != s or s in (".", ".."):
                raise GGQError(f"{index}: shard name {show(s)} is not a file name in the checkpoint folder")
        wanted = sorted(set(wm.values()))
        missing = [s for s in wanted if not (model_dir / s).is_file()]
        if missing:
            raise GGQError(f"{index}: shard {missing[0]} is missing")
        st_files = [model_dir / s for s in wanted]
    if st_files:
        for p in st_files:
            f = _SafetensorsFile(p)
            for name, (dtype, shape, _s, _e) in f.entries.items():
                ck.tensors[name] = TensorSource(name, shape, dtype, (lambda f=f, n=name: f.get(n)), origin=str(p),
                                                releaser=(lambda f=f, n=name: f.release(n)))
        return ck
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise GGQError(f"{model_dir}: no weights (*.safetensors or pytorch_model*.bin) found")
    for p in bins:
        ck.tensors.update(_torch_file_sources(p))
    return ck


def resolve_source(src: str) -> Path:
    """A local folder as is, or a Hugging Face hub id (``org/name``) downloaded with huggingface_hub.

    Raises GGQError when ``src`` is neither, or when the download fails (e.g. offline).
    """
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise GGQError(f"{src}: not a checkpoint folder")
        return p
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise GGQError(f"{src}: no such folder (and not a Hugging Face hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer.model",
                                                       "*.jinja", "*.txt"],
                                  # Mistral repos duplicate the weights as consolidated.safetensors
                                  ignore_patterns=["consolidated*", "original/*", "*.pth"])
    except Exception as e:  # network, auth, not found: all one message for the user
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "no network access (offline)" if offline else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise GGQError(f"{src}: not a local folder, and downloading it from the Hugging Face hub failed: {why}") from None
    return Path(local)
