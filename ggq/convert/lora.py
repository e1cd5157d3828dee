"""LoRA adapters trained with PEFT: reading them, writing llama.cpp's GGUF LoRA format, merging them.

A PEFT LoRA adapter folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ...) and ``adapter_model.safetensors`` (or ``adapter_model.bin``) with, for each
adapted linear layer ``P`` of the base model (``P.weight`` of shape ``(n_out, n_in)``)::

    base_model.model.P.lora_A.weight   (r, n_in)
    base_model.model.P.lora_B.weight   (n_out, r)

PEFT's layer computes ``y = x W^T + s * (x A^T) B^T`` with ``s = lora_alpha / r`` (``/ sqrt(r)``
with ``use_rslora``; per-module ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha``),
i.e. the weight ``W + s * B @ A`` (PEFT's ``merge_and_unload``, ``get_delta_weight``).

llama.cpp's format (``convert_lora_to_gguf.py``, llama-cpp-python 0.3.36; read by
``llama_adapter_lora_init`` in ``src/llama-adapter.cpp``): ``general.architecture`` of the base,
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32) and per
adapted GGUF tensor ``NAME`` (``blk.0.attn_q.weight``) two tensors ``NAME.lora_a`` (ggml
``ne = [n_in, r]``, numpy ``(r, n_in)``: A as PEFT stores it) and ``NAME.lora_b`` (``ne = [r, n_out]``:
B with its rows in the GGUF tensor's row order, i.e. for llama's Q and K the rows permuted like the
base weight's; A's columns are the input features, which the permutation does not touch). llama.cpp
applies ``y += scale * alpha / r * (x A^T) B^T`` with ``r`` the tensor's rank (``alpha = 0``:
no ``alpha / r`` factor) and ``scale`` the user's (``--lora FILE`` = 1, ``--lora-scaled FILE S``).

Tensor types, as that script chooses them: ``--outtype`` f32 / f16 / bf16 for both matrices; q8_0
where the row length is a multiple of 32 (``lora_a``: ``n_in``), else F16 (``lora_b``'s rows are
``r`` long). The values are PEFT's stored ones (bf16 read exactly as float32), converted once.

When PEFT's factor differs from llama.cpp's ``alpha / r`` (``use_rslora``, ``alpha_pattern``),
the ratio is multiplied into ``lora_b`` (in float32, before the output type), so the file gives
PEFT's model (llama.cpp's script ignores both and writes a different adapter).

Refused, each with a one-line :class:`~ggq.errors.GGQError` naming the file: a ``peft_type``
other than LORA, DoRA (``use_dora``: magnitude vectors), ``fan_in_fan_out``, LoRA biases,
embedding adapters (``lora_embedding_A/B``), fully trained modules (``modules_to_save``), a
``lora_A`` without its ``lora_B``, ranks that do not match, a base tensor the family does not
map or whose shape differs, non-finite ``lora_alpha`` or weights.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ggq.errors import GGQError, show

T = GGMLQuantizationType

#: --outtype values of convert_lora_to_gguf.py
OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)\.weight$")


@dataclass
class LoraPair:
    """One adapted matrix: GGUF tensor ``name`` (``blk.0.attn_q.weight``), ``a`` (r, n_in) and ``b``
    (n_out, r), float32 or float16 as stored, ``b``'s rows in the GGUF tensor's row order, and
    ``factor``, the multiplier on ``b`` that makes llama.cpp's ``alpha / r`` PEFT's scaling (1.0
    unless rsLoRA or alpha_pattern)."""

    name: str
    a: np.ndarray
    b: np.ndarray
    factor: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Adapter:
    """A LoRA adapter in GGUF names: ``arch`` (GGUF architecture), ``alpha`` (``adapter.lora.alpha``),
    ``pairs`` by GGUF base tensor name, ``path`` (for messages)."""

    path: str
    arch: str
    alpha: float
    pairs: dict[str, LoraPair] = field(default_factory=dict)

    def scale(self, name: str) -> float:
        """The factor on ``B @ A`` for tensor ``name``: ``alpha / r`` (1 when alpha is 0, as
        llama.cpp) times the pair's folded ``factor``."""
        p = self.pairs[name]
        return (self.alpha / p.rank if self.alpha else 1.0) * p.factor


def parse_lora_spec(spec: str, option: str = "--lora") -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` -> (path, scale); the scale must be a finite number. A path that
    itself contains ``:`` is taken whole when what follows the last ``:`` is not a number."""
    path, scale = spec, 1.0
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path, scale = spec, 1.0
    if not path:
        raise GGQError(f"{option} {show(spec)}: no adapter path")
    if not math.isfinite(scale):
        raise GGQError(f"{option} {show(spec)}: the scale must be a finite number")
    return path, scale


# ------------------------------------------------------------------------ reading a PEFT folder

def _read_config(d: Path) -> dict:
    from ggq.convert.checkpoint import read_json_object

    p = d / "adapter_config.json"
    cfg = read_json_object(d, "adapter_config.json", "a PEFT adapter folder")
    ptype = cfg.get("peft_type")
    if not isinstance(ptype, str) or ptype.upper() != "LORA":
        raise GGQError(f"{p}: peft_type {show(ptype)} is not LORA (only LoRA adapters convert)")
    for key, what in (("use_dora", "DoRA adapters (use_dora) are not supported"),
                      ("fan_in_fan_out", "fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported"),
                      ("lora_bias", "LoRA biases (lora_bias) are not supported"),
                      ("use_qalora", "QA-LoRA adapters (use_qalora: pooled inputs) are not supported"),
                      ("alora_invocation_tokens", "aLoRA adapters (alora_invocation_tokens) are not supported"),
                      ("trainable_token_indices", "trainable tokens (trainable_token_indices) are not supported"),
                      ("layer_replication", "layer_replication is not supported"),
                      ("target_parameters", "LoRA on parameters (target_parameters) is not supported")):
        if cfg.get(key):
            raise GGQError(f"{p}: {what}")
    if cfg.get("modules_to_save"):
        raise GGQError(f"{p}: modules_to_save {show(cfg['modules_to_save'])}: fully trained modules are not "
                       "supported in a LoRA adapter (llama.cpp's format holds only lora_a/lora_b pairs)")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GGQError(f"{p}: lora_alpha {show(alpha)} is not a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in v.values()):
            raise GGQError(f"{p}: {key} is not a map of module names to finite numbers")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first pattern that is ``module`` or matches the
    end of its dotted name."""
    for key, v in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def _weights(d: Path) -> tuple[dict[str, object], str]:
    """{key: TensorSource} of the adapter's weights, and the weight file's path."""
    st = d / "adapter_model.safetensors"
    if st.is_file():
        from ggq.convert.checkpoint import TensorSource, _SafetensorsFile

        f = _SafetensorsFile(st)
        return {k: TensorSource(k, shape, dtype, (lambda f=f, k=k: f.get(k)), origin=str(st))
                for k, (dtype, shape, _s, _e) in f.entries.items()}, str(st)
    bin_ = d / "adapter_model.bin"
    if bin_.is_file():
        from ggq.convert.checkpoint import _torch_file_sources

        return _torch_file_sources(bin_), str(bin_)
    raise GGQError(f"{d}: no adapter_model.safetensors or adapter_model.bin")


def _base_model(base: str | None, cfg: dict, adapter_dir: Path):
    """(folder, config, family, hparams, {hf name: shape}) of the base checkpoint: ``base``, else
    ``base_model_name_or_path`` of adapter_config.json (a folder or a hub id). The shapes come from
    the checkpoint's tensors (quantized checkpoints as the logical weights they decode to); a
    folder with only config.json gives none, and shapes are then not checked here."""
    from ggq import models
    from ggq.convert.checkpoint import open_checkpoint, read_config, resolve_source

    if base is None:
        base = cfg.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise GGQError(f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; give the base with --base")
    model_dir = resolve_source(str(base))
    try:
        ck = open_checkpoint(model_dir)
        from ggq.convert import quantized

        quantized.prepare(ck)  # bitsandbytes & co: logical (out, in) weights (QLoRA's base)
        shapes = {n: tuple(t.shape) for n, t in ck.tensors.items()}
        config = ck.config
    except GGQError as e:
        if "no weights" not in str(e):
            raise
        config, shapes = read_config(model_dir), {}
    fam = models.for_checkpoint(config, str(model_dir / "config.json"))
    hp = fam.hparams(config, model_dir)
    return model_dir, config, fam, hp, shapes


def read_peft_adapter(adapter_dir: str | Path, base: str | Path | None = None) -> tuple[Adapter, Path]:
    """Read and validate the PEFT LoRA folder ``adapter_dir`` against its base checkpoint ``base``
    (a Hugging Face folder or hub id; default: adapter_config.json's ``base_model_name_or_path``).

    Returns the :class:`Adapter` in GGUF names (``b`` rows permuted like the base's Q/K rows, the
    PEFT scaling folded into ``factor`` where it is not ``alpha / r``) and the base folder.
    Raises GGQError (one line naming the file) for anything this module's docstring lists.
    """
    from ggq.convert import arch as archmod

    d = Path(adapter_dir)
    if not d.is_dir():
        raise GGQError(f"{d}: not an adapter folder")
    cfg = _read_config(d)
    model_dir, config, fam, hp, shapes = _base_model(None if base is None else str(base), cfg, d)
    tensors, wfile = _weights(d)
    names = archmod.NameMap(fam.gguf_arch, hp.n_layer, (config.get("architectures") or [""])[0])
    alpha = float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    alpha_pat = cfg.get("alpha_pattern") or {}

    halves: dict[str, dict[str, object]] = {}
    for key in sorted(tensors, key=archmod.natural_key):
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY.match(k)
        if m is None:
            if "lora_embedding_" in k:
                why = "embedding adapters (lora_embedding_A/B) are not supported"
            elif "lora_magnitude_vector" in k:
                why = "DoRA magnitude vectors are not supported"
            elif ".lora_" in k and k.endswith(".bias"):
                why = "LoRA biases are not supported"
            else:
                why = "not a lora_A/lora_B weight (a fully trained module? those are not supported)"
            raise GGQError(f"{wfile}: tensor {show(key)}: {why}")
        halves.setdefault(m["module"], {})[m["ab"]] = tensors[key]
    if not halves:
        raise GGQError(f"{wfile}: no lora_A/lora_B tensors")

    ad = Adapter(str(d), fam.name, alpha)
    for module, ab in halves.items():
        for need in ("A", "B"):
            if need not in ab:
                raise GGQError(f"{wfile}: {show(module)} has lora_{'B' if need == 'A' else 'A'} but no lora_{need}")
        a_src, b_src = ab["A"], ab["B"]
        hf = module + ".weight"
        try:
            rule = fam.tensor_rule(hf, hp, names)
        except GGQError as e:
            raise GGQError(f"{wfile}: {show(module)}: {e}") from None
        if rule is None:
            raise GGQError(f"{wfile}: {show(module)} is not a tensor of the base model's GGUF file")
        if hp.tie_embeddings and hf == "lm_head.weight":
            raise GGQError(f"{wfile}: the adapter targets lm_head, but the base model ties it to the token "
                           "embeddings (llama.cpp's format cannot hold that)")
        if rule.name == "token_embd.weight":
            raise GGQError(f"{wfile}: embedding adapters are not supported ({show(module)})")
        if len(a_src.shape) != 2 or len(b_src.shape) != 2:
            raise GGQError(f"{wfile}: {show(module)}: lora_A {list(a_src.shape)} and lora_B {list(b_src.shape)} "
                           "must be matrices")
        r, n_in = a_src.shape
        n_out, r_b = b_src.shape
        if r != r_b or r < 1:
            raise GGQError(f"{wfile}: {show(module)}: lora_A has rank {r} but lora_B has rank {r_b}")
        base_shape = shapes.get(hf)
        if shapes and base_shape is None:
            raise GGQError(f"{wfile}: {show(module)}: the base checkpoint {model_dir} has no tensor {show(hf)}")
        if base_shape is not None and tuple(base_shape) != (n_out, n_in):
            raise GGQError(f"{wfile}: {show(module)}: lora_B @ lora_A is {[n_out, n_in]} but the base weight "
                           f"{show(hf)} is {list(base_shape)}")
        for src in (a_src, b_src):
            if src.dtype not in ("F32", "F16", "BF16"):
                raise GGQError(f"{wfile}: tensor {show(src.name)} has dtype {show(src.dtype)}, not a float type")
        a, b = _float(a_src.load()), _float(b_src.load())
        if a.dtype != b.dtype:  # like llama.cpp's LoraTorchTensor: both float32 when they differ
            a, b = a.astype(np.float32), b.astype(np.float32)
        for name, x in (("lora_A", a), ("lora_B", b)):
            if not np.isfinite(x).all():
                raise GGQError(f"{wfile}: {show(module)}.{name} has non-finite values")
        if rule.rows is not None or rule.add:
            raise GGQError(f"{wfile}: {show(module)}: adapters of this tensor are not supported")
        if rule.permute_heads:
            b = archmod.permute_qk_rows(b, rule.permute_heads)
        m_alpha = float(_pattern_value(alpha_pat, module, alpha))
        peft_scale = m_alpha / (math.sqrt(r) if rslora else r)
        llama_scale = alpha / r if alpha else 1.0
        factor = 1.0 if peft_scale == llama_scale else peft_scale / llama_scale
        if not math.isfinite(factor) or abs(factor) > float(np.finfo(np.float32).max):
            raise GGQError(f"{wfile}: {show(module)}: lora_alpha {alpha} cannot express PEFT's scaling {peft_scale}")
        ad.pairs[rule.name] = LoraPair(rule.name, np.ascontiguousarray(a), np.ascontiguousarray(b), factor)
    return ad, model_dir


def _float(x: np.ndarray) -> np.ndarray:
    """float16 stays float16 (llama.cpp keeps torch's float16); anything else becomes float32."""
    x = np.asarray(x)
    return x if x.dtype in (np.float16, np.float32) else x.astype(np.float32)


# ------------------------------------------------------------------------ writing the GGUF adapter

def _encode(x: np.ndarray, qtype: T) -> tuple[np.ndarray, T]:
    """``x`` in ``qtype`` as convert_lora_to_gguf.py stores it: Q8_0 needs rows of a multiple of
    32 weights, else F16 (its QuantError fallback)."""
    from ggq import quants

    if qtype == T.Q8_0 and x.shape[-1] % 32:
        qtype = T.F16
    if qtype in (T.F32, T.F16):
        return np.ascontiguousarray(x.astype(np.float32 if qtype == T.F32 else np.float16)), qtype
    return quants.quantize(x.astype(np.float32), qtype), qtype


def _decoded(arr: np.ndarray, qtype: T) -> np.ndarray:
    """float32 values of ``arr`` as :func:`_encode` stored them in ``qtype``."""
    from ggq import quants

    if qtype == T.F16:
        return np.asarray(arr).astype(np.float32)
    return quants.dequantize(np.asarray(arr), qtype)


def convert_lora(adapter_dir: str | Path, base: str | Path | None = None, out: str | Path | None = None,
                 outtype: str = "f16", force: bool = False) -> Path:
    """``ggq convert-lora``: write the PEFT adapter ``adapter_dir`` as a llama.cpp GGUF LoRA file.

    ``base``: the base checkpoint (folder or hub id; its config and tensor names are what is
    needed). ``outtype``: f32, f16, bf16 or q8_0 (``convert_lora_to_gguf.py``'s ``--outtype``;
    default f16). ``out``: default ``<adapter folder>-<OUTTYPE>.gguf`` in the current folder.
    Returns the path; never leaves a partial file (temporary file renamed at the end).
    """
    import gguf

    from ggq.convert.arch import natural_key
    from ggq.format.output import atomic_output, check_output

    key = str(outtype).lower()
    if key not in OUTTYPES:
        raise GGQError(f"unknown --outtype {show(outtype)} (valid: {', '.join(OUTTYPES)})")
    d = Path(adapter_dir)
    out_p = Path(out) if out else Path.cwd() / f"{d.resolve().name}-{key.upper()}.gguf"
    check_output(out_p, force)
    ad, _base = read_peft_adapter(d, base)
    folded = sum(p.factor != 1.0 for p in ad.pairs.values())
    if folded:
        print(f"ggq: note: {d}: PEFT's scaling (use_rslora / alpha_pattern) differs from lora_alpha / r for "
              f"{folded} tensors; the factor is multiplied into their lora_b", file=sys.stderr)

    w = gguf.GGUFWriter(None, ad.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(d.resolve().name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ad.alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    data = []
    for name in sorted(ad.pairs, key=natural_key):
        p = ad.pairs[name]
        with np.errstate(over="ignore", invalid="ignore"):
            b = p.b if p.factor == 1.0 else p.b.astype(np.float32) * np.float32(p.factor)
        if not np.isfinite(b).all():
            raise GGQError(f"{d}: {name}.lora_b times PEFT's scaling factor {p.factor:g} (use_rslora / alpha_pattern) "
                           "overflows float32")
        for suffix, x in ((".lora_a", p.a), (".lora_b", b)):
            with np.errstate(over="ignore", invalid="ignore"):  # checked here, one line instead of a warning
                arr, qt = _encode(x, OUTTYPES[key])
            if qt != T.F32 and not np.isfinite(_decoded(arr, qt)).all():
                raise GGQError(f"{d}: {name}{suffix} has values beyond {qt.name}'s range (largest "
                               f"{float(np.abs(x).max()):.3g}); use --outtype f32")
            w.add_tensor_info(name + suffix, x.shape, np.dtype(np.float32), arr.nbytes, raw_dtype=qt)
            data.append(arr)
    with atomic_output(out_p, force) as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for arr in data:
                w.write_tensor_data(arr)
            w.close()
        finally:
            for f in w.fout or []:
                f.close()
    return out_p


# ------------------------------------------------------------------------ merging

def delta(pair: LoraPair) -> np.ndarray:
    """``B @ A`` in float32, ``(n_out, n_in)`` (rows in GGUF order); the pair's ``factor`` is not
    included (:meth:`Adapter.scale` has it)."""
    return pair.b.astype(np.float32) @ pair.a.astype(np.float32)


def merge(w: np.ndarray, adapters: list[tuple[Adapter, float]], name: str) -> np.ndarray:
    """The float32 weight ``w + sum(scale * alpha / r * factor * B @ A)`` over the ``(adapter, user
    scale)`` pairs that adapt GGUF tensor ``name`` (``w``: ``(n_out, n_in)``, rows in GGUF order).
    GGQError naming the adapter when its change is not finite in float32 (a huge scale, alpha or
    values) while ``w`` is: the merged model would compute NaN."""
    out = np.array(w, dtype=np.float32, copy=True)
    base_finite = bool(np.isfinite(out).all())
    for ad, scale in adapters:
        p = ad.pairs.get(name)
        if p is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                f = np.float32(scale * ad.scale(name))
                out += f * delta(p)
            if base_finite and not np.isfinite(out).all():
                raise GGQError(f"{ad.path}: {name}: the adapter's change (scale {scale:g} x {ad.scale(name):g} "
                               "x lora_b @ lora_a) overflows float32")
    return out


def load_for_convert(specs: list[str], model_dir: Path, fam_name: str) -> list[tuple[Adapter, float]]:
    """The ``--lora PATH[:SCALE]`` adapters of ``ggq convert`` for the base checkpoint ``model_dir``:
    PEFT folders (read against that base) or GGUF adapter files (:mod:`ggq.runtime.lora`)."""
    out = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            from ggq.runtime.lora import read_adapter

            ad = read_adapter(p, fam_name)
        else:
            ad, _ = read_peft_adapter(p, model_dir)
        if ad.arch != fam_name:
            raise GGQError(f"{path}: adapter for architecture {show(ad.arch)}, the base is {fam_name}")
        out.append((ad, scale))
    return out
