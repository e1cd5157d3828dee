"""Model families: one module per family, found by declaring it.

Every module of this package (but ``base``) lists its :class:`~ggq.models.base.Family` instances
in ``FAMILIES``; :func:`families` imports the modules and collects them, so adding a family is adding
a module (``specs/model-families.md``). The rest of ggq asks this package which family a checkpoint
or a GGUF file belongs to:

* :func:`for_checkpoint` -- by ``config.json``'s ``architectures[0]`` (``ggq convert``);
* :func:`for_gguf` -- by ``general.architecture`` (the runtime, ``ggq quantize``'s mixes);
* :func:`find` -- the same lookups without raising (None when unknown).
"""

from __future__ import annotations

import importlib
import pkgutil

from ggq.errors import GGQError, show
from ggq.models.base import Family

_FAMILIES: list[Family] | None = None


def families() -> list[Family]:
    """Every family of every module in this package, in module-name order."""
    global _FAMILIES
    if _FAMILIES is None:
        found: list[Family] = []
        for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if m.name == "base" or m.name.startswith("_"):
                continue
            found.extend(importlib.import_module(f"{__name__}.{m.name}").FAMILIES)
        _FAMILIES = found
    return _FAMILIES


def find(hf_arch: str | None = None, gguf_arch: str | None = None) -> Family | None:
    """The family converting Hugging Face architecture ``hf_arch`` or running GGUF architecture
    ``gguf_arch`` (a ``general.architecture`` value); None when no family does."""
    for f in families():
        if (hf_arch is not None and hf_arch in f.hf_architectures) or (gguf_arch is not None and gguf_arch in f.gguf_names):
            return f
    return None


def hf_architectures() -> list[str]:
    return [a for f in families() for a in f.hf_architectures]


def gguf_architectures() -> list[str]:
    return [a for f in families() for a in f.gguf_names]


def for_checkpoint(config: dict, where: str) -> Family:
    """The family of a ``config.json`` (its ``architectures[0]``); GGQError naming the supported ones."""
    names = config.get("architectures") or []
    supported = ", ".join(hf_architectures())
    if not isinstance(names, list) or not names:
        raise GGQError(f"{where}: config.json has no 'architectures' entry (supported: {supported})")
    fam = find(hf_arch=names[0]) if isinstance(names[0], str) else None
    if fam is None:
        raise GGQError(f"{where}: unsupported architecture {show(names[0])} (supported: {supported})")
    return fam


def for_gguf(arch: str, where: str) -> Family:
    """The family running GGUF architecture ``arch``; GGQError naming the ones ggq runs."""
    fam = find(gguf_arch=arch) if isinstance(arch, str) else None
    if fam is None:
        raise GGQError(f"{where}: architecture {show(arch)} is not supported (ggq runs {', '.join(gguf_architectures())})")
    return fam


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B for a GGUF architecture (False for architectures ggq has no family for)."""
    fam = find(gguf_arch=arch)
    return fam is not None and fam.is_70b(n_layer, n_head, n_head_kv)
