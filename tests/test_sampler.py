"""Sampler: each step of llama.cpp's chain checked against hand-computed math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggq.runtime.sampler import Sampler, SamplerParams

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, temp=1.0)


def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def test_defaults_are_llamacpp():
    p = SamplerParams()
    assert (p.temp, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n) == (0.8, 40, 0.95, 0.05, 1.0, 64)


def test_greedy_is_argmax_first_on_ties():
    s = Sampler(temp=0.0)
    assert s.sample(np.array([0.0, 3.0, 3.0, -1.0], np.float32)) == 1
    ids, pr = s.candidates(np.array([5.0, 1.0], np.float32))
    assert ids.tolist() == [0] and pr.tolist() == [1.0]


def test_temperature_scales_softmax():
    logits = np.array([1.0, 2.0, 4.0], np.float32)
    ids, pr = Sampler(**{**OFF, "temp": 0.5}).candidates(logits)
    exp = _softmax([4 / 0.5, 2 / 0.5, 1 / 0.5])  # best first
    assert ids.tolist() == [2, 1, 0]
    assert np.allclose(pr, exp, rtol=1e-6)


def test_top_k():
    logits = np.array([0.1, 3.0, 2.0, 1.0, -5.0], np.float32)
    ids, pr = Sampler(**{**OFF, "top_k": 2}).candidates(logits)
    assert ids.tolist() == [1, 2]
    assert np.allclose(pr, _softmax([3.0, 2.0]))


def test_top_p_keeps_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.2 (logits are their logs)
    logits = np.log(np.array([0.2, 0.5, 0.3], np.float32))
    ids, _ = Sampler(**{**OFF, "top_p": 0.8}).candidates(logits)
    assert ids.tolist() == [1, 2]  # 0.5 + 0.3 = 0.8 >= 0.8
    ids, _ = Sampler(**{**OFF, "top_p": 0.79}).candidates(logits)
    assert ids.tolist() == [1, 2]
    ids, _ = Sampler(**{**OFF, "top_p": 0.5}).candidates(logits)
    assert ids.tolist() == [1]
    ids, pr = Sampler(**{**OFF, "top_p": 0.81}).candidates(logits)
    assert ids.tolist() == [1, 2, 0] and np.allclose(pr, [0.5, 0.3, 0.2], rtol=1e-5)


def test_min_p_relative_to_best():
    # p = 0.6, 0.25, 0.1, 0.05; min_p 0.1 keeps p >= 0.06
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05], np.float32))
    ids, pr = Sampler(**{**OFF, "min_p": 0.1}).candidates(logits)
    assert ids.tolist() == [0, 1, 2]
    assert np.allclose(pr, np.array([0.6, 0.25, 0.1]) / 0.95, rtol=1e-5)


def test_repeat_penalty_divides_positive_multiplies_negative():
    logits = np.array([2.0, -1.0, 1.0, 0.5], np.float32)
    s = Sampler(repeat_penalty=2.0, repeat_last_n=2, **OFF)
    s.accept_many([3, 0, 1])  # window of 2 keeps tokens 0 and 1
    x = s.apply_penalties(logits)
    assert x.tolist() == [1.0, -2.0, 1.0, 0.5]


def test_frequency_presence_penalties():
    s = Sampler(repeat_penalty=1.0, frequency_penalty=0.5, presence_penalty=0.25, **OFF)
    s.accept_many([1, 1, 2])
    x = s.apply_penalties(np.zeros(3, np.float32))
    assert np.allclose(x, [0.0, -2 * 0.5 - 0.25, -0.5 - 0.25])


def test_chain_order_topk_then_topp_then_minp_then_temp():
    # top_k 3 -> [0.4, 0.3, 0.2] renormalized; top_p 0.7 -> first two (0.444+0.333 >= 0.7)
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    ids, pr = Sampler(temp=2.0, top_k=3, top_p=0.7, min_p=0.0).candidates(logits)
    assert ids.tolist() == [0, 1]
    exp = _softmax([math.log(0.4) / 2, math.log(0.3) / 2])
    assert np.allclose(pr, exp, rtol=1e-6)


def test_seed_reproducible_and_frequencies():
    logits = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    a = [Sampler(seed=7, **OFF).sample(logits) for _ in range(3)]
    s1, s2 = Sampler(seed=7, **OFF), Sampler(seed=7, **OFF)
    assert [s1.sample(logits) for _ in range(50)] == [s2.sample(logits) for _ in range(50)]
    s = Sampler(seed=1, **OFF)
    draws = np.bincount([s.sample(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(draws, [0.7, 0.2, 0.1], atol=0.03)
    assert len(set(a)) == 1


@pytest.mark.slow
def test_against_llamacpp_sampler_chain():
    """The kept set after top-k/top-p/min-p/temp equals llama.cpp's own samplers' output."""
    llama_cpp = pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 3).astype(np.float32)
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
    arr = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for smpl in (llama_cpp.llama_sampler_init_top_k(50), llama_cpp.llama_sampler_init_top_p(0.9, 0),
                 llama_cpp.llama_sampler_init_min_p(0.05, 0), llama_cpp.llama_sampler_init_temp(0.7)):
        llama_cpp.llama_sampler_chain_add(chain, smpl)
    llama_cpp.llama_sampler_apply(chain, llama_cpp.ctypes.byref(arr))
    ref = sorted(arr.data[i].id for i in range(arr.size))
    llama_cpp.llama_sampler_free(chain)
    ids, _ = Sampler(temp=0.7, top_k=50, top_p=0.9, min_p=0.05).candidates(logits)
    assert sorted(ids.tolist()) == ref


def test_top_k_ids_equal_a_full_partition():
    """The prefiltered top-k (values within 8 of the maximum first) selects the same ids as a
    partition of the whole vector: peaked and flat logits, banned (-inf) tokens, k near n."""
    from ggq.runtime.sampler import _top_k_ids

    rs = np.random.RandomState(5)
    for case in range(60):
        n = int(rs.choice([50, 1000, 49152]))
        x = (rs.randn(n) * rs.choice([0.5, 3.0, 20.0])).astype(np.float32)
        if case % 3 == 0:
            x[rs.randint(0, n, n // 3)] = -np.inf
        k = int(min(n - 1, rs.choice([1, 5, 40, n // 2])))
        got = set(_top_k_ids(x, k).tolist())
        ref = np.sort(x)[::-1][:k]
        assert len(got) == k and np.array_equal(np.sort(x[list(got)])[::-1], ref)

