"""
Experiments over many runs: the paper's seven-condition table, and the claims check that ends
reproduce.sh.

  python experiments.py --run=table1 --out_dir=out/table1 --seeds=3
  python experiments.py --run=claims --out_dir=out/repro      # after bash reproduce.sh

table1: trains the paper's seven conditions (supervision x readout x norm penalty) for each seed
from --preset, by default the CPU demo config/cpu.py ('' = train.py's defaults, the paper's 44M
model), plus --train_args. Finished runs are skipped and killed ones resumed; a run folder that
holds a run trained with other settings stops it all, in one line, before anything is trained.
Then it prints mean +- std of ||h_K|| and final val PPL per condition -> out_dir/table1.json.

claims: reads every run folder under out_dir (log.jsonl and eval.json from eval.py --run=all)
and says, for each of the paper's claims, the figure measured and whether it held ->
out_dir/claims.json. A claim that did not hold is reported, never hidden.
"""

import json
import math
import os
import shlex

import torch

from configurator import NONEMPTY, at_least, check, one_of, parse
from plot_norms import condition, load_run
from rundir import atomic_write_text, die

HERE = os.path.dirname(os.path.abspath(__file__))

# the paper's Table 1: (supervision, readout, norm_penalty)
CONDITIONS = [("terminal", "rmsnorm", 0.0), ("terminal", "scale_visible", 0.0),
              ("per_loop", "rmsnorm", 0.0), ("per_loop", "scale_visible", 0.0),
              ("per_loop", "final_only", 0.0), ("terminal", "rmsnorm", 0.01),
              ("per_loop", "rmsnorm", 0.01)]


def preset_file(v):
    """A preset path as given, else relative to this repository, so that the default
    (config/cpu.py) works from any folder."""
    if v == "" or os.path.isfile(v):
        return v
    return os.path.join(HERE, v)


def splits(v):
    try:
        shlex.split(v)
        return True
    except ValueError:
        return False


OPTIONS = {
    "run": ("claims", "table1 (train and tabulate the seven conditions) or claims",
            one_of("table1", "claims")),
    "out_dir": ("out/repro", "table1: where its runs go; claims: the folder of runs to judge",
                NONEMPTY),
    "data_dir": ("data", "table1: where prepare.py wrote the datasets", NONEMPTY),
    "preset": ("config/cpu.py", "table1: the train.py preset every condition starts from "
                                "('' = train.py's defaults: the paper's 44M model)",
               check("'' or a .py preset file that exists",
                     lambda v: v == "" or (v.endswith(".py") and os.path.isfile(preset_file(v))),
                     ["config/nope.py"])),
    "seeds": (3, "table1: seeds per condition", at_least(1)),
    "train_args": ("", "table1: extra train.py flags for every run, e.g. '--max_iters=300'",
                   check("train.py flags, quoted as in a shell", splits, ["--x='open"])),
}


def _stats(values):
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0}


def finished(out):
    """Has this run logged its last iteration (and so written its final checkpoint)?"""
    if not os.path.isfile(os.path.join(out, "ckpt.pt")):
        return False
    last = load_run(out)[0][-1]
    return last["iter"] >= last["config"]["max_iters"]


def run_args(cfg, supervision, readout, penalty, seed):
    """(folder, train.py arguments) of one table1 run."""
    out = os.path.join(cfg.out_dir, f"{supervision}_{readout}_pen{penalty:g}_seed{seed}")
    preset = [preset_file(cfg.preset)] if cfg.preset else []
    return out, [*preset, f"--out_dir={out}", f"--data_dir={cfg.data_dir}",
                 f"--supervision={supervision}", f"--readout={readout}",
                 f"--norm_penalty={penalty}", f"--seed={seed}", *shlex.split(cfg.train_args)]


def other_settings(out, args):
    """(key, logged value, value now) for each setting in which the run logged in `out` differs
    from the one train.py `args` would train now; [] when they agree or nothing is logged yet."""
    import train
    log = os.path.join(out, "log.jsonl")
    if not os.path.isfile(log) or os.path.getsize(log) == 0:
        return []
    then = load_run(out)[0][-1]["config"]
    now, _ = parse("train.py", train.OPTIONS, args, together=train.together)
    return [(k, then.get(k, "?"), v) for k, v in vars(now).items()
            if k not in train.IO_KEYS and then.get(k, "?") != v]


def table1(cfg):
    """Train each condition for each seed, then tabulate the last evaluation of each run."""
    from train import main as train
    runs = {(c, seed): run_args(cfg, *c, seed) for c in CONDITIONS
            for seed in range(1, cfg.seeds + 1)}
    for out, args in runs.values():  # reusing a run trained otherwise would be a wrong table
        differs = other_settings(out, args)
        if differs:
            then = ", ".join(f"{k}={a!r}" for k, a, _ in differs)
            now = ", ".join(f"{k}={b!r}" for k, _, b in differs)
            die(f"{out} holds a run trained with {then}; this table would train it with {now}. "
                f"Delete the folder, or give another --out_dir")
    rows = []
    for supervision, readout, penalty in CONDITIONS:
        norms, ppls = [], []
        for seed in range(1, cfg.seeds + 1):
            out, args = runs[(supervision, readout, penalty), seed]
            if not finished(out):
                resume = ["--init_from=resume"] if os.path.isfile(f"{out}/ckpt.pt") else []
                train([*args, *resume])
            last = load_run(out)[0][-1]
            norms.append(last["hidden_norm"][-1])
            ppls.append(math.exp(last["val_loop_ce"][-1]))
        rows.append({"condition": condition(last["config"]), "hidden_norm_K": _stats(norms),
                     "ppl": _stats(ppls), "seeds": cfg.seeds})
    print(f"{'condition':<36} {'||h_K||':>22} {'final PPL':>18}")
    for r in rows:
        n, p = r["hidden_norm_K"], r["ppl"]
        print(f"{r['condition']:<36} {n['mean']:>11.4g} +- {n['std']:<8.3g} "
              f"{p['mean']:>8.3f} +- {p['std']:<6.3f}")
    return rows


# ---- the paper's claims, judged on the figures of one reproduce.sh run -----------------------

def run_figures(folder):
    """What the claims need from one run: its condition, ||h_k|| per loop, PPL per exit depth
    and Lemma 1's cosines."""
    log, ev = load_run(folder)
    config = log[-1]["config"]
    return {"run": os.path.basename(folder.rstrip("/")), "config": config,
            "hidden_norm": log[-1]["hidden_norm"],
            "ppl": ev["per_depth"]["ppl"][:ev["n_loops"]] if ev else None,
            "lemma1": ev.get("lemma1") if ev else None}


def is_baseline(config):
    """The blind spot itself: rmsnorm readout, no penalty, no loop norm."""
    return (config["readout"] == "rmsnorm" and not config["norm_penalty"]
            and not config["loop_norm"])


def baseline_for(run, runs):
    """The rmsnorm run trained like this one (same lr and supervision), if there is one."""
    for other in runs:
        same = all(other["config"][k] == run["config"][k]
                   for k in ("learning_rate", "supervision", "n_loops", "max_iters"))
        if is_baseline(other["config"]) and same:
            return other
    return None


def judge(runs):
    """The claims table: for each claim, the figures measured and whether it held."""
    controlled = [r for r in runs if not is_baseline(r["config"])]
    claims = []

    # (1) the blind spot: the rmsnorm final norm is >= 10x every scale-controlled run's
    ratios = {}
    for r in controlled:
        base = baseline_for(r, runs)
        if base:
            ratios[r["run"]] = base["hidden_norm"][-1] / r["hidden_norm"][-1]
    claims.append({"claim": "rmsnorm's ||h_K|| >= 10x every scale-controlled run's",
                   "figure": ", ".join(f"{k} x{v:.1f}" for k, v in ratios.items()) or "no pairs",
                   "held": bool(ratios) and min(ratios.values()) >= 10})

    # (2) scale-visible readout and norm penalty beat rmsnorm at every exit depth 2..K
    gaps = {}
    for r in controlled:
        base = baseline_for(r, runs)
        fix = r["config"]["readout"] == "scale_visible" or r["config"]["norm_penalty"] > 0
        if fix and base and r["ppl"] and base["ppl"] and not r["config"]["loop_norm"]:
            gaps[r["run"]] = [b - p for p, b in zip(r["ppl"][1:], base["ppl"][1:])]
    worst = {k: min(v) for k, v in gaps.items()}
    claims.append({"claim": "scale_visible and penalty runs have lower PPL than rmsnorm at "
                            "every exit depth 2..K",
                   "figure": ", ".join(f"{k}: smallest PPL gain {v:.3f}"
                                       for k, v in worst.items()) or "no pairs",
                   "held": bool(worst) and min(worst.values()) > 0})

    # (3) Lemma 1 on the trained checkpoints
    lem = {r["run"]: r["lemma1"] for r in runs if r["lemma1"]}
    base = [k for k in lem if is_baseline(next(r for r in runs if r["run"] == k)["config"])]
    visible = [r["run"] for r in runs if r["run"] in lem and
               r["config"]["readout"] == "scale_visible"]
    held = bool(base) and bool(visible)
    held = held and all(lem[k]["max_abs_cos"] < 1e-6 for k in base)
    held = held and all(lem[k]["mean_abs_cos"] > 1e-3 for k in visible)
    figure = [f"{k}: max |cos| {lem[k]['max_abs_cos']:.2g}" for k in base]
    figure += [f"{k}: mean |cos| {lem[k]['mean_abs_cos']:.2g}" for k in visible]
    claims.append({"claim": "Lemma 1: |cos(dCE/dh_K, h_K)| < 1e-6 per token for rmsnorm "
                            "(float64), clearly non-zero (mean > 1e-3) for scale_visible",
                   "figure": ", ".join(figure) or "no eval.json with lemma1", "held": held})

    # (4) loop norm keeps ||h_k|| flat across loops
    flat = {r["run"]: max(r["hidden_norm"]) / min(r["hidden_norm"])
            for r in runs if r["config"]["loop_norm"]}
    claims.append({"claim": "loop norm keeps ||h_k|| flat across loops (max/min <= 1.5)",
                   "figure": ", ".join(f"{k}: max/min {v:.2f}" for k, v in flat.items())
                   or "no loop-norm run",
                   "held": bool(flat) and max(flat.values()) <= 1.5})
    return claims


def print_claims(claims):
    print(f"{'#':<2} {'held':<5} claim / figure measured")
    for i, c in enumerate(claims, 1):
        print(f"{i:<2} {'yes' if c['held'] else 'NO':<5} {c['claim']}")
        print(f"{'':<8} {c['figure']}")


def main(argv=None):
    cfg, _ = parse("experiments.py", OPTIONS, argv, __doc__)
    if cfg.run == "table1":
        rows = table1(cfg)
        path = os.path.join(cfg.out_dir, "table1.json")
        atomic_write_text(path, json.dumps(rows, indent=1))
        print(f"wrote {path}")
        return rows
    if not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"error: --out_dir={cfg.out_dir!r} is not a folder; run "
                         f"bash reproduce.sh first")
    folders = sorted(os.path.join(cfg.out_dir, d) for d in os.listdir(cfg.out_dir)
                     if os.path.isfile(os.path.join(cfg.out_dir, d, "log.jsonl")))
    if not folders:
        raise SystemExit(f"error: no run folders (with log.jsonl) under {cfg.out_dir}")
    claims = judge([run_figures(f) for f in folders])
    print_claims(claims)
    path = os.path.join(cfg.out_dir, "claims.json")
    atomic_write_text(path, json.dumps(claims, indent=1))
    print(f"wrote {path}")
    return claims


if __name__ == "__main__":
    main()
