"""A fresh install's first reply: the forward pass runs before it is compiled, on two cores (issue 11).

Numba compiles a file's forward pass once, on one core (SmolLM2: ~30 s, most of it the ops it
calls; the attention alone is ~40 %), then loads it from its on-disk cache in a fraction of a
second. When the forward is not in that cache, :meth:`ggq.runtime.model.Model.warmup` uses a
:class:`FirstRun`:

1. a second process (``python -m ggq.runtime.firstrun``, same environment, so the same CPU target
   and cache folder) compiles :func:`ggq.runtime.ops.attention` for this model's signature, then
   the family's whole ``forward`` (whose other ops it finds in the cache by then), into the cache;
2. meanwhile this process runs the family's forward as plain Python (its ``py_func``) over the
   compiled ops, each compiled here at its first call, the attention loaded from the cache once
   the other process has written it: the same compiled arithmetic, so the same logits bit for bit,
   with one Python call per op (~1 ms more per token on SmolLM2);
3. when the other process has written the whole forward, :meth:`FirstRun.finish` loads it from the
   cache and the model switches to it (one compiled call per batch again).

So both cores compile at once and the first reply waits for the larger half only. If the helper
process cannot start or fails, this process compiles what is missing itself (as before: slower,
never wrong). Numba's cache API used here (``Dispatcher._cache``) is the one ``Dispatcher.compile``
uses; with another Numba where it is missing, :func:`load_cached` reports "unknown" and the model
compiles as usual.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import numba

from ggq.runtime import ops


def signature(args) -> tuple:
    """The Numba argument types a call with ``args`` compiles for (what the dispatcher computes
    from Python values: ``numba.typeof`` for arguments)."""
    return tuple(numba.typeof(a) for a in args)


def load_cached(dispatcher, sig) -> bool | None:
    """Make ``dispatcher`` ready for ``sig`` if it is compiled already or in Numba's on-disk
    cache (loading it, as ``Dispatcher.compile`` would) and return True; False if it would have to
    be compiled; None if this Numba's cache cannot be asked (then compile as usual)."""
    try:
        from numba.core.compiler_lock import global_compiler_lock

        with global_compiler_lock:
            if tuple(sig) in dispatcher.overloads:
                return True
            cres = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
            if cres is None:
                return False
            dispatcher._cache_hits[sig] += 1
            if not cres.objectmode:
                dispatcher.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            dispatcher.add_overload(cres)
            return True
    except Exception:  # another Numba's internals: fall back to compiling as usual
        return None


class _OpsView(types.ModuleType):
    """:mod:`ggq.runtime.ops` as :func:`python_forward`'s forward sees it: the module's names,
    those in ``overrides`` replaced."""

    def __init__(self, overrides: dict):
        super().__init__("ggq.runtime.ops")
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(ops, name)


def python_forward(forward, attention=None):
    """A family's ``@njit`` ``forward`` as a plain Python function over the same compiled ops
    (same arguments, same results bit for bit: the forward's own body only indexes and loops).
    ``attention``: called instead of :func:`ggq.runtime.ops.attention` (same arguments)."""
    py = forward.py_func
    env = dict(py.__globals__)
    if attention is not None:
        env["ops"] = _OpsView({"attention": attention})
    return types.FunctionType(py.__code__, env, py.__name__, py.__defaults__, py.__closure__)


def _no_attention(*args):
    """:func:`FirstRun.compile_rest`'s attention: nothing (the output stays as it was)."""


class FirstRun:
    """Compile ``forward`` (a family's ``@njit`` forward) for ``forward_sig`` and the attention
    for ``attention_sig`` in a helper process (see the module docstring); :attr:`python_forward`
    runs meanwhile. ``forward_sig``/``attention_sig``: tuples of Numba types (:func:`signature`)."""

    def __init__(self, forward, forward_sig: tuple, attention_sig: tuple):
        self.forward = forward
        self.forward_sig = forward_sig
        self._done = [threading.Event(), threading.Event()]  # attention, forward (set on failure too)
        self.failed = False
        self.cpu_seconds = [0.0, 0.0]  # the helper's CPU time when it had compiled each job
        py = forward.py_func
        self.python_forward = python_forward(forward, self._attention)
        jobs = [(ops.attention.py_func.__module__, "attention", attention_sig),
                (py.__module__, py.__name__, forward_sig)]
        root = str(Path(__file__).resolve().parents[2])  # where this ggq is imported from
        path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "ggq.runtime.firstrun"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          env=dict(os.environ, PYTHONPATH=path),
                                          start_new_session=True)  # Ctrl-C in a chat does not kill it
            self._proc.stdin.write(pickle.dumps(jobs))
            self._proc.stdin.close()
        except Exception:
            self._proc = None
            self._fail()
            return
        threading.Thread(target=self._read, name="ggq-first-run", daemon=True).start()

    def _fail(self):
        self.failed = True
        for e in self._done:
            e.set()

    def _read(self):
        try:
            for line in self._proc.stdout:
                word = line.split()
                if len(word) == 3 and word[0] == b"done" and word[1] in (b"0", b"1"):
                    self.cpu_seconds[int(word[1])] = float(word[2])
                    self._done[int(word[1])].set()
        finally:
            self._proc.wait()
            if not all(e.is_set() for e in self._done):
                self._fail()

    def _attention(self, *args):
        self.wait_for(0)  # then loaded from the cache the helper wrote (or compiled here if it failed)
        return ops.attention(*args)

    def compile_rest(self, args) -> None:
        """Compile here every op the forward calls but the attention (which the helper compiles
        meanwhile): one pass of the forward on ``args`` (its arguments; the outputs are garbage)
        with the attention skipped, so that this process does not wait for the helper while it
        has ops of its own left to compile."""
        python_forward(self.forward, _no_attention)(*args)

    def wait_for(self, job: int, timeout: float | None = None) -> bool:
        """Block until the helper has compiled job 0 (the attention) or 1 (the forward), or failed."""
        return self._done[job].wait(timeout)

    def finish(self):
        """Wait for the helper, then load the compiled forward from the cache (or, if the helper
        failed, compile it here). Returns the compiled forward."""
        self.wait_for(1)
        if not load_cached(self.forward, self.forward_sig):
            self.forward.compile(self.forward_sig)
        return self.forward


def _worker() -> int:
    """The helper process: compile each (module, function name, signature) read from stdin, in
    order, writing "done i <CPU seconds so far>" after each; Numba saves them to its on-disk cache."""
    import importlib
    import time

    jobs = pickle.loads(sys.stdin.buffer.read())
    for i, (module, name, sig) in enumerate(jobs):
        getattr(importlib.import_module(module), name).compile(sig)
        sys.stdout.write(f"done {i} {time.process_time():.2f}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
