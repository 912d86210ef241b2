"""
Evaluate a trained looped model on validation data, and write out_dir/eval.json.

  python eval.py --out_dir=out

- per-depth perplexity: val CE / PPL when exiting after loop k, for k = 1 .. max_depth (default
  2K: what do loops beyond the trained depth do?).
- adaptive exit per token: a token stops at the first loop whose readout passes the exit policy
  (max_prob / logit_margin >= t, entropy <= t), else at loop K; a sweep of t gives the
  matched-depth operating curve (mean loops used, val PPL).
- calibrated halting: the loosest t whose val PPL is at most 1.01x the full-depth PPL, with its
  mean loops used.
Exits are simulated on full sequences: every position runs all loops (so later tokens attend to
deeper states of earlier ones) and each token's prediction is read at its own exit loop.
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import parse
from model import EXIT_POLICIES, LoopedGPT, LoopedGPTConfig, exit_score, exits
from train import atomic_write_text, eval_seed, get_batch, load_checkpoint, load_data

OPTIONS = {
    "out_dir": ("out", "folder holding ckpt.pt; eval.json is written there"),
    "data_dir": ("data", "where prepare.py wrote the datasets"),
    "eval_iters": (20, "validation batches (the same ones train.py evaluates on)"),
    "batch_size": (0, "sequences per batch (0 = the run's batch_size)"),
    "max_depth": (0, "deepest exit evaluated (0 = 2K)"),
    "n_thresholds": (25, "points in each adaptive-exit sweep"),
    "target": (1.01, "calibrated halting: allowed val PPL relative to full depth"),
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
}


def load_model(out_dir, device):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
    model = LoopedGPT(LoopedGPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval().to(device), ckpt


@torch.no_grad()
def collect(model, batches, max_depth):
    """Per token and per exit depth k = 1..max_depth: CE [D, N] and each policy's score [D, N]."""
    ce, scores = [], {p: [] for p in EXIT_POLICIES}
    for x, y in tqdm(batches, desc="eval", unit="batch", leave=False):
        states = model.loop_states(x, max_depth)
        logits = [model.readout(h, k).float() for k, h in enumerate(states, start=1)]
        ce.append(torch.stack([F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none")
                               for lg in logits]))
        for p in EXIT_POLICIES:
            scores[p].append(torch.stack([exit_score(lg, p).flatten() for lg in logits]))
    return torch.cat(ce, dim=1).cpu(), {p: torch.cat(s, dim=1).cpu() for p, s in scores.items()}


def adaptive_exit(ce, score, policy, threshold, K):
    """Each token exits at the first loop k <= K that passes; returns (mean loops, PPL)."""
    passed = exits(score[:K], policy, threshold)
    passed[K - 1] = True
    exit_at = passed.float().argmax(dim=0)  # first True
    token_ce = ce[:K].gather(0, exit_at[None])[0]
    return (exit_at + 1).float().mean().item(), math.exp(token_ce.mean().item())


def thresholds(score, policy, K, n):
    """n thresholds from quantiles of the scores at loops 1..K-1, strict to loose."""
    q = torch.linspace(1, 0, n) if policy != "entropy" else torch.linspace(0, 1, n)
    s = score[:max(1, K - 1)].flatten()
    return torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:100_000]],
                          q).tolist()


def calibrate(ce, score, policy, K, target):
    """Bisection over the sorted scores for the loosest threshold with PPL <= target * full PPL."""
    full = math.exp(ce[K - 1].mean().item())
    cands = torch.unique(score[:max(1, K - 1)]).tolist()  # ascending
    if policy != "entropy":
        cands = cands[::-1]  # strict -> loose in both cases
    lo, hi = -1, len(cands) - 1  # lo: strictest known-good (-1 = no early exit at all)
    if adaptive_exit(ce, score, policy, cands[hi], K)[1] <= target * full:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if adaptive_exit(ce, score, policy, cands[mid], K)[1] <= target * full:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return {"threshold": None, "mean_loops": float(K), "ppl": full, "ratio": 1.0}
    loops, ppl = adaptive_exit(ce, score, policy, cands[lo], K)
    return {"threshold": cands[lo], "mean_loops": loops, "ppl": ppl, "ratio": ppl / full}


def evaluate(model, batches, max_depth=0, n_thresholds=25, target=1.01):
    K = model.config.n_loops
    max_depth = max_depth or 2 * K
    ce, scores = collect(model, batches, max_depth)
    mean_ce = ce.mean(dim=1).tolist()
    out = {"n_loops": K, "n_tokens": ce.shape[1],
           "per_depth": {"k": list(range(1, max_depth + 1)), "ce": mean_ce,
                         "ppl": [math.exp(c) for c in mean_ce]},
           "full_depth_ppl": math.exp(mean_ce[K - 1]), "adaptive": {}, "calibrated": {}}
    for p in EXIT_POLICIES:
        ts = thresholds(scores[p], p, K, n_thresholds)
        sweep = [adaptive_exit(ce, scores[p], p, t, K) for t in ts]
        out["adaptive"][p] = {"threshold": ts,
                              "mean_loops": [s[0] for s in sweep], "ppl": [s[1] for s in sweep]}
        out["calibrated"][p] = calibrate(ce, scores[p], p, K, target)
    return out


def main(argv=None):
    cfg, _ = parse(OPTIONS, argv, __doc__)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, ckpt = load_model(cfg.out_dir, device)
    run = ckpt["config"]
    data, _ = load_data(cfg.data_dir, run["dataset"], run["block_size"])
    bsz = cfg.batch_size or run["batch_size"]
    batches = [get_batch(data["val"], bsz, run["block_size"], eval_seed(i, "val"), device)
               for i in range(cfg.eval_iters)]
    out = evaluate(model, batches, cfg.max_depth, cfg.n_thresholds, cfg.target)
    out["config"] = run
    atomic_write_text(os.path.join(cfg.out_dir, "eval.json"), json.dumps(out))
    K = out["n_loops"]
    print("exit depth k : " + " ".join(f"{k:>6}" for k in out["per_depth"]["k"]))
    print("val PPL      : " + " ".join(f"{p:6.3f}" for p in out["per_depth"]["ppl"]))
    for p, c in out["calibrated"].items():
        print(f"calibrated halting ({p}): {c['mean_loops']:.2f} of {K} loops at PPL {c['ppl']:.3f} "
              f"({c['ratio']:.4f}x full depth)")
    print(f"wrote {os.path.join(cfg.out_dir, 'eval.json')}")
    return out


if __name__ == "__main__":
    main()
