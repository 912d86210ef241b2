"""
Evaluate a trained looped model on validation data, and write out_dir/eval.json.

  python eval.py --out_dir=out                          # per-depth PPL, adaptive exit, halting
  python eval.py --out_dir=out --run=lens --start="ROMEO:"   # each loop's top-1 guess per position
  python eval.py --out_dir=out --run=all                # everything below but speed

- per-depth perplexity: val CE / PPL when exiting after loop k, for k = 1 .. max_depth (default
  2K: what do loops beyond the trained depth do?), on the batches train.py evaluates on.
- halting: a token (or a whole sequence, by its mean score) stops at the first loop whose
  readout passes the exit policy (max_prob / logit_margin >= t, entropy <= t), else at loop K.
  The threshold t is calibrated: of n_thresholds quantiles of the scores (and the two ends), the
  one with the fewest mean loops whose PPL is at most 1.01x full depth, found by trying every
  one. Two protocols: nanoloop's held-out one (calibrated on random batches from the first half
  of val, reported on batches from the second half, per token and per sequence) and the
  paper's (per sequence, calibrated and reported on the same first windows of val). A sweep of
  t gives the operating curve (mean loops used, val PPL) on the held-out batches.
- a depth map: the exit loop of each token of a held-out passage under calibrated halting.
- the paper's diagnostics: Lemma 1 on this checkpoint (and the radial fraction of the gradient
  at loops 1 and K), Lemma 2 over 30 loops, variable depth (the model run for K' = 1..3K loops,
  decoded by its own rule), the radial clamp in two modes, scale sensitivity, the spread of
  per-token norms; with per-depth PPL, the endpoint metrics (the CE gap ln PPL_1 - ln PPL_K).
- speed (--run=speed, after depth; not part of all, so that it can be timed on a quiet
  machine): what calibrated halting saves in time. Tokens per second of generation with the KV
  cache at batch 1 and 8, running all K loops against exiting at the threshold that depth
  calibrated, with exit tests at the loops where they pay for what they cost (timed here), the
  mean loops used, the speed-up and the ideal one (K / mean loops), beside the held-out PPL of
  each; and the compute-quality frontier, the tokens per second of a full forward pass at each
  depth k = 1..K. On a CPU in one thread, timed by its CPU time.
Exits are simulated on full sequences: every position runs all loops (so later tokens attend to
deeper states of earlier ones) and each token's prediction is read at its own exit loop.

On a GPU (CUDA or Apple's MPS) the loops and readouts run there, autocast to the run's dtype, one
exit's [B, T, V] logits at a time; what is measured per token moves to the CPU (`.cpu()`) before
it is summed up in float64 (MPS has none) or binned (torch.histogram is CPU-only), and values are
read only there.
"""

import json
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import DEVICE, NONEMPTY, at_least, check, device_or_exit, error, one_of, parse
from device import autocast, keep_freed_memory, pick_dtype, synchronize
from model import EXIT_POLICIES, exit_score, exits, strict_to_loose
from prepare import load_tokenizer
from rundir import atomic_write_text, die, eval_seed, get_batch, load_checkpoint, load_data
from rundir import model_from_checkpoint, writable_folder

DIAGNOSTICS = ("lemma1", "lemma2", "variable_depth", "clamp", "scale", "spread")
RUNS = ("depth", "lens") + DIAGNOSTICS + ("all", "speed")
SPEED_BATCHES = (1, 8)
EXIT_UNITS = ("token", "sequence")
OPTIONS = {
    "out_dir": ("out", "folder holding ckpt.pt; eval.json is written there", NONEMPTY),
    "data_dir": ("data", "where prepare.py wrote the datasets", NONEMPTY),
    "eval_iters": (20, "validation batches per set (per-depth, calibration, held-out)",
                   at_least(1)),
    "batch_size": (0, "sequences per batch (0 = the run's batch_size)", at_least(0)),
    "max_depth": (0, "deepest exit evaluated: 0 (= 2K) or at least the run's K", at_least(0)),
    "n_thresholds": (51, "quantiles of the exit scores tried as thresholds, beside the two "
                         "ends, in calibration and the sweep (paper: 51)", at_least(2)),
    "target": (1.01, "calibrated halting: allowed PPL relative to full depth", at_least(1.0)),
    "policy": ("logit_margin", "exit policy of the sweep and the depth map (paper: logit_margin)",
               one_of(*EXIT_POLICIES)),
    "exit_unit": ("token", "what exits in the sweep and the depth map: a token, or a sequence "
                           "by the mean score of its tokens", one_of(*EXIT_UNITS)),
    "start": ("ROMEO:", "lens: the prompt whose positions are shown",
              check("non-empty text", lambda v: v != "", [""])),
    "device": ("auto", "auto: cuda, then mps, then cpu", DEVICE),
    "run": ("depth", "what to evaluate: depth (per-depth PPL, halting, depth map), lens, "
                     "one diagnostic, all of these, or speed (after depth: generation tokens/s "
                     "at full depth and under calibrated halting)", one_of(*RUNS)),
    "new_tokens": (200, "speed: tokens generated per timed generation", at_least(1)),
    "rounds": (5, "speed: timed rounds of each kind (the median is reported); on a CPU in one "
                  "thread, timed by its CPU time", at_least(1)),
    "lemma2_loops": (30, "lemma2: loops the trained block is run for (paper: 30)", at_least(2)),
}


def together(cfg, explicit):
    if "start" in explicit and cfg.run not in ("lens", "all"):
        return "--start is the prompt of --run=lens (or all); add --run=lens"
    for name in ("new_tokens", "rounds"):
        if name in explicit and cfg.run != "speed":
            return f"--{name} is an option of --run=speed; add --run=speed"
    if "lemma2_loops" in explicit and cfg.run not in ("lemma2", "all"):
        return "--lemma2_loops is an option of --run=lemma2 (or all); add --run=lemma2"
    return None


def amp(model, dtype):
    """Autocast on the model's device to the run's dtype ("float32": none), as it trained."""
    return autocast(str(model.lm_head.weight.device), dtype)


@torch.no_grad()
def collect(model, batches, max_depth, states=None, dtype="float32"):
    """Per exit depth k = 1..max_depth, per sequence and position: CE [D, S, T] and each
    policy's score [D, S, T], in float32 on the CPU. `states`: the batches' first loop states
    when already computed (all_states); the loops after them continue from the last one."""
    ce = []
    scores = {p: [] for p in EXIT_POLICIES}
    for i, (x, y) in enumerate(tqdm(batches, desc="eval", unit="batch", leave=False)):
        given = list(states[i][:max_depth]) if states else []
        h = given[-1] if given else model.embed(x)
        ce_b, scores_b = [], {p: [] for p in EXIT_POLICIES}
        # depth by depth: one [B, T, V] logits at a time (2K of them would not fit a GPU at a
        # GPT-2 vocabulary), turned into per-token CE and scores, then dropped
        for k in range(1, max_depth + 1):
            with amp(model, dtype):
                if k > len(given):
                    h = model.loop(h, k)
                logits = model.readout(given[k - 1] if k <= len(given) else h, k)
            logits = logits.float()
            ce_b.append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none"))
            for p in EXIT_POLICIES:
                scores_b[p].append(exit_score(logits, p))
            del logits  # before the next depth's readout allocates its own
        ce.append(torch.stack(ce_b))
        for p in EXIT_POLICIES:
            scores[p].append(torch.stack(scores_b[p]))
    return torch.cat(ce, dim=1).cpu(), {p: torch.cat(s, dim=1).cpu() for p, s in scores.items()}


def unit_scores(score, unit):
    """Scores per exit decision: one per token, or one per sequence (its tokens' mean)."""
    return score if unit == "token" else score.mean(dim=-1, keepdim=True)


def exit_loops(score, policy, threshold, K, unit="token", tested=None):
    """The loop (1..K) at which each token exits [S, T]: the first loop that passes, of the
    loops `tested` (default: every loop; generate's exit_at)."""
    passed = exits(unit_scores(score[:K], unit), policy, threshold)
    if tested is not None:  # a loop without an exit test lets no one out
        passed[[k - 1 for k in range(1, K) if k not in tested]] = False
    passed[K - 1] = True
    exit_at = passed.float().argmax(dim=0) + 1  # first True
    return exit_at.expand(score.shape[1:])  # a sequence's tokens all share its exit loop


def adaptive_exit(ce, score, policy, threshold, K, unit="token", tested=None):
    """(mean loops, PPL) when each token (or sequence) exits at its first passing loop (of the
    loops `tested`)."""
    exit_at = exit_loops(score, policy, threshold, K, unit, tested)
    token_ce = ce[:K].gather(0, (exit_at - 1)[None])[0]
    return exit_at.double().mean().item(), math.exp(token_ce.double().mean().item())


def threshold_grid(score, policy, K, n, unit="token"):
    """Candidate thresholds, loosest first: n quantiles (levels evenly spaced over 0..1) of the
    unit scores at loops 1..K-1, and one just past each end (every unit exits at loop 1; none
    exits early), as the paper's code takes them."""
    s = unit_scores(score[:max(1, K - 1)], unit).flatten().double().numpy()
    s = s[np.isfinite(s)]
    grid = [s.min() - 1e-6, *np.unique(np.quantile(s, np.linspace(0, 1, n))), s.max() + 1e-6]
    return strict_to_loose([float(t) for t in grid], policy)[::-1]


def calibrate(ce, score, policy, K, target, n, unit="token"):
    """(threshold, mean loops, PPL) on these batches: of the grid's thresholds (threshold_grid)
    whose PPL is at most target x full depth, the one with the fewest mean loops (the loosest
    of a tie), found by trying every one: PPL need not be monotone in the threshold (a looser
    one can let through tokens whose early exit beats full depth), so nothing may assume it.
    The threshold is None when no early exit meets the target: all K loops run."""
    full = math.exp(ce[K - 1].double().mean().item())
    best = (None, float(K), full)
    for t in threshold_grid(score, policy, K, n, unit):
        loops, ppl = adaptive_exit(ce, score, policy, t, K, unit)
        if ppl <= target * full and loops < best[1]:
            best = (t, loops, ppl)
    return best


def exit_schedule(ce, score, policy, threshold, K, test_cost, target, batch=1):
    """The loops whose exit test pays for itself when generating `batch` rows at a time, judged
    on these (calibration) batches. A batch runs a loop, and pays for a tested loop's test
    (test_cost loops, measured by exit_test_cost), while any of its rows runs: it costs the
    loops of its last row to exit and the tests on the way. The batches are the calibration
    tokens taken `batch` sequences at a time, position by position (each a different text, as
    generation's rows are; the sequences that do not fill a batch are left out); at batch 1 a
    token pays its own loops and tests. From a test at every loop 1..K-1, drop the test whose
    removal lowers the mean cost most, as long as the PPL stays within target x full depth (a
    token let through goes on to a later test, or to loop K); stop when no removal lowers it.
    Returns the loops kept, in order."""
    full = math.exp(ce[K - 1].double().mean().item())
    batch = min(batch, score.size(1))
    S = score.size(1) // batch * batch

    def cost(tested):
        exit_at = exit_loops(score, policy, threshold, K, "token", tested)
        last = exit_at[:S].t().reshape(-1, batch).amax(dim=1).double()  # each batch's last row
        tests = sum((last >= k).double() for k in tested) if tested else 0.0
        ppl = adaptive_exit(ce, score, policy, threshold, K, "token", tested)[1]
        return (last + test_cost * tests).mean().item(), ppl

    tested = set(range(1, K))
    best = cost(tested)[0]
    while tested:
        options = [(cost(tested - {k}), k) for k in sorted(tested)]
        options = [(c, k) for (c, ppl), k in options if ppl <= target * full]
        if not options or min(options)[0] > best:  # on a tie, fewer tests
            break
        best, k = min(options)
        tested.remove(k)
    return sorted(tested)


def halting(cal, held, policy, K, target, n, unit="token"):
    """Calibrate on `cal` = (ce, scores), report on `held` = (ce, scores): disjoint batches
    (nanoloop's held-out protocol), or the same ones (the paper's)."""
    t = calibrate(cal[0], cal[1][policy], policy, K, target, n, unit)[0]
    full = math.exp(held[0][K - 1].double().mean().item())
    if t is None:
        return {"threshold": None, "mean_loops": float(K), "ppl": full, "ratio": 1.0}
    loops, ppl = adaptive_exit(held[0], held[1][policy], policy, t, K, unit)
    return {"threshold": t, "mean_loops": loops, "ppl": ppl, "ratio": ppl / full}


def split_batches(data, n, batch_size, block_size, device):
    """Calibration batches from the first half of the validation split and held-out batches
    from the second half, which it also returns: no token is in both."""
    half = len(data) // 2
    if half <= block_size + 1:
        die(f"the validation split ({len(data)} tokens) is too short to halve into calibration "
            f"and held-out batches of block_size={block_size}")
    cal = [get_batch(data[:half], batch_size, block_size, eval_seed(i, "cal"), device)
           for i in range(n)]
    held = [get_batch(data[half:], batch_size, block_size, eval_seed(i, "held"), device)
            for i in range(n)]
    return cal, held, data[half:]


def windows(data, n, batch_size, block_size, device):
    """The paper's evaluation batches: the first n non-overlapping windows of `data`, in order
    (window i: inputs tokens [i T, (i+1) T), targets one token later), batch_size at a time;
    fewer when the split is shorter."""
    n = max(1, min(n, (len(data) - 1) // block_size))
    xy = torch.from_numpy(data[:n * block_size + 1].astype("int64"))
    x, y = xy[:-1].view(n, block_size), xy[1:].view(n, block_size)
    return [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
            for i in range(0, n, batch_size)]


def evaluate(model, batches, cal_batches, held_batches, paper_batches, cfg, held_data,
             decode=None, states=None, dtype="float32"):
    """Per-depth PPL on `batches` (whose first loop states may be given). Halting two ways:
    nanoloop's held-out protocol (calibrated on `cal_batches`, reported on the disjoint
    `held_batches`, per token and per sequence, every policy) and the paper's (per sequence,
    calibrated and reported on the same `paper_batches`, every policy). The sweep on the
    held-out batches; the depth map of the start of `held_data`. The model runs in `dtype`
    (autocast); everything after collect is on the CPU."""
    K = model.config.n_loops
    n = cfg.n_thresholds
    max_depth = cfg.max_depth or 2 * K
    ce, _ = collect(model, batches, max_depth, states, dtype)
    mean_ce = ce.flatten(1).double().mean(dim=1).tolist()
    out = {"n_loops": K, "n_tokens": ce[0].numel(),
           "per_depth": {"k": list(range(1, max_depth + 1)), "ce": mean_ce,
                         "ppl": [math.exp(c) for c in mean_ce]},
           "full_depth_ppl": math.exp(mean_ce[K - 1]), "target": cfg.target,
           "n_thresholds": n}
    cal = collect(model, cal_batches, K, dtype=dtype)
    held = collect(model, held_batches, K, dtype=dtype)
    out["halting"] = {unit: {p: halting(cal, held, p, K, cfg.target, n, unit)
                             for p in EXIT_POLICIES} for unit in EXIT_UNITS}
    same = collect(model, paper_batches, K, dtype=dtype)
    out["halting_paper"] = {p: halting(same, same, p, K, cfg.target, n, "sequence")
                            | {"n_sequences": same[0].shape[1]} for p in EXIT_POLICIES}
    p, unit = cfg.policy, cfg.exit_unit
    ts = threshold_grid(cal[1][p], p, K, n, unit)
    sweep = [adaptive_exit(held[0], held[1][p], p, t, K, unit) for t in ts]
    out["adaptive"] = {"policy": p, "exit_unit": unit, "threshold": ts,
                       "mean_loops": [s[0] for s in sweep], "ppl": [s[1] for s in sweep]}
    out["depth_map"] = depth_map(model, held_data, out["halting"][unit][p], p, unit, decode,
                                 dtype=dtype)
    return out


@torch.no_grad()
def depth_map(model, data, cal, policy, unit, decode, n_tokens=300, dtype="float32"):
    """A contiguous passage of about n_tokens from `data`, cut into block_size sequences, with
    each token's exit loop under the calibrated threshold `cal` (the depth map's data)."""
    K = model.config.n_loops
    T = model.config.block_size
    n_seq = max(1, min(round(n_tokens / T), (len(data) - 1) // T))
    xy = torch.from_numpy(data[:n_seq * T + 1].astype("int64"))
    ids = xy[:-1]  # stays on the CPU, to be read
    device = model.lm_head.weight.device  # inputs and next-token targets both go there
    x, y = (t.reshape(n_seq, T).to(device) for t in (ids, xy[1:]))
    _, scores = collect(model, [(x, y)], K, dtype=dtype)
    if cal["threshold"] is None:
        loops = torch.full((n_seq, T), K)
    else:
        loops = exit_loops(scores[policy], policy, cal["threshold"], K, unit)
    ids = ids.tolist()
    return {"policy": policy, "exit_unit": unit, "threshold": cal["threshold"], "n_loops": K,
            "ids": ids, "tokens": [decode([i]) for i in ids] if decode else None,
            "exit_loop": loops.flatten().tolist(), "sequence_length": T}


# ---- seeing inside the loops: the logit lens -----------------------------------------------

@torch.no_grad()
def lens(model, ids, decode, dtype="float32"):
    """For each position of the prompt ids: the top-1 next token and its probability after
    every loop k = 1..K (the readout of h_k: what the model would say if it exited there)."""
    x = torch.tensor(ids, dtype=torch.long, device=model.lm_head.weight.device)[None]
    with amp(model, dtype):
        states = model.loop_states(x)
    prob, top1 = [], []
    for k, h in enumerate(states, start=1):
        with amp(model, dtype):
            logits = model.readout(h, k)[0]
        top = F.softmax(logits.float(), dim=-1).max(dim=-1)  # values [T], indices [T]
        prob.append(top.values)
        top1.append(top.indices)
    prob = torch.stack(prob, dim=1).cpu().tolist()  # [T][K]
    top1 = torch.stack(top1, dim=1).cpu().tolist()
    return {"ids": ids, "tokens": [decode([i]) for i in ids], "top1": top1,
            "top1_token": [[decode([i]) for i in row] for row in top1], "prob": prob}


def shown(token):
    """A token as one visible cell: escapes for control characters, a mark for spaces."""
    return repr(token)[1:-1].replace(" ", "\u2423")


def print_lens(out):
    K = len(out["prob"][0])
    print("logit lens: top-1 next token (probability) after each loop")
    header = " ".join(f"{'loop ' + str(k):<14}" for k in range(1, K + 1))
    print(f"{'pos':>3} {'token':<8} {header}")
    for t, token in enumerate(out["tokens"]):
        cells = [f"{shown(w):<6} {p:6.3f} " for w, p in zip(out["top1_token"][t], out["prob"][t])]
        print(f"{t:>3} {shown(token):<8} " + " ".join(cells))


# ---- the paper's diagnostics: why the norm grows, and that the readout does not care ----------

# Each diagnostic takes (model, batches, states=None, dtype): `states` are the batches' loop
# states when already computed (all_states, in the run's dtype). It computes on the model's
# device and moves per-token vectors to the CPU for float64 statistics and for reading.

def wide(h):
    """h in at least float32 (float64 stays float64): per-token statistics of bf16 states."""
    return h.to(torch.promote_types(h.dtype, torch.float32))


def rms(h):
    """Per-token RMS of h [..., C], [..., 1], at least in float32; floored so that a zero state
    divides."""
    return wide(h).pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-9)


@torch.no_grad()
def all_states(model, batches, dtype="float32"):
    """loop_states of every batch, computed once for the diagnostics that share them."""
    with amp(model, dtype):
        return [model.loop_states(x) for x, _ in tqdm(batches, desc="loops", unit="batch",
                                                      leave=False)]


def radial_cos(model, batches, states, loop, chunk_elems=2 ** 24):
    """Per token, |cos(dCE/dh_k, h_k)| at loop k: the radial fraction of the gradient the loss
    sends into the state, with the model's own readout of loop k in float64 on the CPU."""
    readout = model.readout_copy("cpu", torch.float64)  # the model's own decode, in float64
    rows = max(1, chunk_elems // model.config.vocab_size)  # float64 [rows, V] logits at a time
    cos = []
    for (_, y), hs in zip(batches, states):
        h, y = hs[loop - 1].cpu().double().flatten(0, 1), y.cpu().flatten()
        # a token's gradient depends on its own readout only, so the CE can be taken in row
        # chunks (a GPT-2 vocabulary's [B*T, V] float64 logits are ~7 GB); summed, not
        # averaged, so that a sure token's gradient stays far above any floor of a cosine
        for hc, yc in zip(h.split(rows), y.split(rows)):
            hc = hc.detach().requires_grad_(True)
            ce = F.cross_entropy(readout(hc, loop), yc, reduction="sum")
            (g,) = torch.autograd.grad(ce, hc)
            lengths = g.norm(dim=-1) * hc.detach().norm(dim=-1)
            dot = (g * hc.detach()).sum(dim=-1).abs()
            cos.append(torch.where(lengths > 0, dot / lengths, torch.zeros_like(dot)))
    return torch.cat(cos)


def lemma1(model, batches, states=None, dtype="float32", chunk_elems=2 ** 24):
    """Lemma 1 on this checkpoint: per token, |cos(dCE/dh_K, h_K)| (radial_cos, the loops run as
    trained, the readout in float64): zero up to rounding for a scale-invariant last readout,
    clearly non-zero for a scale-visible one. Also its mean at loops 1 and K, the paper's
    radial fraction of the gradient at the two ends."""
    K = model.config.n_loops
    states = states or all_states(model, batches, dtype)
    cos = {k: radial_cos(model, batches, states, k, chunk_elems) for k in sorted({1, K})}
    return {"max_abs_cos": cos[K].max().item(), "mean_abs_cos": cos[K].mean().item(),
            "n_tokens": cos[K].numel(),
            "radial_fraction": {"loop": list(cos), "mean_abs_cos": [c.mean().item()
                                                                    for c in cos.values()]}}


@torch.no_grad()
def lemma2(model, batches, states=None, dtype="float32", n_loops=30):
    """Lemma 2 as the paper checks it: the trained block run for n_loops loops, far past K, and
    per loop, in RMS units (s = RMS(h) per token, u = h / s): s_k, the radial increment
    a_k = <u_k, h_{k+1} - h_k>, the angular step du_k = ||u_{k+1} - u_k|| and du_k * s_k, each a
    mean over tokens (and batches). For h + B(Norm(h)) the lemma predicts a_k and du_k * s_k
    about constant as s_k grows: a large state only grows, its direction barely turns."""
    series = []  # per batch: [s (n), a (n-1), du (n-1), du * s (n-1)], on the device
    for x, _ in tqdm(batches, desc="lemma 2", unit="batch", leave=False):
        h = model.embed(x)
        s_k, a_k, du_k, b_k = [], [], [], []
        prev = None  # (s, u, h) of the loop before, in float32
        for k in range(1, n_loops + 1):
            with amp(model, dtype):
                h = model.loop(h, k)
            hf = wide(h)
            s = rms(hf)
            u = hf / s
            s_k.append(s.mean())
            if prev is not None:
                s0, u0, h0 = prev
                du = (u - u0).norm(dim=-1)
                a_k.append((u0 * (hf - h0)).sum(dim=-1).mean())
                du_k.append(du.mean())
                b_k.append((du * s0[..., 0]).mean())
            prev = (s, u, hf)
        series.append([torch.stack(v) if v else torch.zeros(0) for v in (s_k, a_k, du_k, b_k)])
    means = [torch.stack(part).cpu().double().mean(dim=0).tolist() for part in zip(*series)]
    return {"n_loops": n_loops, "s": means[0], "radial_increment": means[1],
            "angular_step": means[2], "angular_step_x_s": means[3]}


def readout_ce(model, h, k, y, dtype="float32", n_loops=None):
    """Mean CE of the readout of h at loop k, in at least float32 (the readout in the run's
    dtype)."""
    with amp(model, dtype):
        logits = model.readout(h, k, n_loops)
    return F.cross_entropy(wide(logits).flatten(0, 1), y.flatten())


@torch.no_grad()
def variable_depth(model, batches, states=None, dtype="float32", factor=3):
    """The model run for K' = 1..3K loops, its last loop decoded by its readout's own rule for
    a run of K' loops (final_only RMSNorms loop K' whatever K' is): val CE, PPL and ||h_K'||
    (mean per-token norm) per depth, the paper's variable-depth analysis. At K' < K this is not
    the early exit of per_depth, which decodes loop K' of the trained K-loop model."""
    D = factor * model.config.n_loops
    ce, norm = [], []
    for i, (x, y) in enumerate(tqdm(batches, desc="depths", unit="batch", leave=False)):
        hs = list(states[i]) if states else []
        h = None if hs else model.embed(x)
        ce_b, norm_b = [], []
        for k in range(1, D + 1):
            if k <= len(hs):
                h = hs[k - 1]
            else:
                with amp(model, dtype):
                    h = model.loop(h, k)
            ce_b.append(readout_ce(model, h, k, y, dtype, n_loops=k))
            norm_b.append(wide(h).norm(dim=-1).mean())
        ce.append(torch.stack(ce_b))
        norm.append(torch.stack(norm_b))
    ce = torch.stack(ce).cpu().double().mean(dim=0).tolist()
    return {"k": list(range(1, D + 1)), "ce": ce, "ppl": [math.exp(c) for c in ce],
            "hidden_norm": torch.stack(norm).cpu().double().mean(dim=0).tolist()}


CLAMP_MODES = ("none", "freeze_loop1", "remove_radial")


@torch.no_grad()
def clamped_states(model, x, mode, dtype="float32"):
    """The states h_1..h_K when each loop's output is clamped before it is decoded and fed to
    the next loop (the paper's radial clamp). none: as trained. freeze_loop1: every later state
    rescaled to its token's loop-1 RMS, the direction kept. remove_radial: the part of each
    loop's update d = h_k - h_{k-1} along h_{k-1} removed, h_k = h_{k-1} + d - <d, u> u with
    u = h_{k-1} / ||h_{k-1}|| (loop 1 as it is)."""
    h = model.embed(x)
    first = prev = None
    states = []
    for k in range(1, model.config.n_loops + 1):
        with amp(model, dtype):
            h = model.loop(h, k)
        if mode == "freeze_loop1" and first is not None:
            h = (wide(h) * (first / rms(h))).to(h.dtype)
        elif mode == "remove_radial" and prev is not None:
            p, d = wide(prev), wide(h) - wide(prev)
            along = (d * p).sum(dim=-1, keepdim=True) / p.pow(2).sum(dim=-1, keepdim=True)
            h = (wide(h) - along * p).to(h.dtype)
        if first is None:
            first = rms(h)
        states.append(h)
        prev = h
    return states


@torch.no_grad()
def clamp(model, batches, states=None, dtype="float32"):
    """CE and ||h_k|| (mean per-token norm) per exit under each clamp mode (clamped_states):
    does the readout use the scale the recurrence builds?"""
    out = {"modes": list(CLAMP_MODES), "ce": {}, "hidden_norm": {}}
    for mode in CLAMP_MODES:
        ce, norm = [], []
        for (x, y) in batches:
            hs = clamped_states(model, x, mode, dtype)
            ce.append(torch.stack([readout_ce(model, h, k, y, dtype)
                                   for k, h in enumerate(hs, 1)]))
            norm.append(torch.stack([wide(h).norm(dim=-1).mean() for h in hs]))
        out["ce"][mode] = torch.stack(ce).cpu().double().mean(dim=0).tolist()
        out["hidden_norm"][mode] = torch.stack(norm).cpu().double().mean(dim=0).tolist()
    return out


SCALE_ALPHAS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)  # the paper's


@torch.no_grad()
def scale(model, batches, states=None, dtype="float32", alphas=SCALE_ALPHAS):
    """CE of the last loop's readout of alpha * h_K: flat for a scale-invariant readout."""
    K = model.config.n_loops
    ce = [torch.stack([readout_ce(model, a * hs[-1], K, y, dtype) for a in alphas])
          for (_, y), hs in zip(batches, states or all_states(model, batches, dtype))]
    ce = torch.stack(ce).cpu().double().mean(dim=0).tolist()
    return {"alpha": list(alphas), "ce": ce}


@torch.no_grad()
def spread(model, batches, states=None, dtype="float32", bins=40):
    """Per-token ||h_k|| at each loop: p50 / p90 / p99 / max; of the last loop's also the mean,
    std and min (the paper's token norm statistics) and a log-binned histogram."""
    per_batch = [[h.norm(dim=-1).flatten() for h in hs]
                 for hs in states or all_states(model, batches, dtype)]
    # to the CPU: quantiles in float64 (MPS has none) and torch.histogram (CPU-only)
    norms = [torch.cat(n).cpu().double() for n in zip(*per_batch)]
    q = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    last = norms[-1]
    floor = last.clamp(min=1e-12)
    lo, hi = floor.min().log10().item(), floor.max().log10().item() + 1e-9
    edges = torch.logspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"quantiles": ["p50", "p90", "p99", "max"],
            "per_loop": [torch.quantile(n, q).tolist() for n in norms],
            "last_loop": {"mean": last.mean().item(), "std": last.std().item(),
                          "min": last.min().item(), "n_tokens": last.numel()},
            "hist_edges": edges.tolist(),
            "hist_counts": torch.histogram(floor, edges).hist.tolist()}


# ---- early exit in wall-clock time -----------------------------------------------------------

def timer(device):
    """The clock of a timing: on a CPU this thread's CPU time (--run=speed runs one thread: other
    work on a shared machine stretches a wall clock, and not alike for the things compared);
    the wall clock on a GPU, after a synchronize."""
    return time.thread_time if device.type == "cpu" else time.perf_counter


def speed_prompts(data, b):
    """b prompts of 32 tokens, spread over `data` (held-out text)."""
    stride = max(1, (len(data) - 33) // b)
    return torch.stack([torch.from_numpy(data[i * stride:i * stride + 32].astype("int64"))
                        for i in range(b)])


def timed_rounds(kinds, prompts, new_tokens, rounds, model, dtype):
    """Generate with each kind's options (a dict of generate's keywords) round by round, the
    kinds alternating, each round's seed the same for every kind; round 0 is an untimed warm-up
    of 8 tokens. Returns each kind's times and mean loops used, per timed round."""
    from sample import generate
    device = model.lm_head.weight.device
    clock = timer(device)
    times = {kind: [] for kind in kinds}
    loops = {kind: [] for kind in kinds}
    for r in tqdm(range(rounds + 1), desc=f"batch {prompts.size(0)}", leave=False):
        for kind, how in kinds.items():
            torch.manual_seed(r)
            n = new_tokens if r else min(new_tokens, 8)
            synchronize(device)
            start = clock()
            with amp(model, dtype):
                _, used = generate(model, prompts, n, **how)
            synchronize(device)
            if r:
                times[kind].append(clock() - start)
                loops[kind].append(used.float().mean().cpu().item())  # read on the CPU
    return times, loops


def exit_test_cost(model, prompts, policy, new_tokens, rounds, dtype="float32"):
    """What an exit test costs, in loops, timed on generation: all K loops with a test at every
    loop that no token passes, against all K loops without one, is K - 1 tests; all K loops
    against one loop is K - 1 loops. The median over rounds of each round's ratio (the three
    kinds of a round run back to back, so a machine's drift cancels); at least 0. Also one
    loop's speed-up over all K (the median of the rounds' full / one): the most an exit after
    loop 1 can give, since it runs that loop and its test, and a token's work outside the
    loops (embedding, last readout, sampling) no exit saves."""
    never = math.inf if EXIT_POLICIES[policy] == ">=" else -math.inf
    kinds = {"one": {"n_loops": 1}, "full": {},
             "tests": {"exit_policy": policy, "exit_threshold": never}}
    t = timed_rounds(kinds, prompts, new_tokens, rounds, model, dtype)[0]
    ratios = [(tests - full) / max(full - one, 1e-12)
              for one, full, tests in zip(t["one"], t["full"], t["tests"])]
    one_loop = statistics.median([full / one for one, full in zip(t["one"], t["full"])])
    return max(0.0, statistics.median(ratios)), one_loop


@torch.no_grad()
def speed(model, data, halt, cfg, dtype="float32", cal=None, held=None):
    """Generation tokens/s with the KV cache, at batch 1 and 8: all K loops ("full") against
    exiting at the calibrated threshold of `halt` (eval.json's halting entry for cfg.policy per
    token; "exit"). Given the calibration batches' (ce, scores) `cal` and the held-out ones'
    `held`, the exit tests run only at the loops where they pay at that batch size
    (exit_schedule, with a test's cost measured there by exit_test_cost; a schedule that
    rounds of its own do not find faster than all K loops is dropped for no test at all), and
    the exit's held-out PPL is that of the tests used; without them a test runs at every loop.
    Prompts are 32 tokens of `data` (held-out text); both kinds sample with the same seeds. The
    rounds alternate full and exit after an untimed warm-up of each; on a CPU in one thread,
    timed by the thread's CPU time (other work on a shared machine stretches a wall clock, and
    not alike for both kinds: see timer). Per batch: each kind's tokens/s (median round) and
    mean loops (over the rounds), the exit's speed-up (the median of the rounds' paired
    ratios), the ideal speed-up K / mean loops, and the speed-up's share of it."""
    from sample import early_exit_row, paired
    clock = timer(model.lm_head.weight.device)
    K = model.config.n_loops
    t = halt["threshold"]
    out = {"policy": cfg.policy, "threshold": t, "new_tokens": cfg.new_tokens,
           "clock": clock.__name__,
           "ppl": {"full": halt["ppl"] / halt["ratio"], "exit": halt["ppl"]}, "batch": {}}
    for b in SPEED_BATCHES:
        prompts = speed_prompts(data, b)
        kinds = {"full": {}}
        extra = {}
        ppl = halt["ppl"] if t is not None else out["ppl"]["full"]
        if t is not None:  # None: no threshold met the target; halting runs all K loops
            kinds["exit"] = {"exit_policy": cfg.policy, "exit_threshold": t}
        if t is not None and cal is not None:
            cost, one_loop = exit_test_cost(model, prompts, cfg.policy, cfg.new_tokens,
                                            cfg.rounds, dtype)
            tested = exit_schedule(cal[0], cal[1][cfg.policy], cfg.policy, t, K, cost,
                                   cfg.target, b)
            extra = {"test_cost": cost, "one_loop_speed_up": one_loop, "schedule": tested}
            if tested:  # a schedule its own timing does not find faster is not used
                check = timed_rounds({"full": {}, "exit": kinds["exit"] | {"exit_at": tested}},
                                     prompts, cfg.new_tokens, cfg.rounds, model, dtype)[0]
                extra["schedule_speed_up"] = paired(check, "full", "exit")
                if extra["schedule_speed_up"] < 1.0:
                    tested = []
            kinds["exit"]["exit_at"] = extra["tested_loops"] = tested
            ppl = adaptive_exit(held[0], held[1][cfg.policy], cfg.policy, t, K, "token",
                                tested)[1]
        times, loops = timed_rounds(kinds, prompts, cfg.new_tokens, cfg.rounds, model, dtype)
        tokens = b * cfg.new_tokens
        row = {kind: early_exit_row(times, loops, "full", kind, K, tokens) for kind in kinds}
        exit_row = row.get("exit", row["full"])  # no threshold: the exit kind is the full one
        out["batch"][str(b)] = {
            "full": {"tokens_per_s": row["full"]["tokens_per_s"],
                     "mean_loops": row["full"]["mean_loops"]},
            "exit": {"tokens_per_s": exit_row["tokens_per_s"],
                     "mean_loops": exit_row["mean_loops"], "ppl": ppl},
            "speed_up": exit_row["speed_up"], "ideal": exit_row["ideal"],
            "of_ideal": exit_row["of_ideal"]} | extra
    if t is None:
        out["ppl"]["exit"] = out["ppl"]["full"]
    return out


def print_speed(s, K):
    t = "none" if s["threshold"] is None else f"{s['threshold']:.4g}"
    print(f"generation with the KV cache, {s['new_tokens']} tokens ({s['clock']}): all {K} "
          f"loops vs {s['policy']} {EXIT_POLICIES[s['policy']]} {t} (calibrated); held-out PPL "
          f"{s['ppl']['full']:.3f} at full depth, {s['ppl']['exit']:.3f} testing every loop")
    print(f"{'batch':>5} {'full tok/s':>11} {'exit tok/s':>11} {'loops used':>11} {'speed-up':>9} "
          f"{'ideal':>7} {'of ideal':>9} {'exit PPL':>9}  tests at (loops a test; 1 loop)")
    for b, r in s["batch"].items():
        tests = ""
        if "tested_loops" in r:
            tests = f"{','.join(map(str, r['tested_loops'])) or 'none'} ({r['test_cost']:.2f}"
            tests += f"; {r['one_loop_speed_up']:.2f}x)" if "one_loop_speed_up" in r else ")"
        if r.get("schedule") and not r["tested_loops"]:
            tests += (f"; {','.join(map(str, r['schedule']))} timed "
                      f"{r['schedule_speed_up']:.2f}x, dropped")
        print(f"{b:>5} {r['full']['tokens_per_s']:>11.1f} {r['exit']['tokens_per_s']:>11.1f} "
              f"{r['exit']['mean_loops']:>7.2f}/{K} {r['speed_up']:>8.2f}x {r['ideal']:>6.2f}x "
              f"{r['of_ideal']:>9.2f} {r['exit']['ppl']:>9.3f}  {tests}")
    if any("tested_loops" in r for r in s["batch"].values()):
        print("tests at: the loops whose exit test pays at that batch size (sample.py "
              "--exit_at=...; none: the exit runs all loops, as without --exit_policy), a "
              "test's cost in loops, and the speed-up of one loop without a test: the most an "
              "exit can give")


@torch.no_grad()
def frontier(model, x, ppl, rounds, dtype="float32"):
    """The compute-quality frontier: tokens/s of a full forward pass at each depth k = 1..K (k
    loops, then the readout of every position at loop k) on the batch x, beside the PPL of the
    exit at loop k (per_depth), with no training-free trick: what each fixed depth costs. The
    depths alternate round by round after an untimed warm-up; the median round counts."""
    K = model.config.n_loops
    device = x.device
    clock = timer(device)
    times = {k: [] for k in range(1, K + 1)}
    for r in tqdm(range(rounds + 1), desc="frontier", leave=False):
        for k in times:
            synchronize(device)
            start = clock()
            with amp(model, dtype):
                h = model.embed(x)
                for j in range(1, k + 1):
                    h = model.loop(h, j)
                model.readout(h, k)
            synchronize(device)
            if r:
                times[k].append(clock() - start)
    return {"k": list(times), "batch_size": x.size(0), "ppl": ppl[:K],
            "tokens_per_s": [x.numel() / statistics.median(ts) for ts in times.values()]}


def print_frontier(f):
    print(f"compute-quality frontier (a full forward pass of batch {f['batch_size']}):")
    print("depth k       " + " ".join(f"{k:>9}" for k in f["k"]))
    print("tokens/s      " + " ".join(f"{t:9.0f}" for t in f["tokens_per_s"]))
    print("val PPL at k  " + " ".join(f"{p:9.3f}" for p in f["ppl"]))


def print_depth(out, K):
    print("exit depth k : " + " ".join(f"{k:>6}" for k in out["per_depth"]["k"]))
    print("val PPL      : " + " ".join(f"{p:6.3f}" for p in out["per_depth"]["ppl"]))
    print(f"halting at {out['target']}x full-depth PPL (calibrated on the first half of val, "
          f"reported on the second):")
    print(f"{'policy':<14} {'unit':<9} {'mean loops':>10} {'PPL ratio':>10} {'threshold':>10}")
    for unit, policies in out["halting"].items():
        for p, h in policies.items():
            t = "none" if h["threshold"] is None else f"{h['threshold']:.4g}"
            print(f"{p:<14} {unit:<9} {h['mean_loops']:>7.2f}/{K} {h['ratio']:>10.4f} {t:>10}")
    n = next(iter(out["halting_paper"].values()))["n_sequences"]
    print(f"halting as the paper measures it (per sequence, calibrated and reported on the same "
          f"first {n} windows of val):")
    for p, h in out["halting_paper"].items():
        t = "none" if h["threshold"] is None else f"{h['threshold']:.4g}"
        print(f"{p:<14} {'sequence':<9} {h['mean_loops']:>7.2f}/{K} {h['ratio']:>10.4f} {t:>10}")


def print_diagnostics(out, K):
    if "lemma1" in out:
        c = out["lemma1"]
        r = c["radial_fraction"]
        ends = ", ".join(f"loop {k} {v:.3g}" for k, v in zip(r["loop"], r["mean_abs_cos"]))
        print(f"Lemma 1 at loop K (float64, {c['n_tokens']} tokens): |cos(dCE/dh_K, h_K)| "
              f"max {c['max_abs_cos']:.3g}, mean {c['mean_abs_cos']:.3g}; radial fraction of "
              f"the gradient (mean |cos|): {ends}")
    if "endpoint" in out:
        e = out["endpoint"]
        print(f"endpoint: CE gap ln PPL_1 - ln PPL_K = {e['ce_gap']:.4f}")
    if "lemma2" in out:
        c = out["lemma2"]
        print(f"Lemma 2 over {c['n_loops']} loops (RMS units; k -> k+1):")
        print("   k       s_k    a_k (radial)   ||du_k||   ||du_k|| * s_k")
        for k in range(c["n_loops"] - 1):
            print(f"{k + 1:>4} {c['s'][k]:9.4g} {c['radial_increment'][k]:14.4g} "
                  f"{c['angular_step'][k]:10.4g} {c['angular_step_x_s'][k]:16.4g}")
    if "variable_depth" in out:
        v = out["variable_depth"]
        print("depth K' (own rule)  " + " ".join(f"{k:>7}" for k in v["k"]))
        print("val PPL              " + " ".join(f"{p:7.3f}" for p in v["ppl"]))
        print("||h_K'||             " + " ".join(f"{n:7.3g}" for n in v["hidden_norm"]))
    if "clamp" in out:
        c = out["clamp"]
        print("exit k               " + " ".join(f"{k:>7}" for k in range(1, K + 1)))
        for mode in c["modes"]:
            print(f"CE {mode:<17} " + " ".join(f"{v:7.4f}" for v in c["ce"][mode]))
            print(f"||h_k|| {mode:<13} " + " ".join(f"{v:7.3g}" for v in c["hidden_norm"][mode]))
    if "scale" in out:
        print("alpha (x h_K)        " + " ".join(f"{a:>7g}" for a in out["scale"]["alpha"]))
        print("CE at loop K         " + " ".join(f"{v:7.4f}" for v in out["scale"]["ce"]))
    if "spread" in out:
        print("loop   ||h_k|| p50       p90       p99       max")
        for k, q in enumerate(out["spread"]["per_loop"], start=1):
            print(f"{k:>4}  " + " ".join(f"{v:9.4g}" for v in q))


def read_eval_json(path):
    """The eval.json a diagnostic adds its key to, or a one-line error when it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (ValueError, OSError) as e:
        die(f"{path} is damaged ({type(e).__name__}); delete it and run eval.py again")
    if not isinstance(out, dict):
        die(f"{path} is not eval.py's output; delete it and run eval.py again")
    return out


def main(argv=None):
    cfg, explicit = parse("eval.py", OPTIONS, argv, __doc__, together=together)
    device = device_or_exit(cfg.device)
    keep_freed_memory()
    # loaded on the CPU: only the model goes to the device, not the optimizer's state
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt, device)
    run = ckpt["config"]
    # the run's autocast dtype (float32 for checkpoints older than "resolved"), as this device
    # allows it: a float16 run evaluated on MPS or the CPU runs in float32, with a warning
    dtype = pick_dtype(device, run.get("resolved", {}).get("dtype", "float32"))
    K = model.config.n_loops
    if 0 < cfg.max_depth < K and cfg.run in ("depth", "all"):  # full depth is the reference
        error(f"--max_depth={cfg.max_depth} is invalid for this run; accepted: 0 (= 2K) or at "
              f"least its K={K} loops")
    # the data the run trained on (its folder, as an absolute path) unless --data_dir says
    data_dir = cfg.data_dir
    if "data_dir" not in explicit:
        data_dir = run.get("resolved", {}).get("data_dir", run.get("data_dir", cfg.data_dir))
    data, meta = load_data(data_dir, run["dataset"], run["block_size"])
    if meta["vocab_size"] != run["vocab_size"]:
        die(f"{os.path.join(data_dir, run['dataset'])}/meta.json has vocab_size "
            f"{meta['vocab_size']}, the run was trained with {run['vocab_size']}: the dataset was "
            f"prepared again differently; prepare it as the run had it, or train again")
    encode, decode = load_tokenizer(meta)
    ids = None
    if cfg.run in ("lens", "all"):  # checked before any work, not after all of it
        try:
            ids = encode(cfg.start)[-run["block_size"]:]
        except ValueError as e:
            die(f"--start={cfg.start!r} cannot be encoded by this run's tokenizer: {e}")
        if not ids:
            die(f"--start={cfg.start!r} encodes to no tokens; give some text")
    path = os.path.join(cfg.out_dir, "eval.json")
    writable_folder(cfg.out_dir)
    out = {}
    if os.path.isfile(path) and cfg.run != "depth":  # a diagnostic adds its key to the file
        out = read_eval_json(path)
    out["config"] = run
    out["n_loops"] = K

    def save():  # after every part: a late failure never loses the parts already done
        atomic_write_text(path, json.dumps(out))

    bsz = cfg.batch_size or run["batch_size"]
    batches = [get_batch(data["val"], bsz, run["block_size"], eval_seed(i, "val"), device)
               for i in range(cfg.eval_iters if cfg.run != "speed" else 0)]
    # loops 1..K of the batches, computed once for the diagnostics and the per-depth pass
    shared = all_states(model, batches, dtype) if cfg.run in DIAGNOSTICS + ("all",) else None
    if cfg.run in ("depth", "all"):
        cal, held, held_data = split_batches(data["val"], cfg.eval_iters, bsz, run["block_size"],
                                             device)
        paper = windows(data["val"], cfg.eval_iters * bsz, bsz, run["block_size"], device)
        out.update(evaluate(model, batches, cal, held, paper, cfg, held_data, decode, shared,
                            dtype))
        save()
    if cfg.run in ("lens", "all"):
        out["lens"] = lens(model, ids, decode, dtype)
        save()
    for name in DIAGNOSTICS:
        if cfg.run in (name, "all"):
            extra = {"n_loops": cfg.lemma2_loops} if name == "lemma2" else {}
            out[name] = globals()[name](model, batches, shared, dtype, **extra)
            save()
    if "per_depth" in out and "lemma1" in out:  # the paper's endpoint metrics
        ce = out["per_depth"]["ce"]
        out["endpoint"] = {"ce_gap": ce[0] - ce[K - 1],
                           "radial_fraction": out["lemma1"]["radial_fraction"]}
        save()
    if cfg.run == "speed":
        if "halting" not in out:
            die(f"{path} has no calibrated halting yet; run eval.py --run=depth (or all) on "
                f"{cfg.out_dir} first")
        # the batches depth calibrated on and reported on, for the schedule of exit tests
        cal, held, held_data = split_batches(data["val"], cfg.eval_iters, bsz, run["block_size"],
                                             device)
        cal, held = collect(model, cal, K, dtype=dtype), collect(model, held, K, dtype=dtype)
        threads = torch.get_num_threads()
        if device.startswith("cpu"):  # one thread, as the clock (timer) counts one
            torch.set_num_threads(1)
        out["speed"] = speed(model, held_data, out["halting"]["token"][cfg.policy], cfg, dtype,
                             cal, held)
        save()
        x = windows(data["val"], bsz, bsz, run["block_size"], device)[0][0]
        out["frontier"] = frontier(model, x, out["per_depth"]["ppl"], cfg.rounds, dtype)
        save()
        torch.set_num_threads(threads)
        print_speed(out["speed"], K)
        print_frontier(out["frontier"])
    if cfg.run in ("depth", "all"):
        print_depth(out, K)
    if cfg.run in ("lens", "all"):
        print_lens(out["lens"])
    shown = {k: v for k, v in out.items() if cfg.run in (k, "all")}
    if cfg.run in ("lemma1", "all") and "endpoint" in out:
        shown["endpoint"] = out["endpoint"]
    print_diagnostics(shown, K)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
