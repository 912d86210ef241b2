"""The looped model and the exact math of the blind spot. Tiny configs, CPU, float64 where exact."""

import pytest
import torch
import torch.nn.functional as F

from model import READOUTS, SUPERVISIONS, LoopedGPT, LoopedGPTConfig


def tiny(**kw):
    args = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, n_loops=3)
    args.update(kw)
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig(**args))


def batch(B=2, T=12, V=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def test_lemma1_gradient_is_orthogonal_to_state_for_rmsnorm_readout():
    for readout, orthogonal in (("rmsnorm", True), ("scale_visible", False)):
        model = tiny(readout=readout).double()
        idx, tgt = batch()
        with torch.no_grad():
            states = model.loop_states(idx)
        for k, h in enumerate(states, start=1):
            # rescale every token to RMS 3: RMSNorm's eps bends the identity only at tiny scales
            h = (3 * h / h.pow(2).mean(-1, keepdim=True).sqrt()).requires_grad_(True)
            ce = F.cross_entropy(model.readout(h, k).flatten(0, 1), tgt.flatten())
            (g,) = torch.autograd.grad(ce, h)
            cos = F.cosine_similarity(g, h, dim=-1).abs()
            if orthogonal:
                assert cos.max() < 1e-6, (k, cos.max())
            else:
                assert cos.mean() > 1e-2, (k, cos.mean())


# the paper's readouts: is the readout of loop k = 1..2K blind to the scale of h_k? (K = 3)
PAPER_READOUTS = {"rmsnorm": [True] * 6, "scale_visible": [False] * 6,
                  "final_only": [False, False, True, False, False, False]}


def test_readout_table_describes_the_papers_readouts():
    for readout, blind in PAPER_READOUTS.items():
        assert [READOUTS[readout].hides_scale(k, 3) for k in range(1, 7)] == blind, readout


@pytest.mark.parametrize("readout", READOUTS)
def test_readout_scale_invariance_follows_the_table(readout):
    """readout(c * h, k) == readout(h, k) exactly where the table says the scale is hidden, at
    every loop, also past K (eval.py decodes loops up to 2K, sample.py any --n_loops)."""
    model = tiny(readout=readout).double()
    with torch.no_grad():
        states = model.loop_states(batch()[0], n_loops=6)
        for k, h in enumerate(states, start=1):
            invariant = READOUTS[readout].hides_scale(k, 3)
            for c in (0.1, 10.0, 1000.0):
                same = torch.allclose(model.readout(c * h, k), model.readout(h, k), atol=1e-9)
                assert same == invariant, f"{readout} at loop {k}, scale x{c}"


def test_parameter_count_independent_of_loops():
    counts = {tiny(n_loops=K).get_num_params(False) for K in (1, 2, 5)}
    assert len(counts) == 1
    # tied head: the embedding is counted once
    m = tiny()
    assert m.lm_head.weight is m.wte.weight


def test_unused_modules_do_not_exist():
    assert tiny(readout="scale_visible").ln_f is None
    assert tiny(loop_norm=False).loop_rmsnorm is None
    model = tiny(readout="scale_visible")
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_at_every_loop():
    model = tiny().double().eval()
    idx, _ = batch()
    idx2 = idx.clone()
    idx2[:, 7:] = (idx2[:, 7:] + 5) % 37
    with torch.no_grad():
        for h1, h2 in zip(model.loop_states(idx), model.loop_states(idx2)):
            assert torch.allclose(h1[:, :7], h2[:, :7], atol=1e-12)
            assert not torch.allclose(h1[:, 7:], h2[:, 7:])


@pytest.mark.parametrize("readout", READOUTS)
def test_losses_match_definitions(readout):
    lam = 0.05
    idx, tgt = batch()
    for supervision in ("per_loop", "terminal"):
        for penalty in (0.0, lam):
            model = tiny(readout=readout, supervision=supervision, norm_penalty=penalty)
            model = model.double().eval()  # eval mode: every exit decoded, also untrained ones
            logits, loss, stats = model(idx, tgt)
            with torch.no_grad():
                states = model.loop_states(idx)
                ces = torch.stack([F.cross_entropy(model.readout(h, k).flatten(0, 1), tgt.flatten())
                                   for k, h in enumerate(states, start=1)])
                expect = ces.mean() if supervision == "per_loop" else ces[-1]
                expect = expect + penalty * torch.stack([h.pow(2).mean() for h in states]).mean()
                norms = torch.stack([torch.sqrt((h ** 2).sum(-1)).mean() for h in states])
            assert torch.allclose(loss, expect, atol=1e-12)
            assert torch.allclose(stats["loop_ce"], ces, atol=1e-12)
            assert torch.allclose(stats["hidden_norm"], norms, atol=1e-12)
            assert stats["loop_ce"].shape == (3,) and not stats["loop_ce"].requires_grad
            assert torch.allclose(logits, model.readout(states[-1], 3), atol=1e-12)


def test_penalty_adds_exactly_lambda_times_mean_square():
    idx, tgt = batch()
    _, plain, _ = tiny().double()(idx, tgt)
    model = tiny(norm_penalty=0.25).double()
    _, penalised, _ = model(idx, tgt)
    with torch.no_grad():
        sq = torch.stack([h.pow(2).mean() for h in model.loop_states(idx)]).mean()
    assert torch.allclose(penalised - plain, 0.25 * sq, atol=1e-12)


def test_early_exit_and_extra_loops_equal_readout_of_that_state():
    model = tiny(readout="final_only").double().eval()
    idx, tgt = batch()
    with torch.no_grad():
        states = model.loop_states(idx, n_loops=5)
        for k in (1, 2, 3, 5):
            logits, loss, stats = model(idx, tgt, n_loops=k)
            assert torch.allclose(logits, model.readout(states[k - 1], k), atol=1e-12)
            assert stats["loop_ce"].shape == (k,)
            logits, loss, _ = model(idx, n_loops=k)
            assert logits.shape == (2, 1, 37) and loss is None
            assert torch.allclose(logits[:, 0], model.readout(states[k - 1], k)[:, -1], atol=1e-12)


def scaled_up(model, factor):
    with torch.no_grad():
        for name, p in model.block.named_parameters():
            if name.endswith("c_proj.weight"):
                p.mul_(factor)
    return model


def test_loop_norm_bounds_the_state_scale():
    idx, _ = batch()
    with torch.no_grad():
        grown = [h.norm(dim=-1).mean() for h in scaled_up(tiny(n_loops=12), 50).loop_states(idx)]
        bounded = [h.norm(dim=-1).mean()
                   for h in scaled_up(tiny(n_loops=12, loop_norm=True), 50).loop_states(idx)]
    assert grown[-1] > 4 * grown[0]  # pre-norm residual recurrence: the norm keeps growing
    assert max(bounded[3:]) < 1.5 * min(bounded[3:])  # every loop starts from unit RMS


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("extra", [{}, {"loop_norm": True}, {"norm_penalty": 0.01},
                                   {"supervision": "terminal"}])
def test_a_few_steps_lower_the_loss(readout, extra):
    model = tiny(readout=readout, **extra)
    idx, tgt = batch(B=4)
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    first = None
    for _ in range(3):
        _, loss, _ = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if name.startswith("ln_f") and not any(
                    READOUTS[readout].hides_scale(k, 3) for k in model.config.trained_loops()):
                continue  # RMSNorm'd only at loops the loss does not train: measured, not trained
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        first = first if first is not None else loss.item()
    assert model(idx, tgt)[1].item() < first


@pytest.mark.parametrize("field,value,words", [
    ("readout", "not a readout!", " | ".join(READOUTS)),
    ("supervision", "not a supervision!", " | ".join(SUPERVISIONS)),
    ("n_loops", 0, "n_loops=0"),
    ("norm_penalty", -0.1, "norm_penalty=-0.1"),
    ("n_embd", 30, "multiple of n_head"),
    ("n_layer", 0, "an integer >= 1"),
    ("vocab_size", -5, "an integer >= 1"),
    ("block_size", 0, "an integer >= 1"),
])
def test_bad_config_names_field_value_and_accepted(field, value, words):
    with pytest.raises(ValueError) as e:
        LoopedGPTConfig(**{field: value, "n_head": 4})
    assert field in str(e.value) and repr(value) in str(e.value) and words in str(e.value)


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_optimizer_decays_matrices_only():
    model = tiny()
    groups = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("penalty", [0.0, 0.1])
def test_chunked_readout_ce_same_loss_and_gradients(readout, penalty):
    idx, tgt = batch()
    tgt[0, 3] = -1  # ignored position
    results = []
    for readout_ce in ("plain", "chunked"):
        model = tiny(readout=readout, norm_penalty=penalty, readout_ce=readout_ce).double()
        assert model.chunked_ce == (readout_ce == "chunked")
        _, loss, stats = model(idx, tgt)
        loss.backward()
        results.append((loss, stats["loop_ce"], {n: p.grad for n, p in model.named_parameters()}))
    (l0, ce0, g0), (l1, ce1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-12) and torch.allclose(ce0, ce1, atol=1e-12)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-12), name


@pytest.mark.parametrize("gain", [True, False])
def test_rmsnorm_cpu_backward_equals_torch_rmsnorm(gain):
    """model.RMSNorm runs its hand-written backward on a CPU: the output and both gradients
    equal torch's own F.rms_norm under autograd in float64, with eps given and with the dtype's
    default, on rows of every scale (eps matters only on the tiny one)."""
    from model import RMSNorm
    g = torch.Generator().manual_seed(0)
    for eps in (None, 1e-3):
        norm = RMSNorm(16, eps=eps, elementwise_affine=gain).double()
        if gain:
            with torch.no_grad():
                norm.weight.copy_(torch.randn(16, dtype=torch.float64, generator=g))
        scale = torch.tensor([1e-2, 1.0, 30.0, 3000.0], dtype=torch.float64)[:, None, None]
        x = (scale * torch.randn(4, 5, 16, dtype=torch.float64, generator=g)).requires_grad_()
        up = torch.randn(4, 5, 16, dtype=torch.float64, generator=g)
        y = norm(x)
        assert type(y.grad_fn).__name__ == "RMSNormCPUBackward"  # the fast path is the one run
        ref = F.rms_norm(x, (16,), norm.weight, eps)
        wrt = (x, norm.weight) if gain else (x,)
        mine = torch.autograd.grad((y * up).sum(), wrt)
        theirs = torch.autograd.grad((ref * up).sum(), wrt)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # torch's own, on the mixed-dtype input
def test_rmsnorm_cpu_second_derivatives_precision_and_fallbacks():
    """The hand-written backward also differentiates (gradgradcheck), keeps its matmuls in
    float32 when backward runs under bf16 autocast, gives the weight its gradient when x needs
    none, and the inputs it does not take (a float64 x with float32 weights, a 2-D
    normalized_shape) go to torch's own RMSNorm with the same result."""
    from model import RMSNorm, RMSNormCPU
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    for weight in (w, None):
        assert torch.autograd.gradgradcheck(lambda a, b: RMSNormCPU.apply(a, b, 1e-3),
                                            (x, weight))
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x32 = torch.randn(32, 64, generator=g, requires_grad=True)
    up = torch.randn(32, 64, generator=g)
    exact = torch.autograd.grad((norm.double()(x32.double()) * up).sum(),
                                (norm.weight,))[0].float()
    norm.float()
    y = norm(x32)
    assert type(y.grad_fn).__name__ == "RMSNormCPUBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside autocast
        (dw,) = torch.autograd.grad((y * up).sum(), (norm.weight,))
    torch.testing.assert_close(dw, exact, rtol=1e-5, atol=1e-5)  # bf16 matmuls: off by ~1e-3
    xs = x32.detach()  # no gradient wanted for x: the weight still gets its own
    (dw,) = torch.autograd.grad((norm(xs) * up).sum(), (norm.weight,))
    torch.testing.assert_close(dw, exact, rtol=1e-5, atol=1e-5)
    mixed = norm(x32.detach().double())  # float32 weights, float64 input: torch's own path
    assert type(mixed.grad_fn).__name__ != "RMSNormCPUBackward"
    torch.testing.assert_close(mixed, F.rms_norm(x32.double(), (64,), norm.weight.double()))
    plane = RMSNorm((4, 16))
    z = torch.randn(2, 4, 16, generator=g)
    torch.testing.assert_close(plane(z), F.rms_norm(z, (4, 16), plane.weight))


def lean_ce_case(n=50, c=8, v=11, ignored=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(v, c, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(v, (n,), generator=g)
    t[::ignored] = -1
    return x, w, t


@pytest.mark.parametrize("rows", [1, 6, 50])
def test_readout_ce_equals_plain_autograd(rows):
    """Loss and both gradients equal plain autograd's in float64, ignored rows included, one
    row, a ragged last chunk (6 rows: 9 chunks) or one chunk; an upstream factor scales them."""
    from model import ReadoutCE
    x, w, t = lean_ce_case()
    plain = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(3.0 * plain, (x, w))
    lean = ReadoutCE.apply(x, w, t, rows, True, x.dtype)
    lx, lw = torch.autograd.grad(3.0 * lean, (x, w))
    torch.testing.assert_close(lean, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lw, gw, rtol=1e-10, atol=1e-12)


def test_readout_ce_fp16_over_a_large_batch_keeps_the_plain_precision():
    """fp16 autocast over 16,384 rows, the loss scaled as a GradScaler scales it: ReadoutCE
    makes its gradients in forward, where the scaler cannot help, so the mean's 1/n must not
    enter an fp16 product (x / 16384 of a small x is subnormal in fp16). Its gradients stay
    within plain autograd's relative error."""
    from model import ReadoutCE, matmul_dtype
    g = torch.Generator().manual_seed(0)
    x = (0.05 * torch.randn(16384, 16, generator=g)).requires_grad_()
    w = torch.randn(256, 16, generator=g, requires_grad=True)
    t = torch.randint(256, (16384,), generator=g)
    t[::7] = -1
    exact = torch.autograd.grad(F.cross_entropy(x.double() @ w.double().t(), t, ignore_index=-1),
                                (x, w))
    scale = 2.0 ** 16
    with torch.autocast("cpu", dtype=torch.float16):
        plain = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1)
        lean = ReadoutCE.apply(x, w, t, 4096, True, matmul_dtype(x))
    for mine, theirs, ref in zip(torch.autograd.grad(scale * lean, (x, w)),
                                 torch.autograd.grad(scale * plain, (x, w)), exact):
        def rel(a):
            return ((a.double() / scale - ref).norm() / ref.norm()).item()
        assert rel(mine) <= 1.5 * rel(theirs), (rel(mine), rel(theirs))


def test_readout_ce_of_no_rows_and_of_float64_under_autocast():
    """An empty batch is one chunk of nothing (loss 0); float64, which autocast leaves alone,
    keeps its float64 matmuls under autocast."""
    from model import ReadoutCE, chunk_rows, matmul_dtype
    assert chunk_rows(0, 50257, "cpu") >= 1
    x, w, t = lean_ce_case()
    empty = ReadoutCE.apply(x[:0], w, t[:0], chunk_rows(0, 11, "cpu"), False, x.dtype)
    assert empty.item() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_dtype(x) == torch.float64
        lean = ReadoutCE.apply(x, w, t, 6, True, matmul_dtype(x))
    torch.testing.assert_close(lean, F.cross_entropy(x @ w.t(), t, ignore_index=-1),
                               rtol=1e-12, atol=1e-12)


def test_readout_ce_all_ignored_and_without_grad():
    from model import ReadoutCE
    x, w, t = lean_ce_case()
    t[:] = -1
    lean = ReadoutCE.apply(x, w, t, 6, True, x.dtype)
    lx, lw = torch.autograd.grad(lean, (x, w))
    assert lean.item() == 0 and not lx.any() and not lw.any()
    with torch.no_grad():  # a measured exit: the loss only, no gradient work
        x, w, t = lean_ce_case()
        loss = ReadoutCE.apply(x, w, t, 6, False, x.dtype)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), t, ignore_index=-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_readout_ce_under_autocast_within_plain_error(dtype):
    """bf16 and fp16 autocast: the lean CE's error against float64 is no larger than plain
    autograd's own under the same autocast (up to 1.5x, and a small floor)."""
    from model import ReadoutCE, matmul_dtype
    x, w, t = lean_ce_case(n=64, c=32, v=300, dtype=torch.float32)
    ref = F.cross_entropy(x.double() @ w.double().t(), t, ignore_index=-1)
    rx, rw = torch.autograd.grad(ref, (x, w))
    with torch.autocast("cpu", dtype=dtype):
        assert matmul_dtype(x) == dtype
        plain = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1)
        lean = ReadoutCE.apply(x, w, t, 16, True, matmul_dtype(x))
    px, pw = torch.autograd.grad(plain, (x, w))
    lx, lw = torch.autograd.grad(lean, (x, w))
    for mine, theirs, exact in ((lean, plain, ref), (lx, px, rx), (lw, pw, rw)):
        err = (mine.double() - exact.double()).abs().max()
        assert err <= 1.5 * (theirs.double() - exact.double()).abs().max() + 1e-4, err


def test_readout_ce_matmuls_once_per_chunk_and_direction():
    """No recomputation: per chunk, the forward logits, dx and dW (3 matmuls), and backward
    multiplies by the incoming gradient only."""
    from model import ReadoutCE
    x, w, t = lean_ce_case()
    calls = []
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "mm", "addmm", "addmm_"):
                calls.append(func)
            return func(*args, **(kwargs or {}))
    with Count():
        loss = ReadoutCE.apply(x, w, t, 10, True, x.dtype)  # 5 chunks
        forward_calls = len(calls)
        loss.backward()
    assert forward_calls == 15 and len(calls) == 15


def test_readout_ce_auto_follows_vocabulary():
    assert not tiny(vocab_size=8191).chunked_ce
    assert tiny(vocab_size=8192).chunked_ce
    assert not tiny(vocab_size=8192, readout_ce="plain").chunked_ce


@pytest.mark.parametrize("readout", READOUTS)
def test_terminal_step_decodes_only_the_trained_loop(readout, monkeypatch):
    """all_exits=False: same loss and gradients, one readout call instead of K, NaN stats for
    the loops the loss does not train; per_loop decodes every loop either way."""
    idx, tgt = batch()
    results = {}
    for all_exits in (True, False):
        model = tiny(readout=readout, supervision="terminal").double()
        calls = []
        readout_fn = model.readout
        monkeypatch.setattr(model, "readout", lambda h, k: calls.append(k) or readout_fn(h, k))
        _, loss, stats = model(idx, tgt, all_exits=all_exits)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[all_exits] = (loss, stats, grads, calls)
    (l_all, s_all, g_all, c_all), (l_one, s_one, g_one, c_one) = results[True], results[False]
    assert c_all == [1, 2, 3] and c_one == [3]
    assert torch.equal(l_all, l_one)
    assert all((g_all[n] is None and g_one[n] is None) or torch.equal(g_all[n], g_one[n])
               for n in g_all)
    assert torch.isnan(s_one["loop_ce"][:2]).all() and s_one["loop_ce"][2] == s_all["loop_ce"][2]
    assert torch.isfinite(s_all["loop_ce"]).all()
    assert torch.equal(s_one["hidden_norm"], s_all["hidden_norm"])
    model = tiny(readout=readout)
    assert torch.isfinite(model(idx, tgt, all_exits=False)[2]["loop_ce"]).all()  # per_loop


def test_exit_policies_pass_in_the_right_direction():
    from model import exit_score, exits, strict_to_loose
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # a sure row and an unsure one
    for policy in ("max_prob", "logit_margin", "entropy"):
        score = exit_score(logits, policy)
        sure, unsure = score.tolist()
        t = (sure + unsure) / 2
        assert exits(score, policy, t).tolist() == [True, False], policy
        assert strict_to_loose([sure, unsure], policy) == [sure, unsure], policy


def test_training_step_without_logits_is_the_same_step():
    """return_logits=False decodes the last loop with the lean CE too: the same loss and
    gradients as the plain step, and no logits returned."""
    idx, tgt = batch()
    results = []
    for keep in (True, False):
        model = tiny(readout_ce="chunked").double()
        logits, loss, _ = model(idx, tgt, return_logits=keep)
        loss.backward()
        assert (logits is None) == (not keep)
        results.append((loss, [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_readout_ce_chunks_per_device_and_under_compile(monkeypatch):
    """A few large chunks on a GPU, cache-sized ones on a CPU, at most 4 under torch.compile
    (which unrolls the loop), all rows when they fit in one chunk."""
    from model import chunk_rows
    n, V = 64 * 256, 50257  # the 44M preset's batch at GPT-2's vocabulary
    assert chunk_rows(n, V, "cuda") == n // 4  # 4 equal chunks, not 3 full ones and a sliver
    assert chunk_rows(n, V, "cpu") == 2 ** 23 // V
    assert chunk_rows(n, 69, "cpu") == n and chunk_rows(100, V, "mps") == 100
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert -(-n // chunk_rows(n, V, "cpu")) == 4


def test_loop_norm_acts_between_loops_only():
    """Loop norm RMSNorms the state carried into loops 2..K, never the embedding into loop 1:
    with the same weights, h_1 is the plain model's h_1 and the next state starts from
    RMSNorm(h_1)."""
    idx, _ = batch()
    plain = tiny().double()
    normed = tiny(loop_norm=True).double()
    normed.load_state_dict(plain.state_dict())  # loop norm has no weights of its own
    with torch.no_grad():
        h_plain, h_normed = plain.loop_states(idx), normed.loop_states(idx)
        assert torch.equal(h_normed[0], h_plain[0])
        rms = h_plain[0].pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float64).eps).sqrt()
        expect = plain.loop(h_plain[0] / rms, 2)
        torch.testing.assert_close(h_normed[1], expect, rtol=1e-5, atol=1e-8)


def test_residual_projections_start_small_for_the_looped_depth():
    """GPT-2's 1/sqrt(2 * depth) on the residual projections, with the looped depth
    n_layer * n_loops: std 0.02 / sqrt(2 * 4 * 6) for a 4-layer block looped 6 times."""
    cfg = LoopedGPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=256,
                          n_loops=6)
    torch.manual_seed(0)
    model = LoopedGPT(cfg)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / (2 * 4 * 6) ** 0.5, rel=0.02), name
        elif name.endswith("c_fc.weight") or name.endswith("c_attn.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name
