"""Every number nanoloop writes for a user, against a second computation of the same quantity
(issue #33): log.jsonl, the training step, eval.json's per-depth and halting sections,
claims.json and experiments.py's table, plot_norms.py's plotted data and table, bench.py's
figures that are not timings, the device clock's synchronize, and sampling's distribution.

Each expected value is computed here from its definition (the README's words, quoted where it
gives them), by brute force, in float64 or token by token, never by calling the function under
test or a helper it shares. Values are compared, not shapes."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY, read_log
from model import EXIT_POLICIES, LoopedGPT
from rundir import eval_seed, get_batch, load_checkpoint, load_data, model_config
from rundir import model_from_checkpoint


# ---- a looped model by hand, in float64 ---------------------------------------------------

def hand_states(model, x, n_loops=None):
    """h_1..h_n of a float64 copy of `model` (no loop norm), written out: the token and
    position embeddings, then the block's layers once per loop."""
    assert model.loop_rmsnorm is None
    wte = model.wte.weight.detach().double()
    wpe = model.wpe.weight.detach().double()
    layers = [type(layer)(model.config).double() for layer in model.block]
    for mine, theirs in zip(layers, model.block):
        mine.load_state_dict(theirs.state_dict())
        mine.eval()
    h = wte[x] + wpe[torch.arange(x.size(1))]
    states = []
    with torch.no_grad():
        for _ in range(n_loops or model.config.n_loops):
            for layer in layers:
                h = layer(h)
            states.append(h)
    return states


def hand_logits(model, h):
    """The readout of h through the tied head, float64: rmsnorm is h / sqrt(mean(h^2) + eps)
    times its gain; scale_visible is h itself."""
    w = model.lm_head.weight.detach().double()
    if model.config.readout == "rmsnorm":
        gain = model.readout_norm.weight.detach().double()
        h = h / torch.sqrt(h.pow(2).mean(dim=-1, keepdim=True) + model.config.norm_eps) * gain
    else:
        assert model.config.readout == "scale_visible"
    return h @ w.t()


def token_ce(logits, y):
    """Per token: logsumexp of the logits minus the target's logit."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, y[..., None])[..., 0]


def hand_scores(logits):
    """Per token, each exit policy's score from its definition: the largest softmax
    probability, the top-1 minus the top-2 logit, the entropy of the softmax."""
    p = torch.softmax(logits, dim=-1)
    top = logits.sort(dim=-1, descending=True).values
    return {"max_prob": p.max(dim=-1).values, "logit_margin": top[..., 0] - top[..., 1],
            "entropy": -(p * p.log()).sum(dim=-1)}


# ---- log.jsonl -------------------------------------------------------------------------------

def training_clock(monkeypatch):
    """train.py's clock made one that a training forward pass moves by 0.25 s and nothing else
    moves (from 100 s), so throughput and elapsed time are known exactly. Returns the clock
    ([seconds]), which a test may move itself."""
    import train
    clock = [100.0]
    forward = LoopedGPT.forward

    def timed(self, *args, **kw):
        if self.training:
            clock[0] += 0.25
        return forward(self, *args, **kw)
    monkeypatch.setattr(LoopedGPT, "forward", timed)
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: clock[0]))
    return clock


def test_log_values_recomputed_token_by_token(data_dir, tmp_path, monkeypatch):
    """log.jsonl's numbers at iter 0 (the initial weights, remade from the seed) and at the end
    (the final checkpoint's weights), recomputed here in float64 over every token of the
    evaluation batches, from the README's definitions:
    "`hidden_norm`: K floats: ||h_k||, the mean over validation tokens of each token's L2 norm
    of h_k"; "`train_loop_ce`, `val_loop_ce`: K floats: mean CE when exiting after loop k, on
    `eval_iters` fixed batches of each split"; "`lr`: learning rate of the next step";
    "`tokens_per_sec`: training throughput since the previous evaluation"; "`elapsed`: seconds
    of training so far". The clock is one that a training forward pass moves by 0.25 s and
    nothing else moves, so throughput and elapsed time are known exactly."""
    import train
    training_clock(monkeypatch)
    B, acc, T = 2, 3, 32
    train.main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={tmp_path}",
                       f"--batch_size={B}", f"--gradient_accumulation_steps={acc}",
                       "--max_iters=2", "--eval_interval=1"])
    log = read_log(tmp_path)
    assert [e["iter"] for e in log] == [0, 1, 2]
    # lr: TINY's 3e-3 after 2 linear warmup steps of (it + 1) / 3
    assert [e["lr"] for e in log] == pytest.approx([1e-3, 2e-3, 3e-3], rel=1e-12)
    step = acc * 0.25  # seconds: one forward pass per micro-batch
    assert [e["elapsed"] for e in log] == pytest.approx([0.0, step, 2 * step])
    tokens = B * acc * T  # a step: batch x micro-batches x positions
    assert [e["tokens_per_sec"] for e in log[1:]] == pytest.approx([tokens / step] * 2)
    assert all(e["skipped_steps"] == 0 for e in log)

    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    torch.manual_seed(ckpt["config"]["seed"])
    initial = LoopedGPT(model_config(ckpt["config"]))
    final = model_from_checkpoint(ckpt, "cpu")
    data, _ = load_data(data_dir, "tiny_char", T)
    K = final.config.n_loops
    for entry, model in ((log[0], initial), (log[-1], final)):
        expect = {}
        for split in ("train", "val"):
            ce_sum, n = torch.zeros(K, dtype=torch.float64), 0
            norms = [[] for _ in range(K)]
            for i in range(2):  # TINY: eval_iters=2 batches of batch_size sequences
                x, y = get_batch(data[split], B, T, eval_seed(i, split))
                for k, h in enumerate(hand_states(model, x)):
                    ce_sum[k] += token_ce(hand_logits(model, h), y).sum()
                    norms[k] += h.pow(2).sum(dim=-1).sqrt().flatten().tolist()
                n += x.numel()
            expect[f"{split}_loop_ce"] = (ce_sum / n).tolist()
            expect[f"{split}_norm"] = [sum(v) / len(v) for v in norms]
        assert entry["train_loop_ce"] == pytest.approx(expect["train_loop_ce"], rel=1e-5)
        assert entry["val_loop_ce"] == pytest.approx(expect["val_loop_ce"], rel=1e-5)
        assert entry["hidden_norm"] == pytest.approx(expect["val_norm"], rel=1e-5)
        assert entry["hidden_norm"] != pytest.approx(expect["train_norm"], rel=1e-3)



def test_log_elapsed_and_throughput_over_a_resume(data_dir, tmp_path, monkeypatch):
    """"`elapsed`: seconds of training so far (summed over resumes)": a run of 2 steps resumed
    for 2 more, with a clock that only a training forward pass moves (0.25 s), logs 0.5 s at
    iter 2 and 1.0 s at iter 4, and at iter 4 a throughput of the 2 steps since iter 2 over
    their 0.5 s (the time between the two processes not counted)."""
    import train
    clock = training_clock(monkeypatch)
    common = TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={tmp_path}",
                     "--eval_interval=2", "--eval_iters=1"]
    train.main(common + ["--max_iters=2"])
    clock[0] += 1000.0  # the time between the two processes
    train.main(common + ["--max_iters=4", "--init_from=resume"])
    log = read_log(tmp_path)
    assert [e["iter"] for e in log] == [0, 2, 4]
    assert [e["elapsed"] for e in log] == pytest.approx([0.0, 0.5, 1.0])
    assert log[2]["tokens_per_sec"] == pytest.approx(2 * 4 * 32 / 0.5)  # TINY: batch 4 x 32


# ---- the training step against a reference step written plainly ---------------------------

STEP_CASES = {  # option -> train.py flags (3 steps; TINY: lr 3e-3 after 2 warmup steps)
    "clip": ["--grad_clip=0.05"],
    "no_clip": ["--grad_clip=0"],
    "accumulation": ["--gradient_accumulation_steps=3", "--grad_clip=0.05"],
    "decay_all": ["--weight_decay=0.1", "--beta1=0.8", "--beta2=0.95"],
    "decay_matrices": ["--weight_decay=0.1", "--weight_decay_on=matrices"],
    "skip_nonfinite": ["--skip_nonfinite=True", "--grad_clip=0.05"],
    "float16_scaler": ["--skip_nonfinite=True", "--grad_clip=0.05",
                       "--gradient_accumulation_steps=2"],
}
NAN_STEP = 1  # skip_nonfinite and float16_scaler: this step's gradient is NaN


@pytest.mark.parametrize("case", STEP_CASES)
def test_training_step_equals_a_plain_reference_step(case, data_dir, tmp_path, monkeypatch):
    """Three optimizer steps of train.py against a reference step written plainly here, on the
    same micro-batches: plain autograd on the model's loss, each micro-batch's loss divided by
    their count; a step whose gradient norm is not finite skipped (--skip_nonfinite); torch's
    clip_grad_norm_ when --grad_clip > 0; a plain torch.optim.AdamW with the run's betas, decay
    groups (--weight_decay_on: all parameters, or only those of 2+ dimensions) and the warmup
    schedule (lr x (it + 1) / (warmup + 1)). Compared: the gradient the optimizer is handed at
    each step (read by a step pre-hook), the lr and decay of each group at that step, the log's
    lr and skipped steps, and the weights after the last step.
    float16_scaler: a CPU has no float16 autocast, so train.py's GradScaler is built enabled
    (torch.amp.GradScaler on the CPU, init scale 2^14, growth every good step) while the model
    runs in float32: the scaled backward, unscale_, the clip of the unscaled gradient and the
    scaler's skip of a NaN step are all exercised; the scale must end where GradScaler's rules
    put it (x2 per good step, x0.5 on the NaN one)."""
    import train
    flags = dict(a[2:].split("=") for a in STEP_CASES[case])
    acc = int(flags.get("gradient_accumulation_steps", 1))
    clip = float(flags.get("grad_clip", 1.0))
    decay = float(flags.get("weight_decay", 0.01))
    betas = (float(flags.get("beta1", 0.9)), float(flags.get("beta2", 0.999)))
    nan_step = NAN_STEP if "skip_nonfinite" in flags else None
    batches, seen = [], []  # the run's micro-batches; what each optimizer step was handed
    forward = LoopedGPT.forward

    def recorded(self, idx, targets=None, **kw):
        logits, loss, stats = forward(self, idx, targets, **kw)
        if self.training:
            batches.append((idx.clone(), targets.clone()))
            if nan_step is not None and len(batches) == nan_step * acc + 1:
                loss = loss * float("nan")
        return logits, loss, stats
    configure = LoopedGPT.configure_optimizers

    def hooked(self, *args, **kw):
        opt = configure(self, *args, **kw)
        names = {id(p): n for n, p in self.named_parameters()}

        def pre(optimizer, a, k):
            seen.append(({names[id(p)]: p.grad.clone() for g in optimizer.param_groups
                          for p in g["params"]},
                         [(g["lr"], g["weight_decay"], g["betas"], sorted(
                             names[id(p)] for p in g["params"])) for g in optimizer.param_groups]))
        opt.register_step_pre_hook(pre)
        return opt
    monkeypatch.setattr(LoopedGPT, "forward", recorded)
    monkeypatch.setattr(LoopedGPT, "configure_optimizers", hooked)
    if case == "float16_scaler":
        scaler = torch.amp.GradScaler
        monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=False: scaler(
            device, enabled=True, init_scale=2.0 ** 14, growth_interval=1))
    train.main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={tmp_path}",
                       "--batch_size=2", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
                       *STEP_CASES[case]])
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert len(batches) == 3 * acc

    # the reference
    cfg = ckpt["config"]
    torch.manual_seed(cfg["seed"])
    ref = LoopedGPT(model_config(cfg)).train()
    params = list(ref.parameters())
    names = {id(p): n for n, p in ref.named_parameters()}
    if flags.get("weight_decay_on") == "matrices":
        groups = [[p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]
        opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": decay},
                                 {"params": groups[1], "weight_decay": 0.0}], betas=betas)
    else:
        opt = torch.optim.AdamW([{"params": params, "weight_decay": decay}], betas=betas)
    taken, clipped = [], []
    for it in range(3):
        lr = 3e-3 * (it + 1) / 3 if it < 2 else 3e-3
        for g in opt.param_groups:
            g["lr"] = lr
        for m in range(acc):
            x, y = batches[it * acc + m]
            _, loss, _ = ref(x, y)
            if it == nan_step and m == 0:
                loss = loss * float("nan")
            (loss / acc).backward()
        norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params))
        if nan_step is not None and not math.isfinite(norm):
            opt.zero_grad()
            continue
        if clip > 0:
            clipped.append(norm > clip)
            torch.nn.utils.clip_grad_norm_(params, clip)
        grads, groups_seen = seen[len(taken)]
        for p in params:
            torch.testing.assert_close(grads[names[id(p)]], p.grad, rtol=1e-5, atol=1e-9,
                                       msg=f"step {it}: the gradient of {names[id(p)]}")
        assert groups_seen == [(lr, g["weight_decay"], betas,
                                sorted(names[id(p)] for p in g["params"]))
                               for g in opt.param_groups]
        opt.step()
        opt.zero_grad()
        taken.append(it)
    assert len(seen) == len(taken) == (2 if nan_step is not None else 3)
    assert all(clipped) and (clip == 0) == (not clipped)  # a clip that acts, or none at all
    for name, w in ref.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], w, rtol=1e-5, atol=1e-7, msg=name)
    log = read_log(tmp_path)
    assert [e["lr"] for e in log] == pytest.approx([1e-3, 3e-3], rel=1e-12)
    assert log[-1]["skipped_steps"] == (1 if nan_step is not None else 0)
    if case == "float16_scaler":
        assert ckpt["scaler"]["scale"] == 2.0 ** 14 * 2 * 0.5 * 2


# ---- eval.json: per-depth PPL and halting ----------------------------------------------------

def exits_by_scan(score, policy, t, K, unit):
    """Each token's exit loop [S, T]: scanning from loop K-1 down to loop 1, a loop whose unit
    score passes the threshold (>= t; entropy <= t) becomes the exit, so the first passing loop
    is the one left; none passes: loop K. A sequence's unit score is its tokens' mean."""
    u = score[:K] if unit == "token" else score[:K].mean(dim=-1, keepdim=True)
    exit_at = torch.full(u.shape[1:], K)
    for k in range(K - 1, 0, -1):
        passed = u[k - 1] <= t if policy == "entropy" else u[k - 1] >= t
        exit_at = torch.where(passed, torch.full_like(exit_at, k), exit_at)
    return exit_at.expand(score.shape[1:])


def loops_and_ppl(ce, score, policy, t, K, unit):
    """(mean exit loop, exp of the mean CE of every token read at its own exit loop), the sum
    taken token by token in float64."""
    exit_at = exits_by_scan(score, policy, t, K, unit).flatten().tolist()
    flat = ce[:K].double().flatten(1).tolist()
    total = sum(flat[k - 1][i] for i, k in enumerate(exit_at))
    return sum(exit_at) / len(exit_at), math.exp(total / len(exit_at))


def grid_loosest_first(score, policy, K, n, unit):
    """The README's candidates: "of --n_thresholds (51) quantiles of the scores at loops 1..K-1
    and one past each end" (numpy's linear quantiles; a sequence's score: its tokens' mean),
    the loosest (the one most units pass) first."""
    s = score[:K - 1] if unit == "token" else score[:K - 1].mean(dim=-1)
    s = s.double().flatten().numpy()
    grid = sorted({s.min() - 1e-6, *np.quantile(s, np.linspace(0, 1, n)).tolist(),
                   s.max() + 1e-6})
    return grid[::-1] if policy == "entropy" else grid  # entropy passes at or below t


def halting_by_brute_force(cal, held, policy, K, target, n, unit):
    """The README's halting: "the one with the fewest mean loops whose PPL is within 1.01x
    (--target) of running all loops, found by trying every one", on the calibration batches
    (the loosest of a tie); then its mean loops and PPL on the held-out batches, and the ratio
    of that PPL to the held-out batches' own full-depth PPL ("held-out PPL / full-depth PPL").
    No threshold within target: all K loops, ratio 1."""
    full_cal = math.exp(cal[0][K - 1].double().mean().item())
    best = (None, float(K))
    for t in grid_loosest_first(cal[1][policy], policy, K, n, unit):
        loops, ppl = loops_and_ppl(cal[0], cal[1][policy], policy, t, K, unit)
        if ppl <= target * full_cal and loops < best[1]:
            best = (t, loops)
    full = math.exp(sum(held[0][K - 1].double().flatten().tolist()) / held[0][K - 1].numel())
    if best[0] is None:
        return {"threshold": None, "mean_loops": float(K), "ppl": full, "ratio": 1.0}
    loops, ppl = loops_and_ppl(held[0], held[1][policy], policy, best[0], K, unit)
    return {"threshold": best[0], "mean_loops": loops, "ppl": ppl, "ratio": ppl / full}


def hand_collect(model, batches, depth):
    """Per exit depth, sequence and position: CE and each policy's score [D, S, T], from the
    float64 model by hand."""
    ce, scores = [], {p: [] for p in EXIT_POLICIES}
    for x, y in batches:
        logits = [hand_logits(model, h) for h in hand_states(model, x, depth)]
        ce.append(torch.stack([token_ce(lg, y) for lg in logits]))
        for p in EXIT_POLICIES:
            scores[p].append(torch.stack([hand_scores(lg)[p] for lg in logits]))
    return torch.cat(ce, dim=1), {p: torch.cat(s, dim=1) for p, s in scores.items()}


def test_eval_json_per_depth_and_halting_recomputed(tiny_runs, data_dir):
    """eval.json's per-depth section and both halting sections, recomputed:
    per_depth ("val CE and PPL when exiting after loop k = 1..2K"), full_depth_ppl (loop K, the
    trained depth, not the deepest exit) and n_tokens, in float64 token by token; halting (the
    held-out protocol, per token and per sequence, every policy), halting_paper (per sequence,
    calibrated and reported on the same windows), the sweep's thresholds (the calibration
    batches' grid, for the policy and unit asked) and the depth map's threshold, by brute force
    (halting_by_brute_force) on the per-token CEs and scores, which are first checked against
    the float64 model by hand."""
    from eval import collect, evaluate, split_batches, windows
    ckpt = load_checkpoint(os.path.join(tiny_runs["scale_visible"], "ckpt.pt"))
    model = model_from_checkpoint(ckpt, "cpu")
    K, T = model.config.n_loops, model.config.block_size
    val = load_data(data_dir, "tiny_char", T)[0]["val"]
    batches = [get_batch(val, 4, T, eval_seed(i, "val")) for i in range(2)]
    cal_b, held_b, held_data = split_batches(val, 2, 4, T, "cpu")
    paper_b = windows(val, 8, 4, T, "cpu")
    cfg = SimpleNamespace(max_depth=0, target=1.01, policy="max_prob", exit_unit="sequence",
                          n_thresholds=11)
    out = evaluate(model, batches, cal_b, held_b, paper_b, cfg, held_data)

    ce, _ = hand_collect(model, batches, 2 * K)
    mean_ce = [sum(c.flatten().tolist()) / c.numel() for c in ce]
    assert out["per_depth"]["k"] == list(range(1, 2 * K + 1))
    assert out["per_depth"]["ce"] == pytest.approx(mean_ce, rel=1e-5)
    assert out["per_depth"]["ppl"] == pytest.approx([math.exp(c) for c in mean_ce], rel=1e-5)
    assert out["full_depth_ppl"] == pytest.approx(math.exp(mean_ce[K - 1]), rel=1e-5)
    assert out["n_tokens"] == 2 * 4 * T

    sets = {}
    for name, b in (("cal", cal_b), ("held", held_b), ("paper", paper_b)):
        got = collect(model, b, K)
        want = hand_collect(model, b, K)
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-4)
        for p in EXIT_POLICIES:
            torch.testing.assert_close(got[1][p].double(), want[1][p], rtol=1e-4, atol=1e-4)
        sets[name] = got
    early = 0
    for unit in ("token", "sequence"):
        for p in EXIT_POLICIES:
            want = halting_by_brute_force(sets["cal"], sets["held"], p, K, 1.01, 11, unit)
            got = out["halting"][unit][p]
            assert (got["threshold"] is None) == (want["threshold"] is None), (unit, p)
            early += want["threshold"] is not None
            assert got == pytest.approx(want, rel=1e-9), (unit, p)
    assert early >= 3  # most policies found an early exit: the ratios say something
    for p in EXIT_POLICIES:
        want = halting_by_brute_force(sets["paper"], sets["paper"], p, K, 1.01, 11, "sequence")
        assert out["halting_paper"][p] == pytest.approx(want | {"n_sequences": 8}, rel=1e-9), p
    sweep = out["adaptive"]
    grid = grid_loosest_first(sets["cal"][1]["max_prob"], "max_prob", K, 11, "sequence")
    assert (sweep["policy"], sweep["exit_unit"]) == ("max_prob", "sequence")
    assert sweep["threshold"] == pytest.approx(grid, rel=1e-12)
    for t, loops, ppl in zip(sweep["threshold"], sweep["mean_loops"], sweep["ppl"]):
        want = loops_and_ppl(*sets["held"][:1], sets["held"][1]["max_prob"], "max_prob", t, K,
                             "sequence")
        assert (loops, ppl) == pytest.approx(want, rel=1e-9)
    assert out["depth_map"]["threshold"] == out["halting"]["sequence"]["max_prob"]["threshold"]


def test_spread_and_lemma1_summaries_recomputed(tiny_runs, data_dir):
    """eval.json's spread.last_loop (the mean, the sample standard deviation (n - 1) and the
    minimum of per-token ||h_K|| over every token) by numpy from the float64 model; lemma1's
    max and mean |cos(dCE/dh_K, h_K)| over tokens and its radial fraction (the mean at loops 1
    and K), with the scale-visible readout's gradient in closed form, dCE/dh = W^T (softmax -
    onehot), token by token."""
    from eval import lemma1, spread
    ckpt = load_checkpoint(os.path.join(tiny_runs["scale_visible"], "ckpt.pt"))
    model = model_from_checkpoint(ckpt, "cpu")
    K, T = model.config.n_loops, model.config.block_size
    val = load_data(data_dir, "tiny_char", T)[0]["val"]
    batches = [get_batch(val, 4, T, eval_seed(i, "val")) for i in range(2)]
    states = [hand_states(model, x) for x, _ in batches]
    norms = np.concatenate([hs[-1].pow(2).sum(-1).sqrt().flatten().numpy() for hs in states])
    last = spread(model, batches)["last_loop"]
    assert last["n_tokens"] == len(norms) == 2 * 4 * T
    assert [last["mean"], last["std"], last["min"]] == pytest.approx(
        [norms.mean(), norms.std(ddof=1), norms.min()], rel=1e-5)
    w = model.lm_head.weight.detach().double()
    cos = {}
    for k in (1, K):
        cos[k] = []
        for (_, y), hs in zip(batches, states):
            for h, target in zip(hs[k - 1].flatten(0, 1), y.flatten().tolist()):
                g = torch.softmax(w @ h, dim=0)
                g[target] -= 1
                g = w.t() @ g
                cos[k].append(abs(torch.dot(g, h).item()) / (g.norm() * h.norm()).item())
    out = lemma1(model, batches)
    assert out["n_tokens"] == len(cos[K])
    assert out["max_abs_cos"] == pytest.approx(max(cos[K]), rel=1e-4)
    assert out["mean_abs_cos"] == pytest.approx(sum(cos[K]) / len(cos[K]), rel=1e-4)
    assert out["radial_fraction"]["loop"] == [1, K]
    assert out["radial_fraction"]["mean_abs_cos"] == pytest.approx(
        [sum(cos[1]) / len(cos[1]), sum(cos[K]) / len(cos[K])], rel=1e-4)



def test_lens_probabilities_recomputed(tiny_runs):
    """eval.json's lens: for each position of the prompt and each loop k, the top-1 next token
    and its probability, the largest softmax probability of the readout of h_k there, from the
    float64 model by hand; each top-1 token is its id decoded."""
    from eval import lens
    from prepare import load_tokenizer
    ckpt = load_checkpoint(os.path.join(tiny_runs["scale_visible"], "ckpt.pt"))
    model = model_from_checkpoint(ckpt, "cpu")
    encode, decode = load_tokenizer(ckpt["meta"])
    ids = encode("ROMEO:\nWhat say")
    out = lens(model, ids, decode)
    probs = [torch.softmax(hand_logits(model, h[0]), dim=-1)
             for h in hand_states(model, torch.tensor([ids]))]
    for t in range(len(ids)):
        assert out["prob"][t] == pytest.approx([p[t].max().item() for p in probs], rel=1e-5)
        assert out["top1"][t] == [p[t].argmax().item() for p in probs]
        assert out["top1_token"][t] == [decode([i]) for i in out["top1"][t]]


# ---- sampling: --temperature and --top_k -----------------------------------------------------

def tempered_top_k(logits, temperature, top_k):
    """{token id: probability} of the distribution sampling draws from, from its definition in
    float64: the logits divided by the temperature, only the top_k largest kept (0 or None:
    all), softmax over those."""
    row = [float(v) / temperature for v in logits]
    kept = sorted(range(len(row)), key=lambda i: -row[i])[:top_k or len(row)]
    top = max(row[i] for i in kept)
    z = sum(math.exp(row[i] - top) for i in kept)
    return {i: math.exp(row[i] - top) / z for i in kept}


def draws(monkeypatch):
    """sample.draw replaced by one that records each row's probabilities and draws the entry
    `pick[0]` of every row: what sampling asks for, exactly."""
    import sample
    asked, pick = [], [0]

    def draw(probs):
        asked.append(probs.detach().double().clone())
        return torch.full((probs.size(0), 1), pick[0], dtype=torch.long)
    monkeypatch.setattr(sample, "draw", draw)
    return asked, pick


def test_draw_picks_each_entry_with_its_probability(monkeypatch):
    """sample.draw: 100,000 rows of one distribution with a zero entry; each index appears with
    its probability (within 5 standard errors) and the zero one never does, even when the
    exponential draws it divides by come out exactly 0 (as some devices' exponential_ does)."""
    from sample import draw
    torch.manual_seed(0)
    p = [0.45, 0.0, 0.3, 0.2, 0.05]
    n = 100_000
    counts = torch.bincount(draw(torch.tensor([p] * n))[:, 0], minlength=5).tolist()
    for c, q in zip(counts, p):
        assert abs(c / n - q) <= 5 * math.sqrt(q * (1 - q) / n), (counts, p)
    real = torch.Tensor.exponential_

    def with_zeros(t, *a, **kw):  # an exact 0 in every row
        real(t, *a, **kw)
        return t.index_fill_(-1, torch.tensor([1, 3]), 0.0)
    monkeypatch.setattr(torch.Tensor, "exponential_", with_zeros)
    picked = draw(torch.tensor([p] * 1000))[:, 0]
    assert set(picked.tolist()) <= {0, 2, 3, 4} and picked.tolist().count(3) > 900


def test_sample_next_draws_from_the_tempered_top_k_distribution(monkeypatch):
    """sample_next, by intercepting sample.draw: every entry of the distribution it draws
    from, mapped back to the token id it returns, equals the definition's probability of that
    id (tempered_top_k): top-k keeps exactly the k most likely ids, the temperature divides the
    logits; temperature 0 is the argmax and draws nothing."""
    from sample import sample_next
    asked, pick = draws(monkeypatch)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=g) * 3
    for temperature in (0.5, 1.0, 2.5):
        for top_k in (None, 0, 1, 4, 11, 50):
            want = [tempered_top_k(row.tolist(), temperature, top_k) for row in logits]
            got = [{} for _ in want]
            for j in range(len(want[0])):
                asked.clear()
                pick[0] = j
                ids = sample_next(logits.clone(), temperature, top_k)
                assert ids.shape == (3, 1) and len(asked) == 1
                for r, i in enumerate(ids[:, 0].tolist()):
                    got[r][i] = asked[0][r, j].item()
            for r in range(3):
                assert got[r].keys() == want[r].keys(), (temperature, top_k)
                assert got[r] == pytest.approx(want[r], rel=1e-6, abs=1e-12)
    asked.clear()
    greedy = sample_next(logits.clone(), 0.0, 4)
    assert greedy[:, 0].tolist() == [max(range(11), key=lambda i: row[i]) for row in
                                     logits.tolist()] and asked == []


def test_sample_next_frequencies_with_a_fixed_seed():
    """40,000 draws of sample_next (a fixed seed) at temperature 0.7 and top_k 3: each of the 3
    most likely ids appears with the definition's probability (within 5 standard errors), no
    other id ever does."""
    from sample import sample_next
    torch.manual_seed(0)
    row = [1.0, 2.5, -0.5, 2.0, 0.2, 2.2]
    n = 40_000
    ids = sample_next(torch.tensor([row] * n), 0.7, 3)[:, 0]
    counts = torch.bincount(ids, minlength=6).tolist()
    want = tempered_top_k(row, 0.7, 3)
    assert set(want) == {1, 3, 5}
    for i, c in enumerate(counts):
        p = want.get(i, 0.0)
        assert abs(c / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (i, c / n, p)


def test_sample_cli_passes_temperature_and_top_k_to_the_draw(tiny_runs, monkeypatch, capsys):
    """python sample.py --temperature=0.5 --top_k=3: the first token is drawn from the
    definition's distribution over the model's next-token logits after the prompt, computed
    here with the float64 model by hand (tempered_top_k), and is the id drawn."""
    import sample
    asked, pick = draws(monkeypatch)
    pick[0] = 1  # the second entry of the three
    out = tiny_runs["rmsnorm"]
    sample.main([f"--out_dir={out}", "--start=ROMEO:", "--temperature=0.5", "--top_k=3",
                 "--max_new_tokens=1", "--num_samples=1", "--device=cpu"])
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    model = model_from_checkpoint(ckpt, "cpu")
    chars = ckpt["meta"]["chars"]
    x = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    logits = hand_logits(model, hand_states(model, x)[-1][0, -1])
    want = tempered_top_k(logits.tolist(), 0.5, 3)
    assert len(asked) == 1 and asked[0].shape == (1, 3)
    assert sorted(asked[0][0].tolist()) == pytest.approx(sorted(want.values()), rel=1e-4)
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:")
    drawn = chars.index(text[len("ROMEO:")])
    assert asked[0][0, 1].item() == pytest.approx(want[drawn], rel=1e-4)  # the id drawn



def test_sample_cli_mean_loops_over_every_generated_token(tiny_runs, monkeypatch, capsys):
    """python sample.py's last line, "mean loops per generated token", is the mean of the exit
    loops of every token of every sample: with generation replaced by one that returns known
    loops (3 tokens each of 2 samples), 13 / 6."""
    import sample
    loops = iter([[1, 2, 3], [3, 3, 1]])

    def fake_generate(model, x, n, **kw):
        return torch.cat([x, torch.zeros(1, n, dtype=torch.long)], dim=1), torch.tensor(
            [next(loops)])
    monkeypatch.setattr(sample, "generate", fake_generate)
    sample.main([f"--out_dir={tiny_runs['rmsnorm']}", "--max_new_tokens=3", "--num_samples=2",
                 "--exit_policy=entropy", "--exit_threshold=1.5", "--device=cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"mean loops per generated token: {13 / 6:.2f} of 3 (adaptive entropy <= 1.5)"


# ---- claims.json, experiments.py's table, plot_norms.py: from run folders made by hand -------

def logged_config(**changes):
    """A run's config as train.py logs it (every option, the vocabulary, the processes and what
    'auto' resolved to), with `changes`."""
    import train
    config = {k: spec[0] for k, spec in train.OPTIONS.items()}
    config |= {"vocab_size": 65, "world_size": 1, "n_loops": 3, "max_iters": 500,
               "resolved": {"device": "cpu", "dtype": "float32", "compile": False,
                            "data_dir": "/data"}}
    return config | changes


def made_up(g, n, lo=1.0, hi=10.0):
    """n made-up numbers in [lo, hi)."""
    return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()


def made_up_eval(g, K):
    """An eval.json of made-up values with every section plot_norms.py and experiments.py read."""
    ppl = made_up(g, 2 * K, 5, 20)

    def entry(**extra):
        return {"threshold": made_up(g, 1)[0], "mean_loops": made_up(g, 1, 1, K)[0],
                "ppl": made_up(g, 1, 5, 20)[0], "ratio": made_up(g, 1, 1, 1.02)[0], **extra}
    radial = {"loop": [1, K], "mean_abs_cos": made_up(g, 2, 1e-3, 1)}

    def speed_batch():
        # eval.py writes the speed-up (a median of paired rounds) and its ideal beside the
        # tokens/s: made up independently of them, as a real run's need not be their ratio
        loops = made_up(g, 1, 1, K)[0]
        speed_up = made_up(g, 1, 0.5, 3)[0]
        return {"full": {"tokens_per_s": made_up(g, 1, 100, 200)[0], "mean_loops": float(K)},
                "exit": {"tokens_per_s": made_up(g, 1, 100, 300)[0], "mean_loops": loops,
                         "ppl": made_up(g, 1, 5, 20)[0]},
                "speed_up": speed_up, "ideal": K / loops, "of_ideal": speed_up / (K / loops),
                "test_cost": made_up(g, 1, 0, 1)[0], "one_loop_speed_up": made_up(g, 1, 2, 5)[0],
                "tested_loops": [k for k in range(1, K) if made_up(g, 1, 0, 1)[0] < 0.5]}
    return {
        "n_loops": K, "full_depth_ppl": ppl[K - 1],
        "per_depth": {"k": list(range(1, 2 * K + 1)), "ce": [math.log(p) for p in ppl],
                      "ppl": ppl},
        "halting": {u: {p: entry() for p in EXIT_POLICIES} for u in ("token", "sequence")},
        "halting_paper": {p: entry(n_sequences=8) for p in EXIT_POLICIES},
        "adaptive": {"policy": "entropy", "exit_unit": "token", "threshold": made_up(g, 5),
                     "mean_loops": made_up(g, 5, 1, K), "ppl": made_up(g, 5, 5, 20)},
        "variable_depth": {"k": list(range(1, 3 * K + 1)), "ppl": made_up(g, 3 * K, 5, 20),
                           "hidden_norm": made_up(g, 3 * K, 1, 100)},
        "spread": {"hist_counts": [3, 0, 7, 2, 1], "hist_edges": sorted(made_up(g, 6, 1, 100))},
        "scale": {"alpha": [0.1, 0.5, 1.0, 2.0, 10.0], "ce": made_up(g, 5, 1, 3)},
        "lemma2": {"n_loops": 6, "s": made_up(g, 6), "radial_increment": made_up(g, 5),
                   "angular_step": made_up(g, 5, 0, 1), "angular_step_x_s": made_up(g, 5)},
        "frontier": {"k": list(range(1, K + 1)), "tokens_per_s": made_up(g, K, 100, 1000),
                     "ppl": ppl[:K]},
        "lemma1": {"max_abs_cos": made_up(g, 1, 0, 1e-7)[0],
                   "mean_abs_cos": made_up(g, 1, 1e-3, 1)[0], "radial_fraction": radial},
        "endpoint": {"ce_gap": math.log(ppl[0] / ppl[K - 1]), "radial_fraction": radial},
        "speed": {"policy": "logit_margin", "threshold": 1.0, "new_tokens": 200,
                  "ppl": {"full": made_up(g, 1, 5, 20)[0], "exit": made_up(g, 1, 5, 20)[0]},
                  "batch": {"1": speed_batch(), "8": speed_batch()}},
    }


def write_run(folder, config, g, with_eval=True):
    """A run folder: log.jsonl of three evaluations (made-up CEs and norms) and, with_eval,
    eval.json. Returns (log entries, eval.json or None)."""
    os.makedirs(folder)
    K = config["n_loops"]
    log = [{"iter": i, "lr": 1e-3, "train_loop_ce": made_up(g, K, 1, 3),
            "val_loop_ce": made_up(g, K, 1, 3), "hidden_norm": made_up(g, K, 1, 5000),
            "tokens_per_sec": 1.0, "elapsed": 1.0, "skipped_steps": 0, "config": config}
           for i in (0, 250, 500)]
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in log)
    ev = made_up_eval(g, K) if with_eval else None
    if ev:
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump(ev, f)
    return log, ev


def over_seeds(values):
    """The README's "mean, std, min, max, n over the seeds" (std: the sample std, n - 1), by
    numpy."""
    v = np.array(values, dtype=np.float64)
    return {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0, "min": v.min(),
            "max": v.max(), "n": len(v)}


def test_claims_json_recomputed_from_the_run_folders(tmp_path):
    """claims.json, written by experiments.py --run=claims over two seed folders of three runs
    each (rmsnorm, scale_visible, rmsnorm + penalty; logs and eval.json of made-up values),
    against the same figures taken from the files here: per run, ||h_K|| (the last log entry's
    loop K), PPL at exit depths 1..K only, calibrated halting (both protocols) and generation
    speed, as "mean, std, min, max, n over the seeds"; claims 1-3's figures per seed and over
    the seeds, and whether each held in both."""
    from experiments import main
    g = torch.Generator().manual_seed(3)
    K = 3
    kinds = {"rmsnorm": {}, "scale_visible": {"readout": "scale_visible"},
             "penalty": {"norm_penalty": 0.01}}
    made = {}
    for seed in (1, 2):
        for name, changes in kinds.items():
            made[seed, name] = write_run(tmp_path / f"seed{seed}" / name,
                                         logged_config(seed=seed, **changes), g)
    main(["--run=claims", f"--out_dir={tmp_path}"])
    out = json.loads((tmp_path / "claims.json").read_text())
    rows = {r["run"]: r for r in out["runs"]}
    assert set(rows) == set(kinds)
    for name, row in rows.items():
        logs = [made[s, name][0] for s in (1, 2)]
        evs = [made[s, name][1] for s in (1, 2)]
        assert row["seeds"] == 2
        assert row["hidden_norm_K"] == pytest.approx(over_seeds([lg[-1]["hidden_norm"][K - 1]
                                                                 for lg in logs]))
        assert len(row["ppl_per_depth"]) == K
        for k in range(K):
            assert row["ppl_per_depth"][k] == pytest.approx(over_seeds(
                [ev["per_depth"]["ppl"][k] for ev in evs]))
        assert row["ppl"] == pytest.approx(over_seeds([ev["per_depth"]["ppl"][K - 1]
                                                       for ev in evs]))
        assert row["mean_loops"] == pytest.approx(over_seeds(
            [ev["halting"]["token"]["logit_margin"]["mean_loops"] for ev in evs]))
        for p in EXIT_POLICIES:
            for what in ("mean_loops", "ratio"):
                for unit in ("token", "sequence"):
                    assert row["halting"][unit][p][what] == pytest.approx(over_seeds(
                        [ev["halting"][unit][p][what] for ev in evs]))
                assert row["halting_paper"][p][what] == pytest.approx(over_seeds(
                    [ev["halting_paper"][p][what] for ev in evs]))
        for b in ("1", "8"):
            speed = row["speed"]["batch"][b]
            runs = [ev["speed"]["batch"][b] for ev in evs]
            for kind in ("full", "exit"):
                for what in ("tokens_per_s", "mean_loops"):
                    assert speed[f"{kind}_{what}"] == pytest.approx(over_seeds(
                        [r[kind][what] for r in runs]))
            for what in ("speed_up", "ideal", "of_ideal"):
                assert speed[what] == pytest.approx(over_seeds([r[what] for r in runs]))
            assert speed["one_loop"] == pytest.approx(over_seeds(
                [r["one_loop_speed_up"] for r in runs]))
            assert speed["exit_ppl"] == pytest.approx(over_seeds([r["exit"]["ppl"] for r in runs]))
            assert speed["tested_loops"] == [r["tested_loops"] for r in runs]
    claims = out["claims"]
    ratio, gain = {}, {}
    for name in ("scale_visible", "penalty"):
        ratio[name], gain[name] = [], []
        for s in (1, 2):
            (base_log, base_ev), (log, ev) = made[s, "rmsnorm"], made[s, name]
            ratio[name].append(base_log[-1]["hidden_norm"][K - 1] / log[-1]["hidden_norm"][K - 1])
            gain[name].append(min(b - p for p, b in zip(ev["per_depth"]["ppl"][1:K],
                                                        base_ev["per_depth"]["ppl"][1:K])))
    lemma = {"rmsnorm max |cos|": [made[s, "rmsnorm"][1]["lemma1"]["max_abs_cos"] for s in (1, 2)],
             "scale_visible mean |cos|": [made[s, "scale_visible"][1]["lemma1"]["mean_abs_cos"]
                                          for s in (1, 2)]}
    for i, values, holds in ((0, ratio, lambda v: v >= 10), (1, gain, lambda v: v > 0),
                             (2, lemma, None)):
        assert claims[i]["figures"].keys() == values.keys()
        for name, v in values.items():
            assert claims[i]["figures"][name] == pytest.approx(over_seeds(v)), (i, name)
        for s in (1, 2):
            if holds:
                held = all(holds(v[s - 1]) for v in values.values())
                assert claims[i]["per_seed"][f"seed{s}"]["held"] == held, (i, s)
    assert claims[2]["held"] and claims[2]["held_in"] == "2/2"  # max < 1e-7, mean > 1e-3
    assert not claims[3]["held"] and claims[3]["held_in"] == "0/2"  # no loop-norm run


def test_table1_rows_recomputed_from_the_runs_logs(tmp_path, monkeypatch):
    """experiments.py --run=table1's rows, with train.py replaced by one that writes a finished
    run's log of made-up values: per condition, ||h_K|| (the last evaluation's loop K) and the
    final PPL (exp of its val CE at loop K, the trained depth) as mean and sample std over the
    seeds, recomputed from the logs by numpy."""
    import experiments
    import train
    g = torch.Generator().manual_seed(5)
    logs = {}

    def fake_train(args):
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
        config = logged_config(supervision=flags["supervision"], readout=flags["readout"],
                               norm_penalty=float(flags["norm_penalty"]),
                               seed=int(flags["seed"]))
        logs[flags["out_dir"]] = write_run(flags["out_dir"], config, g, with_eval=False)[0]
        open(os.path.join(flags["out_dir"], "ckpt.pt"), "w").close()
    monkeypatch.setattr(train, "main", fake_train)
    rows = experiments.main(["--run=table1", f"--out_dir={tmp_path}", "--seeds=3",
                             "--preset="])
    assert len(rows) == len(experiments.CONDITIONS) == 7
    for row, (supervision, readout, penalty) in zip(rows, experiments.CONDITIONS):
        runs = [logs[str(tmp_path / f"{supervision}_{readout}_pen{penalty:g}_seed{s}")]
                for s in (1, 2, 3)]
        norms = [log[-1]["hidden_norm"][-1] for log in runs]
        ppls = [math.exp(log[-1]["val_loop_ce"][-1]) for log in runs]
        for key, values in (("hidden_norm_K", norms), ("ppl", ppls)):
            want = over_seeds(values)
            assert row[key] == pytest.approx(want), (supervision, readout, penalty, key)
        assert row["seeds"] == 3


def figures_kept(monkeypatch):
    """plt.subplots made to keep each (figure, axes) it makes, to read the plotted data back;
    saving and laying out the figure skipped (the data is in the axes already)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    figures = []
    subplots = plt.subplots

    def kept(*args, **kw):
        figures.append(subplots(*args, **kw))
        return figures[-1]
    monkeypatch.setattr(plt, "subplots", kept)
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kw: None)
    monkeypatch.setattr(Figure, "tight_layout", lambda self, *args, **kw: None)
    return figures


def test_plotted_data_and_table_recomputed_from_the_files(tmp_path, monkeypatch):
    """plot_norms.py's figure, read back from matplotlib's axes (the lines' x and y, the
    histogram's bins), panel by panel against the values in each run's log.jsonl and eval.json:
    ||h_K|| over training (loop K of every evaluation), ||h_k|| per loop at the end (and
    variable depth's ||h_K'||, dotted), the spread histogram, PPL per exit depth (eval.json's, or
    exp of the log's val CE without it; variable depth's PPL dotted), the adaptive sweep and its
    calibrated star (the sweep's own policy and unit), PPL of alpha * h_K (exp of the CE),
    Lemma 2's a_k and du_k x s_k at k = 1..n-1, and the frontier; and the printed table's rows
    (||h_K||, PPL at K, mean loops of the --policy and --exit_unit asked, PPL at 1..K)."""
    import plot_norms
    g = torch.Generator().manual_seed(7)
    K = 3
    a_log, ev = write_run(tmp_path / "a", logged_config(), g)
    b_log, _ = write_run(tmp_path / "b", logged_config(readout="scale_visible"), g,
                         with_eval=False)
    figures = figures_kept(monkeypatch)
    rows = plot_norms.main([str(tmp_path / "a"), str(tmp_path / "b"), "--policy=max_prob",
                            "--exit_unit=sequence", f"--out={tmp_path / 'fig.png'}"])
    (_, ax), = figures

    def lines(i, j):
        return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax[i, j].get_lines()]

    def ppl_of(ce):
        return [math.exp(c) for c in ce]
    vd, ad, lem, fr = ev["variable_depth"], ev["adaptive"], ev["lemma2"], ev["frontier"]
    star = ev["halting"][ad["exit_unit"]][ad["policy"]]
    expected = {
        (0, 0): [([e["iter"] for e in log], [e["hidden_norm"][K - 1] for e in log])
                 for log in (a_log, b_log)],
        (0, 1): [([1, 2, 3], a_log[-1]["hidden_norm"]), (vd["k"], vd["hidden_norm"]),
                 ([1, 2, 3], b_log[-1]["hidden_norm"])],
        (1, 0): [(ev["per_depth"]["k"], ev["per_depth"]["ppl"]), (vd["k"], vd["ppl"]),
                 ([1, 2, 3], ppl_of(b_log[-1]["val_loop_ce"]))],
        (1, 1): [(ad["mean_loops"], ad["ppl"]), ([star["mean_loops"]], [star["ppl"]])],
        (1, 2): [(ev["scale"]["alpha"], ppl_of(ev["scale"]["ce"]))],
        (2, 0): [([1, 2, 3, 4, 5], lem["radial_increment"])],
        (2, 1): [([1, 2, 3, 4, 5], lem["angular_step_x_s"])],
        (2, 2): [(fr["tokens_per_s"], fr["ppl"])],
    }
    for (i, j), want in expected.items():
        got = lines(i, j)
        assert len(got) == len(want), (i, j)
        for (gx, gy), (wx, wy) in zip(got, want):
            assert gx == pytest.approx(wx, rel=1e-12) and gy == pytest.approx(wy, rel=1e-12), (
                i, j)
    (stairs,) = ax[0, 2].patches
    values, edges, _ = stairs.get_data()
    assert list(values) == ev["spread"]["hist_counts"]
    assert list(edges) == pytest.approx(ev["spread"]["hist_edges"], rel=1e-12)
    assert rows[0]["run"] == "a"
    assert rows[0]["hidden_norm_K"] == a_log[-1]["hidden_norm"][-1]
    assert rows[0]["ppl"] == ev["per_depth"]["ppl"][K - 1]
    assert rows[0]["ppl_per_depth"] == ev["per_depth"]["ppl"][:K]
    assert rows[0]["mean_loops"] == ev["halting"]["sequence"]["max_prob"]["mean_loops"]
    ppl_b = ppl_of(b_log[-1]["val_loop_ce"])
    assert rows[1]["hidden_norm_K"] == b_log[-1]["hidden_norm"][-1]
    assert rows[1]["ppl"] == pytest.approx(ppl_b[-1]) and math.isnan(rows[1]["mean_loops"])
    assert rows[1]["ppl_per_depth"] == pytest.approx(ppl_b)



def test_depth_map_figure_titles_the_mean_exit_loop(tmp_path, monkeypatch):
    """plot_norms.py --depth_map: each run's row is titled with the mean of its tokens' exit
    loops, computed here from eval.json's depth_map, and shades as many character cells as
    the passage has characters."""
    import plot_norms
    g = torch.Generator().manual_seed(11)
    tokens = list("to be, or not\nto be")
    loops = torch.randint(1, 4, (len(tokens),), generator=g).tolist()
    _, ev = write_run(tmp_path / "a", logged_config(), g)
    ev["depth_map"] = {"policy": "entropy", "exit_unit": "token", "threshold": 1.0,
                       "n_loops": 3, "ids": list(range(len(tokens))), "tokens": tokens,
                       "exit_loop": loops, "sequence_length": 32}
    (tmp_path / "a" / "eval.json").write_text(json.dumps(ev))
    figures = figures_kept(monkeypatch)
    plot_norms.plot_depth_map({str(tmp_path / "a"): plot_norms.load_run(str(tmp_path / "a"))},
                              str(tmp_path / "depth.png"))
    (_, axes), = figures
    ax = axes[0, 0]
    assert f"mean exit loop {sum(loops) / len(loops):.2f} of 3" in ax.get_title(loc="left")
    assert len(ax.patches) == len(tokens)  # the newline shown as one cell



def test_fp16_warning_names_the_loop_and_its_rms():
    """train.py's float16 warning: the loop of the largest ||h_k|| and its per-element RMS,
    ||h_k|| / sqrt(n_embd) (||h||^2 is the sum of C squares), worked out by hand; no warning at
    an RMS of 32 or less."""
    from train import fp16_warning
    msg = fp16_warning([100.0, 3000.0, 2000.0], n_embd=64)  # 3000 / 8 = 375
    assert "||h_2|| = 3000 (per-element RMS 375)" in msg
    msg = fp16_warning([40.0, 33.0 * 16], n_embd=256)  # 528 / 16 = 33
    assert "||h_2|| = 528 (per-element RMS 33)" in msg
    assert fp16_warning([10.0, 32.0 * 16], n_embd=256) is None


# ---- the device clock and bench.py's figures that are not timings ----------------------------

def test_synchronize_waits_for_every_name_of_a_gpu(monkeypatch):
    """device.synchronize, which every clock read on a GPU follows: CUDA is synchronized for the
    device however it is named ("cuda", "cuda:0", "cuda:3", a torch.device), MPS for "mps", and
    nothing for the CPU or meta. torch's synchronize functions are replaced by recorders, so this
    runs without a GPU."""
    from device import synchronize
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(
        ("cuda", str(device))))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    for name, want in (("cuda", [("cuda", "cuda")]), ("cuda:0", [("cuda", "cuda:0")]),
                       ("cuda:3", [("cuda", "cuda:3")]),
                       (torch.device("cuda", 1), [("cuda", "cuda:1")]),
                       ("mps", [("mps", None)]), (torch.device("mps"), [("mps", None)]),
                       ("cpu", []), (torch.device("cpu"), []), ("meta", [])):
        calls.clear()
        synchronize(name)
        assert calls == want, name


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every matrix product run inside it, 2 m k n each (a multiply and an
    add per term): mm, addmm, bmm and baddbmm, whatever called them."""

    PRODUCTS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        which = self.PRODUCTS.get(func.overloadpacket.__name__)
        if which:
            a, b = args[which[0]], args[which[1]]
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["per_loop", "terminal", "nanogpt"])
def test_flops_per_token_equals_the_matmuls_a_step_runs(case):
    """model.flops_per_token and bench.py's PlainGPT.flops_per_token (bench's model FLOPs, MFU
    and FLOP/s ratios) against the FLOPs of the matrix products one training step runs, forward
    and backward, counted as they run (MatmulFlops; attention on SDPA's math path so that its
    products are matmuls; the plain CE, three matmuls an exit), per token: equal, once the norm
    gains are added at the convention's 6 FLOPs per weight use (they are no matmul: the looped
    model's 2 RMSNorms a layer in each of K loops; the plain GPT's LayerNorms)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench import PlainGPT
    from model import LoopedGPTConfig
    torch.manual_seed(0)
    if case == "nanogpt":
        model = PlainGPT(vocab_size=37, block_size=16, n_layer=3, n_head=2, n_embd=16)
        gains = sum(p.numel() for name, p in model.named_parameters() if ".ln_" in f".{name}")
        assert gains == (2 * 3 + 1) * 16
    else:
        cfg = LoopedGPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16,
                              n_loops=3, supervision=case, readout_ce="plain")
        model = LoopedGPT(cfg)
        gains = 2 * cfg.n_layer * cfg.n_embd * cfg.n_loops
    model.train()
    x, y = torch.randint(37, (2, 2, 16))
    counter = MatmulFlops()
    with sdpa_kernel(SDPBackend.MATH), counter:
        kw = {} if case == "nanogpt" else {"return_logits": False}  # as bench.py's step
        _, loss, _ = model(x, y, **kw)
        loss.backward()
    assert model.flops_per_token() == counter.flops / x.numel() + 6 * gains


def test_bench_report_arithmetic_by_hand(capsys):
    """bench.report's figures from made-up step results, by hand: model FLOP/s = FLOPs per
    token x tokens/s, MFU = that / the peak, each case against nanogpt's model FLOP/s, and the
    ratios of step time and of peak memory, each the first case named over the second."""
    import bench
    cases = {"terminal": (0.30, 1000.0, 3.0e6, 5e8), "dense": (0.36, 800.0, 4.0e6, 6e8),
             "official": (0.50, 600.0, 4.0e6, 9e8), "flat": (0.25, 1200.0, 2.5e6, 4e8),
             "nanogpt": (0.20, 1500.0, 2.0e6, 3e8)}
    results = [{"case": c, "step_s": s, "tokens_per_sec": tps, "flops_per_token": f,
                "peak_mem_bytes": m} for c, (s, tps, f, m) in cases.items()]
    peak = 1e11
    ratios = bench.report(results, "gpt2", peak, {"terminal": [0.3, 0.4], "flat": [0.25, 0.5]})
    by = {r["case"]: r for r in results}
    for c, (s, tps, f, m) in cases.items():
        assert by[c]["model_flops_per_sec"] == pytest.approx(f * tps, rel=1e-12)
        assert by[c]["mfu"] == pytest.approx(f * tps / peak, rel=1e-12)
        assert by[c]["vs_nanogpt"] == pytest.approx(f * tps / (2.0e6 * 1500.0), rel=1e-12)
    assert ratios == pytest.approx({
        "terminal step time / flat step time": 0.30 / 0.25,
        "terminal step time / flat step time, by round": [0.3 / 0.25, 0.4 / 0.5],
        "dense step time / official step time": 0.36 / 0.50,
        "dense peak memory / official peak memory": 6e8 / 9e8,
        "dense peak memory / terminal peak memory": 6e8 / 5e8,
        "terminal model FLOP/s / nanogpt model FLOP/s": 3.0e9 / 3.0e9,
        "dense model FLOP/s / nanogpt model FLOP/s": 3.2e9 / 3.0e9}, rel=1e-12)


def test_bench_cpu_peak_and_step_figures_from_a_known_clock(monkeypatch):
    """The CPU's matmul peak is 2 n^3 FLOPs (a multiply and an add per term) over the fastest
    of its products; a case's step time is its fastest timed step (the warm-up untimed), its
    tokens/s batch x sequence over that step, with a clock that only each step's forward pass
    moves, by a known time."""
    import bench
    times = iter([0.5, 0.125, 0.25])
    monkeypatch.setattr(bench, "_timed", lambda fn, device="cpu": next(times))
    assert bench.cpu_matmul_peak(n=8, reps=3) == 2 * 8 ** 3 / 0.125
    cfg, _ = bench.parse("bench.py", bench.OPTIONS, [
        "--block_size=16", "--batch_size=2", "--n_loops=2", "--steps=3", "--warmup=1",
        "--gen_tokens=0", "--vocab=char"])
    clock, steps = [0.0], iter([9.0, 0.5, 0.25, 0.75])  # the warm-up, then 3 timed steps
    forward = LoopedGPT.forward

    def step(self, *args, **kw):
        clock[0] += next(steps)
        return forward(self, *args, **kw)
    monkeypatch.setattr(LoopedGPT, "forward", step)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    r = bench.run_case(cfg, "dense", "char", "cpu", "float32")
    assert r["step_s_all"] == [0.5, 0.25, 0.75] and r["step_s"] == 0.25
    assert r["tokens_per_sec"] == 2 * 16 / 0.25


def test_eval_speed_and_frontier_read_the_clock_after_a_synchronize(tiny_runs, monkeypatch):
    """eval.py --run=speed's two clocks (generation tokens/s, the frontier): every clock read
    comes right after a synchronize of the model's device, so that on a GPU the time read is
    the work's, not its launch's."""
    import eval as eval_script
    import sample
    events = []
    monkeypatch.setattr(eval_script, "synchronize", lambda device: events.append(
        ("sync", str(device))))
    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        events.append(("clock",))
        return clock[0]
    # a CPU's clock is the thread's CPU time, a GPU's the wall clock: either counts here
    monkeypatch.setattr(eval_script, "time", SimpleNamespace(perf_counter=perf_counter,
                                                             thread_time=perf_counter))
    monkeypatch.setattr(sample, "generate", lambda model, idx, n, **kw: (
        idx, torch.ones(idx.size(0), n)))
    model = model_from_checkpoint(load_checkpoint(
        os.path.join(tiny_runs["rmsnorm"], "ckpt.pt")), "cpu")
    cfg = SimpleNamespace(policy="logit_margin", new_tokens=4, rounds=2)
    eval_script.speed(model, np.arange(400), {"threshold": 1.0, "ppl": 10.0, "ratio": 1.0}, cfg)
    eval_script.frontier(model, torch.zeros(2, 8, dtype=torch.long), [5.0] * 6, rounds=2)
    clocks = [i for i, e in enumerate(events) if e == ("clock",)]
    # a start and an end per timed round, a start only in the untimed warm-up round
    assert len(clocks) == 2 * 2 * (1 + 2 * 2) + model.config.n_loops * (1 + 2 * 2)
    assert all(events[i - 1] == ("sync", "cpu") for i in clocks), events


# ---- a second round of planted bugs: numbers a user reads, each against a value --------------

def test_banner_steps_an_epoch_are_windows_over_the_global_batch():
    """The banner's "(N steps of G an epoch)": the windows over the global batch (batch_size x
    gradient_accumulation_steps), not over batch_size."""
    import train
    cfg = SimpleNamespace(batch_size=4, gradient_accumulation_steps=2, block_size=16, stride=12,
                          sampling="epochs", epochs=0, max_iters=10)
    line = train.data_line(cfg, 1000, 30)
    assert "30 windows of 17 tokens at stride 12 (3.8 steps of 8 an epoch)" in line, line


def test_progress_bar_shows_the_last_loops_norm_of_the_step(data_dir, tmp_path, monkeypatch):
    """The progress bar's h_K is ||h_K|| (loop K) of the step just taken, as the forward pass
    measured it, and its loss that step's loss."""
    import train
    steps = []
    forward = LoopedGPT.forward

    def kept(self, *args, **kw):
        out = forward(self, *args, **kw)
        if self.training:
            steps.append((out[1].item(), out[2]["hidden_norm"].tolist()))
        return out
    monkeypatch.setattr(LoopedGPT, "forward", kept)
    shown = []

    class Bar:
        def __init__(self, *args, **kw):
            pass

        write = staticmethod(lambda *args, **kw: None)

        def set_postfix(self, **kw):
            shown.append(kw)

        def __getattr__(self, name):
            return lambda *args, **kw: None
    monkeypatch.setattr(train, "tqdm", Bar)
    train.main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={tmp_path}",
                       "--max_iters=3", "--eval_interval=3", "--log_interval=1"])
    assert len(shown) == len(steps) == 3
    for bar, (loss, norms) in zip(shown, steps):
        assert norms[0] != pytest.approx(norms[-1], rel=1e-2)  # loop 1 and K tell apart
        assert bar["h_K"] == f"{norms[-1]:.3g}" and bar["loss"] == f"{loss:.4f}"


def test_spread_histogram_bins_every_token_into_log_spaced_bins(tiny_runs, data_dir):
    """eval.json's spread histogram: `bins` log-spaced bins (bins + 1 edges) from the smallest to
    the largest per-token ||h_K||, by numpy, whose counts add up to every token."""
    from eval import spread
    model = model_from_checkpoint(load_checkpoint(
        os.path.join(tiny_runs["rmsnorm"], "ckpt.pt")), "cpu")
    T = model.config.block_size
    val = load_data(data_dir, "tiny_char", T)[0]["val"]
    batches = [get_batch(val, 4, T, eval_seed(i, "val")) for i in range(2)]
    norms = np.concatenate([hand_states(model, x)[-1].pow(2).sum(-1).sqrt().flatten().numpy()
                            for x, _ in batches])
    out = spread(model, batches, bins=40)
    edges = np.logspace(np.log10(norms.min()), np.log10(norms.max()), 41)
    assert out["hist_edges"] == pytest.approx(edges.tolist(), rel=1e-6)
    counts, _ = np.histogram(norms, np.array(out["hist_edges"]))
    assert out["hist_counts"] == counts.tolist() and sum(counts) == len(norms)


def test_depth_map_without_a_threshold_runs_every_token_to_loop_K(tiny_runs, data_dir):
    """No threshold met the target: halting runs all K loops, so every token of the depth map
    exits at loop K."""
    from eval import depth_map
    model = model_from_checkpoint(load_checkpoint(
        os.path.join(tiny_runs["rmsnorm"], "ckpt.pt")), "cpu")
    val = load_data(data_dir, "tiny_char", model.config.block_size)[0]["val"]
    out = depth_map(model, val, {"threshold": None}, "entropy", "token", None, n_tokens=64)
    K = model.config.n_loops
    assert out["exit_loop"] and set(out["exit_loop"]) == {K}


def test_endpoint_table_rows_are_each_runs_first_and_last_exit():
    """experiments.endpoint: a row's ppl_1 is the PPL at exit 1, ppl_K at exit K, the radial
    fractions at loops 1 and K and ||h_K|| the last loop's, each as mean over the seeds."""
    from experiments import endpoint
    runs = []
    for seed, (ppl, radial, norms) in enumerate([([23.0, 17.0, 11.0], [0.3, 0.1], [5, 50, 500]),
                                                 ([25.0, 19.0, 13.0], [0.5, 0.3], [7, 70, 700])]):
        runs.append({"run": "rmsnorm", "replicate": f"seed{seed}", "config": logged_config(),
                     "ppl": ppl, "hidden_norm": norms,
                     "endpoint": {"ce_gap": math.log(ppl[0] / ppl[-1]),
                                  "radial_fraction": {"loop": [1, 3], "mean_abs_cos": radial}}})
    (row,) = endpoint(runs)["rows"]
    assert row["ppl_1"]["mean"] == pytest.approx(24.0)
    assert row["ppl_K"]["mean"] == pytest.approx(12.0)
    assert row["radial_fraction_1"]["mean"] == pytest.approx(0.4)
    assert row["radial_fraction_K"]["mean"] == pytest.approx(0.2)
    assert row["hidden_norm_K"]["mean"] == pytest.approx(600.0)
    assert row["ce_gap"]["mean"] == pytest.approx(
        (math.log(23 / 11) + math.log(25 / 13)) / 2)


def test_claim_4_is_the_largest_norm_over_the_smallest():
    """Claim 4 (loop norm keeps ||h_k|| flat): max over loops / min over loops, so a norm that
    rises and falls back is not flat (40 / 20 = 2.0 > 1.5) even though its last and first
    loops agree."""
    from experiments import judge
    run = {"run": "loop_norm", "replicate": "seed1", "config": logged_config(loop_norm=True),
           "hidden_norm": [20.0, 40.0, 22.0], "ppl": [3.0, 2.0, 1.5], "lemma1": None,
           "halting": None, "halting_paper": None, "endpoint": None, "speed": None}
    claim = judge([run])[3]
    assert claim["values"] == {"loop_norm": pytest.approx(2.0)} and not claim["held"]
    run["hidden_norm"] = [20.0, 26.0, 24.0]
    claim = judge([run])[3]
    assert claim["values"] == {"loop_norm": pytest.approx(1.3)} and claim["held"]


def test_per_depth_panel_marks_the_trained_depth_K(tmp_path, monkeypatch):
    """The PPL-per-exit-depth panel marks one point, the trained depth K (index K - 1 of k =
    1..2K)."""
    import plot_norms
    g = torch.Generator().manual_seed(3)
    write_run(tmp_path / "a", logged_config(), g)
    figures = figures_kept(monkeypatch)
    plot_norms.main([str(tmp_path / "a"), f"--out={tmp_path / 'fig.png'}"])
    (_, ax), = figures
    line = ax[1, 0].get_lines()[0]
    K = 3
    assert line.get_markevery() == [K - 1]
    assert list(line.get_xdata())[K - 1] == K


def test_depth_map_shades_loop_1_lightest_and_loop_K_darkest(tmp_path, monkeypatch):
    """The depth map's cell of a token that exited at loop k has YlOrRd's colour at
    0.1 + 0.85 (k - 1) / (K - 1): loop 1 the lightest, loop K the darkest."""
    import matplotlib.pyplot as plt
    import plot_norms
    g = torch.Generator().manual_seed(5)
    tokens = list("abcdefgh")
    loops = [1, 2, 3, 3, 2, 1, 1, 3]
    _, ev = write_run(tmp_path / "a", logged_config(), g)
    ev["depth_map"] = {"policy": "entropy", "exit_unit": "token", "threshold": 1.0,
                       "n_loops": 3, "ids": list(range(len(tokens))), "tokens": tokens,
                       "exit_loop": loops, "sequence_length": 32}
    (tmp_path / "a" / "eval.json").write_text(json.dumps(ev))
    figures = figures_kept(monkeypatch)
    plot_norms.plot_depth_map({str(tmp_path / "a"): plot_norms.load_run(str(tmp_path / "a"))},
                              str(tmp_path / "depth.png"))
    (_, axes), = figures
    cmap = plt.get_cmap("YlOrRd")
    got = [tuple(p.get_facecolor()) for p in axes[0, 0].patches]
    want = [tuple(cmap(0.1 + 0.85 * (k - 1) / 2)) for k in loops]
    assert got == [pytest.approx(w) for w in want]


def test_speed_up_is_the_median_of_the_rounds_paired_ratios():
    """sample.early_exit_row: the speed-up is the median over rounds of full time / exit time
    (each round's pair shares the machine's state), not a ratio of the two medians; the ideal is
    K / mean loops and the share of it the median of each round's speed-up / its ideal."""
    from sample import early_exit_row
    times = {"full": [1.0, 5.0, 9.0], "exit": [2.0, 3.0, 1.0]}
    loops = {"full": [6.0, 6.0, 6.0], "exit": [2.0, 4.0, 3.0]}
    row = early_exit_row(times, loops, "full", "exit", 6, 100)
    assert row["speed_up"] == pytest.approx(5 / 3)  # median of 0.5, 5/3, 9 (medians: 5 / 2)
    assert row["ideal"] == pytest.approx(2.0) and row["mean_loops"] == pytest.approx(3.0)
    # each round over its own ideal: median of 0.5 / 3, (5/3) / 1.5, 9 / 2 (not (5/3) / 2)
    assert row["of_ideal"] == pytest.approx((5 / 3) / 1.5)
    assert row["tokens_per_s"] == pytest.approx(100 / 2.0)


def test_bench_ragged_speed_is_dense_time_over_ragged_time(monkeypatch, capsys):
    """bench.py --gen_ragged_sweep: ragged_speed is how many times faster the ragged batch is,
    dense time / ragged time, from a clock where dense rounds take 2 s and ragged ones 1 s."""
    import bench

    def timed(model, prompts, tokens, variants, rounds, device, clock="wall"):
        times = {name: [2.0 if name == "dense" else 1.0] * rounds for name in variants}
        loops = {name: [3.0] * rounds for name in variants}
        return times, None, loops
    monkeypatch.setattr(bench, "time_generation", timed)
    monkeypatch.setattr(bench, "calibrate_exit", lambda *args, **kw: 1.0)
    model = LoopedGPT(model_config({"n_layer": 1, "n_head": 2, "n_embd": 8, "n_loops": 6,
                                    "block_size": 64, "vocab_size": 11}))
    prompts = torch.zeros(8, 4, dtype=torch.long)
    cfg = SimpleNamespace(gen_tokens=4, rounds=3)
    table = bench.ragged_sweep(model, prompts, cfg, "cpu", "cpu")
    assert table and all(r["ragged_speed"] == pytest.approx(2.0)
                         for row in table.values() for r in row.values())
    assert "2.00x" in capsys.readouterr().out


# ---- a third round: numbers that are only printed ------------------------------------------

def test_nonfinite_message_names_the_first_loop_that_overflowed():
    """The non-finite loss line names the first loop whose ||h_k|| is not finite, 1-based, with
    that loop's norm; with every state finite, the first trained exit whose CE is not."""
    import train
    msg = train.nonfinite_message(5, [1.0, 2.0, 3.0], [10.0, math.inf, math.inf], [1, 2, 3], "c")
    assert "(loop 2, ||h_2|| = inf)" in msg and "iter 5" in msg
    msg = train.nonfinite_message(7, [1.0, 2.0, math.nan], [10.0, 20.0, 30.0], [3], "c")
    assert "(loop 3, ||h_3|| = 30)" in msg


def test_evaluation_line_prints_the_logged_val_ce_and_norms(data_dir, tmp_path, monkeypatch):
    """train.py's line at each evaluation: 'val CE per loop' is the log entry's val_loop_ce (not
    its train_loop_ce) at 3 decimals, and '||h_k||' its hidden_norm at 3 digits."""
    import train
    lines = []
    monkeypatch.setattr(train.tqdm, "write", lambda text, *args, **kw: lines.append(text))
    train.main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={tmp_path}",
                       "--max_iters=2", "--eval_interval=2"])
    log = read_log(tmp_path)
    printed = [t for t in lines if t.startswith("iter ")]
    assert len(printed) == len(log) == 2
    for text, e in zip(printed, log):
        ces = " ".join(f"{c:.3f}" for c in e["val_loop_ce"])
        norms = " ".join(f"{n:.3g}" for n in e["hidden_norm"])
        assert text.startswith(f"iter {e['iter']}: val CE per loop {ces} | ||h_k|| {norms} |")
        assert e["val_loop_ce"] != e["train_loop_ce"]


def test_print_speed_shows_full_then_exit(capsys):
    """eval.py's speed table: the held-out PPL at full depth and testing every loop, and per
    batch each kind's tokens/s, the loops used, the speed-up, the ideal and its share, the exit's
    PPL and the loops tested with a test's cost, from eval.json's speed entry."""
    from eval import print_speed
    row = {"full": {"tokens_per_s": 400.0, "mean_loops": 6.0},
           "exit": {"tokens_per_s": 600.0, "mean_loops": 2.5, "ppl": 10.25},
           "speed_up": 1.5, "ideal": 2.4, "of_ideal": 0.625}
    tested = dict(row, test_cost=0.3125, one_loop_speed_up=4.125, tested_loops=[2, 5])
    untested = dict(row, test_cost=0.25, tested_loops=[])  # an eval.json without one loop's
    print_speed({"policy": "logit_margin", "threshold": 2.0, "new_tokens": 200,
                 "clock": "thread_time", "ppl": {"full": 10.0, "exit": 10.1},
                 "batch": {"1": row, "8": tested, "16": untested}}, 6)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("held-out PPL 10.000 at full depth, 10.100 testing every loop")
    assert out[2].split() == ["1", "400.0", "600.0", "2.50/6", "1.50x", "2.40x", "0.62",
                              "10.250"]
    assert out[3].split()[0] == "8" and out[3].split()[-3:] == ["2,5", "(0.31;", "4.12x)"]
    assert out[4].split()[0] == "16" and out[4].split()[-2:] == ["none", "(0.25)"]


def test_depth_map_legend_names_loops_1_to_K_in_their_shades(tmp_path, monkeypatch):
    """The depth map's legend: 'exit at loop k' for k = 1..K, each beside the shade of loop k."""
    import matplotlib.pyplot as plt
    import plot_norms
    g = torch.Generator().manual_seed(5)
    _, ev = write_run(tmp_path / "a", logged_config(), g)
    ev["depth_map"] = {"policy": "entropy", "exit_unit": "token", "threshold": 1.0,
                       "n_loops": 3, "ids": [0, 1, 2], "tokens": list("abc"),
                       "exit_loop": [1, 2, 3], "sequence_length": 32}
    (tmp_path / "a" / "eval.json").write_text(json.dumps(ev))
    figures = figures_kept(monkeypatch)
    plot_norms.plot_depth_map({str(tmp_path / "a"): plot_norms.load_run(str(tmp_path / "a"))},
                              str(tmp_path / "depth.png"))
    (fig, _), = figures
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"exit at loop {k}" for k in (1, 2, 3)]
    cmap = plt.get_cmap("YlOrRd")
    swatches = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    assert swatches == [pytest.approx(tuple(cmap(0.1 + 0.85 * (k - 1) / 2))) for k in (1, 2, 3)]


def test_bench_report_prints_the_figures_it_returns(capsys):
    """bench.report's table: each case's tokens/s, step time in ms, model GFLOP/s, MFU and the
    ratio to nanogpt, printed as computed (the terminal case: 3.0e6 FLOPs x 1000 tokens/s =
    3.00 GFLOP/s, 3.0% of a 1e11 peak)."""
    import bench
    results = [{"case": "terminal", "step_s": 0.30, "tokens_per_sec": 1000.0,
                "flops_per_token": 3.0e6, "peak_mem_bytes": 5e8},
               {"case": "nanogpt", "step_s": 0.20, "tokens_per_sec": 1500.0,
                "flops_per_token": 2.0e6, "peak_mem_bytes": 3e8}]
    bench.report(results, "gpt2", 1e11, {})
    rows = {}
    for line in capsys.readouterr().out.splitlines():  # the table's rows come first
        if line.split() and line.split()[0] in ("terminal", "nanogpt"):
            rows.setdefault(line.split()[0], line.split())
    assert rows["terminal"][1:3] == ["1,000", "300.0"]
    assert rows["terminal"][-3:] == ["3.00", "3.0%", "1.00x"]
    assert rows["nanogpt"][-3:] == ["3.00", "3.0%", "1.00x"]


# ---- a fourth round: the printed tables of experiments.py, plot_norms.py and prepare.py -----

def test_printed_endpoint_table_is_the_rows_it_returns(capsys):
    """experiments.py's endpoint table, printed: each row's PPL at 1 and K, CE gap, radial
    fraction at 1 and at K and ||h_K||, in that order, are the returned row's means."""
    from experiments import endpoint, print_endpoint
    runs = [{"run": "rmsnorm", "replicate": "seed1", "config": logged_config(),
             "ppl": [23.0, 17.0, 11.0], "hidden_norm": [5.0, 50.0, 500.0],
             "endpoint": {"ce_gap": math.log(23 / 11),
                          "radial_fraction": {"loop": [1, 3], "mean_abs_cos": [0.4, 0.02]}}}]
    e = endpoint(runs)
    print_endpoint(e)
    (row,) = e["rows"]
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("rmsnorm "))
    got = line.split()[3:9]
    assert got == [f"{row['ppl_1']['mean']:.3f}", f"{row['ppl_K']['mean']:.3f}",
                   f"{row['ce_gap']['mean']:.3f}", f"{0.4:.2g}", f"{0.02:.2g}", f"{500.0:.4g}"]


def test_printed_plot_table_is_the_rows_it_returns(tmp_path, monkeypatch, capsys):
    """plot_norms.py's printed table: for each run ||h_K||, PPL at K, mean loops and PPL at
    k = 1..K, read from the end of its line, equal the returned row and the run's files."""
    import plot_norms
    g = torch.Generator().manual_seed(9)
    log, ev = write_run(tmp_path / "a", logged_config(), g)
    figures_kept(monkeypatch)
    (row,) = plot_norms.main([str(tmp_path / "a"), f"--out={tmp_path / 'fig.png'}"])
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("a "))
    fields = line.split()
    K = 3
    ppl_k = ev["per_depth"]["ppl"][:K]
    loops = ev["halting"]["token"]["logit_margin"]["mean_loops"]
    assert fields[-K:] == [f"{p:.3f}" for p in ppl_k]
    assert fields[-K - 3:-K] == [f"{log[-1]['hidden_norm'][-1]:.4g}", f"{ppl_k[-1]:.3f}",
                                 f"{loops:.2f}"]
    assert row["ppl"] == ppl_k[-1] and row["mean_loops"] == loops


def test_prepare_prints_the_token_counts_it_wrote(tmp_path, capsys):
    """prepare.py's last line: the train and val token counts and the vocabulary size are those
    of the files it wrote (counted here from train.bin and val.bin)."""
    from prepare import main
    (tmp_path / "t.txt").write_text("to be, or not to be: that is the question.\n" * 30)
    out = main([f"--input={tmp_path / 't.txt'}", "--tokenizer=char", "--name=c",
                f"--data_dir={tmp_path / 'data'}"])
    meta = json.loads((out / "meta.json").read_text())
    n = {s: len(np.fromfile(out / f"{s}.bin", dtype=meta["dtype"])) for s in ("train", "val")}
    assert n["train"] != n["val"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert (f"train {n['train']:,} tokens, val {n['val']:,} tokens, "
            f"vocab {meta['vocab_size']:,} (char)") in last


# ---- exit tests where they pay (eval.py --run=speed's schedule) ----------------------------

def exits_by_hand(score, policy, threshold, K, tested):
    """Each token's exit loop, token by token: its first tested loop whose score passes, else
    K. score [K, S, T] as nested lists."""
    sign = EXIT_POLICIES[policy]
    S, T = len(score[0]), len(score[0][0])
    out = []
    for s in range(S):
        for t in range(T):
            loop = K
            for k in sorted(tested):
                v = score[k - 1][s][t]
                if (v >= threshold) if sign == ">=" else (v <= threshold):
                    loop = k
                    break
            out.append(loop)
    return out


def schedule_cost(ce, score, policy, threshold, K, cost, tested, batch=1):
    """(mean cost in loops, PPL) of a schedule, by hand: a batch of `batch` sequences (0..b-1,
    then b..2b-1, ...; a last partial one left out) at one position runs until its last row
    exits and pays `cost` for each tested loop it reaches (the one it exits at included)."""
    loops = exits_by_hand(score.tolist(), policy, threshold, K, tested)
    S, T = score.shape[1], score.shape[2]
    batch = min(batch, S)
    paid = []
    for first in range(0, S - batch + 1, batch):
        for t in range(T):
            last = max(loops[s * T + t] for s in range(first, first + batch))
            paid.append(last + cost * sum(1 for k in tested if k <= last))
    flat = ce.reshape(K, -1).tolist()
    nll = [flat[e - 1][i] for i, e in enumerate(loops)]
    return sum(paid) / len(paid), math.exp(sum(nll) / len(nll))


def test_exit_schedule_keeps_the_tests_that_pay_and_meets_the_target():
    """exit_schedule on made-up CEs and scores (K = 5): the schedule's PPL is within target x
    full depth and its mean cost (loops run plus `cost` per test met, computed token by token
    here) is at most that of a test at every loop, and no single test more or less would lower
    it within the target. With free tests every loop where someone exits is kept; with tests
    dearer than anything they save, none is; loops no token reaches are dropped."""
    from eval import exit_schedule
    g = torch.Generator().manual_seed(0)
    K = 5
    ce = torch.rand(K, 6, 40, generator=g, dtype=torch.float64) * 3
    ce[K - 1] *= 0.9  # full depth is the best exit, on the whole
    score = torch.rand(K, 6, 40, generator=g, dtype=torch.float64)
    full = math.exp(ce[K - 1].mean().item())
    t = 0.9  # max_prob >= 0.9: about a tenth of the tokens pass at each loop
    for cost, target in ((0.05, 1.2), (0.3, 1.2), (0.3, 1.02), (2.0, 1.2)):
        got = exit_schedule(ce, score, "max_prob", t, K, cost, target)
        mine, ppl = schedule_cost(ce, score, "max_prob", t, K, cost, got)
        every = schedule_cost(ce, score, "max_prob", t, K, cost, range(1, K))
        assert got == sorted(set(got)) and set(got) <= set(range(1, K))
        assert ppl <= target * full * (1 + 1e-12) and mine <= every[0] + 1e-12, (cost, target)
        for k in range(1, K):  # a local optimum: one test fewer or more does not pay
            other = sorted(set(got) ^ {k})
            c, p = schedule_cost(ce, score, "max_prob", t, K, cost, other)
            assert c >= mine - 1e-12 or p > target * full, (cost, target, got, other)
    assert exit_schedule(ce, score, "max_prob", t, K, 0.0, 10.0) == [1, 2, 3, 4]
    # the target binds: 10 tokens pass at loops 2 and 3 and predict well at 2, terribly at 3;
    # 50 pass at loop 3 only. Dropping the test at 2 would pay (0.3 x 100 tests for 10 extra
    # loops) but send the 10 to loop 3: PPL e^1 -> e^2.9, past 1.1x full depth, so it stays
    ce = torch.ones(4, 1, 100, dtype=torch.float64)
    ce[2, 0, :10] = 20.0
    score = torch.zeros(4, 1, 100, dtype=torch.float64)
    score[1:3, 0, :10] = 1.0
    score[2, 0, 10:60] = 1.0
    assert exit_schedule(ce, score, "max_prob", 0.5, 4, 0.3, 1.1) == [2, 3]
    assert exit_schedule(ce, score, "max_prob", 0.5, 4, 0.3, 10.0) == [3]
    # a batch waits for its last row: half the sequences exit at loop 1, alternately, so at
    # batch 1 the test there saves a loop for half the tokens, at batch 4 it never saves one
    ce = torch.ones(3, 8, 2, dtype=torch.float64)
    score = torch.zeros(3, 8, 2, dtype=torch.float64)
    score[0, ::2] = 1.0
    assert exit_schedule(ce, score, "max_prob", 0.5, 3, 0.3, 1.1) == [1]
    assert exit_schedule(ce, score, "max_prob", 0.5, 3, 0.3, 1.1, batch=4) == []
    # the rule as the docstring states it, run here on schedule_cost: from every test, drop
    # the one whose removal lowers the cost most (within the target), a tie to fewer tests
    for seed in range(12):
        g.manual_seed(seed)
        ce = torch.rand(K, 2, 30, generator=g, dtype=torch.float64) * 3
        score = torch.rand(K, 2, 30, generator=g, dtype=torch.float64)
        early = score[0] >= 0.7  # tokens that pass at loop 1 predict best there, worst later
        ce[0] = torch.where(early, 0.1 * ce[0], ce[0])
        ce[1:] = torch.where(early, ce[1:] + 2, ce[1:])
        cost = [0.02, 0.1, 0.3, 0.6][seed % 4]
        target = [1.01, 1.1, 1.5][seed % 3]
        batch = [1, 2][seed % 2]
        full = math.exp(ce[K - 1].mean().item())
        kept = set(range(1, K))
        best = schedule_cost(ce, score, "max_prob", 0.7, K, cost, kept, batch)[0]
        while kept:
            fits = []
            for k in sorted(kept):
                c, p = schedule_cost(ce, score, "max_prob", 0.7, K, cost, kept - {k}, batch)
                if p <= target * full:
                    fits.append((c, k))
            if not fits or min(fits)[0] > best + 1e-12:
                break
            best, k = min(fits)
            kept.remove(k)
        got = exit_schedule(ce, score, "max_prob", 0.7, K, cost, target, batch)
        assert got == sorted(kept), seed
    assert exit_schedule(ce, score, "max_prob", t, K, 10.0, 10.0) == []
    everyone = torch.ones_like(score)  # every token passes at loop 1: loops 2..4 never tested
    assert exit_schedule(ce, everyone, "max_prob", t, K, 0.1, 10.0) == [1]
    # entropy is <=: a token exits when its score is at most the threshold
    assert exit_schedule(ce, 1 - everyone, "entropy", 0.5, K, 0.1, 10.0) == [1]


def test_exit_test_cost_is_the_tests_time_over_the_loops_time(monkeypatch):
    """exit_test_cost with a generator whose time is known: each token costs 1 ms per loop run,
    0.3 ms per exit test met and 0.5 ms outside the loops, so a test costs 0.3 loops, and one
    loop is (4 + 0.5) / (1 + 0.5) = 3x as fast as all 4; the thresholds it times with pass no
    token (a test at every loop, nobody exits)."""
    import eval as eval_script
    import sample
    K = 4
    clock = [0.0]
    model = SimpleNamespace(config=SimpleNamespace(n_loops=K),
                            lm_head=SimpleNamespace(weight=torch.zeros(1)))

    def fake_generate(model, idx, n, n_loops=None, exit_policy=None, exit_threshold=None):
        loops = n_loops or K
        tests = loops - 1 if exit_policy else 0
        if exit_policy:
            assert exit_threshold == (math.inf if EXIT_POLICIES[exit_policy] == ">="
                                      else -math.inf)
        clock[0] += n * (1e-3 * loops + 0.3e-3 * tests + 0.5e-3)
        return idx, torch.full((idx.size(0), n), loops)
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(eval_script.time, "thread_time", lambda: clock[0])
    monkeypatch.setattr(eval_script, "amp", lambda model, dtype: torch.no_grad())
    for policy in EXIT_POLICIES:
        cost, one_loop = eval_script.exit_test_cost(model, torch.zeros(1, 4, dtype=torch.long),
                                                    policy, 20, 2)
        assert cost == pytest.approx(0.3) and one_loop == pytest.approx(3.0)


def test_speed_times_the_schedule_and_reports_its_held_out_ppl(tiny_runs, monkeypatch):
    """speed given calibration and held-out (ce, scores): at each batch size the exit kind
    generates with exit_at = exit_schedule's loops for that batch size at the test cost measured
    there, unless rounds of its own find that schedule slower than full depth (then no test at
    all), and eval.json's exit PPL for it is the held-out PPL of the tests used, computed here
    token by token."""
    import eval as eval_script
    import sample
    model = model_from_checkpoint(load_checkpoint(
        os.path.join(tiny_runs["rmsnorm"], "ckpt.pt")), "cpu")
    K = model.config.n_loops
    g = torch.Generator().manual_seed(1)
    cal = (torch.rand(K, 4, 8, generator=g) * 3, {"max_prob": torch.rand(K, 4, 8, generator=g)})
    held = (torch.rand(K, 4, 8, generator=g) * 3,
            {"max_prob": torch.rand(K, 4, 8, generator=g)})
    costs = {1: 0.4, 8: 0.1}  # a test's cost measured at each batch size
    one_loop = {1: 2.5, 8: 3.5}  # and one loop's speed-up there
    monkeypatch.setattr(eval_script, "exit_test_cost", lambda model, prompts, *a, **kw: (
        costs[prompts.size(0)], one_loop[prompts.size(0)]))
    want = {b: eval_script.exit_schedule(cal[0], cal[1]["max_prob"], "max_prob", 0.8, K, c, 1.5,
                                         b) for b, c in costs.items()}
    assert 0 < len(want[1]) < K - 1  # some loops tested, not all: the PPL depends on which
    assert want[8] != want[1]
    seen = []
    clock = [0.0]
    # a token of full depth takes 1 s; with exit tests, one and a half at batch 1 and half of
    # that at batch 8: at batch 1 the schedule does not pay in its own timed rounds, so it is
    # dropped and the exit runs with no test (exit_at=[])
    per_token = {1: 1.5, 8: 0.5}

    def fake_generate(model, idx, n, exit_policy=None, exit_threshold=None, exit_at=None):
        if exit_policy:
            seen.append((idx.size(0), exit_at))
        clock[0] += n * (per_token[idx.size(0)] if exit_at else 1.0)
        return idx, torch.full((idx.size(0), n), K)
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(eval_script.time, "thread_time", lambda: clock[0])
    cfg = SimpleNamespace(policy="max_prob", new_tokens=4, rounds=1, target=1.5)
    halt = {"threshold": 0.8, "mean_loops": 2.0, "ppl": 9.0, "ratio": 1.01}
    out = eval_script.speed(model, np.arange(400), halt, cfg, cal=cal, held=held)
    used = {1: [], 8: want[8]}
    # a schedule's check: 2 rounds (a warm-up and a timed one); then the 2 reported rounds
    assert seen == [(b, w) for b in (1, 8) for w in [want[b]] * 2 * bool(want[b]) + [used[b]] * 2]
    for b, c in costs.items():
        r = out["batch"][str(b)]
        assert r["schedule"] == want[b] and r["tested_loops"] == used[b] and r["test_cost"] == c
        assert r["one_loop_speed_up"] == one_loop[b]
        if want[b]:
            assert r["schedule_speed_up"] == pytest.approx(1 / per_token[b])
        ppl = schedule_cost(held[0].double(), held[1]["max_prob"].double(), "max_prob", 0.8, K,
                            0.0, used[b])[1]
        assert r["exit"]["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert out["ppl"] == {"full": pytest.approx(9.0 / 1.01), "exit": 9.0}  # every loop tested
