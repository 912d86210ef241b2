"""sample.py: generation with a KV cache per (loop, layer), adaptive exit, and --show_depth."""

import math
import os

import pytest
import torch

import sample
from conftest import run
from model import LoopedGPT, LoopedGPTConfig, exit_score, exits
from sample import KVCache, depth_colours, exit_step, generate, parse_depth, render_depth
from standin import standin


def tiny(**kw):
    args = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, n_loops=3)
    args.update(kw)
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig(**args)).eval()


@pytest.fixture
def empty_is_nan():
    """torch.empty gives NaN (as under deterministic algorithms): a cache entry read before
    anything was written there shows in the logits."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def one_thread():
    """Tiny tensors, thousands of ops: one thread is faster, and is not slowed 10-100x when other
    processes hold the cores (a team of OpenMP threads waits for its slowest one at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_generate_crops_context_and_respects_depth():
    model = tiny()
    out, loops = generate(model, torch.zeros(1, 3, dtype=torch.long), 20, temperature=0.0,
                          n_loops=2)
    assert out.shape == (1, 23) and (loops == 2).all()  # 23 > block_size 16: cropped, no error
    # greedy next token at depth 2 is the argmax of the depth-2 readout
    with torch.no_grad():
        logits, _, _ = model(out[:, :10], n_loops=2)
    assert out[0, 10] == logits[0, -1].argmax()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "dense"])
def test_kv_cache_rule_for_early_exit(ragged):
    """A token that exits at loop e gets loop e's keys/values at the deeper loops of the cache,
    written in place in the buffers made before the first token, when a deeper loop next runs
    (until then nothing is written there)."""
    model = tiny(n_loops=3).double()
    idx = torch.randint(37, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model, 2, 3)
    buffers = [c.kv for k in (1, 2, 3) for c in cache.loops[k]]
    with torch.no_grad():
        exit_step(model, idx, 0, 3, cache, None, None)  # fill at full depth
        for k in (2, 3):
            for c in cache.loops[k]:
                c.kv[:, 6] = float("nan")
        logits, used = exit_step(model, idx[:, -1:], 6, 3, cache, "entropy", 1e9,
                                 ragged)  # all exit at loop 1
        assert all(c.kv[:, 6].isnan().all() for k in (2, 3) for c in cache.loops[k])
        cache.settle(2)  # what the next step does before its loop 2, then its loop 3
        cache.settle(3)
    assert used.tolist() == [1, 1]
    assert [c.kv for k in (1, 2, 3) for c in cache.loops[k]] == buffers  # the same tensors
    for k in (2, 3):
        for cache_k, exit_cache in zip(cache.loops[k], cache.loops[1]):
            kv, exit_kv = cache_k.kv, exit_cache.kv  # [B, block_size, 2, H, D]
            assert torch.equal(kv[:, 6], exit_kv[:, 6])
            assert not torch.equal(kv[:, :6], exit_kv[:, :6])  # the prompt ran every loop
    with torch.no_grad():
        full = model.loop_states(idx)  # the fill's last logits are a plain forward's
        uncached = exit_step(model, idx, 0, 3, None, None, None)[0]
    assert torch.allclose(model.readout(full[-1][:, -1], 3), uncached)


@pytest.mark.usefixtures("one_thread")
def test_attention_with_a_cache_matches_without():
    """CausalSelfAttention(x, kv_cache) and Layer(x, kv_cache), on a fill from position 0, equal
    the plain forward (Layer.decode's weights prepared, or made on the spot)."""
    model = tiny().double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    layer = model.block[0]
    with torch.no_grad():
        for weights in (True, False):
            cache = KVCache(model, 2, 1)
            cache.step(0, 7)
            loop_cache = cache.loops[1][0]
            if not weights:
                del loop_cache.weights
            assert torch.allclose(layer.attn(x, loop_cache), layer.attn(x), atol=1e-12)
            assert torch.allclose(layer(x, loop_cache), layer(x), atol=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_cached_decode_under_autocast_keeps_the_residual_in_float32():
    """Under autocast (a GPU's bf16; the CPU's here) the cache holds the matmuls' dtype and the
    residual stream stays float32, as in the plain forward: the logits agree to bf16's
    precision."""
    model = tiny()
    idx = torch.randint(37, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(model, 2, 3)
        exit_step(model, idx[:, :-1], 0, 3, cache, None, None)
        cache.step(8, 1)
        h = model.embed(idx[:, -1:], 8)
        for k in (1, 2, 3):
            h = model.loop(h, k, cache.loops[k])
        want = model(idx)[0][:, -1].float()
        got = model.readout(h[:, -1], 3).float()
    assert h.dtype == torch.float32 and cache.loops[1][0].kv.dtype == torch.bfloat16
    assert (got - want).abs().max() < 0.05 * want.abs().max()


# ---- the KV cache against a recompute, at the logits ------------------------------------------

def lively(**kw):
    """A random tiny model whose logits depend on the tokens and their positions (std 0.5, not
    0.02: a barely trained or freshly initialised model predicts nearly the same thing
    everywhere, so a cache that forgets its context or positions would still match)."""
    model = tiny(**{"n_loops": 4, **kw}).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def recompute_step(model, idx, exit_at, K, policy, threshold, tested=None):
    """The logits of idx's last position and its exit loop, from scratch, written out here
    rather than taken from sample.py. The cache rule, recomputed: position p of row b exited at
    loop exit_at[b, p], so at every deeper loop its keys/values are that loop's. Only the loops
    `tested` (default all) may be exited at before K."""
    B, T = idx.shape
    exit_at = torch.cat([exit_at, torch.full((B, 1), K)], dim=1)  # the last: decided below
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = model.embed(idx)
    above = None  # each layer's keys/values at the loop above
    decided = torch.zeros(B, dtype=torch.bool)
    chosen = None
    for k in range(1, K + 1):
        if k > 1 and model.loop_rmsnorm is not None:
            h = model.loop_rmsnorm(h)
        here = []
        for i, layer in enumerate(model.block):
            attn = layer.attn
            C, H = h.size(-1), attn.n_head
            q, key, v = (t.view(B, T, H, C // H).transpose(1, 2)
                         for t in attn.c_attn(layer.ln_1(h)).split(C, dim=2))
            if above is not None:
                frozen = (exit_at < k)[:, None, :, None]
                key = torch.where(frozen, above[i][0], key)
                v = torch.where(frozen, above[i][1], v)
            here.append((key, v))
            att = (q @ key.transpose(-2, -1)) / math.sqrt(C // H)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            h = h + attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
            h = h + layer.mlp(layer.ln_2(h))
        above = here
        logits = model.readout(h[:, -1], k)
        chosen = torch.empty_like(logits) if chosen is None else chosen
        may = tested is None or k in tested
        newly = ~decided & ((may & exits(exit_score(logits, policy), policy, threshold)) | (k == K))
        chosen[newly] = logits[newly]
        exit_at[newly, -1] = k
        decided |= newly
    return chosen, exit_at[:, -1]


def prompt_exits(model, prompt, K, policy, threshold, tested=None, first=0):
    """{position: exit loops [B]} of the prompt's tokens but its last, each decided as if the
    prompt had been fed one token a step (its positions from `first`)."""
    B = prompt.size(0)
    exit_of = {}
    for p in range(prompt.size(1) - 1):
        before = [exit_of[first + i] for i in range(p)]
        before = torch.stack(before, 1) if before else torch.zeros(B, 0, dtype=torch.long)
        exit_of[first + p] = recompute_step(model, prompt[:, :p + 1], before, K, policy,
                                            threshold, tested)[1]
    return exit_of


def recomputed(model, out, P, K, policy, threshold, use_cache, tested=None):
    """Every step's logits [B, new, V] and exit loops [B, new] for the tokens `out` (prompt of
    P tokens), each recomputed from its whole window. The windows as generate documents them:
    with a cache the prompt's last block_size tokens, grown one token a step and, once full,
    refilled from the last block_size // 2 tokens (each keeps its exit loop: its deeper keys and
    values are that loop's, as in its own step; a prompt token's is decided as if it had been
    fed alone, one token a step); without one the last block_size tokens, all at full depth."""
    bs = model.config.block_size
    B, L = out.shape
    start = max(0, P - bs)
    exit_of = {}  # position -> exit loops of the tokens decided
    if use_cache and policy is not None:
        exit_of = prompt_exits(model, out[:, start:P], K, policy, threshold, tested, start)

    def earlier(start, end):
        if start == end:
            return torch.zeros(B, 0, dtype=torch.long)
        return torch.stack([exit_of.get(p, torch.full((B,), K)) for p in range(start, end)], 1)
    logits, loops = [], []
    for end in range(P, L):  # the window out[:, start:end] predicts token `end`
        if not use_cache:
            start = max(0, end - bs)
        elif end - start > bs:
            start = end - bs // 2
        window = out[:, start:end]
        if policy is None:
            step = model(window, n_loops=K)[0][:, -1]
            used = torch.full((B,), K)
        else:
            step, used = recompute_step(model, window, earlier(start, end - 1), K, policy,
                                        threshold, tested)
        if use_cache:
            exit_of[end - 1] = used
        logits.append(step)
        loops.append(used)
    return torch.stack(logits, 1), torch.stack(loops, 1)


def assert_recomputed(model, out, loops, logits, P, K, policy, threshold, use_cache,
                      tested=None):
    """generate's logits and exit loops are the recompute's (float64: to 1e-10)."""
    with torch.no_grad():
        want, want_loops = recomputed(model, out, P, K, policy, threshold, use_cache, tested)
    assert torch.allclose(logits, want, rtol=0, atol=1e-10)
    assert torch.equal(loops, want_loops)


def generated(model, prompt, n, monkeypatch, **kw):
    """generate's tokens, exit loops and the logits it sampled each token from."""
    seen = []
    real = sample.sample_next

    def recording(logits, temperature, top_k):
        seen.append(logits.clone())
        return real(logits, temperature, top_k)
    monkeypatch.setattr(sample, "sample_next", recording)
    torch.manual_seed(0)  # temperature 1: varied tokens, so the context matters
    out, loops = generate(model, prompt, n, temperature=1.0, **kw)
    return out, loops, torch.stack(seen, 1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("n_loops", [2, 4])
def test_kv_cache_fixed_depth_matches_recompute_at_the_logits(use_cache, n_loops, monkeypatch):
    model = lively()
    prompt = torch.randint(37, (3, 5), generator=torch.Generator().manual_seed(1))
    out, loops, logits = generated(model, prompt, 30, monkeypatch, n_loops=n_loops,
                                   use_cache=use_cache)  # 35 > 16 = block_size: two refills
    assert logits.std() > 1.0  # the logits differ by token and position
    assert_recomputed(model, out, loops, logits, 5, n_loops, None, None, use_cache)


@pytest.mark.usefixtures("one_thread", "empty_is_nan")
@pytest.mark.parametrize("model_kw", [{}, {"loop_norm": True, "bias": True}],
                         ids=["plain", "loop_norm_bias"])
@pytest.mark.parametrize("use_cache,ragged", [(True, True), (True, False), (False, False)],
                         ids=["ragged", "dense", "no_cache"])
def test_kv_cache_adaptive_exit_matches_recompute_at_the_logits(use_cache, ragged, model_kw,
                                                                monkeypatch):
    """Rows exit at different loops, token by token; with a cache each exited token's deeper
    keys/values are its exit loop's (exit_step's rule), across two refills of the cache. A
    ragged batch runs the deeper loops on the rows still running only; a dense one on all."""
    model = lively(**model_kw)
    K = model.config.n_loops
    prompt = torch.randint(37, (3, 5), generator=torch.Generator().manual_seed(1))
    out, loops, logits = generated(model, prompt, 30, monkeypatch, exit_policy="max_prob",
                                   exit_threshold=0.35, use_cache=use_cache, ragged=ragged)
    with torch.no_grad():
        want, want_loops = recomputed(model, out, 5, K, "max_prob", 0.35, use_cache)
    assert set(loops.unique().tolist()) == set(range(1, K + 1))  # every depth is used
    assert (loops != loops[0]).any(dim=0).sum() >= 10  # rows exit at different loops
    assert (loops.amax(dim=0) < K).sum() >= 3  # and some steps skip the deeper loops for all
    assert torch.allclose(logits, want, rtol=0, atol=1e-10)
    assert torch.equal(loops, want_loops)


@pytest.mark.usefixtures("one_thread", "empty_is_nan")
@pytest.mark.parametrize("use_cache,ragged", [(True, True), (True, False), (False, False)],
                         ids=["ragged", "dense", "no_cache"])
def test_exit_tests_at_some_loops_only_match_recompute(use_cache, ragged, monkeypatch):
    """exit_at=[1, 3] of K=4: a token exits at loop 1, 3 or 4, never at loop 2, even where its
    loop-2 readout passes; the same logits and exit loops as the recompute that tests only those
    loops, across two refills."""
    model = lively()
    prompt = torch.randint(37, (3, 5), generator=torch.Generator().manual_seed(1))
    out, loops, logits = generated(model, prompt, 30, monkeypatch, exit_policy="max_prob",
                                   exit_threshold=0.35, use_cache=use_cache, ragged=ragged,
                                   exit_at=[1, 3])
    with torch.no_grad():
        want, want_loops = recomputed(model, out, 5, 4, "max_prob", 0.35, use_cache, {1, 3})
        every, _ = recomputed(model, out, 5, 4, "max_prob", 0.35, use_cache)
    assert set(loops.unique().tolist()) == {1, 3, 4}
    assert not torch.allclose(every, want, rtol=0, atol=1e-10)  # loop 2 would have exited some
    assert torch.allclose(logits, want, rtol=0, atol=1e-10)
    assert torch.equal(loops, want_loops)


@pytest.mark.usefixtures("one_thread", "empty_is_nan")
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "dense"])
def test_refill_runs_each_token_its_own_loops(ragged, monkeypatch):
    """A refill of the cache runs each of its tokens through the loops it ran in its own step
    and no further (the last one, new, until it exits), counted here in positions per loop:
    exactly the sum of their exit loops. One row, whose refills' last tokens exit early as
    well as late; the same logits and exit loops as the recompute."""
    model = lively()
    runs = []  # (is a fill, positions) of every loop run
    real_loop, real_step = model.loop, sample.exit_step

    def loop(h, k, kv_caches=None):
        runs[-1][1].append(h.size(1))
        return real_loop(h, k, kv_caches)

    def step(model, x, *args, **kw):
        runs.append((x.size(1) > 1, []))
        return real_step(model, x, *args, **kw)
    monkeypatch.setattr(model, "loop", loop)
    monkeypatch.setattr(sample, "exit_step", step)
    real_settle = sample.KVCache.settle

    def settle(cache, k):  # each position noted once since the loop last ran, in the window,
        noted = [p for p, _ in cache.pending[k]]  # and copied once
        assert len(set(noted)) == len(noted) and all(p < cache.end for p in noted)
        real_settle(cache, k)
        assert not cache.pending[k]
    monkeypatch.setattr(sample.KVCache, "settle", settle)
    prompt = torch.randint(37, (1, 5), generator=torch.Generator().manual_seed(2))
    out, loops, logits = generated(model, prompt, 40, monkeypatch, exit_policy="max_prob",
                                   exit_threshold=0.35, use_cache=True, ragged=ragged)
    assert_recomputed(model, out, loops, logits, 5, 4, "max_prob", 0.35, True)
    refills = [i for i, (fill, _) in enumerate(runs) if fill and i > 0]
    assert refills == [12, 21, 30, 39]  # 45 tokens, 16 positions: refills of 8 every 9 steps
    with torch.no_grad():  # the prompt's first 4 tokens, as if fed one a step
        first = [e.item() for e in prompt_exits(model, prompt, 4, "max_prob", 0.35).values()]
    assert min(first) < 4  # a prompt token that exits early
    assert sum(runs[0][1]) == sum(first) + loops[0, 0].item()  # the prompt's fill
    exit_of = first + loops[0].tolist()  # position p's exit loop
    lasts = []
    for i in refills:  # step i's window: positions i - 4 .. i + 4, the last one decided
        positions = sum(runs[i][1])
        assert positions == sum(exit_of[i - 3:i + 5]) < 8 * 4
        lasts.append(exit_of[i + 4])
    assert min(lasts) < 4 and max(lasts) == 4  # a last token that exits early, and one not


@pytest.mark.usefixtures("one_thread", "empty_is_nan")
@pytest.mark.parametrize("positions", [2, 0], ids=["slices_of_2", "slices_of_1"])
def test_prompt_runs_each_token_its_own_loops(positions, monkeypatch):
    """A prompt longer than the cache: its last block_size tokens fill it, each running the
    loops it would run fed alone, one token a step (its own readout's exit test, read out in
    slices of 2 positions of the 3 rows, or of 1 where even one position's logits are more than
    the limit), and a refill's window holds prompt tokens that keep those exit loops. The same
    logits and exit loops as the recompute, and the fill runs exactly the sum of its positions'
    exit loops."""
    model = lively()
    runs = []  # positions of every loop run, per step
    real_loop, real_step = model.loop, sample.exit_step

    def loop(h, k, kv_caches=None):
        runs[-1].append(h.size(1))
        return real_loop(h, k, kv_caches)

    def step(model, x, *args, **kw):
        runs.append([])
        return real_step(model, x, *args, **kw)
    monkeypatch.setattr(model, "loop", loop)
    monkeypatch.setattr(sample, "exit_step", step)
    monkeypatch.setattr(sample, "READOUT_FLOATS", positions * 3 * 37 or 37)
    prompt = torch.randint(37, (3, 20), generator=torch.Generator().manual_seed(3))
    out, loops, logits = generated(model, prompt, 12, monkeypatch, exit_policy="max_prob",
                                   exit_threshold=0.35, use_cache=True)
    assert_recomputed(model, out, loops, logits, 20, 4, "max_prob", 0.35, True)
    with torch.no_grad():
        first = prompt_exits(model, prompt[:, 4:], 4, "max_prob", 0.35, first=4)
    first = torch.stack(list(first.values()), 1)  # positions 4..18
    assert 1 in first and 4 in first  # prompt tokens that exit early, and some that run all
    # the fill runs each position while some row has not exited there
    assert sum(runs[0]) == first.amax(0).sum() + loops[:, 0].max()
    # the next step refills the cache from positions 13..20: six prompt tokens that keep their
    # exit loops, the prompt's last (the first step's exit) and the new token
    assert sum(runs[1]) == first[:, 9:].amax(0).sum() + loops[:, :2].amax(0).sum() < 8 * 4


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ragged", [None, True])
def test_one_token_prompt_without_a_cache(ragged, monkeypatch):
    """Adaptive exit with no cache from a one-token prompt (sample.py's default start): the
    first step is one token with nothing cached, which a ragged batch (the CPU's default) must
    not take for a cached step."""
    model = lively()
    prompt = torch.randint(37, (2, 1), generator=torch.Generator().manual_seed(4))
    out, loops, logits = generated(model, prompt, 6, monkeypatch, exit_policy="max_prob",
                                   exit_threshold=0.35, use_cache=False, ragged=ragged)
    assert_recomputed(model, out, loops, logits, 1, 4, "max_prob", 0.35, False)


def test_no_exit_test_is_fixed_depth(monkeypatch):
    """exit_at=[] (no loop pays for its test, eval.py --run=speed's "none"): generation takes
    the fixed-depth path, no readout before loop K and nothing of adaptive exit, and gives the
    fixed-depth tokens with every token at loop K."""
    model = lively()
    prompt = torch.randint(37, (3, 5), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    want, _ = generate(model, prompt, 12)
    for name in ("ragged_exit_step", "exit_loop"):
        monkeypatch.setattr(sample, name, None)  # called: a TypeError
    torch.manual_seed(0)
    out, loops = generate(model, prompt, 12, exit_policy="max_prob", exit_threshold=0.35,
                          exit_at=[])
    assert torch.equal(out, want) and (loops == 4).all()


INDUCTOR = pytest.mark.skipif(not os.environ.get("NANOLOOP_INDUCTOR_TEST"),
                              reason="NANOLOOP_INDUCTOR_TEST=1 builds the C++ graphs (40 s)")


@pytest.mark.usefixtures("one_thread", "empty_is_nan")
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
@pytest.mark.parametrize("policy", [None, "max_prob"], ids=["fixed", "adaptive"])
def test_compiled_generation_matches_recompute_at_the_logits(policy, backend, monkeypatch):
    """compile=True: each loop a compiled graph over the whole, masked KV buffer, across two
    refills; the same logits as a recompute, in float64. aot_eager traces the graphs Inductor
    would take (Dynamo, AOT autograd) without building C++; Inductor has its own (opt-in) run:
    it once read stale keys where aot_eager did not (through views of a buffer its graph wrote,
    the buffers then slices of one tensor)."""
    monkeypatch.setattr(sample, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    model = lively(n_loops=2, n_layer=1)  # two graphs per loop function: seconds to trace
    prompt = torch.randint(37, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = {"exit_policy": policy, "exit_threshold": 0.25} if policy else {}
    out, loops, logits = generated(model, prompt, 20, monkeypatch, compile=True, **kw)
    assert_recomputed(model, out, loops, logits, 5, 2, policy, 0.25, True)
    if policy:
        assert (loops.amax(dim=0) == 1).sum() >= 3  # whole steps skipped loop 2
        assert (loops[:, loops.amax(dim=0) == 2] == 1).sum() >= 3  # rows kept loop 1's K/V


# ---- generation on an accelerator: the stand-in (tests/standin.py) --------------------------

@pytest.mark.parametrize("kind", ["cuda", "mps"])
@pytest.mark.parametrize("policy,everyone", [(None, None), ("max_prob", False),
                                             ("max_prob", True)],
                         ids=["fixed", "adaptive", "adaptive_all_exit"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_on_device_standin(kind, policy, everyone, use_cache, monkeypatch):
    """Generation's tensors (prompt, caches, exits, sampled tokens) stay on the model's device
    and nothing reads a value back, but for the checks adaptive exit needs: whether every row
    (and whether any) has exited, a fill's decisions at its positions, and at a refill the exit
    loops of the window's tokens, which the test answers (no values on the stand-in)."""
    asked, windows = [], []

    def who_exited(done):
        assert policy is not None, "fixed depth reads nothing back from the device"
        asked.append(done.device.type)
        return everyone, True  # some row has: the exited rows' cache copies run too

    def exit_decisions(passed):  # a fill's, at each of its positions still undecided
        asked.append(passed.device.type)
        return [[everyone] * passed.size(1)] * passed.size(0)

    def exit_loops(loops_used, prompt_exits, P, start, end):
        windows.append({t.device.type for t in loops_used})
        return [[3] * (end - start)] * 2
    monkeypatch.setattr(sample, "who_exited", who_exited)
    monkeypatch.setattr(sample, "exit_decisions", exit_decisions)
    monkeypatch.setattr(sample, "exit_loops", exit_loops)
    prompt = torch.zeros(2, 3, dtype=torch.long)  # on the CPU: generate moves it
    with standin(kind) as device:
        model = tiny(n_loops=3).to(device)
        out, loops = generate(model, prompt, 20, temperature=0.8, top_k=5,
                              exit_policy=policy, exit_threshold=0.5, use_cache=use_cache)
    assert out.device.type == loops.device.type == device  # 23 > block_size 16: a refill
    assert out.shape == (2, 23) and loops.shape == (2, 20) and loops.dtype == torch.long
    if policy:
        assert asked and set(asked) == {device}
    # one refill (a cache of 16 positions), where adaptive exit reads its window's exit loops
    assert windows == ([{device}] if policy and use_cache else [])


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_ragged_generation_on_device_standin(kind, monkeypatch):
    """A ragged batch on a device: the rows that exit leave it, and every tensor stays on the
    device but for the exit decisions read back each loop (answered here: row 0 exits at loop
    1, row 2 at loop 2, the others run all 3 loops)."""
    decisions = {1: [True, False, False, False], 2: [False, True, False]}
    asked = []

    def exit_decisions(passed):
        if passed.dim() == 2:  # a fill's, [B, positions still undecided]: none exits there
            asked.append(("fill", passed.device.type))
            return [[False] * passed.size(1)] * passed.size(0)
        asked.append(passed.device.type)
        return decisions[4 - len(passed) + 1]

    def exit_loops(loops_used, prompt_exits, P, start, end):
        asked.append(("window", {t.device.type for t in loops_used}))
        return [[3] * (end - start)] * 4
    monkeypatch.setattr(sample, "exit_decisions", exit_decisions)
    monkeypatch.setattr(sample, "exit_loops", exit_loops)
    prompt = torch.zeros(4, 3, dtype=torch.long)
    with standin(kind) as device:
        model = tiny(n_loops=3).to(device)
        out, loops = generate(model, prompt, 15, exit_policy="max_prob", exit_threshold=0.5,
                              ragged=True)
    assert out.device.type == loops.device.type == device
    assert out.shape == (4, 18) and loops.shape == (4, 15)
    # 13 one-token steps decide at loops 1 and 2, every row's decisions; the fill and the
    # refill (its last token reaches position 16 = block_size, the last step) read theirs at
    # both loops too, the refill after reading its window's exit loops
    fill = [("fill", device)] * 2
    assert asked == fill + [device] * 13 * 2 + [("window", {device})] + fill


@pytest.mark.parametrize("colour", [True, False])
def test_depth_rendering_parses_back(colour):
    pieces = ["R", "O", "[", "]", "\n", "ab", "[x", " "]
    loops = [1, 4, 2, 3, 4, 1, 2, 3]
    text = render_depth(pieces, loops, 4, colour)
    if colour:
        assert "\x1b[" in text and "[1]" not in text
    assert parse_depth(text, 4, colour) == (pieces, loops)
    assert len(set(depth_colours(6))) == 6  # one distinct shade per loop


def test_sample_show_depth_marks_every_token(tiny_runs):
    out = str(tiny_runs["rmsnorm"])
    p = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=25",
            "--num_samples=1", "--exit_policy=logit_margin", "--exit_threshold=0.05",
            "--show_depth=True", "--temperature=0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n", 1)
    assert "[k], the loop it exited at" in lines[0]  # not a terminal: plain markers
    body = lines[1].split("---------------")[0]
    assert body.startswith("ROMEO:")
    pieces, loops = parse_depth(body[len("ROMEO:"):].rstrip("\n"), 3, False)
    assert len(loops) == 25 and all(1 <= k <= 3 for k in loops)
    mean = float(p.stdout.split("mean loops per generated token: ")[1].split()[0])
    assert abs(mean - sum(loops) / 25) < 0.006  # the markers are the exits that were counted
    # the same run, fixed depth: every token at loop 2
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=10", "--num_samples=1",
            "--n_loops=2", "--show_depth=True")
    body = p.stdout.split("\n", 1)[1].split("---------------")[0]
    assert body.count("[2]") >= 10 and "[1]" not in body and "[3]" not in body


def test_sample_fixed_and_adaptive_depth(tiny_runs):
    out = str(tiny_runs["rmsnorm"])
    p = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=40",
            "--num_samples=1", "--n_loops=2")
    assert p.returncode == 0, p.stderr
    text = p.stdout.split("---------------")[0].rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40
    assert "mean loops per generated token: 2.00 of 2" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=30", "--num_samples=1",
            "--exit_policy=entropy", "--exit_threshold=100")  # every token exits at loop 1
    assert p.returncode == 0 and "mean loops per generated token: 1.00 of 3" in p.stdout


def test_sample_bad_inputs(tiny_runs, tmp_path):
    p = run("sample.py", f"--out_dir={tiny_runs['rmsnorm']}", "--start=\u2603 snowman")
    assert p.returncode != 0 and "cannot be encoded" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={tmp_path}")
    assert p.returncode != 0 and "no checkpoint" in p.stderr
