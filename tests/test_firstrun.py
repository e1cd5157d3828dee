"""A fresh install's first run (ggq.runtime.firstrun): the forward runs as Python over the compiled
ops while a helper process compiles the attention and the whole forward into Numba's cache.

The reference for the Python-level forward is the compiled forward itself (whose agreement with
llama.cpp the runtime tests check): the same ops on the same inputs must give the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _need_runtime():
    pytest.importorskip("numba")


def test_python_forward_matches_compiled(smollm2_gguf):
    """SmolLM2 Q4_1 (llama.cpp's file): a prompt batch, decode steps and a batched decode of two
    sequences through firstrun.python_forward give the compiled forward's logits bit for bit."""
    _need_runtime()
    from ggq.runtime import firstrun, ops
    from ggq.runtime.model import Model

    m = Model.load(smollm2_gguf, n_ctx=128, n_seq=2)
    fwd = m.family.forward
    prompt = [1, 504, 3458, 282, 4649, 314, 17, 2080, 28, 253]
    outs = {}
    for name, fn in (("compiled", fwd), ("python", firstrun.python_forward(fwd, ops.attention))):
        m._forward_fn = fn
        m.reset(0)
        m.reset(1)
        a = m.eval(prompt, all_logits=True)
        b = [m.eval([t]) for t in (42, 7, 1000)]
        m.eval(prompt[:3], seq=1)
        c = m.decode_batch([5, 6], [0, 1])
        outs[name] = (a, b, c)
    m._forward_fn = fwd
    for x, y in zip(outs["compiled"], outs["python"]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_SCRIPT = r"""
import json, sys
import numpy as np
from ggq.runtime import ops
from ggq.runtime.model import Model

m = Model.load(sys.argv[1], n_ctx=64, kv_type="f16")  # what ggq generate uses
m.warmup(repackers=False, wait=False)
fr = m._first_run
first = fr is not None and m._forward_fn is fr.python_forward
a = m.eval([1, 504, 3458, 282, 4649, 314], all_logits=True)
b = m.eval([42])
m.reset()
m.finish_compile()
compiled = m._forward_fn is m.family.forward
a2 = m.eval([1, 504, 3458, 282, 4649, 314], all_logits=True)
b2 = m.eval([42])
print(json.dumps(dict(
    first_run=first, helper_failed=fr.failed if fr else None, compiled=compiled,
    same=bool(np.array_equal(a, a2) and np.array_equal(b, b2)),
    attention_hits=sum(ops.attention.stats.cache_hits.values()),
    attention_misses=sum(ops.attention.stats.cache_misses.values()),
    forward_hits=sum(m.family.forward.stats.cache_hits.values()),
    forward_misses=sum(m.family.forward.stats.cache_misses.values()),
    helper_cpu=fr.cpu_seconds if fr else None)))
"""


@pytest.mark.slow
def test_first_run_with_an_empty_compile_cache(smollm2_gguf, tmp_path):
    """With an empty Numba cache: the model runs before its forward is compiled, this process
    loads the attention and then the whole forward from the cache the helper process wrote
    (never compiling either itself), and the logits are the same before and after the switch.
    Then `ggq generate` (same KV cache type) with that cache starts without compiling and answers
    as the model should."""
    _need_runtime()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), GGQ_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(smollm2_gguf)], capture_output=True, text=True,
                       env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["first_run"] and got["helper_failed"] is False and got["compiled"], got
    assert got["same"], got
    assert got["attention_hits"] >= 1 and got["attention_misses"] == 0, got
    assert got["forward_hits"] >= 1 and got["forward_misses"] == 0, got

    def compiled():  # one Numba cache data file per compiled function and signature
        return {p.name for p in (tmp_path / "numba").rglob("*.nbc")}

    before = compiled()
    cmd = [sys.executable, "-m", "ggq.cli", "generate", str(smollm2_gguf), "--temp", "0", "-n", "4"]
    r = subprocess.run(cmd, input="The capital of France is\n", capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout
    new = compiled() - before  # only the load-time repackers (the script did not ask for them)
    assert new and all(n.startswith("fastpack.") for n in new), sorted(new)
