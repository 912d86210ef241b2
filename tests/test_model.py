"""The looped model and the exact math of the blind spot. Tiny configs, CPU, float64 where exact."""

import math
from dataclasses import fields

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
    cfg = LoopedGPTConfig(n_loops=3)
    for readout, blind in PAPER_READOUTS.items():
        assert [READOUTS[readout].hides_scale(cfg, k, 3) for k in range(1, 7)] == blind, readout


# every entry of READOUTS, with each setting of its own knobs that changes what it does
def readout_cases():
    cases = []
    for name in READOUTS:
        owned = [f.name for f in fields(LoopedGPTConfig)
                 if f.metadata["applies"] == ("readout", name)]
        variants = [{}]
        if "readout_alpha" in owned:  # the alpha readout: both ends, fixed, and learned
            variants = [{"readout_alpha": 0.0, "readout_alpha_learned": False},
                        {"readout_alpha": 1.0, "readout_alpha_learned": False},
                        {"readout_alpha": 0.3, "readout_alpha_learned": False},
                        {}, {"readout_alpha_per_loop": True, "readout_s_ref": "learned"}]
        for v in variants:
            cases.append(pytest.param(name, v, id=name + "".join(f"-{k}={x}" for k, x in
                                                                v.items())))
    return cases


@pytest.mark.parametrize("readout,knobs", readout_cases())
def test_every_readout_hides_the_scale_exactly_where_it_declares(readout, knobs):
    """Measured, for every entry of READOUTS: at loops k = 1..3K (the rule is called past K:
    eval.py runs up to 3K loops, sample.py any number), and at loops 4K, 10K and 100K, the
    logits of c * h_k equal those of h_k for every c > 0 exactly where the entry declares
    hides_scale, and (Lemma 1, through the model in float64) the gradient of the CE with
    respect to h_k is then orthogonal to h_k, and clearly not where it shows the scale. A fork's
    new readout gets these verdicts for free."""
    model = tiny(readout=readout, **knobs).double().eval()
    K = model.config.n_loops
    idx, tgt = batch()
    with torch.no_grad():
        states = model.loop_states(idx, n_loops=3 * K)
    # the rule depends on the loop's number, not on how h got there: far loops reuse the last h
    loops = list(enumerate(states, start=1)) + [(m * K, states[-1]) for m in (4, 10, 100)]
    for k, h in loops:
        declared = READOUTS[readout].hides_scale(model.config, k, K)
        # RMS 3 per token: a norm's eps (1e-6) bends the identity only at tiny scales
        h = 3 * h / h.pow(2).mean(-1, keepdim=True).sqrt()
        with torch.no_grad():
            same = [torch.allclose(model.readout(c * h, k), model.readout(h, k), rtol=1e-5,
                                   atol=1e-5) for c in (0.5, 10.0, 1000.0)]
        assert all(same) == declared and any(same) == declared, (k, same, declared)
        h.requires_grad_(True)
        ce = F.cross_entropy(model.readout(h, k).flatten(0, 1), tgt.flatten())
        (g,) = torch.autograd.grad(ce, h)
        cos = F.cosine_similarity(g, h, dim=-1).abs()
        if declared:
            assert cos.max() < 1e-6, (k, cos.max())
        else:
            assert cos.mean() > 1e-3, (k, cos.mean())


def test_parameter_count_independent_of_loops():
    counts = {tiny(n_loops=K).get_num_params(False) for K in (1, 2, 5)}
    assert len(counts) == 1
    # tied head: the embedding is counted once
    m = tiny()
    assert m.lm_head.weight is m.wte.weight


def test_unused_modules_do_not_exist():
    assert tiny(readout="scale_visible").readout_norm is None
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
@pytest.mark.parametrize("supervision", SUPERVISIONS)
def test_losses_match_definitions(readout, supervision):
    """For every readout and every supervision: the loss is sum_k w_k CE_k / sum_k w_k plus
    lambda * mean_k mean(h_k^2), with each exit's CE taken by plain cross-entropy from its
    logits and w_k the entry's own weight(k, K); loop_ce is each exit's CE, hidden_norm the mean
    per-token L2 norm."""
    lam = 0.05
    idx, tgt = batch()
    weights = torch.tensor([float(SUPERVISIONS[supervision].weight(k, 3)) for k in (1, 2, 3)],
                           dtype=torch.float64)
    for penalty in (0.0, lam):
        model = tiny(readout=readout, supervision=supervision, norm_penalty=penalty)
        model = model.double().eval()  # eval mode: every exit decoded, also untrained ones
        logits, loss, stats = model(idx, tgt)
        with torch.no_grad():
            states = model.loop_states(idx)
            ces = torch.stack([F.cross_entropy(model.readout(h, k).flatten(0, 1), tgt.flatten())
                               for k, h in enumerate(states, start=1)])
            expect = (weights * ces).sum() / weights.sum()
            expect = expect + penalty * torch.stack([h.pow(2).mean() for h in states]).mean()
            norms = torch.stack([torch.sqrt((h ** 2).sum(-1)).mean() for h in states])
        assert torch.allclose(loss, expect, atol=1e-12)
        assert torch.allclose(stats["loop_ce"], ces, atol=1e-12)
        assert torch.allclose(stats["hidden_norm"], norms, atol=1e-12)
        assert stats["loop_ce"].shape == (3,) and not stats["loop_ce"].requires_grad
        assert torch.allclose(logits, model.readout(states[-1], 3), atol=1e-12)


def test_the_papers_supervisions_are_the_mean_and_the_last_exit():
    """per_loop is the plain mean of the K CEs, terminal the last one alone (the paper's)."""
    idx, tgt = batch()
    for supervision, pick in (("per_loop", lambda c: c.mean()), ("terminal", lambda c: c[-1])):
        model = tiny(supervision=supervision).double().eval()
        _, loss, stats = model(idx, tgt)
        assert torch.allclose(loss, pick(stats["loop_ce"]), atol=1e-12), supervision


@pytest.mark.parametrize("weight,words", [
    (lambda loop, K: 0.0, "one must be > 0"),
    (lambda loop, K: -1.0 if loop == 1 else 1.0, "-1.0"),
    (lambda loop, K: float("nan"), "nan"),
    (lambda loop, K: "heavy", "must return a number"),
    (lambda loop, K: 1 / (K - loop), "ZeroDivisionError"),
])
def test_a_supervision_with_bad_weights_is_refused_in_one_line(weight, words, monkeypatch):
    """A supervision's weights are checked when the config is built (finite, >= 0, one > 0 for
    the K in use), with one line naming the entry, not a ZeroDivisionError in training."""
    from model import Supervision
    monkeypatch.setitem(SUPERVISIONS, "mine", Supervision("a fork's", weight))
    with pytest.raises(ValueError) as e:
        LoopedGPTConfig(supervision="mine")
    assert "'mine'" in str(e.value) and words in str(e.value)
    assert len(str(e.value).splitlines()) == 1


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
                                   *({"supervision": s} for s in SUPERVISIONS
                                     if s != "per_loop")])
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
            if name.startswith("readout_norm") and not any(
                    READOUTS[readout].hides_scale(model.config, k, 3)
                    for k in model.config.trained_loops()):
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


def test_optimizer_decays_all_parameters_or_matrices_only():
    """decay="all" (the paper's code: AdamW over model.parameters()) decays every parameter,
    the tied embedding once; "matrices" (nanoGPT's) only those with two or more dimensions."""
    model = tiny(loop_norm=True)
    params = {id(p): p for p in model.parameters()}
    groups = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert sorted(map(id, groups[0]["params"])) == sorted(params)
    assert len(groups[0]["params"]) == len(list(model.named_parameters()))  # tied: once
    groups = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "matrices").param_groups
    assert {id(p) for p in groups[0]["params"]} == {i for i, p in params.items() if p.dim() >= 2}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {i for i, p in params.items() if p.dim() < 2}


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
    default, on rows of every scale (eps matters only on the tiny one); so does its output
    without autograd (no_grad, inference_mode), which skips the Function."""
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
        for mode in (torch.no_grad, torch.inference_mode):  # evaluation and generation
            with mode():
                torch.testing.assert_close(norm(x), ref.detach(), rtol=1e-12, atol=1e-12)


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
    RMSNorm(h_1) * gain, with the eps of norm_eps and the gain the paper's (learned, from 1)."""
    idx, _ = batch()
    plain = tiny(norm_eps=1e-3).double()
    for gain in (True, False):
        normed = tiny(loop_norm=True, loop_norm_gain=gain, norm_eps=1e-3).double()
        normed.load_state_dict(plain.state_dict(), strict=False)
        assert (normed.loop_rmsnorm.weight is not None) == gain
        if gain:
            with torch.no_grad():
                normed.loop_rmsnorm.weight.uniform_(0.5, 1.5)
        g = normed.loop_rmsnorm.weight if gain else 1.0
        with torch.no_grad():
            h_plain, h_normed = plain.loop_states(idx), normed.loop_states(idx)
            assert torch.equal(h_normed[0], h_plain[0])
            rms = h_plain[0].pow(2).mean(-1, keepdim=True).add(1e-3).sqrt()
            expect = plain.loop(h_plain[0] / rms * g, 2)
            torch.testing.assert_close(h_normed[1], expect, rtol=1e-9, atol=1e-9)


def test_gpt2_init_scales_residual_projections_for_the_looped_depth():
    """init=gpt2: N(0, 0.02) weights, and GPT-2's 1/sqrt(2 * depth) on the residual
    projections with the looped depth n_layer * n_loops: std 0.02 / sqrt(2 * 4 * 6) for a
    4-layer block looped 6 times."""
    cfg = LoopedGPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=256,
                          n_loops=6, init="gpt2")
    torch.manual_seed(0)
    model = LoopedGPT(cfg)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / (2 * 4 * 6) ** 0.5, rel=0.02), name
        elif name.endswith("c_fc.weight") or name.endswith("c_attn.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name


def test_torch_init_is_the_papers():
    """init=torch (the paper's code keeps PyTorch's defaults): token and position embeddings
    N(0, 1), the tied head the embedding's matrix, every Linear kaiming-uniform
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (std 1/sqrt(3 fan_in)), every norm gain 1; so h_0
    starts at an RMS of about sqrt(2)."""
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(vocab_size=4096, block_size=256, n_layer=2, n_head=4,
                                      n_embd=256, loop_norm=True))
    assert model.config.init == "torch"  # the default
    assert model.lm_head.weight is model.wte.weight
    for emb in (model.wte.weight, model.wpe.weight):
        assert emb.mean().item() == pytest.approx(0, abs=0.01)
        assert emb.std().item() == pytest.approx(1, rel=0.02)
    linears = [m for m in model.block.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 5
    for lin in linears:
        bound = 1 / lin.in_features ** 0.5
        assert lin.weight.abs().max().item() <= bound
        assert lin.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)
    gains = [p for n, p in model.named_parameters() if n.endswith(("ln_1.weight", "ln_2.weight",
                                                                  "norm.weight"))]
    assert len(gains) == 2 * 2 + 2 and all(torch.equal(g, torch.ones_like(g)) for g in gains)
    with torch.no_grad():
        h0 = model.embed(torch.randint(4096, (8, 256)))
    assert h0.pow(2).mean().sqrt().item() == pytest.approx(2 ** 0.5, rel=0.03)


def test_dropout_sites_are_the_papers():
    """Dropout on the embeddings, the attention probabilities and the SwiGLU output, and none
    after the attention's output projection: counted as modules, then seen at work."""
    model = tiny(dropout=0.5, n_layer=2)
    drops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == ["drop", "block.0.mlp.dropout", "block.1.mlp.dropout"]
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert [layer.attn.dropout for layer in model.block] == [0.5, 0.5]
    attn = model.block[0].attn
    x = torch.randn(2, 8, 16)
    attn.train()
    ys = [attn(x) for _ in range(2)]
    assert not torch.allclose(ys[0], ys[1])  # the probabilities are dropped in training
    attn.dropout = 0.0
    y = attn(x)  # with no dropout on the probabilities nothing else is dropped after c_proj
    assert torch.equal(y, attn(x)) and (y != 0).all()


def test_every_rmsnorm_uses_norm_eps():
    model = tiny(norm_eps=3e-4, loop_norm=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 2 and all(m.eps == 3e-4 for m in norms)


def valid_other_value(f, base):
    """A value of knob f other than its default that its check takes (with `base`)."""
    d = f.default
    if isinstance(d, bool):
        candidates = [not d]
    elif isinstance(d, str):
        candidates = [v for v in f.metadata["accepted"].split(" | ") if v != d]
    else:
        candidates = [type(d)(d / 2), type(d)(d + 1), type(d)(2 * d)]
    for v in candidates:
        try:
            LoopedGPTConfig(**base, **{f.name: v})
            return v
        except ValueError:
            continue
    raise AssertionError(f"no valid value other than the default found for {f.name}")


@pytest.mark.parametrize("f", fields(LoopedGPTConfig), ids=lambda f: f.name)
def test_every_knob_refuses_its_declared_bad_values(f):
    """Each knob's own declaration (model.knob): every declared bad value is refused in one
    line naming the knob and the value, its default is taken, another valid value is taken,
    and a knob that applies to one readout (or to the loop norm) is refused, in one line, set
    without it. A new knob gets these verdicts without an edit here."""
    assert f.metadata["bad"], f"{f.name} declares no bad values"
    owner = f.metadata["applies"]
    base = {owner[0]: owner[1]} if owner else {}
    LoopedGPTConfig(**base, **{f.name: f.default})
    for bad in f.metadata["bad"]:
        with pytest.raises(ValueError) as e:
            LoopedGPTConfig(**base, **{f.name: bad})
        msg = str(e.value)
        assert f"{f.name}={bad!r}" in msg and len(msg.splitlines()) == 1, msg
    if isinstance(f.default, float):  # the command line refuses these first; Python too
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError):
                LoopedGPTConfig(**base, **{f.name: bad})
    other = valid_other_value(f, base)
    if owner:
        with pytest.raises(ValueError) as e:
            LoopedGPTConfig(**{f.name: other})
        assert f"{f.name}={other!r} applies only with {owner[0]}={owner[1]}" in str(e.value)


@pytest.mark.parametrize("f", fields(LoopedGPTConfig), ids=lambda f: f.name)
def test_every_knob_reaches_the_float64_readout_copy(f):
    """Lemma 1 decodes with model.readout_copy, which calls the readout's entry directly. With
    each knob at a value other than its default (for every readout it applies to), the copy's
    logits equal model.readout's at every loop 1..2K: a knob wired into LoopedGPT.readout
    alone, where the copy cannot see it, fails here."""
    if f.name == "readout":
        return  # every readout is taken below
    owner = f.metadata["applies"]
    readouts = [owner[1]] if owner and owner[0] == "readout" else list(READOUTS)
    for readout in readouts:
        base = {"readout": readout} | ({owner[0]: owner[1]} if owner else {})
        other = valid_other_value(f, base)
        if f.name in ("vocab_size", "block_size", "n_embd", "n_head"):
            continue  # sizes: tiny's own values are the test's, any other only resizes
        model = tiny(**base, **{f.name: other}).double().eval()
        with torch.no_grad():  # move every parameter off its init (gains of 1, alpha 0.5)
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        copy = model.readout_copy("cpu", torch.float64)
        K = model.config.n_loops
        h = torch.randn(2, 5, model.config.n_embd, dtype=torch.float64)
        with torch.no_grad():
            for k in range(1, 2 * K + 1):
                assert torch.allclose(copy(h, k), model.readout(h, k), rtol=1e-9, atol=1e-9), (
                    f.name, other, readout, k)


def alpha_model(**kw):
    return tiny(readout="alpha", **kw).double()


def rms(h):
    return h.pow(2).mean(-1, keepdim=True).sqrt()


def test_alpha_readout_at_both_ends_is_rmsnorm_without_gain_and_the_raw_readout():
    """The paper's continuum: alpha = 0 is s_ref * h / RMS(h) (RMSNorm without a gain, s_ref
    fixed at 1 here), alpha = 1 is h itself: the same logits as the scale_visible model with
    the same weights, in float64."""
    idx, _ = batch()
    raw = tiny(readout="scale_visible").double().eval()
    for alpha, s_ref in ((0.0, "fixed"), (1.0, "fixed"), (1.0, "ema")):
        model = alpha_model(readout_alpha=alpha, readout_alpha_learned=False,
                            readout_s_ref=s_ref).eval()
        model.load_state_dict(raw.state_dict(), strict=False)
        with torch.no_grad():
            for k, h in enumerate(model.loop_states(idx, n_loops=5), start=1):
                seen = model.readout_input(h, k)
                expect = h / rms(h) if alpha == 0 else h
                torch.testing.assert_close(seen, expect, rtol=1e-12, atol=1e-12)
                if alpha == 1:
                    torch.testing.assert_close(model.readout(h, k), raw.readout(h, k),
                                               rtol=1e-12, atol=1e-12)


def test_alpha_readout_in_between_follows_gamma():
    """0 < alpha < 1: gamma(s) = s_ref^(1 - alpha) * s^alpha times u = h / s, by hand, with a
    learned s_ref moved off 1."""
    model = alpha_model(readout_alpha=0.25, readout_alpha_learned=False,
                        readout_s_ref="learned").eval()
    with torch.no_grad():
        model.readout_norm.log_s_ref.fill_(0.7)
        h = 5 * torch.randn(2, 4, 16, dtype=torch.float64)
        s = rms(h)
        expect = math.exp(0.7) ** 0.75 * s ** 0.25 * h / s
        torch.testing.assert_close(model.readout_input(h, 2), expect, rtol=1e-12, atol=1e-12)


def test_alpha_readout_learns_alpha_and_s_ref():
    """Learned alpha starts at readout_alpha through a sigmoid and gets a gradient; so does a
    learned s_ref; a fixed alpha is a buffer."""
    model = alpha_model(readout_alpha=0.2, readout_s_ref="learned")
    assert torch.sigmoid(model.readout_norm.alpha_logit).item() == pytest.approx(0.2)
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    assert model.readout_norm.alpha_logit.grad.abs().item() > 0
    assert model.readout_norm.log_s_ref.grad.abs().item() > 0
    fixed = alpha_model(readout_alpha=0.2, readout_alpha_learned=False)
    assert "readout_norm.alpha_fixed" in fixed.state_dict()
    assert not any("alpha" in n for n, _ in fixed.named_parameters())


@pytest.mark.parametrize("supervision", SUPERVISIONS)
def test_alpha_readout_ema_follows_every_loop_in_training_only(supervision):
    """s_ref as an EMA (decay 0.99) of the batch's mean log RMS(h): a training step moves it
    once per loop, in loop order, the first step taking the mean itself, whatever the loss
    trains (the paper's code decodes every loop); an eval forward leaves it; it is a buffer of
    the state dict, so a checkpoint keeps it."""
    model = alpha_model(supervision=supervision)
    idx, tgt = batch()
    with torch.no_grad():
        means = [rms(h).log().mean().item() for h in model.loop_states(idx)]
    expect = means[0]
    for m in means[1:]:
        expect = 0.99 * expect + 0.01 * m
    model.train()
    model(idx, tgt)[1].backward()
    assert model.readout_norm.log_s_ref.item() == pytest.approx(expect, rel=1e-9)
    assert model.readout_norm.ema_steps.item() == 3
    model.eval()
    model(idx, tgt)
    assert model.readout_norm.log_s_ref.item() == pytest.approx(expect, rel=1e-9)
    copy = alpha_model(supervision=supervision)
    copy.load_state_dict(model.state_dict())
    assert copy.readout_norm.log_s_ref.item() == model.readout_norm.log_s_ref.item()


def test_alpha_readout_per_loop_has_one_alpha_per_loop():
    """readout_alpha_per_loop: loop k decodes with the k-th alpha; loops past K with loop K's."""
    model = alpha_model(readout_alpha_per_loop=True, readout_s_ref="fixed").eval()
    with torch.no_grad():
        model.readout_norm.alpha_logit.copy_(torch.tensor([-2.0, 0.0, 2.0]))
        h = 5 * torch.randn(2, 4, 16, dtype=torch.float64)
        s = rms(h)
        for k, a in ((1, -2.0), (2, 0.0), (3, 2.0), (5, 2.0)):
            alpha = 1 / (1 + math.exp(-a))
            torch.testing.assert_close(model.readout_input(h, k), s ** alpha * h / s,
                                       rtol=1e-12, atol=1e-12)


def test_final_only_decodes_the_last_loop_of_the_run_it_is_given():
    """readout(h, k) is the trained model's early exit (RMSNorm only at the trained K);
    readout(h, k, n_loops=k) decodes a run of k loops by its own rule: final_only RMSNorms
    its last loop k whatever k is (eval.py's variable depth)."""
    model = tiny(readout="final_only").double().eval()
    h = 5 * torch.randn(2, 4, 16, dtype=torch.float64)
    norm = model.readout_norm
    with torch.no_grad():
        for k in (1, 2, 5, 9):
            torch.testing.assert_close(model.readout(h, k, n_loops=k), model.lm_head(norm(h)))
            expect = model.lm_head(norm(h) if k == 3 else h)
            torch.testing.assert_close(model.readout(h, k), expect)
