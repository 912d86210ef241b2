"""eval.py (per-depth PPL, halting, depth map, lens, diagnostics), plot_norms.py and
experiments.py (Table 1, the claims table)."""

import json
import math
import os
from types import SimpleNamespace

import torch

from conftest import run
from eval import adaptive_exit, all_states, calibrate, collect, evaluate, exit_loops, halting
from eval import lens
from eval import split_batches
from prepare import load_tokenizer
from rundir import eval_seed, get_batch, load_checkpoint, load_data, model_from_checkpoint

SETTINGS = SimpleNamespace(max_depth=0, target=1.01, policy="logit_margin", exit_unit="token",
                           n_thresholds=5)


def load_model(out_dir):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    return model_from_checkpoint(ckpt, "cpu"), ckpt


def val_batches(out_dir, data_dir, n=3):
    model, ckpt = load_model(out_dir)
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    T = ckpt["config"]["block_size"]
    return model, [get_batch(data["val"], 4, T, eval_seed(i, "val")) for i in range(n)]


def halves(out_dir, data_dir, n=3):
    model, ckpt = load_model(out_dir)
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    return split_batches(data["val"], n, 4, ckpt["config"]["block_size"], "cpu")


def test_per_depth_at_K_equals_models_own_val_ce(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir)
    cal, held, held_data = halves(tiny_runs["rmsnorm"], data_dir)
    out = evaluate(model, batches, cal, held, SETTINGS, held_data)
    with torch.no_grad():
        own = sum(model(x, y)[1].item() for x, y in batches) / len(batches)  # mean of K CEs
        last = sum(model(x, y)[2]["loop_ce"][-1].item() for x, y in batches) / len(batches)
    K = model.config.n_loops
    assert len(out["per_depth"]["ppl"]) == 2 * K
    assert abs(out["per_depth"]["ce"][K - 1] - last) < 1e-5
    assert abs(sum(out["per_depth"]["ce"][:K]) / K - own) < 1e-5
    assert set(out["halting"]) == {"token", "sequence"}
    for unit in out["halting"].values():
        assert set(unit) == {"max_prob", "logit_margin", "entropy"}
        assert all(1 <= h["mean_loops"] <= K for h in unit.values())


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
    full = math.exp(ce[K - 1].mean().item())
    for unit in ("token", "sequence"):
        loops, ppl = adaptive_exit(ce, scores["max_prob"], "max_prob", 1.01, K, unit)  # none pass
        assert loops == K and abs(ppl - full) < 1e-9
        loops, ppl = adaptive_exit(ce, scores["entropy"], "entropy", 1e9, K, unit)  # all pass
        assert loops == 1 and abs(ppl - math.exp(ce[0].mean().item())) < 1e-9


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
    cal_b, held_b, _ = halves(tiny_runs["rmsnorm"], data_dir)
    cal = collect(model, cal_b, K)
    other_b = [(x.flip(0), y.flip(0)) for x, y in cal_b[1:]] + [held_b[0]]
    results = []
    for held in (collect(model, held_b, K), collect(model, other_b, K)):
        for unit in ("token", "sequence"):
            for policy in ("max_prob", "logit_margin", "entropy"):
                results.append((unit, policy, halting(cal, held, policy, K, 1.01, unit)))
    n = len(results) // 2
    for (_, _, a), (_, _, b) in zip(results[:n], results[n:]):
        assert a["threshold"] == b["threshold"]  # the held-out batches do not move it
    for unit, policy, _ in results[:n]:
        t = calibrate(cal[0], cal[1][policy], policy, K, 1.01, unit)
        if t is not None:  # on the calibration batches the target holds
            full = math.exp(cal[0][K - 1].mean().item())
            assert adaptive_exit(cal[0], cal[1][policy], policy, t, K, unit)[1] <= 1.01 * full


def test_calibrated_threshold_is_the_loosest_within_target():
    """On synthetic exits where sure tokens lose little by exiting early, the calibrated
    threshold keeps PPL within 1.01x, and the next looser candidate would not."""
    from model import strict_to_loose
    g = torch.Generator().manual_seed(0)
    K, S, T = 3, 8, 50
    sure = torch.rand(K, S, T, generator=g)
    base = 2.0 + torch.rand(S, T, generator=g)
    ce = torch.stack([base + (1 - sure[0]) * 0.5, base + (1 - sure[1]) * 0.1, base])
    full = math.exp(ce[K - 1].mean().item())
    assert math.exp(ce[0].mean().item()) > 1.1 * full  # exiting everyone at loop 1 costs
    scores = {"max_prob": sure, "logit_margin": 10 * sure, "entropy": 3 * (1 - sure)}
    for policy, score in scores.items():
        t = calibrate(ce, score, policy, K, 1.01)
        loops, ppl = adaptive_exit(ce, score, policy, t, K)
        assert ppl <= 1.01 * full and 1 < loops < K, policy
        cands = strict_to_loose(torch.unique(score[:K - 1]).tolist(), policy)
        looser = cands[cands.index(t) + 1]
        assert adaptive_exit(ce, score, policy, looser, K)[1] > 1.01 * full, policy


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


def test_decomposition_parts_add_up(tiny_runs, data_dir):
    from eval import decomposition
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=1)
    model = model.double()
    with torch.no_grad():
        states = model.loop_states(batches[0][0])
        h, h_next = states[0], states[1]
        d = h_next - h
        u = h / h.norm(dim=-1, keepdim=True)
        a_rad = (d * u).sum(-1)
        tangential = (d - a_rad[..., None] * u).norm(dim=-1)
    assert torch.allclose(a_rad ** 2 + tangential ** 2, d.norm(dim=-1) ** 2, rtol=1e-10)
    out = decomposition(model, batches)
    K = model.config.n_loops
    assert sorted(out) == list(range(1, K))
    assert abs(out[1]["radial"]["mean"] - a_rad.mean().item()) < 1e-9
    assert abs(out[1]["tangential"]["mean"] - tangential.mean().item()) < 1e-9
    assert all(0 <= out[k]["angle"]["mean"] <= math.pi for k in out)


def test_radial_clamp_with_own_norms_is_exact(tiny_runs, data_dir):
    from eval import clamped_loop_ce
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir, n=1)
    x, y = batches[0]
    with torch.no_grad():
        own = [h.norm(dim=-1, keepdim=True) for h in model.loop_states(x)]
        plain = model(x, y)[2]["loop_ce"].tolist()
    assert clamped_loop_ce(model, x, y, ref_norms=own) == plain
    clamped = clamped_loop_ce(model, x, y)  # loop-1 reference: the state's growth removed
    assert clamped[0] == plain[0] and clamped[1:] != plain[1:]


def test_scale_sensitivity_flat_only_for_rmsnorm(tiny_runs, data_dir):
    from eval import scale
    for readout, flat in (("rmsnorm", True), ("scale_visible", False)):
        model, batches = val_batches(tiny_runs[readout], data_dir, n=2)
        ce = scale(model.double(), batches)["ce"]
        assert (max(ce) - min(ce) < 1e-6) == flat, (readout, ce)


def test_norm_spread_quantiles_are_ordered(tiny_runs, data_dir):
    from eval import spread
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir, n=2)
    out = spread(model, batches)
    for p50, p90, p99, top in out["per_loop"]:
        assert 0 < p50 <= p90 <= p99 <= top
    assert sum(out["hist_counts"]) == 2 * 4 * 32  # every token of the last loop is binned


def test_eval_cli_each_diagnostic(tiny_runs, data_dir):
    out = tiny_runs["scale_visible"]
    for name in ("lemma1", "decomposition", "clamp", "scale", "spread"):
        p = run("eval.py", f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_iters=1",
                f"--run={name}")
        assert p.returncode == 0, p.stderr
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert {"lemma1", "decomposition", "clamp", "scale", "spread"} <= ev.keys()


def test_lemma1_on_trained_checkpoints(tiny_runs, data_dir):
    from eval import lemma1
    cos = {}
    for name in ("rmsnorm", "scale_visible"):
        model, batches = val_batches(tiny_runs[name], data_dir, n=2)
        cos[name] = lemma1(model, batches)
        assert cos[name]["n_tokens"] == 2 * 4 * 32
        assert next(model.parameters()).dtype == torch.float32  # handed back as it came
    assert cos["rmsnorm"]["max_abs_cos"] < 1e-6
    assert cos["scale_visible"]["mean_abs_cos"] > 1e-3
