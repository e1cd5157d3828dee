"""llama.cpp's quantization mixes: which ggml type every tensor of a GGUF file gets.

A *file type* (``gguf.LlamaFileType``, ``general.file_type``) names a mix, e.g. ``Q4_K_M``: most
weights in Q4_K, but ``output.weight`` in Q6_K, half of the ``attn_v``/``ffn_down`` layers in Q6_K,
norms and biases in F32, and 32-block fallbacks for rows that are not a multiple of 256.

:func:`plan_types` reproduces those choices tensor by tensor:

* for quantized file types, the rules of ``llama-quantize`` (``src/llama-quant.cpp`` in llama.cpp:
  ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``), applied
  to the float file that ``convert_hf_to_gguf.py`` would write first;
* for F32/F16/BF16, the rules of ``convert_hf_to_gguf.py`` (``ModelBase.prepare_tensors``: 1-D
  tensors, norms and a few special tensors stay F32).

The rules are re-implemented from reading those sources; see ``specs/mixes.md``. What they know of
an architecture (LLM_TYPE_70B) comes from its family (:mod:`ggq.models`); llama-quantize's rules
for architectures ggq has no family for (falcon's) are not applied: such a file gets the general
rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf
from gguf import GGMLQuantizationType, LlamaFileType

from ggq import models
from ggq.errors import GGQError

T = GGMLQuantizationType
F = LlamaFileType

#: user-facing names of the file types ggq writes (upper case; lookups are case-insensitive)
FILE_TYPES: dict[str, LlamaFileType] = {
    "F32": F.ALL_F32,
    "F16": F.MOSTLY_F16,
    "BF16": F.MOSTLY_BF16,
    "Q8_0": F.MOSTLY_Q8_0,
    "Q4_0": F.MOSTLY_Q4_0,
    "Q4_1": F.MOSTLY_Q4_1,
    "Q5_0": F.MOSTLY_Q5_0,
    "Q5_1": F.MOSTLY_Q5_1,
    "Q2_K": F.MOSTLY_Q2_K,
    "Q3_K_S": F.MOSTLY_Q3_K_S,
    "Q3_K_M": F.MOSTLY_Q3_K_M,
    "Q3_K_L": F.MOSTLY_Q3_K_L,
    "Q4_K_S": F.MOSTLY_Q4_K_S,
    "Q4_K_M": F.MOSTLY_Q4_K_M,
    "Q5_K_S": F.MOSTLY_Q5_K_S,
    "Q5_K_M": F.MOSTLY_Q5_K_M,
    "Q6_K": F.MOSTLY_Q6_K,
    # aliases, as in llama-quantize's QUANT_OPTIONS
    "Q3_K": F.MOSTLY_Q3_K_M,
    "Q4_K": F.MOSTLY_Q4_K_M,
    "Q5_K": F.MOSTLY_Q5_K_M,
}

#: file type -> the default tensor type of the mix (llama_ftype_get_default_type)
DEFAULT_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    F.ALL_F32: T.F32,
    F.MOSTLY_F16: T.F16,
    F.MOSTLY_BF16: T.BF16,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q4_0: T.Q4_0,
    F.MOSTLY_Q4_1: T.Q4_1,
    F.MOSTLY_Q5_0: T.Q5_0,
    F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K,
    F.MOSTLY_Q3_K_M: T.Q3_K,
    F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K,
    F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K,
    F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)

#: ggml types a user may name in --output-tensor-type / --token-embedding-type / --tensor-type
TENSOR_TYPES: dict[str, GGMLQuantizationType] = {
    t.name: t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
}


def parse_file_type(name: str) -> LlamaFileType:
    """Parse a mix name (``"q4_k_m"``, ``"Q4_K"``, ``"F16"``...; case-insensitive) to a file type.

    Raises GGQError listing the valid names if ``name`` is unknown.
    """
    ft = FILE_TYPES.get(str(name).strip().upper())
    if ft is None:
        raise GGQError(f"unknown file type {name!r}; valid types: {', '.join(FILE_TYPES)}")
    return ft


def parse_tensor_type(name: str) -> GGMLQuantizationType:
    """Parse a ggml type name (``"q6_k"``, ``"Q8_0"``, ``"f16"``; case-insensitive).

    Raises GGQError listing the valid names if ``name`` is unknown.
    """
    t = TENSOR_TYPES.get(str(name).strip().upper())
    if t is None:
        raise GGQError(f"unknown tensor type {name!r}; valid types: {', '.join(TENSOR_TYPES)}")
    return t


def file_type_name(ftype: LlamaFileType) -> str:
    """The canonical name of a file type (``MOSTLY_Q4_K_M`` -> ``"Q4_K_M"``)."""
    for k, v in FILE_TYPES.items():
        if v == ftype:
            return k
    return LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")


@dataclass
class MixOverrides:
    """llama-quantize's per-tensor overrides.

    ``output_tensor_type``: type of ``output.weight`` (and of ``token_embd.weight`` when tied and
    the tensor goes through the mix rules) -- ``--output-tensor-type``.
    ``token_embedding_type``: type of ``token_embd.weight`` -- ``--token-embedding-type``.
    ``tensor_types``: ``(regex, type)`` pairs; the first regex found (``re.search``) in a tensor's
    name (lower case, as llama-quantize lowers the pattern) sets its type -- ``--tensor-type``.
    ``pure``: no mix rules, every quantizable tensor in the default type -- ``--pure``.
    ``leave_output_tensor``: keep ``output.weight`` as it is -- ``--leave-output-tensor``.
    """

    output_tensor_type: GGMLQuantizationType | None = None
    token_embedding_type: GGMLQuantizationType | None = None
    tensor_types: list[tuple[str, GGMLQuantizationType]] = field(default_factory=list)
    pure: bool = False
    leave_output_tensor: bool = False

    @classmethod
    def parse(cls, output_tensor_type: str | None = None, token_embedding_type: str | None = None,
              tensor_types: list[str] | tuple[str, ...] = ()) -> "MixOverrides":
        """Build overrides from CLI strings (``tensor_types`` as ``PATTERN=TYPE``); GGQError if malformed."""
        tts = []
        for spec in tensor_types:
            pat, sep, typ = spec.partition("=")
            if not sep or not pat:
                raise GGQError(f"malformed --tensor-type {spec!r}; expected PATTERN=TYPE, e.g. attn_v=q8_0")
            if not typ:
                raise GGQError(f"missing type in --tensor-type {spec!r}; expected PATTERN=TYPE")
            try:
                re.compile(pat.lower())
            except re.error as e:
                raise GGQError(f"bad regular expression in --tensor-type {spec!r}: {e}") from None
            tts.append((pat.lower(), parse_tensor_type(typ)))
        return cls(
            output_tensor_type=parse_tensor_type(output_tensor_type) if output_tensor_type else None,
            token_embedding_type=parse_tensor_type(token_embedding_type) if token_embedding_type else None,
            tensor_types=tts,
        )


# ------------------------------------------------------------------ convert_hf_to_gguf.py float rules

def _tensor_patterns(keys: list[str]) -> re.Pattern:
    pats = []
    for k in keys:
        mt = getattr(gguf.MODEL_TENSOR, k, None)
        if mt is None or mt not in gguf.TENSOR_NAMES:
            continue
        fmt = gguf.TENSOR_NAMES[mt]
        pats.append(re.escape(fmt).replace(r"\{bid\}", r"\d+").replace(r"\{xid\}", r"\d+") + r"\.weight")
    return re.compile("(?:" + "|".join(pats) + ")$")


# the tensors prepare_tensors always keeps in F32
_ALWAYS_F32 = _tensor_patterns([
    "FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D", "SHORTCONV_CONV",
    "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2",
    "TIME_MIX_LERP_FUSED", "POSNET_NORM1", "POSNET_NORM2", "V_ENC_EMBD_POS", "A_ENC_EMBD_POS",
    "ALTUP_CORRECT_COEF", "ALTUP_PREDICT_COEF", "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V",
    "INDEXER_PROJ",
])


def float_type(name: str, shape: tuple[int, ...], outtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type ``convert_hf_to_gguf.py --outtype <outtype>`` gives tensor ``name`` (F32/F16/BF16).

    1-D tensors, ``*_norm.weight``, names not ending in ``.weight`` and a fixed list of special
    tensors (MoE routers, position embeddings, conv1d kernels...) are F32; the rest ``outtype``.
    """
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if not name.endswith((".weight", ".lora_a", ".lora_b")) or _ALWAYS_F32.search(name):
        return T.F32
    return T(outtype)


# ------------------------------------------------------------------ llama-quantize rules

_NO_QUANT_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count (minimum 1)."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def allows_quantization(name: str, shape: tuple[int, ...], leave_output_tensor: bool = False) -> bool:
    """llama-quantize's ``tensor_allows_quantization``: 2-D/3-D ``*weight`` tensors except norms,
    MoE routers, positional embeddings, conv1d kernels and a few other small special tensors."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    if any(s in name for s in _NO_QUANT_SUBSTRINGS):
        return False
    return name not in ("position_embd.weight", "token_types.weight")


def _category(name: str) -> str:
    """tensor_get_category: broad role of a tensor, by substring as llama.cpp does."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for sub, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if sub in name:
            return cat
    return "other"


_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")
_BLK = re.compile(r"^blk\.(\d+)\.")


def _layer_of(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names) -> list[str]:
    """Tensor names in the order llama.cpp's model loader iterates them (its ``weights_map``):
    non-layer tensors first, then by layer number, then by name."""
    return sorted(names, key=lambda n: (_layer_of(n), n.encode()))


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _State:
    def __init__(self, arch: str, hparams: dict, has_imatrix: bool):
        self.arch = arch
        self.n_layer = int(hparams.get("n_layer", 0))
        n_head = int(hparams.get("n_head", 0) or 0)
        n_head_kv = hparams.get("n_head_kv")
        n_head_kv = n_head if n_head_kv is None else int(n_head_kv)
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        self.n_expert = int(hparams.get("n_expert", 0) or 0)
        # LLM_TYPE_70B is the only model type the mix rules use; its family knows it (ggq.models)
        self.is_70b = models.is_70b(arch, self.n_layer, n_head, n_head_kv)
        self.has_imatrix = has_imatrix
        self.n_attention_wv = 0
        self.i_attention_wv = 0
        self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.has_tied_embeddings = True

    def layer_info(self, counter: int, name: str) -> tuple[int, int]:
        if max(1, self.n_expert) > 1:
            i = _layer_of(name)
            if i < 0 or i >= self.n_layer:
                raise GGQError(f"cannot determine the layer of tensor {name} (n_layer {self.n_layer})")
            return i, self.n_layer
        return counter, self.n_layer


def _mix_type(qs: _State, new_type: T, name: str, ne0: int, ftype: F, cat: str,
              ov: MixOverrides) -> T:
    """llama_tensor_get_type_impl for the K-quant / legacy file types ggq writes."""
    if cat == "output" or (qs.has_tied_embeddings and cat == "token_embd"):
        if ov.output_tensor_type is not None:
            return ov.output_tensor_type
        if ne0 % gguf.GGML_QUANT_SIZES[new_type][0] != 0:
            return T.Q8_0
        return new_type if new_type == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        if ov.token_embedding_type is not None:
            return ov.token_embedding_type
        return new_type
    if cat in _ATTN_V:
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q4_K if qs.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new_type = T.Q5_K
        if qs.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if qs.n_expert == 8:
            new_type = T.Q8_0
        qs.i_attention_wv += 1
    elif cat == "attn_k":
        if qs.n_expert == 8:
            new_type = T.Q8_0
    elif cat == "ffn_down":
        i_layer, n_layer = qs.layer_info(qs.i_ffn_down, name)
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M and _use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i_layer < n_layer // 8:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and qs.has_imatrix and i_layer < n_layer // 8:
            new_type = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        qs.i_ffn_down += 1
    elif cat == "attn_output":
        if qs.n_expert == 8:
            if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
                new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q2_K:
            new_type = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q5_K
    elif cat == "attn_qkv":
        # attn_qkv is an attn_v-like category, handled above (llama.cpp's branch here is unreachable)
        pass
    elif cat == "ffn_gate":
        qs.layer_info(qs.i_ffn_gate, name)
        qs.i_ffn_gate += 1
    elif cat == "ffn_up":
        qs.layer_info(qs.i_ffn_up, name)
        qs.i_ffn_up += 1
    return new_type


# tensor_type_fallback: a 256-block type whose row length does not divide falls back to a 32-block type
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def fallback_type(qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    """tensor_type_fallback: ``qtype`` if rows of ``ne0`` weights fit its blocks, else a 32-block
    type (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16."""
    qtype = T(qtype)
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    if ne0 % bs == 0:
        return qtype
    ret = _FALLBACK.get(qtype, qtype)
    if ne0 % gguf.GGML_QUANT_SIZES[ret][0] != 0:
        ret = T.F16
    return ret


def plan_types_from(tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]], ftype: LlamaFileType,
                    arch: str, hparams: dict, overrides: MixOverrides | None = None, *,
                    has_imatrix: bool = False) -> dict[str, GGMLQuantizationType]:
    """llama-quantize's choice for each tensor of an existing GGUF file.

    ``tensors``: ``(name, shape in ne order, current ggml type)``. Tensors llama-quantize does not
    quantize keep their current type. Returns ``{name: new type}`` in llama.cpp's iteration order
    (:func:`llama_order`), which the per-layer counters depend on. Raises GGQError for a file type
    ggq has no mix for.
    """
    ftype = LlamaFileType(ftype)
    if ftype not in DEFAULT_TYPE:
        raise GGQError(f"no quantization mix for file type {ftype.name}")
    default = DEFAULT_TYPE[ftype]
    ov = overrides or MixOverrides()
    qs = _State(arch, hparams, has_imatrix)
    by_name = {n: (tuple(int(x) for x in s), T(t)) for n, s, t in tensors}
    order = llama_order(by_name)
    for n in order:
        c = _category(n)
        if c in _ATTN_V:
            qs.n_attention_wv += 1
        if c == "output":
            qs.has_tied_embeddings = False
    try:
        # llama-quantize lowers the pattern (tensor names are lower case)
        pats = [(re.compile(p.lower()), T(t)) for p, t in ov.tensor_types]
    except re.error as e:
        raise GGQError(f"bad --tensor-type regular expression: {e}") from None
    out: dict[str, GGMLQuantizationType] = {}
    for n in order:
        shape, cur = by_name[n]
        if not allows_quantization(n, shape, ov.leave_output_tensor):
            out[n] = cur
            continue
        cat = _category(n)
        if ov.token_embedding_type is not None and cat == "token_embd":
            named = n == "per_layer_token_embd.weight" and any(p.search(n) for p, _ in pats)
            if not named:
                out[n] = ov.token_embedding_type
                continue
        if ov.output_tensor_type is not None and cat == "output":
            out[n] = ov.output_tensor_type
            continue
        new = default
        if default not in FLOAT_TYPES:
            manual = False
            for p, t in pats:
                if p.search(n):
                    new, manual = t, True
                    break
            if not manual and not ov.pure:
                new = _mix_type(qs, new, n, shape[0], ftype, cat, ov)
            new = fallback_type(new, shape[0])
        out[n] = new
    return out


def plan_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: LlamaFileType, arch: str, hparams: dict,
               overrides: MixOverrides | None = None,
               source_float_type: GGMLQuantizationType = T.F32, *,
               has_imatrix: bool = False) -> dict[str, GGMLQuantizationType]:
    """The ggml type of every tensor of a model written as file type ``ftype``, as llama.cpp chooses.

    ``tensors``: ``(gguf name, shape in ne order)`` -- ``ne[0]`` is the row length.
    ``ftype``: the mix (see :data:`FILE_TYPES`, :func:`parse_file_type`).
    ``arch``: gguf architecture name (``"llama"``); ``hparams``: ``n_layer``, ``n_head``,
    ``n_head_kv`` (default ``n_head``), ``n_expert`` (default 0).
    ``overrides``: llama-quantize's ``--output-tensor-type``/``--token-embedding-type``/``--tensor-type``.
    ``source_float_type``: the float type ``convert_hf_to_gguf.py`` gives 2-D weights in the
    intermediate file llama-quantize reads (F16 for the usual ``--outtype f16`` then
    ``llama-quantize``); tensors llama-quantize leaves alone keep that file's type.
    ``has_imatrix``: an importance matrix is used (changes ffn_down for Q4_0/Q5_0 mixes).

    For F32/F16/BF16 the result is ``convert_hf_to_gguf.py --outtype`` (:func:`float_type`); for
    quantized mixes llama-quantize's rules applied to that float file (:func:`plan_types_from`).
    Returns ``{name: type}`` in llama.cpp's tensor order. Raises GGQError for an unknown file type.
    """
    ftype = LlamaFileType(ftype)
    if ftype not in DEFAULT_TYPE:
        raise GGQError(f"no quantization mix for file type {ftype.name}")
    default = DEFAULT_TYPE[ftype]
    if default in FLOAT_TYPES:
        return {n: float_type(n, tuple(s), default) for n, s in
                ((n, s) for n, s in sorted(tensors, key=lambda t: (_layer_of(t[0]), t[0].encode())))}
    src = [(n, tuple(s), float_type(n, tuple(s), source_float_type)) for n, s in tensors]
    return plan_types_from(src, ftype, arch, hparams, overrides, has_imatrix=has_imatrix)


def hparams_from_gguf(md: dict) -> tuple[str, dict]:
    """(arch, hparams) for :func:`plan_types` from a GGUF file's metadata ``md`` ({key: value},
    :attr:`ggq.format.gguf_reader.GGUFHeader.metadata`).
    ``n_head``/``n_head_kv`` may be per-layer arrays in GGUF; llama.cpp's mix rules use layer 0.
    """
    def get(key, default=None):
        if key not in md or md[key] is None:
            return default
        v = md[key]
        if isinstance(v, (list, tuple)):
            v = v[0] if len(v) else default
        return v

    arch = get("general.architecture", "")
    n_head = get(f"{arch}.attention.head_count", 0)
    return arch, {
        "n_layer": get(f"{arch}.block_count", 0),
        "n_head": n_head,
        "n_head_kv": get(f"{arch}.attention.head_count_kv", n_head),
        "n_expert": get(f"{arch}.expert_count", 0),
        "n_embd": get(f"{arch}.embedding_length", 0),
        "n_ff": get(f"{arch}.feed_forward_length", 0),
    }
