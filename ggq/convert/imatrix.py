"""Importance matrices (imatrix): per-column mean squared input activations of every matmul weight.

File formats (both llama.cpp's, read and written the way ``tools/imatrix/imatrix.cpp`` and
``common/imatrix-loader.cpp`` do):

* GGUF (current): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); for each weight ``<name>`` two F32
  tensors, ``<name>.in_sum2`` with ne ``(n_per_row, n_mat)`` -- the raw sums of squared
  activations per column and matrix (expert) -- and ``<name>.counts`` with ne ``(1, n_mat)`` -- the
  number of activation rows (tokens) summed; tensors sorted by name.
* legacy ``.dat``: int32 entry count; per entry int32 name length, name, int32 ``ncall``, int32
  ``nval``, ``nval`` float32 values holding ``mean * ncall``; then optionally int32 chunk count and
  the dataset name.

:func:`load_imatrix` turns either into the importance weights llama-quantize passes to the
quantizers (``load_imatrix`` in ``tools/quantize/quantize.cpp``): ``in_sum2 / counts`` per matrix
(1.0 where a matrix saw no tokens), or ``values / ncall`` for ``.dat``.

:func:`collect_imatrix` computes one over calibration text with transformers (PyTorch) forward
passes and ``nn.Linear`` forward pre-hooks -- not with ggq's runtime -- so it works for any
checkpoint transformers can run; see ``specs/mixes.md``.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

from ggq.errors import GGQError, show


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _read_dat(path: Path) -> tuple[dict[str, tuple[np.ndarray, int]], dict]:
    """Legacy .dat: {name: (values, ncall)}, info."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise GGQError(f"{path}: truncated imatrix .dat file")
        v = struct.unpack_from(fmt, buf, pos)
        pos += size
        return v

    (n,) = take("<i")
    if n < 1:
        raise GGQError(f"{path}: no entries in imatrix .dat file")
    out = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln < 0 or pos + ln > len(buf):
            raise GGQError(f"{path}: truncated imatrix .dat file")
        name = buf[pos:pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1:
            raise GGQError(f"{path}: entry {show(name)} has no values")
        vals = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos) if pos + 4 * nval <= len(buf) else None
        if vals is None:
            raise GGQError(f"{path}: truncated imatrix .dat file")
        pos += 4 * nval
        out[name] = (vals.astype(np.float32), ncall)
    info = {"datasets": [], "chunk_count": 0, "chunk_size": 0, "legacy": True}
    if pos + 4 <= len(buf):
        (info["chunk_count"],) = take("<i")
        if pos + 4 <= len(buf):
            (ln,) = take("<i")
            if ln > 0 and pos + ln <= len(buf):
                info["datasets"] = [buf[pos:pos + ln].decode("utf-8", "replace")]
    return out, info


def read_imatrix_raw(path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """The raw content of an imatrix file.

    Returns ``({name: (sums float32 (n_mat, n_per_row), counts float32 (n_mat,))}, info)`` with
    ``info`` = ``{"datasets": [...], "chunk_count": int, "chunk_size": int, "legacy": bool}``. For a
    legacy ``.dat`` the sums are the stored ``mean * ncall`` values (one matrix) and counts
    ``[ncall]``. Raises GGQError for a missing, malformed or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise GGQError(f"{path}: no such imatrix file")
    if not _is_gguf(path):
        ents, info = _read_dat(path)
        return {k: (v.reshape(1, -1), np.array([c], np.float32)) for k, (v, c) in ents.items()}, info
    from ggq.format.gguf_reader import read_gguf

    h = read_gguf(path)
    md = h.metadata

    def val(key, default, kind):
        v = md.get(key, default)
        if kind is list:
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok:
            raise GGQError(f"{path}: imatrix metadata {key} = {show(v)} has the wrong type")
        return v

    info = {"datasets": list(val("imatrix.datasets", [], list)), "chunk_count": val("imatrix.chunk_count", 0, int),
            "chunk_size": val("imatrix.chunk_size", 0, int), "legacy": False,
            "has_metadata": all(k in md for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"))}
    sums, counts = {}, {}
    for t in h.tensors.values():
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = t
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = t
    if not sums and not counts:
        raise GGQError(f"{path}: no imatrix entries (.in_sum2/.counts tensors)")

    def data(t) -> np.ndarray:
        return np.fromfile(path, dtype="<f4", count=t.nbytes // 4, offset=t.offset)

    out = {}
    for name in sorted(set(sums) | set(counts)):
        s, c = sums.get(name), counts.get(name)
        if s is None or c is None:
            raise GGQError(f"{path}: mismatched sums and counts for {show(name)}")
        if int(s.qtype) != 0 or int(c.qtype) != 0:
            raise GGQError(f"{path}: sums and counts for {show(name)} must be F32")
        cv = data(c)
        sv = data(s)
        if sv.size % cv.size:
            raise GGQError(f"{path}: {show(name)}: {sv.size} sums do not split into {cv.size} matrices")
        out[name] = (sv.reshape(cv.size, -1).astype(np.float32), cv.astype(np.float32))
    return out, info


def read_imatrix_info(path) -> dict:
    """``{"datasets", "chunk_count", "chunk_size", "legacy"}`` of an imatrix file (see :func:`read_imatrix_raw`)."""
    return read_imatrix_raw(path)[1]


def load_imatrix(path) -> dict[str, np.ndarray]:
    """Importance weights per GGUF tensor name, as llama-quantize computes them from an imatrix file.

    Returns ``{name: float32 (n_mat * n_per_row,)}`` -- ``(n_per_row,)`` for ordinary 2-D weights,
    expert after expert for 3-D MoE weights. GGUF format: ``in_sum2 / counts`` per matrix (1.0 for a
    matrix with count 0, counts rounded to integers); legacy ``.dat``: ``values / ncall`` (values as
    stored when ``ncall`` is 0). Raises GGQError for a malformed file, non-finite values, or a
    GGUF file without the imatrix metadata llama-quantize requires.
    """
    path = Path(path)
    raw, info = read_imatrix_raw(path)
    if not info["legacy"] and not info.get("has_metadata", True):
        raise GGQError(f"{path}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)")
    out = {}
    for name, (sums, counts) in raw.items():
        if info["legacy"]:
            ncall = int(counts[0])
            e = sums.reshape(-1) / np.float32(ncall) if ncall > 0 else sums.reshape(-1).copy()
        else:
            c = np.rint(counts).astype(np.float32)
            e = np.where(c[:, None] > 0, sums / np.where(c > 0, c, 1)[:, None], np.float32(1.0)).reshape(-1)
        e = e.astype(np.float32)
        if not np.all(np.isfinite(e)):
            raise GGQError(f"{path}: imatrix entry {show(name)} contains non-finite values")
        out[name] = e
    return out


def save_imatrix(path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], *, datasets: list[str] = (),
                 chunk_count: int = 0, chunk_size: int = 0, force: bool = False) -> Path:
    """Write an imatrix in llama.cpp's GGUF format.

    ``sums``: ``{name: float32 (n_mat, n_per_row) or (n_per_row,)}`` raw sums of squared
    activations; ``counts``: ``{name: (n_mat,) or scalar}`` activation rows summed per matrix;
    ``datasets``: calibration file names; ``chunk_count``: chunks processed; ``chunk_size``: tokens
    per chunk. Written through a temporary file. Raises GGQError for an existing ``path`` without
    ``force`` or inconsistent shapes.
    """
    from gguf import GGUFValueType

    from ggq.format.gguf_writer import GGUFWriter
    from ggq.format.output import atomic_output

    w = GGUFWriter(None, "")  # no general.architecture, as llama-imatrix writes
    w.add_type("imatrix")
    w.add_key_value("imatrix.datasets", [str(d) for d in datasets], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    tensors = []
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        c = np.asarray(counts[name], dtype=np.float32).reshape(-1)
        if c.size != s.shape[0]:
            raise GGQError(f"imatrix entry {name}: {s.shape[0]} matrices but {c.size} counts")
        tensors.append((f"{name}.in_sum2", np.ascontiguousarray(s)))
        tensors.append((f"{name}.counts", c.reshape(-1, 1)))
    for name, a in tensors:
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    path = Path(path)
    try:
        with atomic_output(path, force) as tmp:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, a in tensors:
                w.write_tensor_stream([a], a.nbytes)
            w.close()
    finally:
        w.close_files()
    return path


# ------------------------------------------------------------------ collection (transformers)

def _gguf_arch_for(config: dict, where: str):
    """The GGUF architecture of a checkpoint: its family's (:mod:`ggq.models`), else the one named
    like its ``model_type`` (tensor names only matter here)."""
    import gguf

    from ggq import models

    archs = config.get("architectures")
    fam = models.find(hf_arch=archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if fam is not None:
        return fam.gguf_arch
    mt = config.get("model_type")
    for a, n in gguf.MODEL_ARCH_NAMES.items():
        if n == mt:
            return a
    raise GGQError(f"{where}: cannot map model_type {show(mt)} to a GGUF architecture")


def _load_model(model: str):
    """(torch model, tokenizer, gguf arch, n_layer, where) from a HF folder/hub id or a GGUF file."""

    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        import gguf

        from ggq.format.gguf_reader import read_gguf

        md = read_gguf(p).metadata
        arch_name = md.get("general.architecture")
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
        if arch is None:
            raise GGQError(f"{p}: unknown general.architecture {show(arch_name)}")
        n_layer = md.get(f"{arch_name}.block_count")
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or not 0 < n_layer < 2**16:
            raise GGQError(f"{p}: invalid {arch_name}.block_count {show(n_layer)}")
        try:
            m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as e:
            raise GGQError(f"{p}: transformers cannot load this GGUF ({type(e).__name__}: {e})") from None
        return m, tok, arch, n_layer, str(p)
    from ggq.convert.checkpoint import read_config, resolve_source

    d = resolve_source(str(model))
    config = read_config(d)  # one-line errors for a missing, unreadable or malformed config.json
    arch = _gguf_arch_for(config, str(d / "config.json"))
    n_layer = config.get("num_hidden_layers", config.get("n_layer"))
    if type(n_layer) is not int or not 0 < n_layer < 2**16:
        raise GGQError(f"{d / 'config.json'}: invalid num_hidden_layers {show(n_layer)}")
    try:
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise GGQError(f"{d}: transformers cannot load this checkpoint ({type(e).__name__}: {e})") from None
    return m, tok, arch, n_layer, str(d)


def _torch():
    try:
        import torch
    except ImportError:
        raise GGQError("ggq imatrix needs PyTorch and transformers (pip install torch transformers)") from None
    return torch


def collect_imatrix(model_dir_or_gguf, text_path, out, ctx: int = 512, chunks: int | None = None, *,
                    force: bool = False, progress: bool = True, process_output: bool = False) -> Path:
    """Collect an importance matrix over calibration text and write it in llama.cpp's GGUF format.

    ``model_dir_or_gguf``: a Hugging Face checkpoint folder or hub id, or a GGUF file transformers
    can load. ``text_path``: UTF-8 calibration text. ``ctx``: tokens per chunk; ``chunks``: at most
    this many chunks (default: all whole chunks of the text). Like ``llama-imatrix``: the text is
    tokenized once (with BOS if the tokenizer adds one), cut into chunks of ``ctx`` tokens whose first
    token is replaced by BOS, and each chunk runs as one causal sequence; for every ``nn.Linear``
    whose weight maps to a ``blk.*`` GGUF tensor (plus ``output.weight`` with ``process_output``),
    the squared input activations are summed per column and the token count recorded.

    Returns ``out``. Raises GGQError for a missing text file, text shorter than one chunk, a model
    that cannot be loaded or mapped to GGUF names, or non-finite activations.
    """
    import gguf

    torch = _torch()
    text_path, out = Path(text_path), Path(out)
    if not text_path.is_file():
        raise GGQError(f"{text_path}: no such calibration text file")
    if ctx < 16:
        raise GGQError(f"--ctx {ctx}: must be at least 16 tokens")
    from ggq.format.output import check_output

    check_output(out, force)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no "sequence longer than model_max_length" noise
        if not progress:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model, tok, arch, n_layer, where = _load_model(model_dir_or_gguf)
    model.eval()
    tmap = gguf.get_tensor_name_map(arch, n_layer)

    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    add_bos = bos is not None and len(tok("a")["input_ids"]) > 0 and tok("a")["input_ids"][0] == bos
    if add_bos:
        ids = [bos] + list(ids)
    n_chunk = len(ids) // ctx
    if chunks is not None:
        n_chunk = min(n_chunk, int(chunks))
    if n_chunk < 1:
        raise GGQError(f"{text_path}: {len(ids)} tokens, fewer than one chunk of {ctx}")

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(gname):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = (x * x).sum(0, dtype=torch.float64)
            if gname in sums:
                sums[gname] += s
            else:
                sums[gname] = s
            counts[gname] = counts.get(gname, 0) + x.shape[0]
        return hook

    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = tmap.get_name(mname + ".weight", try_suffixes=(".weight",))
        if gname is None:
            continue
        if gname.startswith("blk.") or (process_output and gname == "output.weight"):
            hooks.append(mod.register_forward_pre_hook(make_hook(gname)))
    if not hooks:
        raise GGQError(f"{where}: no matmul weights map to GGUF tensor names")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_chunk, unit="chunk", desc="imatrix", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with torch.inference_mode():
            for i in range(n_chunk):
                chunk = list(ids[i * ctx:(i + 1) * ctx])
                if add_bos:
                    chunk[0] = bos
                model(input_ids=torch.tensor([chunk]), use_cache=False)
                if bar is not None:
                    bar.update(1)
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()

    np_sums, np_counts = {}, {}
    for k, s in sums.items():
        a = s.numpy().astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise GGQError(f"{where}: non-finite activations into {k}")
        np_sums[k] = a.reshape(1, -1)
        np_counts[k] = np.array([counts[k]], np.float32)
    return save_imatrix(out, np_sums, np_counts, datasets=[str(text_path)], chunk_count=n_chunk,
                        chunk_size=ctx, force=force)
