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
import shlex

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
    "run": ("depth", "what to evaluate: depth (per-depth PPL, adaptive exit, calibrated halting) | "
                     "decomposition | clamp | scale | spread | all | table1 (trains the seven conditions)"),
    "preset": ("config/train_cpu.py", "table1: the train.py preset every condition starts from"),
    "seeds": (3, "table1: seeds per condition"),
    "train_args": ("", "table1: extra train.py flags for every run, e.g. '--max_iters=300'"),
}
DIAGNOSTICS = ("decomposition", "clamp", "scale", "spread")
# the paper's Table 1: (supervision, readout, norm_penalty)
CONDITIONS = [("terminal", "rmsnorm", 0.0), ("terminal", "scale_visible", 0.0), ("per_loop", "rmsnorm", 0.0),
              ("per_loop", "scale_visible", 0.0), ("per_loop", "final_only", 0.0),
              ("terminal", "rmsnorm", 0.01), ("per_loop", "rmsnorm", 0.01)]


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


# ---- the paper's diagnostics: why the norm grows, and that the readout does not care ----------

def _stats(x):
    return {"mean": x.mean().item(), "std": x.std().item()}


@torch.no_grad()
def decomposition(model, batches):
    """Lemma 2, measured. For loop k -> k+1, u = h_k / ||h_k||, d = h_{k+1} - h_k: the radial part
    a_rad = <d, u>, the tangential part ||d - a_rad u||, the angle between h_k and h_{k+1}, and
    the predicted angle tangential / ||h_k||: a big state barely turns, it only grows."""
    parts = {}
    for x, _ in tqdm(batches, desc="decomposition", unit="batch", leave=False):
        states = model.loop_states(x)
        for k, (h, h_next) in enumerate(zip(states, states[1:]), start=1):
            norm = h.norm(dim=-1)
            d = h_next - h
            a_rad = (d * h).sum(-1) / norm
            tangential = (d - a_rad[..., None] * h / norm[..., None]).norm(dim=-1)
            cos = F.cosine_similarity(h, h_next, dim=-1).clamp(-1, 1)
            for name, v in (("norm", norm), ("radial", a_rad), ("tangential", tangential),
                            ("update", d.norm(dim=-1)), ("angle", torch.arccos(cos)),
                            ("predicted_angle", tangential / norm)):
                parts.setdefault(k, {}).setdefault(name, []).append(v.flatten().double())
    return {k: {name: _stats(torch.cat(v)) for name, v in p.items()} for k, p in parts.items()}


@torch.no_grad()
def clamped_loop_ce(model, x, y, ref_norms=None):
    """CE at each exit when every state's per-token norm is reset to a reference (default: its
    loop-1 norm) before it is decoded and fed to the next loop; the direction is kept."""
    h, ces = model.embed(x), []
    for k in range(1, model.config.n_loops + 1):
        h = model.loop(h, k)
        norm = h.norm(dim=-1, keepdim=True)
        if ref_norms is not None:
            ref = ref_norms[k - 1]
        elif k == 1:
            ref = norm  # every later state is brought back to its token's loop-1 norm
        h = h * (ref / norm)
        ces.append(F.cross_entropy(model.readout(h, k).flatten(0, 1).float(), y.flatten()).item())
    return ces


def clamp(model, batches):
    plain, clamped = [], []
    for x, y in tqdm(batches, desc="radial clamp", unit="batch", leave=False):
        with torch.no_grad():
            plain.append(model(x, y)[2]["loop_ce"].tolist())
        clamped.append(clamped_loop_ce(model, x, y))
    return {"unclamped_ce": [sum(c) / len(plain) for c in zip(*plain)],
            "clamped_ce": [sum(c) / len(clamped) for c in zip(*clamped)]}


@torch.no_grad()
def scale(model, batches, alphas=(0.1, 0.3, 1.0, 3.0, 10.0)):
    """CE of the last loop's readout of alpha * h_K: flat for a scale-invariant readout."""
    K, ce = model.config.n_loops, {a: 0.0 for a in alphas}
    for x, y in tqdm(batches, desc="scale sensitivity", unit="batch", leave=False):
        h = model.loop_states(x)[-1]
        for a in alphas:
            ce[a] += F.cross_entropy(model.readout(a * h, K).flatten(0, 1).float(), y.flatten()).item() / len(batches)
    return {"alpha": list(alphas), "ce": [ce[a] for a in alphas]}


@torch.no_grad()
def spread(model, batches, bins=40):
    """Per-token ||h_k|| at each loop: p50 / p90 / p99 / max, and a log-binned histogram of the last."""
    norms = [torch.cat(n) for n in zip(*[[h.norm(dim=-1).flatten().double() for h in model.loop_states(x)]
                                         for x, _ in tqdm(batches, desc="norm spread", unit="batch", leave=False)])]
    q = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    last = norms[-1].clamp(min=1e-12)
    edges = torch.logspace(last.min().log10().item(), last.max().log10().item() + 1e-9, bins + 1, dtype=torch.float64)
    return {"quantiles": ["p50", "p90", "p99", "max"],
            "per_loop": [torch.quantile(n, q).tolist() for n in norms],
            "hist_edges": edges.tolist(), "hist_counts": torch.histogram(last, edges).hist.tolist()}


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


def table1(cfg):
    """The paper's Table 1 on a preset: train the seven conditions for each seed (finished runs are
    skipped, killed ones resumed), then mean +- std of ||h_K|| and final val PPL per condition."""
    from plot_norms import condition, load_run
    from train import main as train
    rows = []
    for supervision, readout, penalty in CONDITIONS:
        norms, ppls = [], []
        for seed in range(1, cfg.seeds + 1):
            out = os.path.join(cfg.out_dir, f"{supervision}_{readout}_pen{penalty:g}_seed{seed}")
            resume = ["--init_from=resume"] if os.path.isfile(os.path.join(out, "ckpt.pt")) else []
            train([cfg.preset, f"--out_dir={out}", f"--data_dir={cfg.data_dir}", f"--supervision={supervision}",
                   f"--readout={readout}", f"--norm_penalty={penalty}", f"--seed={seed}", *resume,
                   *shlex.split(cfg.train_args)])
            last = load_run(out)[0][-1]
            norms.append(last["hidden_norm"][-1])
            ppls.append(math.exp(last["val_loop_ce"][-1]))
        norms, ppls = torch.tensor(norms), torch.tensor(ppls)
        rows.append({"condition": condition(last["config"]), "hidden_norm_K": _stats(norms),
                     "ppl": _stats(ppls), "seeds": cfg.seeds})
    print(f"{'condition':<36} {'||h_K||':>22} {'final PPL':>18}")
    for r in rows:
        n, p = r["hidden_norm_K"], r["ppl"]
        print(f"{r['condition']:<36} {n['mean']:>11.4g} +- {n['std']:<8.3g} {p['mean']:>8.3f} +- {p['std']:<6.3f}")
    return rows


def print_diagnostics(out, K):
    if "decomposition" in out:
        print("loop k->k+1   ||h_k||   radial a_rad   tangential   angle (rad)   predicted tangential/||h_k||")
        for k, d in out["decomposition"].items():
            print(f"{k:>4}->{int(k) + 1:<6} {d['norm']['mean']:9.4g} {d['radial']['mean']:9.4g} +- {d['radial']['std']:<7.2g}"
                  f"{d['tangential']['mean']:9.4g}  {d['angle']['mean']:10.4f} +- {d['angle']['std']:<7.2g}"
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


def main(argv=None):
    cfg, _ = parse(OPTIONS, argv, __doc__)
    runs = ("depth", "all", "table1") + DIAGNOSTICS
    if cfg.run not in runs:
        raise SystemExit(f"error: --run={cfg.run!r} is not one of: {' | '.join(runs)}")
    if cfg.run == "table1":
        rows = table1(cfg)
        atomic_write_text(os.path.join(cfg.out_dir, "table1.json"), json.dumps(rows, indent=1))
        print(f"wrote {os.path.join(cfg.out_dir, 'table1.json')}")
        return rows
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, ckpt = load_model(cfg.out_dir, device)
    run = ckpt["config"]
    data, _ = load_data(cfg.data_dir, run["dataset"], run["block_size"])
    bsz = cfg.batch_size or run["batch_size"]
    batches = [get_batch(data["val"], bsz, run["block_size"], eval_seed(i, "val"), device)
               for i in range(cfg.eval_iters)]
    path = os.path.join(cfg.out_dir, "eval.json")
    out = {}
    if os.path.isfile(path) and cfg.run != "depth":  # a diagnostic adds its key to the existing file
        with open(path) as f:
            out = json.load(f)
    K = model.config.n_loops
    if cfg.run in ("depth", "all"):
        out.update(evaluate(model, batches, cfg.max_depth, cfg.n_thresholds, cfg.target))
    for name in DIAGNOSTICS:
        if cfg.run in (name, "all"):
            out[name] = globals()[name](model, batches)
    out["config"], out["n_loops"] = run, K
    atomic_write_text(path, json.dumps(out))
    if "per_depth" in out and cfg.run in ("depth", "all"):
        print("exit depth k : " + " ".join(f"{k:>6}" for k in out["per_depth"]["k"]))
        print("val PPL      : " + " ".join(f"{p:6.3f}" for p in out["per_depth"]["ppl"]))
        for p, c in out["calibrated"].items():
            print(f"calibrated halting ({p}): {c['mean_loops']:.2f} of {K} loops at PPL {c['ppl']:.3f} "
                  f"({c['ratio']:.4f}x full depth)")
    print_diagnostics({k: v for k, v in out.items() if cfg.run in (k, "all")}, K)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
