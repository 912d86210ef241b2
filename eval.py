"""
Evaluate a trained looped model on validation data, and write out_dir/eval.json.

  python eval.py --out_dir=out                          # per-depth PPL, adaptive exit, halting
  python eval.py --out_dir=out --run=lens --start="ROMEO:"   # each loop's top-1 guess per position
  python eval.py --out_dir=out --run=all                # everything below

- per-depth perplexity: val CE / PPL when exiting after loop k, for k = 1 .. max_depth (default
  2K: what do loops beyond the trained depth do?), on the batches train.py evaluates on.
- halting, as the paper measures it: a token (or a whole sequence, by its mean score) stops at
  the first loop whose readout passes the exit policy (max_prob / logit_margin >= t,
  entropy <= t), else at loop K. The threshold t is calibrated on calibration batches (the first
  half of the validation split): the loosest t whose PPL is at most 1.01x full depth. Mean loops
  and the PPL ratio are then reported on held-out batches (the second half). A sweep of t gives
  the operating curve (mean loops used, val PPL) on the held-out batches.
- a depth map: the exit loop of each token of a held-out passage under calibrated halting.
- the paper's diagnostics: Lemma 1 on this checkpoint, Lemma 2's decomposition, the radial
  clamp, scale sensitivity, the spread of per-token norms.
- speed (--run=speed, after depth; not part of all, so that it can be timed on a quiet
  machine): what calibrated halting saves in wall-clock time. Tokens per second of generation
  with the KV cache at batch 1 and 8, running all K loops against exiting at the threshold that
  depth calibrated, beside the held-out PPL of each.
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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import DEVICE, NONEMPTY, at_least, check, device_or_exit, error, one_of, parse
from device import autocast, keep_freed_memory, pick_dtype, synchronize
from model import EXIT_POLICIES, exit_score, exits, strict_to_loose
from prepare import load_tokenizer
from rundir import atomic_write_text, die, eval_seed, get_batch, load_checkpoint, load_data
from rundir import model_from_checkpoint, writable_folder

DIAGNOSTICS = ("lemma1", "decomposition", "clamp", "scale", "spread")
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
    "n_thresholds": (25, "points in each adaptive-exit sweep", at_least(2)),
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
    "rounds": (3, "speed: timed generations of each kind (the median is reported)", at_least(1)),
}


def together(cfg, explicit):
    if "start" in explicit and cfg.run not in ("lens", "all"):
        return "--start is the prompt of --run=lens (or all); add --run=lens"
    for name in ("new_tokens", "rounds"):
        if name in explicit and cfg.run != "speed":
            return f"--{name} is an option of --run=speed; add --run=speed"
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


def exit_loops(score, policy, threshold, K, unit="token"):
    """The loop (1..K) at which each token exits [S, T]: the first loop that passes."""
    passed = exits(unit_scores(score[:K], unit), policy, threshold)
    passed[K - 1] = True
    exit_at = passed.float().argmax(dim=0) + 1  # first True
    return exit_at.expand(score.shape[1:])  # a sequence's tokens all share its exit loop


def adaptive_exit(ce, score, policy, threshold, K, unit="token"):
    """(mean loops, PPL) when each token (or sequence) exits at its first passing loop."""
    exit_at = exit_loops(score, policy, threshold, K, unit)
    token_ce = ce[:K].gather(0, (exit_at - 1)[None])[0]
    return exit_at.float().mean().item(), math.exp(token_ce.mean().item())


def thresholds(score, policy, K, n, unit="token"):
    """n thresholds from quantiles of the scores at loops 1..K-1, strict to loose."""
    s = unit_scores(score[:max(1, K - 1)], unit).flatten()
    pick = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:100_000]
    qs = torch.quantile(s[pick], torch.linspace(0, 1, n)).tolist()
    return strict_to_loose(qs, policy)


def calibrate(ce, score, policy, K, target, unit="token"):
    """The loosest threshold whose PPL on these batches is <= target x full depth (bisection
    over the sorted scores), or None when no early exit is good enough."""
    full = math.exp(ce[K - 1].mean().item())
    cands = strict_to_loose(torch.unique(unit_scores(score[:max(1, K - 1)], unit)).tolist(),
                            policy)

    def good(i):
        return adaptive_exit(ce, score, policy, cands[i], K, unit)[1] <= target * full
    lo, hi = -1, len(cands) - 1  # lo: the loosest known good (-1 = no early exit at all)
    if good(hi):
        return cands[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if good(mid):
            lo = mid
        else:
            hi = mid
    return cands[lo] if lo >= 0 else None


def halting(cal, held, policy, K, target, unit="token"):
    """Calibrate on `cal` = (ce, scores), report on the disjoint `held` = (ce, scores)."""
    t = calibrate(cal[0], cal[1][policy], policy, K, target, unit)
    full = math.exp(held[0][K - 1].mean().item())
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


def evaluate(model, batches, cal_batches, held_batches, cfg, held_data, decode=None,
             states=None, dtype="float32"):
    """Per-depth PPL on `batches` (whose first loop states may be given); halting calibrated on
    `cal_batches`, reported on `held_batches` for both exit units and every policy; the sweep on
    the held-out batches; the depth map of the start of `held_data`. The model runs in `dtype`
    (autocast); everything after collect is on the CPU."""
    K = model.config.n_loops
    max_depth = cfg.max_depth or 2 * K
    ce, _ = collect(model, batches, max_depth, states, dtype)
    mean_ce = ce.flatten(1).mean(dim=1).tolist()
    out = {"n_loops": K, "n_tokens": ce[0].numel(),
           "per_depth": {"k": list(range(1, max_depth + 1)), "ce": mean_ce,
                         "ppl": [math.exp(c) for c in mean_ce]},
           "full_depth_ppl": math.exp(mean_ce[K - 1]), "target": cfg.target}
    cal = collect(model, cal_batches, K, dtype=dtype)
    held = collect(model, held_batches, K, dtype=dtype)
    out["halting"] = {unit: {p: halting(cal, held, p, K, cfg.target, unit) for p in EXIT_POLICIES}
                      for unit in EXIT_UNITS}
    p, unit = cfg.policy, cfg.exit_unit
    ts = thresholds(cal[1][p], p, K, cfg.n_thresholds, unit)
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

def _stats(x):
    """Mean and std of per-token values: on the CPU, in float64."""
    x = x.cpu().double()
    return {"mean": x.mean().item(), "std": x.std().item()}


@torch.no_grad()
def all_states(model, batches, dtype="float32"):
    """loop_states of every batch, computed once for the diagnostics that share them."""
    with amp(model, dtype):
        return [model.loop_states(x) for x, _ in tqdm(batches, desc="loops", unit="batch",
                                                      leave=False)]


def lemma1(model, batches, states=None, dtype="float32", chunk_elems=2 ** 24):
    """Lemma 1 on this checkpoint: per token, |cos(dCE/dh_K, h_K)|, with the readout in float64
    on the CPU (the loops run as trained). Zero up to rounding for a scale-invariant last
    readout; clearly non-zero for a scale-visible one."""
    K = model.config.n_loops
    readout = model.readout_copy("cpu", torch.float64)  # the model's own decode, in float64
    rows = max(1, chunk_elems // model.config.vocab_size)  # float64 [rows, V] logits at a time
    cos = []
    for (_, y), hs in zip(batches, states or all_states(model, batches, dtype)):
        h, y = hs[-1].cpu().double().flatten(0, 1), y.cpu().flatten()
        # a token's gradient depends on its own readout only, so the batch's mean CE can be
        # taken in row chunks (a GPT-2 vocabulary's [B*T, V] float64 logits are ~7 GB)
        for hc, yc in zip(h.split(rows), y.split(rows)):
            hc = hc.detach().requires_grad_(True)
            ce = F.cross_entropy(readout(hc, K), yc, reduction="sum") / len(h)
            (g,) = torch.autograd.grad(ce, hc)
            cos.append(F.cosine_similarity(g, hc, dim=-1).abs())
    cos = torch.cat(cos)
    return {"max_abs_cos": cos.max().item(), "mean_abs_cos": cos.mean().item(),
            "n_tokens": cos.numel()}


@torch.no_grad()
def decomposition(model, batches, states=None, dtype="float32"):
    """Lemma 2, measured. For loop k -> k+1, u = h_k / ||h_k||, d = h_{k+1} - h_k: the radial part
    a_rad = <d, u>, the tangential part ||d - a_rad u||, the angle between h_k and h_{k+1}, and
    the predicted angle tangential / ||h_k||: a big state barely turns, it only grows."""
    parts = {}
    for hs in states or all_states(model, batches, dtype):
        for k, (h, h_next) in enumerate(zip(hs, hs[1:]), start=1):
            norm = h.norm(dim=-1)
            d = h_next - h
            a_rad = (d * h).sum(-1) / norm
            tangential = (d - a_rad[..., None] * h / norm[..., None]).norm(dim=-1)
            cos = F.cosine_similarity(h, h_next, dim=-1).clamp(-1, 1)
            for name, v in (("norm", norm), ("radial", a_rad), ("tangential", tangential),
                            ("update", d.norm(dim=-1)), ("angle", torch.arccos(cos)),
                            ("predicted_angle", tangential / norm)):
                parts.setdefault(k, {}).setdefault(name, []).append(v.flatten())
    return {k: {name: _stats(torch.cat(v)) for name, v in p.items()} for k, p in parts.items()}


def readout_ce(model, h, k, y, dtype="float32"):
    """Mean CE of the readout of h at loop k, in float32 (the readout in the run's dtype)."""
    with amp(model, dtype):
        logits = model.readout(h, k)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def clamped_loop_ce(model, x, y, ref_norms=None, dtype="float32"):
    """CE at each exit [K] when every state's per-token norm is reset to a reference (default:
    its loop-1 norm) before it is decoded and fed to the next loop; the direction is kept."""
    h = model.embed(x)
    ces = []
    for k in range(1, model.config.n_loops + 1):
        with amp(model, dtype):
            h = model.loop(h, k)
        norm = h.norm(dim=-1, keepdim=True)
        if ref_norms is not None:
            ref = ref_norms[k - 1]
        elif k == 1:
            ref = norm  # every later state is brought back to its token's loop-1 norm
        h = h * (ref / norm)
        ces.append(readout_ce(model, h, k, y, dtype))
    return torch.stack(ces)


@torch.no_grad()
def clamp(model, batches, states=None, dtype="float32"):
    """CE per exit with and without the radial clamp (clamped_loop_ce), over the batches."""
    plain, clamped = [], []
    for (x, y), hs in zip(batches, states or all_states(model, batches, dtype)):
        plain.append(torch.stack([readout_ce(model, h, k, y, dtype)
                                  for k, h in enumerate(hs, 1)]))
        clamped.append(clamped_loop_ce(model, x, y, dtype=dtype))
    plain, clamped = torch.stack(plain).cpu().tolist(), torch.stack(clamped).cpu().tolist()
    return {"unclamped_ce": [sum(c) / len(plain) for c in zip(*plain)],
            "clamped_ce": [sum(c) / len(clamped) for c in zip(*clamped)]}


@torch.no_grad()
def scale(model, batches, states=None, dtype="float32", alphas=(0.1, 0.3, 1.0, 3.0, 10.0)):
    """CE of the last loop's readout of alpha * h_K: flat for a scale-invariant readout."""
    K = model.config.n_loops
    ce = [torch.stack([readout_ce(model, a * hs[-1], K, y, dtype) for a in alphas])
          for (_, y), hs in zip(batches, states or all_states(model, batches, dtype))]
    ce = torch.stack(ce).cpu().tolist()  # [batch][alpha]
    return {"alpha": list(alphas), "ce": [sum(c / len(ce) for c in col) for col in zip(*ce)]}


@torch.no_grad()
def spread(model, batches, states=None, dtype="float32", bins=40):
    """Per-token ||h_k|| at each loop: p50 / p90 / p99 / max, and a log-binned histogram of the
    last loop's."""
    per_batch = [[h.norm(dim=-1).flatten() for h in hs]
                 for hs in states or all_states(model, batches, dtype)]
    # to the CPU: quantiles in float64 (MPS has none) and torch.histogram (CPU-only)
    norms = [torch.cat(n).cpu().double() for n in zip(*per_batch)]
    q = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    last = norms[-1].clamp(min=1e-12)
    lo, hi = last.min().log10().item(), last.max().log10().item() + 1e-9
    edges = torch.logspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"quantiles": ["p50", "p90", "p99", "max"],
            "per_loop": [torch.quantile(n, q).tolist() for n in norms],
            "hist_edges": edges.tolist(), "hist_counts": torch.histogram(last, edges).hist.tolist()}


# ---- early exit in wall-clock time -----------------------------------------------------------

@torch.no_grad()
def speed(model, data, halt, cfg, dtype="float32"):
    """Generation tokens/s with the KV cache, at batch 1 and 8: all K loops ("full") against
    exiting at the calibrated threshold of `halt` (eval.json's halting entry for cfg.policy per
    token; "exit"). Prompts are 32 tokens of `data` (held-out text); both kinds sample with the
    same seeds. The rounds alternate full and exit, after one untimed warm-up of each, and the
    median time is reported, with the mean loops the generated tokens used."""
    from sample import generate
    device = model.lm_head.weight.device
    t = halt["threshold"]
    kinds = {"full": {}}
    if t is not None:  # None: no threshold met the target; halting runs all K loops
        kinds["exit"] = {"exit_policy": cfg.policy, "exit_threshold": t}
    out = {"policy": cfg.policy, "threshold": t, "new_tokens": cfg.new_tokens,
           "ppl": {"full": halt["ppl"] / halt["ratio"], "exit": halt["ppl"]}, "batch": {}}
    for b in SPEED_BATCHES:
        stride = max(1, (len(data) - 33) // b)
        prompts = torch.stack([torch.from_numpy(data[i * stride:i * stride + 32].astype("int64"))
                               for i in range(b)])
        times = {kind: [] for kind in kinds}
        loops = {}
        for r in tqdm(range(cfg.rounds + 1), desc=f"speed, batch {b}", leave=False):
            for kind, how in kinds.items():
                torch.manual_seed(r)
                n = cfg.new_tokens if r else min(cfg.new_tokens, 8)  # round 0 warms up
                synchronize(device)
                start = time.perf_counter()
                with amp(model, dtype):
                    _, used = generate(model, prompts, n, **how)
                synchronize(device)
                if r:
                    times[kind].append(time.perf_counter() - start)
                    loops[kind] = used.float().mean().cpu().item()  # read on the CPU
        out["batch"][str(b)] = {kind: {"tokens_per_s": b * cfg.new_tokens / statistics.median(ts),
                                       "mean_loops": loops[kind]}
                                for kind, ts in times.items()}
    if "exit" not in kinds:  # the exit kind is the full one
        out["ppl"]["exit"] = out["ppl"]["full"]
        for b in out["batch"].values():
            b["exit"] = b["full"]
    return out


def print_speed(s, K):
    t = "none" if s["threshold"] is None else f"{s['threshold']:.4g}"
    print(f"generation with the KV cache, {s['new_tokens']} tokens: all {K} loops vs "
          f"{s['policy']} {EXIT_POLICIES[s['policy']]} {t} (calibrated)")
    print(f"{'batch':>5} {'full tok/s':>11} {'exit tok/s':>11} {'speed-up':>9} "
          f"{'loops used':>11}   held-out PPL {s['ppl']['full']:.3f} -> {s['ppl']['exit']:.3f}")
    for b, r in s["batch"].items():
        up = r["exit"]["tokens_per_s"] / r["full"]["tokens_per_s"]
        print(f"{b:>5} {r['full']['tokens_per_s']:>11.1f} {r['exit']['tokens_per_s']:>11.1f} "
              f"{up:>8.2f}x {r['exit']['mean_loops']:>7.2f}/{K}")


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


def print_diagnostics(out, K):
    if "lemma1" in out:
        c = out["lemma1"]
        print(f"Lemma 1 at loop K (float64, {c['n_tokens']} tokens): |cos(dCE/dh_K, h_K)| "
              f"max {c['max_abs_cos']:.3g}, mean {c['mean_abs_cos']:.3g}")
    if "decomposition" in out:
        print("loop k->k+1   ||h_k||   radial a_rad   tangential   angle (rad)   "
              "predicted tangential/||h_k||")
        for k, d in out["decomposition"].items():
            print(f"{k:>4}->{int(k) + 1:<6} {d['norm']['mean']:9.4g} "
                  f"{d['radial']['mean']:9.4g} +- {d['radial']['std']:<7.2g}"
                  f"{d['tangential']['mean']:9.4g}  "
                  f"{d['angle']['mean']:10.4f} +- {d['angle']['std']:<7.2g}"
                  f"{d['predicted_angle']['mean']:10.4f}")
    if "clamp" in out:
        c = out["clamp"]
        print("exit k            " + " ".join(f"{k:>7}" for k in range(1, K + 1)))
        print("CE unclamped      " + " ".join(f"{v:7.4f}" for v in c["unclamped_ce"]))
        print("CE radial clamp   " + " ".join(f"{v:7.4f}" for v in c["clamped_ce"]))
    if "scale" in out:
        print("alpha (x h_K)     " + " ".join(f"{a:>7g}" for a in out["scale"]["alpha"]))
        print("CE at loop K      " + " ".join(f"{v:7.4f}" for v in out["scale"]["ce"]))
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
        out.update(evaluate(model, batches, cal, held, cfg, held_data, decode, shared, dtype))
        save()
    if cfg.run in ("lens", "all"):
        out["lens"] = lens(model, ids, decode, dtype)
        save()
    for name in DIAGNOSTICS:
        if cfg.run in (name, "all"):
            out[name] = globals()[name](model, batches, shared, dtype)
            save()
    if cfg.run == "speed":
        if "halting" not in out:
            die(f"{path} has no calibrated halting yet; run eval.py --run=depth (or all) on "
                f"{cfg.out_dir} first")
        held_data = data["val"][len(data["val"]) // 2:]  # split_batches' held-out half
        out["speed"] = speed(model, held_data, out["halting"]["token"][cfg.policy], cfg, dtype)
        save()
        print_speed(out["speed"], K)
    if cfg.run in ("depth", "all"):
        print_depth(out, K)
    if cfg.run in ("lens", "all"):
        print_lens(out["lens"])
    print_diagnostics({k: v for k, v in out.items() if cfg.run in (k, "all")}, K)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
