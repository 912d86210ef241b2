"""eval.py (per-depth PPL, halting, depth map, lens, diagnostics), plot_norms.py and
experiments.py (Table 1, the claims table)."""

import json
import math
import os
import shutil
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import eval as eval_script
from conftest import run
from eval import DIAGNOSTICS, adaptive_exit, all_states, calibrate, collect, depth_map, evaluate
from eval import exit_loops, halting, lens, split_batches, threshold_grid, windows
from model import EXIT_POLICIES, LoopedGPT, LoopedGPTConfig, exit_score
from prepare import load_tokenizer
from rundir import eval_seed, get_batch, load_checkpoint, load_data, model_from_checkpoint
from standin import standin

SETTINGS = SimpleNamespace(max_depth=0, target=1.01, policy="logit_margin", exit_unit="token",
                           n_thresholds=11)


def load_model(out_dir):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    return model_from_checkpoint(ckpt, "cpu"), ckpt


def val_batches(out_dir, data_dir, n=3):
    model, ckpt = load_model(out_dir)
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    T = ckpt["config"]["block_size"]
    return model, [get_batch(data["val"], 4, T, eval_seed(i, "val")) for i in range(n)]


def halves(out_dir, data_dir, n=3):
    """(calibration batches, held-out batches, held-out data, the paper's window batches)."""
    model, ckpt = load_model(out_dir)
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    T = ckpt["config"]["block_size"]
    return (*split_batches(data["val"], n, 4, T, "cpu"), windows(data["val"], 4 * n, 4, T, "cpu"))


def test_per_depth_at_K_equals_models_own_val_ce(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir)
    cal, held, held_data, paper = halves(tiny_runs["rmsnorm"], data_dir)
    out = evaluate(model, batches, cal, held, paper, SETTINGS, held_data)
    with torch.no_grad():
        own = sum(model(x, y)[1].item() for x, y in batches) / len(batches)  # mean of K CEs
        last = sum(model(x, y)[2]["loop_ce"][-1].item() for x, y in batches) / len(batches)
    K = model.config.n_loops
    assert len(out["per_depth"]["ppl"]) == 2 * K
    assert abs(out["per_depth"]["ce"][K - 1] - last) < 1e-5
    assert abs(sum(out["per_depth"]["ce"][:K]) / K - own) < 1e-5
    assert set(out["halting"]) == {"token", "sequence"}
    for unit in [*out["halting"].values(), out["halting_paper"]]:
        assert set(unit) == {"max_prob", "logit_margin", "entropy"}
        assert all(1 <= h["mean_loops"] <= K for h in unit.values())
    assert all(h["n_sequences"] == 12 for h in out["halting_paper"].values())


def test_collect_continues_from_given_states_exactly(tiny_runs, data_dir):
    """eval.py --run=all reuses the diagnostics' loops 1..K for the per-depth pass: the CEs and
    scores at every depth, below, at and beyond K, are those of a pass from the embeddings."""
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir)
    K = model.config.n_loops
    shared = all_states(model, batches)
    for depth in (K - 1, K, 2 * K):
        ce, scores = collect(model, batches, depth)
        ce_shared, scores_shared = collect(model, batches, depth, shared)
        assert ce.shape[0] == depth and torch.equal(ce, ce_shared)
        assert all(torch.equal(scores[p], scores_shared[p]) for p in scores)


def test_adaptive_exit_extremes(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir)
    K = model.config.n_loops
    ce, scores = collect(model, batches, K)
    full = math.exp(ce[K - 1].double().mean().item())
    for unit in ("token", "sequence"):
        loops, ppl = adaptive_exit(ce, scores["max_prob"], "max_prob", 1.01, K, unit)  # none pass
        assert loops == K and ppl == pytest.approx(full, rel=1e-12)
        loops, ppl = adaptive_exit(ce, scores["entropy"], "entropy", 1e9, K, unit)  # all pass
        assert loops == 1 and ppl == pytest.approx(math.exp(ce[0].double().mean().item()),
                                                   rel=1e-12)


def test_sequence_exit_gives_every_token_of_a_sequence_one_depth(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir)
    K = model.config.n_loops
    ce, scores = collect(model, batches, K)
    score = scores["logit_margin"]
    t = score[0].mean(dim=-1).median().item()  # about half the sequences pass at loop 1
    loops = exit_loops(score, "logit_margin", t, K, "sequence")
    assert loops.shape == score.shape[1:]
    assert (loops == loops[:, :1]).all()  # one depth per sequence
    first = score[0].mean(dim=-1) >= t
    assert ((loops[:, 0] == 1) == first).all()  # decided by the sequence's mean score
    tokens = exit_loops(score, "logit_margin", t, K, "token")
    assert not (tokens == tokens[:, :1]).all()  # per token, depths differ within a sequence


def test_calibration_uses_the_calibration_batches_only(tiny_runs, data_dir):
    model, _ = load_model(tiny_runs["rmsnorm"])
    K = model.config.n_loops
    cal_b, held_b, _, _ = halves(tiny_runs["rmsnorm"], data_dir)
    cal = collect(model, cal_b, K)
    other_b = [(x.flip(0), y.flip(0)) for x, y in cal_b[1:]] + [held_b[0]]
    results = []
    for held in (collect(model, held_b, K), collect(model, other_b, K)):
        for unit in ("token", "sequence"):
            for policy in ("max_prob", "logit_margin", "entropy"):
                results.append((unit, policy, halting(cal, held, policy, K, 1.01, 11, unit)))
    n = len(results) // 2
    for (_, _, a), (_, _, b) in zip(results[:n], results[n:]):
        assert a["threshold"] == b["threshold"]  # the held-out batches do not move it
    for unit, policy, _ in results[:n]:
        t, loops, ppl = calibrate(cal[0], cal[1][policy], policy, K, 1.01, 11, unit)
        if t is not None:  # on the calibration batches the target holds
            full = math.exp(cal[0][K - 1].double().mean().item())
            assert adaptive_exit(cal[0], cal[1][policy], policy, t, K, unit) == (loops, ppl)
            assert ppl <= 1.01 * full


def by_hand(ce, score, t, K, unit, passes):
    """(mean loops, PPL) of adaptive exit, unit by unit in plain Python floats: the first loop
    whose score (a sequence's: its tokens' mean) passes t, else K; PPL = exp of the mean CE of
    every token at its unit's exit loop."""
    S, T = ce.shape[1:]
    loops, total = [], 0.0
    for i in range(S):
        units = [[j] for j in range(T)] if unit == "token" else [list(range(T))]
        for tokens in units:
            exit_at = K
            for k in range(K - 1):
                mean_score = sum(score[k, i, j].item() for j in tokens) / len(tokens)
                if passes(mean_score, t):
                    exit_at = k + 1
                    break
            loops += [exit_at] * len(tokens)
            total += sum(ce[exit_at - 1, i, j].item() for j in tokens)
    return sum(loops) / len(loops), math.exp(total / (S * T))


@pytest.mark.parametrize("unit", ["token", "sequence"])
@pytest.mark.parametrize("policy", EXIT_POLICIES)
def test_calibration_is_the_fewest_loops_within_target_on_the_grid(policy, unit):
    """The paper's protocol, worked by hand: the candidates are the n quantiles of the scores at
    loops 1..K-1 (numpy's, linear) and one just past each end; of those whose PPL is within
    1.01x of full depth, the one with the fewest mean loops wins."""
    import numpy as np
    passes = (lambda s, t: s <= t) if policy == "entropy" else (lambda s, t: s >= t)
    g = torch.Generator().manual_seed(1)
    K, S, T = 3, 6, 5
    sure = torch.rand(K, S, T, generator=g, dtype=torch.float64)
    base = 2.0 + torch.rand(S, T, generator=g, dtype=torch.float64)
    ce = torch.stack([base + 0.6 * (0.5 - sure[0]), base + 0.2 * (0.5 - sure[1]), base])
    score = {"max_prob": sure, "logit_margin": 10 * sure, "entropy": 3 * (1 - sure)}[policy]
    unit_score = score[:K - 1] if unit == "token" else score[:K - 1].mean(-1)
    flat = unit_score.flatten().numpy()
    grid = [flat.min() - 1e-6, *np.quantile(flat, np.linspace(0, 1, 7)), flat.max() + 1e-6]
    full = math.exp(ce[K - 1].mean().item())
    best = None
    for t in grid:
        loops, ppl = by_hand(ce, score, t, K, unit, passes)
        if ppl <= 1.01 * full and (best is None or loops < best[1]):
            best = (t, loops, ppl)
    t, loops, ppl = calibrate(ce, score, policy, K, 1.01, 7, unit)
    assert best[1] < K  # the case has an early exit worth taking
    assert loops == pytest.approx(best[1]) and ppl == pytest.approx(best[2], rel=1e-12)
    assert by_hand(ce, score, t, K, unit, passes) == pytest.approx((loops, ppl), rel=1e-12)
    assert sorted(threshold_grid(score, policy, K, 7, unit)) == pytest.approx(sorted(grid))


@pytest.mark.parametrize("policy", ["max_prob", "entropy"])
def test_calibration_does_not_assume_ppl_monotone_in_the_threshold(policy):
    """Six tokens, K = 2. Exiting the surest one, A, costs (CE 1.3 against 1.0 at full depth),
    and so does adding B and C; adding D (0.5) pays it back, E is free, F costs 2.5. So the PPL
    is within 1.01x with no exit, above it for the top 1-3, within it for the top 4-5, above it
    for all six: not monotone in the threshold. The fewest loops within target is the top 5
    exiting (7/6 loops); a bisection over the sorted scores, which assumes monotonicity,
    finds no early exit at all."""
    from model import strict_to_loose
    sure = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    score = torch.stack([sure, sure])[:, None] if policy == "max_prob" else \
        torch.stack([1 - sure, 1 - sure])[:, None]
    ce = torch.tensor([[[1.3, 1.0, 1.0, 0.5, 1.0, 2.5]], [[1.0] * 6]], dtype=torch.float64)
    t, loops, ppl = calibrate(ce, score, policy, 2, 1.01, 51)
    assert loops == pytest.approx(7 / 6) and ppl == pytest.approx(math.exp(5.8 / 6))
    full = math.exp(1.0)

    def good(t):
        return adaptive_exit(ce, score, policy, t, 2)[1] <= 1.01 * full
    cands = strict_to_loose(torch.unique(score[0]).tolist(), policy)
    lo, hi = -1, len(cands) - 1  # bisection for the loosest good candidate
    if not good(cands[hi]):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if good(cands[mid]) else (lo, mid)
    assert lo == -1  # bisection: "no early exit meets the target"


def test_eval_cli_writes_json(tiny_runs, data_dir):
    p = run("eval.py", f"--out_dir={tiny_runs['rmsnorm']}", f"--data_dir={data_dir}",
            "--eval_iters=2")
    assert p.returncode == 0, p.stderr
    ev = json.load(open(os.path.join(tiny_runs["rmsnorm"], "eval.json")))
    assert set(ev["halting"]["sequence"]) == {"max_prob", "logit_margin", "entropy"}
    assert "logit_margin   sequence" in p.stdout
    m = ev["depth_map"]
    assert len(m["tokens"]) == len(m["exit_loop"]) == len(m["ids"]) >= 256
    assert "".join(m["tokens"][:50]) and all(1 <= k <= 3 for k in m["exit_loop"])


def test_lens_last_column_is_greedy_decoding(tiny_runs, data_dir):
    from sample import generate
    model, ckpt = load_model(tiny_runs["scale_visible"])
    encode, decode = load_tokenizer(ckpt["meta"])
    ids = encode("ROMEO:\nWhat")
    out = lens(model, ids, decode)
    K = model.config.n_loops
    assert len(out["top1"]) == len(ids) and all(len(row) == K for row in out["top1"])
    assert all(0 < p <= 1 for row in out["prob"] for p in row)
    for t in range(len(ids)):
        greedy, _ = generate(model, torch.tensor([ids[:t + 1]]), 1, temperature=0)
        assert out["top1"][t][-1] == greedy[0, -1].item()
    with torch.no_grad():  # column k is the readout of loop k: an exit after k loops
        for k in range(1, K):
            logits, _, _ = model(torch.tensor([ids]), n_loops=k)
            assert out["top1"][-1][k - 1] == logits[0, -1].argmax().item()
    p = run("eval.py", f"--out_dir={tiny_runs['scale_visible']}", f"--data_dir={data_dir}",
            "--run=lens", "--start=ROMEO:")
    assert p.returncode == 0, p.stderr
    assert "loop 1" in p.stdout and f"loop {K}" in p.stdout
    ev = json.load(open(os.path.join(tiny_runs["scale_visible"], "eval.json")))
    assert ev["lens"]["tokens"] == list("ROMEO:")


class LinearBlock:
    """A stand-in model whose loop adds the same vector b to every state: h_k = h_0 + k b. For it
    Lemma 2's series have a closed form, worked below in float64 numpy."""

    def __init__(self, h0, b):
        self.h0, self.b = h0, b
        self.lm_head = SimpleNamespace(weight=torch.zeros(1))  # where eval.py's amp looks

    def embed(self, x):
        return self.h0

    def loop(self, h, k):
        return h + self.b


def test_lemma2_series_on_a_block_with_a_closed_form():
    """Lemma 2 as the paper measures it, per loop k (RMS units: s = RMS(h), u = h / s, means over
    tokens): s_k, a_k = <u_k, h_{k+1} - h_k>, du_k = ||u_{k+1} - u_k||, du_k * s_k. On
    h_k = h_0 + k b every one is known by hand; a_k -> ||b|| sqrt(C) cos and du_k * s_k tend to
    constants as s_k grows, as the lemma says."""
    import numpy as np
    from eval import lemma2
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    out = lemma2(LinearBlock(h0, b), [(None, None)], n_loops=30)
    h = h0.numpy()[None] + np.arange(1, 31)[:, None, None, None] * b.numpy()[None]  # [30, ...]
    s = np.sqrt((h ** 2).mean(-1, keepdims=True))
    u = h / s
    a = (u[:-1] * (h[1:] - h[:-1])).sum(-1)
    du = np.linalg.norm(u[1:] - u[:-1], axis=-1)
    assert out["n_loops"] == 30
    assert out["s"] == pytest.approx(s[..., 0].mean(axis=(1, 2)).tolist(), rel=1e-12)
    assert out["radial_increment"] == pytest.approx(a.mean(axis=(1, 2)).tolist(), rel=1e-12)
    assert out["angular_step"] == pytest.approx(du.mean(axis=(1, 2)).tolist(), rel=1e-12)
    assert out["angular_step_x_s"] == pytest.approx((du * s[:-1, ..., 0]).mean(axis=(1, 2))
                                                    .tolist(), rel=1e-12)
    # the lemma's shape: the radial increment settles, the turn shrinks like 1/s
    assert abs(out["radial_increment"][-1] - out["radial_increment"][-2]) < 1e-3
    assert out["angular_step"][-1] < out["angular_step"][5] / 4


@pytest.mark.parametrize("readout", ["final_only", "rmsnorm"])
def test_variable_depth_decodes_each_depth_by_its_own_rule(readout, tiny_runs, data_dir):
    """The model run for K' = 1..3K loops: the CE of loop K' decoded as the last loop of a
    K'-loop run (final_only: RMSNorm'd at every K'), and the mean per-token ||h_K'||, both by
    hand from loop_states; for rmsnorm (whose rule does not depend on the depth) it equals
    the early exit of per_depth at the same loop."""
    from eval import variable_depth
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=2)
    cfg = model.config
    if readout != cfg.readout:  # the same weights under the final_only readout
        other = LoopedGPT(LoopedGPTConfig(**{**vars(cfg), "readout": readout})).eval()
        other.load_state_dict(model.state_dict())
        model = other
    model = model.double()
    K = cfg.n_loops
    for given in (None, all_states(model, batches)):
        out = variable_depth(model, batches, given)
        assert out["k"] == list(range(1, 3 * K + 1))
        with torch.no_grad():
            states = [model.loop_states(x, n_loops=3 * K) for x, _ in batches]
            for d in (1, K - 1, K, 3 * K):
                ce = [F.cross_entropy(model.lm_head(model.readout_norm(hs[d - 1])).flatten(0, 1),
                                      y.flatten()).item() for (_, y), hs in zip(batches, states)]
                assert out["ce"][d - 1] == pytest.approx(sum(ce) / 2, rel=1e-9)
                assert out["ppl"][d - 1] == pytest.approx(math.exp(sum(ce) / 2), rel=1e-9)
                norm = [hs[d - 1].norm(dim=-1).mean().item() for hs in states]
                assert out["hidden_norm"][d - 1] == pytest.approx(sum(norm) / 2, rel=1e-9)
    if readout == "rmsnorm":
        ce, _ = collect(model, batches, 2 * K)
        assert out["ce"][:2 * K] == pytest.approx(ce.flatten(1).mean(1).tolist(), rel=1e-6)


def test_radial_clamp_modes(tiny_runs, data_dir):
    """The paper's radial clamp, mode by mode, in float64: none is the model's own states;
    freeze_loop1 gives every later state its token's loop-1 RMS and the direction of the loop
    applied to the clamped state before; remove_radial makes each loop's update orthogonal to
    the state it starts from, keeping the rest of it, and loop 1 is as it was."""
    from eval import clamp, clamped_states
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir, n=1)
    model = model.double()
    x, y = batches[0]
    with torch.no_grad():
        own = model.loop_states(x)
        none = clamped_states(model, x, "none")
        assert all(torch.equal(a, b) for a, b in zip(own, none))
        frozen = clamped_states(model, x, "freeze_loop1")
        radial = clamped_states(model, x, "remove_radial")
        assert torch.equal(frozen[0], own[0]) and torch.equal(radial[0], own[0])
        rms1 = own[0].pow(2).mean(-1).sqrt()
        for k in range(2, len(own) + 1):
            h = frozen[k - 1]
            torch.testing.assert_close(h.pow(2).mean(-1).sqrt(), rms1, rtol=1e-12, atol=0)
            free = model.loop(frozen[k - 2], k)
            cos = F.cosine_similarity(h, free, dim=-1)
            torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)
            prev, h = radial[k - 2], radial[k - 1]
            update = h - prev
            cos = F.cosine_similarity(update, prev, dim=-1)
            assert cos.abs().max() < 1e-9, k
            d = model.loop(prev, k) - prev  # what the loop would add: only its radial part gone
            u = prev / prev.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(update, d - (d * u).sum(-1, keepdim=True) * u)
    out = clamp(model, batches)
    assert out["modes"] == ["none", "freeze_loop1", "remove_radial"]
    for mode, states in (("none", none), ("freeze_loop1", frozen), ("remove_radial", radial)):
        with torch.no_grad():
            ce = [F.cross_entropy(model.readout(h, k).flatten(0, 1), y.flatten()).item()
                  for k, h in enumerate(states, start=1)]
        assert out["ce"][mode] == pytest.approx(ce, rel=1e-12)
        assert out["hidden_norm"][mode] == pytest.approx(
            [h.norm(dim=-1).mean().item() for h in states], rel=1e-12)


def test_scale_sensitivity_flat_only_for_rmsnorm(tiny_runs, data_dir):
    """CE of the readout of alpha * h_K at the paper's ten alphas, by hand: flat for rmsnorm
    (on states of a trained scale: at a tiny one the norm's eps, 1e-6, would show), moving for
    scale_visible."""
    from eval import SCALE_ALPHAS, scale
    assert SCALE_ALPHAS == (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    for readout, flat in (("rmsnorm", True), ("scale_visible", False)):
        model, batches = val_batches(tiny_runs[readout], data_dir, n=2)
        model = model.double()
        states = [[100 * h for h in hs] for hs in all_states(model, batches)]
        ce = scale(model, batches, states)["ce"]
        K = model.config.n_loops
        with torch.no_grad():
            expect = [sum(F.cross_entropy(model.readout(a * hs[-1], K).flatten(0, 1),
                                          y.flatten()).item()
                          for (_, y), hs in zip(batches, states)) / 2 for a in SCALE_ALPHAS]
        assert ce == pytest.approx(expect, rel=1e-12)
        assert (max(ce) - min(ce) < 1e-6) == flat, (readout, ce)


def test_norm_spread_quantiles_are_ordered(tiny_runs, data_dir):
    from eval import spread
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=2)
    out = spread(model, batches)
    for p50, p90, p99, top in out["per_loop"]:
        assert 0 < p50 <= p90 <= p99 <= top
    assert sum(out["hist_counts"]) == 2 * 4 * 32  # every token of the last loop is binned


def test_eval_cli_each_diagnostic(tiny_runs, data_dir):
    """Each diagnostic alone adds its key to eval.json (in-process; the CLI as a user runs it
    is tested in test_faults.py)."""
    out = tiny_runs["scale_visible"]
    for name in DIAGNOSTICS:
        extra = ["--lemma2_loops=5"] if name == "lemma2" else []
        eval_script.main([f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_iters=1",
                          f"--run={name}", *extra])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert set(DIAGNOSTICS) <= ev.keys()
    assert ev["lemma2"]["n_loops"] == 5 and len(ev["lemma2"]["s"]) == 5


def test_lemma1_on_trained_checkpoints(tiny_runs, data_dir):
    """On the trained runs, with the states taken to a trained model's scale (x100: at a tiny
    scale the norm's eps, 1e-6, leaves a radial part of about eps / mean(h^2)): |cos| < 1e-6 for
    rmsnorm, clearly non-zero for scale_visible; and the radial fraction at loops 1 and K is
    the mean |cos| there, recomputed token by token."""
    from eval import lemma1
    cos = {}
    for name in ("rmsnorm", "scale_visible"):
        model, batches = val_batches(tiny_runs[name], data_dir, n=2)
        states = [[100 * h for h in hs] for hs in all_states(model, batches)]
        cos[name] = lemma1(model, batches, states)
        assert cos[name]["n_tokens"] == 2 * 4 * 32
        assert next(model.parameters()).dtype == torch.float32  # handed back as it came
        K = model.config.n_loops
        double = load_model(tiny_runs[name])[0].double()
        for k, mean in zip(cos[name]["radial_fraction"]["loop"],
                           cos[name]["radial_fraction"]["mean_abs_cos"]):
            per_token = []
            for (_, y), hs in zip(batches, states):
                for b in range(y.size(0)):
                    for t in range(y.size(1)):
                        h = hs[k - 1][b, t].double().requires_grad_(True)
                        ce = F.cross_entropy(double.readout(h[None], k), y[b, t][None])
                        (g,) = torch.autograd.grad(ce, h)
                        per_token.append(abs(torch.dot(g, h) / (g.norm() * h.norm())).item())
            assert mean == pytest.approx(sum(per_token) / len(per_token), rel=1e-6, abs=1e-15)
        assert cos[name]["radial_fraction"]["loop"] == [1, K]
    assert cos["rmsnorm"]["max_abs_cos"] < 1e-6
    assert cos["scale_visible"]["mean_abs_cos"] > 1e-3


def test_lemma1_readout_is_the_models_and_chunks_change_nothing(tiny_runs, data_dir):
    """lemma1 decodes h_K with float64 CPU copies of the LM head and the readout's norm: the
    model's own readout; walking over row chunks gives the per-token cosines of the whole
    batch."""
    from eval import lemma1
    for name in ("rmsnorm", "scale_visible"):
        model, batches = val_batches(tiny_runs[name], data_dir, n=2)
        K = model.config.n_loops
        h = all_states(model, batches)[0][-1]
        with torch.no_grad():
            copy = model.readout_copy("cpu", torch.float64)
            assert torch.allclose(copy(h.double(), K), model.readout(h, K).double(), atol=1e-5)
        whole = lemma1(model, batches)
        chunked = lemma1(model, batches, chunk_elems=5 * model.config.vocab_size)  # 5 rows
        assert chunked["n_tokens"] == whole["n_tokens"] == 2 * 4 * 32
        for key in ("max_abs_cos", "mean_abs_cos"):  # the same up to float64 rounding
            assert abs(chunked[key] - whole[key]) < 1e-12, (name, key)


# ---- on a GPU: the stand-in accelerator (tests/standin.py) ----------------------------------

class ZerosOnCpu(TorchFunctionMode):
    """Inside the stand-in, `.cpu()` of a device tensor gives zeros of its shape and dtype, so a
    function runs to its end: its device part under the device's rules, the rest (float64,
    histograms, reading values) on CPU tensors whose values mean nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and args[0].device.type == "meta":
            return torch.zeros(args[0].shape, dtype=args[0].dtype)
        return func(*args, **(kwargs or {}))


@contextmanager
def on_device(kind):
    with standin(kind) as dev, ZerosOnCpu():
        with pytest.raises(RuntimeError):  # the rules are on
            torch.ones(2, device=dev) + torch.ones(2)
        yield dev


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_eval_tensor_paths_on_device(kind, tiny_runs, data_dir):
    """collect, evaluate (per depth, halting, depth map), lens, all_states and every diagnostic,
    on a model and batches on the device: no CPU tensor mixed in, no float64 on MPS, no
    histogram on the device, no value read before its move to the CPU."""
    for readout in ("rmsnorm", "scale_visible", "alpha"):  # with a readout norm and without
        model, ckpt = load_model(tiny_runs[readout])
        encode, decode = load_tokenizer(ckpt["meta"])
        data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
        K, T, C = model.config.n_loops, model.config.block_size, model.config.n_embd
        with on_device(kind) as dev:
            model = model.to(dev)
            batches = [get_batch(data["val"], 4, T, eval_seed(i, "val"), dev) for i in range(2)]
            cal, held, held_data = split_batches(data["val"], 2, 4, T, dev)
            paper = windows(data["val"], 8, 4, T, dev)
            states = all_states(model, batches)
            assert [len(hs) for hs in states] == [K, K]
            assert all(h.device.type == dev and h.shape == (4, T, C) for hs in states for h in hs)
            for given in (None, states):
                ce, scores = collect(model, batches, 2 * K, given)
                assert ce.shape == (2 * K, 8, T) and ce.device.type == "cpu"
                assert all(s.shape == (2 * K, 8, T) for s in scores.values())
            out = evaluate(model, batches, cal, held, paper, SETTINGS, held_data, decode,
                           states)
            assert len(out["per_depth"]["ce"]) == 2 * K and len(out["depth_map"]["exit_loop"])
            for threshold in (None, 0.5):
                m = depth_map(model, held_data, {"threshold": threshold}, "entropy", "token",
                              decode)
                assert len(m["exit_loop"]) == len(m["ids"]) == len(m["tokens"])
            ids = encode("ROMEO:")
            out = lens(model, ids, decode)
            assert len(out["top1"]) == len(out["prob"]) == len(ids)
            assert all(len(row) == K for row in out["top1"])
            # lemma2 runs the block on past K: 2K loops take every one of its paths, as its
            # default of 30 does, in a fifth of the time
            extra = {"lemma2": {"n_loops": 2 * K}}
            for name in DIAGNOSTICS:
                for given in (None, states):
                    assert getattr(eval_script, name)(model, batches, given,
                                                      **extra.get(name, {})), name


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_eval_main_on_device_writes_json(kind, tiny_runs, data_dir, tmp_path, monkeypatch):
    """python eval.py --run=all on the device, through to eval.json (the depth map once crashed
    there, after all the compute)."""
    shutil.copy(os.path.join(tiny_runs["rmsnorm"], "ckpt.pt"), tmp_path)
    monkeypatch.setattr(eval_script, "keep_freed_memory", lambda: None)
    with on_device(kind) as dev:
        monkeypatch.setattr(eval_script, "device_or_exit", lambda name: dev)
        eval_script.main([f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--run=all",
                          "--eval_iters=1"])
    out = json.load(open(tmp_path / "eval.json"))
    assert {"per_depth", "halting", "depth_map", "lens", *DIAGNOSTICS} <= out.keys()


def test_collect_keeps_one_depth_of_logits_on_device(tiny_runs, data_dir, monkeypatch):
    """Every depth's [B, T, V] logits are dropped before the next depth's readout: 2K of them
    at once would not fit a GPU at a GPT-2 vocabulary."""
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=2)
    K = model.config.n_loops
    readout = model.readout
    made, alive = [], []  # weak references to every readout's logits; how many live per call

    def tracked(h, k):
        alive.append(sum(r() is not None for r in made))
        logits = readout(h, k)
        made.append(weakref.ref(logits))
        return logits
    monkeypatch.setattr(model, "readout", tracked)
    for given in (None, all_states(model, batches)):
        collect(model, batches, 2 * K, given)
    assert len(alive) == 2 * 2 * 2 * K and max(alive) == 0, alive


def test_collect_on_cpu_is_all_logits_at_once(tiny_runs, data_dir):
    """Depth by depth changes nothing on the CPU: the CE and scores are exactly those of all the
    depths' logits computed at once."""
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir, n=2)
    K = model.config.n_loops
    with torch.no_grad():
        ce, scores = [], {p: [] for p in EXIT_POLICIES}
        for x, y in batches:
            logits = [model.readout(h, k) for k, h in enumerate(model.loop_states(x, 2 * K), 1)]
            ce.append(torch.stack([F.cross_entropy(lg.transpose(1, 2), y, reduction="none")
                                   for lg in logits]))
            for p in EXIT_POLICIES:
                scores[p].append(torch.stack([exit_score(lg, p) for lg in logits]))
    for given in (None, all_states(model, batches)):
        got_ce, got = collect(model, batches, 2 * K, given)
        assert torch.equal(got_ce, torch.cat(ce, dim=1))
        assert all(torch.equal(got[p], torch.cat(scores[p], dim=1)) for p in EXIT_POLICIES)


def test_eval_runs_in_the_runs_dtype(tiny_runs, data_dir, tmp_path, monkeypatch):
    """A run trained in bfloat16 is evaluated under bfloat16 autocast (its readouts' logits are
    bf16), with CE and scores in float32."""
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=1)
    K = model.config.n_loops
    readout, dtypes = model.readout, set()

    def tracked(h, k):
        logits = readout(h, k)
        dtypes.add(logits.dtype)
        return logits
    monkeypatch.setattr(model, "readout", tracked)
    ce, scores = collect(model, batches, K, dtype="bfloat16")
    assert dtypes == {torch.bfloat16}
    assert ce.dtype == torch.float32 and all(s.dtype == torch.float32 for s in scores.values())
    ce32, _ = collect(model, batches, K)
    assert not torch.equal(ce, ce32) and torch.allclose(ce, ce32, atol=0.1)
    # eval.py reads the dtype from the checkpoint
    ckpt = torch.load(os.path.join(tiny_runs["rmsnorm"], "ckpt.pt"), weights_only=True)
    ckpt["config"]["resolved"]["dtype"] = "bfloat16"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    used = set()
    amp = eval_script.amp
    monkeypatch.setattr(eval_script, "amp", lambda m, dtype: used.add(dtype) or amp(m, dtype))
    monkeypatch.setattr(eval_script, "keep_freed_memory", lambda: None)
    eval_script.main([f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--run=all",
                      "--eval_iters=1", "--device=cpu"])
    assert used == {"bfloat16"}


# ---- values against independent references -------------------------------------------------

def test_depth_map_equals_exits_recomputed_token_by_token(tiny_runs, data_dir):
    """Each token's exit loop: the first loop whose readout's top-1 minus top-2 logit reaches
    the threshold, else K, recomputed here from the model's own readouts."""
    model, ckpt = load_model(tiny_runs["scale_visible"])
    data, _ = load_data(data_dir, "tiny_char", ckpt["config"]["block_size"])
    K, T = model.config.n_loops, model.config.block_size
    val = data["val"]
    x = torch.from_numpy(val[:2 * T].astype("int64")).view(2, T)
    with torch.no_grad():
        margins = []
        for k, h in enumerate(model.loop_states(x), start=1):
            top2 = model.readout(h, k).topk(2, dim=-1).values
            margins.append((top2[..., 0] - top2[..., 1]).flatten().tolist())
    t = sorted(margins[0])[len(margins[0]) // 2]  # about half the tokens exit at loop 1
    expect = []
    for i in range(2 * T):
        expect.append(next((k for k in range(1, K) if margins[k - 1][i] >= t), K))
    assert 1 < len(set(expect))  # the exits differ between tokens
    out = depth_map(model, val, {"threshold": t}, "logit_margin", "token", None, n_tokens=2 * T)
    assert out["ids"] == val[:2 * T].tolist()
    # the threshold sits on one token's score: allow that token to round either way
    wrong = [i for i, (a, b) in enumerate(zip(out["exit_loop"], expect)) if a != b]
    assert len(wrong) <= 1, wrong


def test_norm_spread_equals_numpy(tiny_runs, data_dir):
    import numpy as np

    from eval import spread
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=2)
    with torch.no_grad():
        norms = [np.concatenate([h.norm(dim=-1).flatten().double().numpy() for h in hs])
                 for hs in zip(*[model.loop_states(x) for x, _ in batches])]
    out = spread(model, batches)
    for k, n in enumerate(norms):
        expect = np.percentile(n, [50, 90, 99, 100])
        np.testing.assert_allclose(out["per_loop"][k], expect, rtol=1e-6)
    counts, _ = np.histogram(norms[-1], bins=np.array(out["hist_edges"]))
    assert out["hist_counts"] == counts.tolist()


def test_calibration_and_held_out_batches_are_disjoint(tiny_runs, data_dir):
    """Every calibration sequence lies in the first half of the validation split, every
    held-out one in the second: found by searching the split for each sequence."""
    import numpy as np
    _, ckpt = load_model(tiny_runs["rmsnorm"])
    T = ckpt["config"]["block_size"]
    val = load_data(data_dir, "tiny_char", T)[0]["val"]
    cal, held, _ = split_batches(val, 3, 4, T, "cpu")
    half = len(val) // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(val), T + 1)
    for batches, inside in ((cal, lambda s: s + T + 1 <= half), (held, lambda s: s >= half)):
        for x, y in batches:
            for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
                starts = np.flatnonzero((windows == row).all(axis=1))
                assert len(starts) and all(inside(s) for s in starts), starts


def test_threshold_sweep_recomputed(tiny_runs, data_dir):
    """The operating curve: for each threshold, the mean exit loop and the PPL of the held-out
    tokens when each reads its prediction at its own exit, recomputed token by token."""
    model, _ = load_model(tiny_runs["scale_visible"])
    cal_b, held_b, held_data, paper = halves(tiny_runs["scale_visible"], data_dir, n=2)
    val_b = val_batches(tiny_runs["scale_visible"], data_dir, n=2)[1]
    out = evaluate(model, val_b, cal_b, held_b, paper, SETTINGS, held_data)
    K = model.config.n_loops
    ce, scores = collect(model, held_b, K)
    ce, margin = ce.flatten(1).tolist(), scores["logit_margin"].flatten(1).tolist()
    sweep = out["adaptive"]
    assert len(set(sweep["mean_loops"])) > 1  # the sweep spans different depths
    for t, loops, ppl in zip(sweep["threshold"], sweep["mean_loops"], sweep["ppl"]):
        exit_at = [next((k for k in range(1, K) if margin[k - 1][i] >= t), K)
                   for i in range(len(ce[0]))]
        assert loops == pytest.approx(sum(exit_at) / len(exit_at))
        token_ce = [ce[k - 1][i] for i, k in enumerate(exit_at)]
        assert ppl == pytest.approx(math.exp(sum(token_ce) / len(token_ce)), rel=1e-6)


def test_eval_all_end_to_end_values(tiny_runs, data_dir, tmp_path):
    """eval.py --run=all writes what the functions compute on the run's own batches: the
    per-depth CE at K is the model's own val CE, the diagnostics equal direct calls."""
    from eval import lemma1, main, scale, spread
    shutil.copytree(tiny_runs["scale_visible"], tmp_path / "run")
    out = main([f"--out_dir={tmp_path / 'run'}", "--run=all", "--eval_iters=2",
                "--n_thresholds=3"])
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["scale"] == out["scale"]
    model, ckpt = load_model(tmp_path / "run")
    T, B = ckpt["config"]["block_size"], ckpt["config"]["batch_size"]
    data, _ = load_data(data_dir, "tiny_char", T)
    batches = [get_batch(data["val"], B, T, eval_seed(i, "val")) for i in range(2)]
    K = model.config.n_loops
    with torch.no_grad():
        own = sum(model(x, y)[2]["loop_ce"][K - 1].item() for x, y in batches) / 2
    assert out["per_depth"]["ce"][K - 1] == pytest.approx(own, rel=1e-5)
    assert out["scale"] == scale(model, batches)
    assert out["spread"]["per_loop"] == spread(model, batches)["per_loop"]
    assert out["lemma1"]["max_abs_cos"] == pytest.approx(lemma1(model, batches)["max_abs_cos"])
    # the endpoint metric, as its definition says: the CE gap is ln PPL_1 - ln PPL_K
    ppl = out["per_depth"]["ppl"]
    assert out["endpoint"]["ce_gap"] == pytest.approx(math.log(ppl[0]) - math.log(ppl[K - 1]))
    assert out["endpoint"]["radial_fraction"] == out["lemma1"]["radial_fraction"]


# ---- early exit in wall-clock time (--run=speed) ----------------------------------------------

def test_frontier_is_tokens_over_the_median_round_per_depth(tiny_runs, monkeypatch):
    """The compute-quality frontier with a clock that charges each loop and readout a known
    time: tokens/s at depth k is B x T over the median timed round of k loops and one readout;
    the warm-up round is not timed; the PPL beside it is per_depth's at k."""
    model, _ = load_model(tiny_runs["rmsnorm"])
    K = model.config.n_loops
    clock = [0.0]
    rounds = [0]
    loop, readout = model.loop, model.readout

    def slow_loop(h, k, kv_caches=None):
        clock[0] += 0.01 * (5 if rounds[0] == 0 else 1)  # the untimed warm-up is slow
        return loop(h, k)

    def slow_readout(h, k, n_loops=None):
        clock[0] += 0.002
        if k == K:
            rounds[0] += 1
        return readout(h, k)
    monkeypatch.setattr(model, "loop", slow_loop)
    monkeypatch.setattr(model, "readout", slow_readout)
    monkeypatch.setattr(eval_script.time, "thread_time", lambda: clock[0])  # a CPU's clock
    x = torch.zeros(3, 32, dtype=torch.long)
    ppl = [9.0, 8.0, 7.0, 6.5, 6.4, 6.3]
    out = eval_script.frontier(model, x, ppl, rounds=3)
    assert out["k"] == list(range(1, K + 1)) and out["ppl"] == ppl[:K]
    for k, tps in zip(out["k"], out["tokens_per_s"]):
        assert tps == pytest.approx(3 * 32 / (0.01 * k + 0.002)), k


def test_paper_halting_is_per_sequence_on_the_same_windows(tiny_runs, data_dir):
    """evaluate's halting_paper: for each policy, the threshold calibrated per sequence on the
    first windows of val (in order, non-overlapping), and its mean loops and PPL on those same
    windows, recomputed with calibrate on the CEs and scores of the windows."""
    model, ckpt = load_model(tiny_runs["scale_visible"])
    data, _ = load_data(data_dir, "tiny_char", 32)
    cal_b, held_b, held_data, paper = halves(tiny_runs["scale_visible"], data_dir, n=2)
    x0 = torch.from_numpy(data["val"][:32 * 8 + 1].astype("int64"))
    assert torch.equal(torch.cat([x for x, _ in paper]), x0[:-1].view(8, 32))
    assert torch.equal(torch.cat([y for _, y in paper]), x0[1:].view(8, 32))
    val_b = val_batches(tiny_runs["scale_visible"], data_dir, n=2)[1]
    out = evaluate(model, val_b, cal_b, held_b, paper, SETTINGS, held_data)
    K = model.config.n_loops
    ce, scores = collect(model, paper, K)
    for policy, h in out["halting_paper"].items():
        t, loops, ppl = calibrate(ce, scores[policy], policy, K, 1.01, 11, "sequence")
        full = math.exp(ce[K - 1].double().mean().item())
        assert h["threshold"] == t and h["n_sequences"] == 8
        assert h["mean_loops"] == pytest.approx(loops) and h["ppl"] == pytest.approx(ppl)
        assert h["ratio"] == pytest.approx(ppl / full)


def test_speed_reports_the_median_of_the_timed_rounds(tiny_runs, monkeypatch):
    """A fake generator whose calls take known times: tokens/s is batch x new tokens over the
    median timed round; warm-ups are not timed; the exit kind runs at the calibrated threshold."""
    import sample
    model, _ = load_model(tiny_runs["rmsnorm"])
    K = model.config.n_loops
    clock = [0.0]
    calls = {"full": 0, "exit": 0}
    factors = [7.0, 1.0, 4.0, 1.2]  # per kind: the warm-up, then three timed rounds

    def fake_generate(model, idx, n, exit_policy=None, exit_threshold=None):
        kind = "exit" if exit_policy else "full"
        assert exit_policy in (None, "logit_margin") and exit_threshold in (None, 2.5)
        clock[0] += n * (0.001 if exit_policy else 0.003) * factors[calls[kind] % 4]
        calls[kind] += 1
        used = torch.full((idx.size(0), n), 1 if exit_policy else K)
        return idx, used
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(eval_script.time, "thread_time", lambda: clock[0])  # a CPU's clock
    cfg = SimpleNamespace(policy="logit_margin", new_tokens=20, rounds=3)
    halt = {"threshold": 2.5, "mean_loops": 1.5, "ppl": 10.1, "ratio": 1.01}
    data = torch.arange(500).numpy()
    out = eval_script.speed(model, data, halt, cfg)
    for b in ("1", "8"):
        assert out["batch"][b]["full"]["tokens_per_s"] == pytest.approx(int(b) / (0.003 * 1.2))
        assert out["batch"][b]["exit"]["tokens_per_s"] == pytest.approx(int(b) / (0.001 * 1.2))
        assert out["batch"][b]["full"]["mean_loops"] == K
        assert out["batch"][b]["exit"]["mean_loops"] == 1
        # each round's exit took a third of its full round: 3x, against an ideal of K / 1
        assert out["batch"][b]["speed_up"] == pytest.approx(3.0)
        assert out["batch"][b]["ideal"] == K and out["batch"][b]["of_ideal"] == pytest.approx(3 / K)
    assert out["ppl"] == {"full": pytest.approx(10.0), "exit": 10.1}
    # no threshold met the target: halting runs all K loops, so "exit" is the full kind
    calls["full"] = 0
    out = eval_script.speed(model, data, halt | {"threshold": None, "ratio": 1.0}, cfg)
    r = out["batch"]["8"]
    assert calls["exit"] == 8 and r["exit"] == r["full"] | {"ppl": out["ppl"]["full"]}


def test_speed_cli_generates_at_the_calibrated_threshold(tiny_runs, data_dir, tmp_path):
    out_dir = tmp_path / "run"
    os.makedirs(out_dir)
    shutil.copy(os.path.join(tiny_runs["scale_visible"], "ckpt.pt"), out_dir)
    args = [f"--out_dir={out_dir}", f"--data_dir={data_dir}"]
    p = run("eval.py", "--run=speed", *args)  # nothing calibrated yet: one line, nothing run
    assert p.returncode == 1 and "run eval.py --run=depth" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (out_dir / "eval.json").exists()
    p = run("eval.py", "--new_tokens=5", *args)
    assert p.returncode == 2 and "--new_tokens is an option of --run=speed" in p.stderr
    assert run("eval.py", "--eval_iters=2", *args).returncode == 0
    # a threshold every token passes at loop 1: generation must really exit there
    ev = json.loads((out_dir / "eval.json").read_text())
    ev["halting"]["token"]["logit_margin"]["threshold"] = -1.0  # a margin is >= 0
    (out_dir / "eval.json").write_text(json.dumps(ev))
    p = run("eval.py", "--run=speed", "--new_tokens=40", "--rounds=1", *args)
    assert p.returncode == 0, p.stderr
    ev = json.loads((out_dir / "eval.json").read_text())
    K = ev["n_loops"]
    assert "per_depth" in ev and "halting" in ev  # the depth part is kept
    for b in ("1", "8"):
        r = ev["speed"]["batch"][b]
        assert r["full"]["mean_loops"] == K and r["exit"]["mean_loops"] == 1.0
        assert r["full"]["tokens_per_s"] > 0 and r["exit"]["tokens_per_s"] > 0
    assert ev["speed"]["threshold"] == -1.0 and "speed-up" in p.stdout
    # every token exits at loop 1: the test there is the only one that pays, at either size
    assert all(ev["speed"]["batch"][b]["tested_loops"] == [1] for b in ("1", "8"))
    assert "tests at" in p.stdout


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_speed_on_device(kind, tiny_runs, data_dir, monkeypatch):
    """--run=speed on the stand-in device: prompts built on the CPU reach the model's device, and
    nothing is read back but through the CPU (and generation's exit checks, answered here)."""
    import sample
    monkeypatch.setattr(sample, "who_exited", lambda done: (False, True))
    monkeypatch.setattr(sample, "exit_decisions", lambda passed: (  # none exits
        [[False] * passed.size(1)] * passed.size(0) if passed.dim() == 2
        else [False] * passed.size(0)))
    monkeypatch.setattr(sample, "exit_loops", lambda loops_used, prompt_exits, P, start, end: (
        [[model.config.n_loops] * (end - start)] * loops_used[0].size(0)))  # a refill's window
    # the stand-in's values are zeros (0 loops used): the arithmetic of the row, value-tested
    # on the CPU above, is given loops a real run could use
    row = sample.early_exit_row
    monkeypatch.setattr(sample, "early_exit_row", lambda times, loops, ref, name, K, tokens: row(
        times, {k: [1.0] * len(v) for k, v in loops.items()}, ref, name, K, tokens))
    model, ckpt = load_model(tiny_runs["scale_visible"])
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    cfg = SimpleNamespace(policy="logit_margin", new_tokens=4, rounds=1)
    halt = {"threshold": 0.5, "mean_loops": 2.0, "ppl": 10.1, "ratio": 1.01}
    with on_device(kind) as dev:
        out = eval_script.speed(model.to(dev), data["val"], halt, cfg)
    assert set(out["batch"]) == {"1", "8"}
    assert all(r[k]["tokens_per_s"] > 0 for r in out["batch"].values() for k in ("full", "exit"))
