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
from eval import exit_loops, halting, lens, split_batches
from model import EXIT_POLICIES, exit_score
from prepare import load_tokenizer
from rundir import eval_seed, get_batch, load_checkpoint, load_data, model_from_checkpoint
from standin import standin

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
    assert clamped_loop_ce(model, x, y, ref_norms=own).tolist() == plain
    clamped = clamped_loop_ce(model, x, y).tolist()  # loop-1 reference: the growth removed
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
    """Each diagnostic alone adds its key to eval.json (in-process; the CLI as a user runs it
    is tested in test_faults.py)."""
    out = tiny_runs["scale_visible"]
    for name in ("lemma1", "decomposition", "clamp", "scale", "spread"):
        eval_script.main([f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_iters=1",
                          f"--run={name}"])
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
            states = all_states(model, batches)
            assert [len(hs) for hs in states] == [K, K]
            assert all(h.device.type == dev and h.shape == (4, T, C) for hs in states for h in hs)
            for given in (None, states):
                ce, scores = collect(model, batches, 2 * K, given)
                assert ce.shape == (2 * K, 8, T) and ce.device.type == "cpu"
                assert all(s.shape == (2 * K, 8, T) for s in scores.values())
            out = evaluate(model, batches, cal, held, SETTINGS, held_data, decode, states)
            assert len(out["per_depth"]["ce"]) == 2 * K and len(out["depth_map"]["exit_loop"])
            for threshold in (None, 0.5):
                m = depth_map(model, held_data, {"threshold": threshold}, "entropy", "token",
                              decode)
                assert len(m["exit_loop"]) == len(m["ids"]) == len(m["tokens"])
            ids = encode("ROMEO:")
            out = lens(model, ids, decode)
            assert len(out["top1"]) == len(out["prob"]) == len(ids)
            assert all(len(row) == K for row in out["top1"])
            for name in DIAGNOSTICS:
                for given in (None, states):
                    assert getattr(eval_script, name)(model, batches, given), name


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
    cal_b, held_b, held_data = halves(tiny_runs["scale_visible"], data_dir, n=2)
    val_b = val_batches(tiny_runs["scale_visible"], data_dir, n=2)[1]
    out = evaluate(model, val_b, cal_b, held_b, SETTINGS, held_data)
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


# ---- early exit in wall-clock time (--run=speed) ----------------------------------------------

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
    monkeypatch.setattr(eval_script.time, "perf_counter", lambda: clock[0])
    cfg = SimpleNamespace(policy="logit_margin", new_tokens=20, rounds=3)
    halt = {"threshold": 2.5, "mean_loops": 1.5, "ppl": 10.1, "ratio": 1.01}
    data = torch.arange(500).numpy()
    out = eval_script.speed(model, data, halt, cfg)
    for b in ("1", "8"):
        assert out["batch"][b]["full"]["tokens_per_s"] == pytest.approx(int(b) / (0.003 * 1.2))
        assert out["batch"][b]["exit"]["tokens_per_s"] == pytest.approx(int(b) / (0.001 * 1.2))
        assert out["batch"][b]["full"]["mean_loops"] == K
        assert out["batch"][b]["exit"]["mean_loops"] == 1
    assert out["ppl"] == {"full": pytest.approx(10.0), "exit": 10.1}
    # no threshold met the target: halting runs all K loops, so "exit" is the full kind
    calls["full"] = 0
    out = eval_script.speed(model, data, halt | {"threshold": None, "ratio": 1.0}, cfg)
    assert calls["exit"] == 8 and out["batch"]["8"]["exit"] == out["batch"]["8"]["full"]


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


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_speed_on_device(kind, tiny_runs, data_dir, monkeypatch):
    """--run=speed on the stand-in device: prompts built on the CPU reach the model's device, and
    nothing is read back but through the CPU (and generation's one exit check, answered here)."""
    import sample
    monkeypatch.setattr(sample, "who_exited", lambda done: (False, True))
    model, ckpt = load_model(tiny_runs["scale_visible"])
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    cfg = SimpleNamespace(policy="logit_margin", new_tokens=4, rounds=1)
    halt = {"threshold": 0.5, "mean_loops": 2.0, "ppl": 10.1, "ratio": 1.01}
    with on_device(kind) as dev:
        out = eval_script.speed(model.to(dev), data["val"], halt, cfg)
    assert set(out["batch"]) == {"1", "8"}
    assert all(r[k]["tokens_per_s"] > 0 for r in out["batch"].values() for k in ("full", "exit"))
