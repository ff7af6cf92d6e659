"""The compiled decode program (kernels_cpu/decode_loops.py, ktx.layers.program) against independent references.

Each op kind against numpy/torch written apart from it: the GEMV and MoE ops against float64 matmuls of
gguf-py's dequantized weights on activations quantized the documented way (test_kernels_cpu.q8_emulate), the
router's top-k against ktx.layers.router.route (torch, itself checked against transformers), latent attention
against ktx.layers.mla.mla_latent (torch). Then whole decode steps of a DeepSeek-shaped model against the float
reference path (dequantized weights, no int8 activations), within the error int8 activations cause there.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_cpu import deq, q8_emulate, rand_raw, silu

import ktx
from ktx.errors import KtxError
from ktx.kernels_cpu import MoEExperts, QuantLinear, WorkerPool
from ktx.layers.mla import mla_latent
from ktx.layers import program
from ktx.layers.program import DecodeProgram
from ktx.layers.router import route
from ktx.scheduler import select_top


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2) as p:
        yield p


_NO_CACHE = np.zeros((1, 1, 1), np.float32)  # one array: the spinning path restarts its workers for new caches


def _run(P, kv=None, pos=0, vc=None):
    P.run(_NO_CACHE if kv is None else kv, _NO_CACHE if vc is None else vc, pos)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_gemv_ops_match_dequantized_matmul(pool, data):
    qt = data.draw(st.sampled_from([QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q5_0]), "type")
    B = data.draw(st.sampled_from([1, 3]), "B")
    R = data.draw(st.sampled_from([64, 100, 256]), "rows")
    K = 256 * data.draw(st.integers(1, 2), "K blocks")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    raw = rand_raw(rng, qt, B, R, K)
    lin = QuantLinear(raw if B > 1 else raw[0], qt, R, K, pool, name="w")
    P = DecodeProgram(pool)
    x, q = P.f32(B * K), P.qbuf(B, K)
    y, acc = P.f32(B * R + 7), P.f32(B * R)
    P.quant(x, K, q, rows=B)
    P.gemv(lin, q, y, bstride=R + 3 if B > 1 else 0)  # a gap between the batches' outputs
    P.gemv(lin, q, acc, bstride=R, acc=True)
    P.finish()
    xv = rng.standard_normal(B * K).astype(np.float32)
    P.F[x:x + B * K] = xv
    before = rng.standard_normal(B * R).astype(np.float32)
    P.F[acc:acc + B * R] = before
    _run(P)
    for b in range(B):
        want = q8_emulate(xv[None, b * K:(b + 1) * K])[0] @ deq(raw[b], qt).T  # [R]
        tol = 1e-5 * (np.abs(deq(raw[b], qt)) @ np.abs(xv[b * K:(b + 1) * K])) + 1e-6
        o = y + b * (R + 3)
        assert np.all(np.abs(P.F[o:o + R] - want) <= tol), f"batch {b}"
        got = P.F[acc + b * R: acc + (b + 1) * R] - before[b * R:(b + 1) * R]
        assert np.all(np.abs(got - want) <= tol + 1e-5 * np.abs(before[b * R:(b + 1) * R])), f"accumulated batch {b}"


def _gemv_program(pool, rng, R=128, K=512):
    raw = rand_raw(rng, QT.Q4_K, 1, R, K)[0]
    lin = QuantLinear(raw, QT.Q4_K, R, K, pool, name="w")
    P = DecodeProgram(pool)
    x, q, y = P.f32(K), P.qbuf(1, K), P.f32(R)
    P.quant(x, K, q)
    P.gemv(lin, q, y)
    P.finish()
    W = deq(raw, QT.Q4_K)

    def step():  # a fresh x through the program, checked against the int8-activation reference
        xv = rng.standard_normal(K).astype(np.float32)
        P.F[x:x + K] = xv
        _run(P)
        want = q8_emulate(xv[None])[0] @ W.T
        assert np.all(np.abs(P.F[y:y + R] - want) <= 1e-5 * (np.abs(W) @ np.abs(xv)) + 1e-6)
    return P, step


def test_spinning_workers_leave_for_other_jobs_and_after_their_spin(pool, monkeypatch):
    """Between steps the program's workers spin (program.py). Another job on their pool must not wait for a
    spin to end (a minute here), a spin that ran out must leave the worker startable, and every step must be
    right either way."""
    from ktx.layers.program import CTL_WORDS

    rng = np.random.default_rng(3)
    monkeypatch.setenv("KTX_SPIN_US", "60000000")
    P, step = _gemv_program(pool, rng)
    assert "spin" in P.describe()
    for _ in range(3):
        step()
    assert not P._ctl[CTL_WORDS + 1] & 1, "the worker should be spinning between steps"
    seen = []
    job = pool.submit(lambda wid, n: seen.append(wid))
    assert job._done.wait(10), "a job queued behind a spinning worker"
    assert sorted(seen) == [0, 1]
    for _ in range(3):
        step()

    monkeypatch.setenv("KTX_SPIN_US", "200")
    P, step = _gemv_program(pool, rng)
    for _ in range(3):
        step()
        deadline = time.monotonic() + 10
        while not P._ctl[CTL_WORDS + 1] & 1:  # the spin runs out: the worker goes idle
            assert time.monotonic() < deadline, "the worker never stopped spinning"
            time.sleep(0.001)

    monkeypatch.setenv("KTX_SPIN_US", "soon")
    with pytest.raises(KtxError, match="KTX_SPIN_US"):
        _gemv_program(pool, rng)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_moe_op_matches_float_reference(pool, data):
    t_gu, t_d = data.draw(st.sampled_from([(QT.Q4_K, QT.Q6_K), (QT.Q8_0, QT.Q8_0), (QT.Q4_K, QT.Q4_K), (QT.Q4_K, QT.Q5_0)]),
                          "types")
    sizes = [256, 512] if t_d in (QT.Q6_K, QT.Q4_K) else [256, 320, 512]  # down's K = I: whole blocks of its type
    H, I, E = 256, data.draw(st.sampled_from(sizes), "I"), data.draw(st.integers(4, 8), "E")
    k = data.draw(st.integers(0, 3), "k")  # 0: a dense MLP given as the shared part
    Is = data.draw(st.sampled_from([0] + sizes) if k else st.sampled_from(sizes), "shared I")
    stacked = data.draw(st.booleans(), "shared gate+up stacked")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    g, u, d = rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_gu, E, I, H), rand_raw(rng, t_d, E, H, I)
    ex = MoEExperts((g, t_gu), (u, t_gu), (d, t_d), hidden=H, inter=I, pool=pool) if k else None
    # 1 item per thread: items of several row blocks (run as a gate run, then an up run), the last one short
    items = data.draw(st.sampled_from([program.ITEMS_PER_THREAD, 1]), "items per thread")
    P = DecodeProgram(pool)
    x, q, y = P.f32(H), P.qbuf(1, H), P.f32(H)
    ids, w = P.ids(max(k, 1)), P.f32(max(k, 1))
    shared = None
    if Is:
        sg, su, sd = rand_raw(rng, t_gu, 1, Is, H)[0], rand_raw(rng, t_gu, 1, Is, H)[0], rand_raw(rng, t_d, 1, H, Is)[0]
        down = QuantLinear(sd, t_d, H, Is, pool)
        if stacked:
            gu = QuantLinear(np.concatenate([sg, su]), t_gu, 2 * Is, H, pool)
            shared = (gu, 0, gu, Is, down, Is)
        else:
            shared = (QuantLinear(sg, t_gu, Is, H, pool), 0, QuantLinear(su, t_gu, Is, H, pool), 0, down, Is)
    P.quant(x, H, q)
    default, program.ITEMS_PER_THREAD = program.ITEMS_PER_THREAD, items
    try:
        P.moe(ex, k, ids, w, q, y, H, shared)
    finally:
        program.ITEMS_PER_THREAD = default
    P.finish()
    xv = rng.standard_normal(H).astype(np.float32)
    chosen = rng.choice(E, size=k, replace=False)
    wv = rng.random(k).astype(np.float32)
    P.F[x:x + H], P.IX[ids:ids + k], P.F[w:w + k] = xv, chosen, wv
    base = rng.standard_normal(H).astype(np.float32)
    P.F[y:y + H] = base
    _run(P)
    xq = q8_emulate(xv[None])[0]

    def mlp(Wg, Wu, Wd):
        return Wd @ q8_emulate((silu(Wg @ xq) * (Wu @ xq))[None])[0]

    want = sum((wv[j] * mlp(deq(g[e], t_gu), deq(u[e], t_gu), deq(d[e], t_d)) for j, e in enumerate(chosen)),
               np.zeros(H))
    if Is:
        want = want + mlp(deq(sg, t_gu), deq(su, t_gu), deq(sd, t_d))
    got = P.F[y:y + H] - base
    assert np.abs(got - want).max() <= 2e-3 * (np.abs(want).max() + 1e-30)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_topk_op_matches_router(pool, data):
    n_group = data.draw(st.sampled_from([1, 2, 4, 8]), "groups")
    E = n_group * data.draw(st.sampled_from([2, 4, 8]), "per group")
    k = data.draw(st.integers(1, min(8, E)), "k")
    sigmoid = data.draw(st.booleans(), "sigmoid")
    topk_group = data.draw(st.integers(1, n_group), "topk_group")
    if topk_group * (E // n_group) < k:  # the kept groups must hold k experts
        topk_group = n_group
    norm, scale = data.draw(st.booleans(), "norm"), data.draw(st.sampled_from([1.0, 2.5]), "scale")
    k_sel = data.draw(st.integers(1, k), "k_sel")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    logits = (rng.standard_normal(E) * 2).astype(np.float32)
    bias = (rng.standard_normal(E) * 0.1).astype(np.float32) if sigmoid and data.draw(st.booleans(), "bias") else None
    P = DecodeProgram(pool)
    lo, ids, w = P.f32(E), P.ids(k), P.f32(k)
    P.topk(lo, E, k, sigmoid, None if bias is None else torch.from_numpy(bias), n_group, topk_group, norm, k_sel, ids,
           w, scale)
    P.finish()
    P.F[lo:lo + E] = logits
    _run(P)
    rid, rw = route(torch.from_numpy(logits)[None], k, gating="sigmoid" if sigmoid else "softmax",
                    bias=None if bias is None else torch.from_numpy(bias), n_group=n_group, topk_group=topk_group,
                    norm=norm, scale=scale)
    want_ids, want_w = select_top(rid.numpy().astype(np.int32), rw.numpy(), k_sel)
    got = dict(zip(P.IX[ids:ids + k_sel].tolist(), P.F[w:w + k_sel].tolist()))
    want = dict(zip(want_ids[0].tolist(), want_w[0].tolist()))
    assert got.keys() == want.keys()
    for e in want:
        assert abs(got[e] - want[e]) <= 1e-5 * max(1.0, abs(want[e]))


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_mla_op_matches_torch(pool, data):
    n_h = data.draw(st.sampled_from([1, 3, 4, 16, 18]), "heads")  # blocks of 4 heads on the SIMD kernels, the rest not
    lat, rope = data.draw(st.sampled_from([48, 64, 192]), "lat"), data.draw(st.sampled_from([32, 24]), "rope")
    cap, L = 64, 2
    pos = data.draw(st.integers(0, cap - 1), "pos")
    layer = data.draw(st.integers(0, L - 1), "layer")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    kv = rng.standard_normal((L, cap, lat + rope)).astype(np.float32)
    q = rng.standard_normal((n_h, lat + rope)).astype(np.float32)
    P = DecodeProgram(pool)
    qo, o, sc = P.f32(n_h * (lat + rope)), P.f32(n_h * lat), P.f32(n_h * cap)
    P.mla(layer, qo, n_h, lat, o, sc, 0.07)
    P.finish()
    P.F[qo:qo + q.size] = q.ravel()
    _run(P, kv, pos)
    t = torch.from_numpy
    want = mla_latent(t(q[None, :, :lat]), t(q[None, :, lat:]), t(kv[layer, :pos + 1, :lat]), t(kv[layer, :pos + 1, lat:]),
                      0.07, pos)[0].numpy()
    np.testing.assert_allclose(P.F[o:o + n_h * lat].reshape(n_h, lat), want, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_gqa_op_matches_torch(pool, data):
    from ktx.layers.attention import gqa_attend

    n_kv = data.draw(st.sampled_from([1, 2, 3]), "kv heads")
    n_h = n_kv * data.draw(st.sampled_from([1, 2, 4, 5]), "group")
    d, dv = data.draw(st.sampled_from([(64, 64), (32, 48), (40, 40)]), "dims")
    cap, L = 48, 2
    pos, layer = data.draw(st.integers(0, cap - 1), "pos"), data.draw(st.integers(0, L - 1), "layer")
    window = data.draw(st.sampled_from([0, 1, 5, 64]), "window")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    K = rng.standard_normal((L, cap, n_kv, d)).astype(np.float32)
    V = rng.standard_normal((L, cap, n_kv, dv)).astype(np.float32)
    q = rng.standard_normal((n_h, d)).astype(np.float32)
    P = DecodeProgram(pool)
    qo, o, sc = P.f32(n_h * d), P.f32(n_h * dv), P.f32(n_h * cap)
    P.gqa(layer, qo, n_h, n_kv, d, dv, o, sc, window, d ** -0.5)
    P.finish()
    P.F[qo:qo + q.size] = q.ravel()
    _run(P, K.reshape(L, cap, -1), pos, V.reshape(L, cap, -1))
    t = torch.from_numpy
    want = gqa_attend(t(q[None]), t(K[layer, :pos + 1]), t(V[layer, :pos + 1]), d ** -0.5, pos, window)[0].numpy()
    np.testing.assert_allclose(P.F[o:o + n_h * dv].reshape(n_h, dv), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shards,path", [(None, "auto"), (2, "auto"), (None, "avx2")])
def test_decode_steps_match_float_reference(tmp_path, shards, path):
    """DeepSeek-V3-shaped model (MLA, dense lead layer, sigmoid group-limited routing, shared expert), with every
    expert split into two NUMA shards (two pools, forced on this one-node machine) or not, on the best kernels or
    the AVX2 ones: decode steps through the program vs the float reference model on the same tokens."""
    import dataclasses

    from ktx.synthetic import PRESETS, write_synthetic

    preset = dataclasses.replace(PRESETS["dsv3-tiny"], moe_ffn=512)  # two Q4_K blocks along I: one per shard
    kernels, path = path, write_synthetic(preset, tmp_path / "dsv3-tiny.gguf")
    ref = ktx.load(path, cache_len=64, experts="reference")
    m = ktx.load(path, cache_len=64, threads=2, numa_shards=shards, experts=kernels)
    if shards:
        assert len(m.net.program_for(m.engine.cache).pools) == shards
    assert m.net.program_for(m.engine.cache) is not None, m.net.program_note
    prompt, steps = torch.arange(12) + 5, [3, 9, 11, 2, 17, 5, 8, 30, 41, 7]
    errs, same = [], []
    for mm in (ref, m):
        mm.engine.reset()
        mm.net.forward(prompt, mm.engine.cache)
    for t in steps:
        a = ref.net.forward(torch.tensor([t]), ref.engine.cache).numpy()[0]
        # each on its own cache: the quantized model's prompt went through its per-op prefill, its steps through the program
        b = m.net.forward(torch.tensor([t]), m.engine.cache).numpy()[0]
        errs.append(np.abs(a - b).max() / np.abs(a).max())
        same.append(a.argmax() == b.argmax())
    # int8 activations: 1.8-3% of the largest logit here, as on the per-op quantized path; a wrong op gives O(1)
    # at every step. One step may differ more: its rounding may flip a near-tied expert choice.
    assert np.sum(np.array(errs) >= 0.06) <= 1 and np.mean(same) >= 0.7, (errs, same)


@pytest.mark.parametrize("spin_us", ["0", "60000000"])
def test_a_worker_held_back_holds_up_nobody(tmp_path, monkeypatch, spin_us):
    """Barriers count work, not threads (decode_loops.run_program): while the program's worker is held back (here
    by a job that blocks its thread; in life, by the OS giving its core to another process) the caller decodes
    alone, and the worker that turns up late, inside or after tokens that are done, changes nothing. Each step's
    logits against the same steps decoded with both threads free (checked against the float path above). Not
    bit for bit: one thread's sums add up in another order, which can move an activation across an int8 rounding
    step (~1e-3 of the largest logit) or flip a near-tied expert choice (1.1e-2 at one step of this model, seen
    with the old thread-counting barriers too, between two plain 2-thread decodes under load); a wrong op shows
    as far more (editing the op table: the last layer's experts skipped 0.5, a GEMV added twice 0.34). Without a
    spin, a held-back worker gets a queued job per step; with one, a single job (post_tokens clears the idle bit
    when it starts it; one more may still wait from before the hold)."""
    import threading

    from ktx.synthetic import PRESETS, write_synthetic

    monkeypatch.setenv("KTX_SPIN_US", spin_us)
    path = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "dsv3-tiny.gguf")
    m = ktx.load(path, cache_len=64, threads=2)
    prog = m.net.program_for(m.engine.cache)
    assert prog is not None and prog.n_threads == 2, m.net.program_note
    pool = prog.pools[0]
    prompt, steps = torch.arange(12) + 5, [3, 9, 11, 2, 17, 5, 8, 30, 41, 7, 12, 13]

    def decode(tokens):
        return [m.net.forward(torch.tensor([t]), m.engine.cache).numpy()[0] for t in tokens]

    m.engine.reset()
    m.net.forward(prompt, m.engine.cache)
    want = decode(steps)

    m.engine.reset()
    m.net.forward(prompt, m.engine.cache)
    got = decode(steps[:2])
    release = threading.Event()
    pool.submit(lambda wid, n: release.wait(), workers=1)
    held: list = []
    runner = threading.Thread(target=lambda: held.extend(decode(steps[2:9])))  # 7 steps, more than the ring of 4
    runner.start()
    runner.join(60)
    queued = pool._queues[0].qsize()
    release.set()
    runner.join()
    assert len(held) == 7, "decode waited for the held-back worker"
    assert queued >= 7 if spin_us == "0" else queued <= 2, queued
    got += held + decode(steps[9:])
    for i, (a, b) in enumerate(zip(want, got)):
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max(), f"step {i}"


def test_counters_are_not_reused_under_a_worker_still_inside_their_token(pool, monkeypatch):
    """The spinning path's ring of counter sets (decode_loops.RING): token n reuses token n - RING's set, so it must
    wait while a worker says it is inside token n - RING (a worker the OS held back there), and go on once it
    leaves. The pool's worker is kept busy, and its enter word is set here as if it were inside token 1."""
    import threading

    from ktx.kernels_cpu.decode_loops import RING
    from ktx.layers.program import CTL_WORDS

    monkeypatch.setenv("KTX_SPIN_US", "60000000")
    rng = np.random.default_rng(5)
    P, step = _gemv_program(pool, rng)
    release = threading.Event()
    pool.submit(lambda wid, n: release.wait(), workers=1)
    enter = CTL_WORDS + P.n_threads + 1  # worker 1's "inside token" word
    P._ctl[enter] = 1
    try:
        for _ in range(RING):  # tokens 1 .. RING: each on its own counter set
            step()
        blocked = threading.Thread(target=step)  # token RING + 1 reuses token 1's set
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive(), "token RING + 1 zeroed the counters of a token a worker is still inside"
        P._ctl[enter] = 0
        blocked.join(10)
        assert not blocked.is_alive()
    finally:
        P._ctl[enter] = 0
        release.set()
    for _ in range(3):
        step()


GQA_SIZES = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
GQA_CASES = {  # kernel-sized tiny models (the CPU expert kernels take multiples of 64, K-quant rows of 256)
    "qwen3moe": ("make_qwen3_moe", dict(moe_intermediate_size=256)),
    "mixtral": ("make_mixtral", {}),
    "qwen2moe": ("make_qwen2_moe", dict(moe_intermediate_size=256, shared_expert_intermediate_size=256)),
    "gemma3": ("make_gemma3", dict(query_pre_attn_scalar=64)),
    "llama": ("make_llama", {}),
}


@pytest.mark.parametrize("name", list(GQA_CASES))
def test_gqa_decode_steps_match_float_reference(tmp_path, name):
    """Each GQA architecture (q/k norms, biases, NeoX or adjacent-pair rope, gemma3's sliding window, post-norms
    and GELU, qwen2moe's gated shared expert) from a Q8_0 file: decode steps through the program against the
    float reference path on the same file's weights, past gemma3's window of 8."""
    import tiny_models
    from ktx.convert import convert_hf_to_gguf

    make, sizes = GQA_CASES[name]
    hf_dir, _ = getattr(tiny_models, make)(tmp_path / "hf", seed=3, **{**GQA_SIZES, **sizes})
    path = convert_hf_to_gguf(hf_dir, tmp_path / "model-q8_0.gguf", "q8_0")
    ref = ktx.load(path, cache_len=64, experts="reference")
    m = ktx.load(path, cache_len=64, threads=2)
    assert m.net.program_for(m.engine.cache) is not None, m.net.program_note
    errs, same = [], []
    for mm in (ref, m):
        mm.engine.reset()
        mm.net.forward(torch.arange(10) + 20, mm.engine.cache)
    for t in [3, 9, 11, 2, 17, 5, 8, 30, 41, 7, 12, 13]:
        a = ref.net.forward(torch.tensor([t]), ref.engine.cache).numpy()[0]
        b = m.net.forward(torch.tensor([t]), m.engine.cache).numpy()[0]
        errs.append(np.abs(a - b).max() / np.abs(a).max())
        same.append(a.argmax() == b.argmax())
    # int8 activations: 0.5-1.1% of the largest logit here (measured); a wrong op gives several times that (one
    # step may flip a near-tied expert choice)
    assert np.sum(np.array(errs) >= 0.03) <= 1 and np.mean(same) >= 0.7, (errs, same)


def test_models_the_program_cannot_take_decode_per_op_and_say_why(tmp_path, capsys):
    """Float dense weights: the load names the per-op path and the reason."""
    from ktx.synthetic import PRESETS, write_synthetic

    path = write_synthetic(PRESETS["dsv3-tiny"], tmp_path / "dsv3-tiny.gguf")
    for kw, why in ((dict(experts="reference"), "dense weights on the float path"),):
        m = ktx.load(path, cache_len=32, **kw)
        assert why in capsys.readouterr().err
        assert m.net.program_for(m.engine.cache) is None and why in m.net.program_note
        assert len(m.generate("hello", max_new_tokens=3)) > 0  # and it still decodes
