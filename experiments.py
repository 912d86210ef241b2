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

claims: reads every run folder under out_dir and its seed folders (reproduce.sh's
out_dir/seed<n>/<run>: log.jsonl, and eval.json from eval.py --run=all and --run=speed). Each of
the paper's claims is judged in each seed on that seed's runs; it is called held only when it
held in every seed ("held_in": "3/3"), and its figures are given per seed and as mean +- sample
std over the seeds. Then the tables over seeds: ||h_K||, PPL at every exit depth, calibrated
halting, and generation speed at full depth against calibrated halting. All of it ->
out_dir/claims.json. A claim that did not hold is reported, never hidden.
"""

import json
import math
import os
import re
import shlex
import textwrap

import torch

from configurator import NONEMPTY, at_least, check, one_of, parse
from model import READOUTS
from plot_norms import condition, load_run
from rundir import atomic_write_text, die, model_config

HERE = os.path.dirname(os.path.abspath(__file__))

# The paper's official 44M configs as nanoloop conditions, (supervision, readout,
# norm_penalty): the six of its configs/44m (its seventh, "base", repeats the first).
OFFICIAL = {("terminal", "rmsnorm", 0.0): "terminal + RMSNorm",
            ("terminal", "scale_visible", 0.0): "terminal + raw",
            ("per_loop", "rmsnorm", 0.0): "per-loop + RMSNorm",
            ("per_loop", "scale_visible", 0.0): "per-loop + raw",
            ("per_loop", "final_only", 0.0): "per-loop + final-only norm",
            ("terminal", "rmsnorm", 0.01): "terminal + norm penalty"}
# Table 1: the six, and per-loop + norm penalty, which no official 44M config has
CONDITIONS = [*OFFICIAL, ("per_loop", "rmsnorm", 0.01)]


def official_condition(config):
    """The paper's official 44M config this run's condition is, or None (loop norm, per-loop +
    penalty, the alpha readout, another lambda: nanoloop's own rows)."""
    if config.get("loop_norm"):
        return None
    return OFFICIAL.get((config["supervision"], config["readout"],
                         float(config.get("norm_penalty", 0.0))))


VISIBLE = ("scale visible to the loss: some trained exit's readout shows the scale, or a norm "
           "penalty; on the six official conditions, the paper's grouping")


def loss_sees_scale(config):
    """Is the scale of some h_k visible to the loss? Some trained exit's readout shows it, or a
    norm penalty puts it in the loss. On the six official conditions this is the paper's
    grouping (raw, final-only and norm-penalty runs visible, the others not)."""
    cfg = model_config(config)
    hides = READOUTS[cfg.readout].hides_scale
    return cfg.norm_penalty > 0 or any(not hides(cfg, k, cfg.n_loops)
                                       for k in cfg.trained_loops())


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


def spread(values):
    """mean, sample standard deviation (0 for one value), min, max and n of `values`."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(values) > 1 else 0.0,
            "min": t.min().item(), "max": t.max().item(), "n": len(values)}


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
        rows.append({"condition": condition(last["config"]), "hidden_norm_K": spread(norms),
                     "ppl": spread(ppls), "seeds": cfg.seeds,
                     "official": official_condition(last["config"])})
    print(f"{'condition':<36} {'||h_K||':>22} {'final PPL':>18}  official 44M config")
    for r in rows:
        n, p = r["hidden_norm_K"], r["ppl"]
        print(f"{r['condition']:<36} {n['mean']:>11.4g} +- {n['std']:<8.3g} "
              f"{p['mean']:>8.3f} +- {p['std']:<6.3f}  {r['official'] or '(none: an extra row)'}")
    return rows


# ---- the paper's claims, judged on reproduce.sh's runs, seed by seed --------------------------

def run_figures(folder, replicate="."):
    """What the claims and tables need from one run: its name and condition, ||h_k|| per loop,
    PPL per exit depth, Lemma 1's cosines, halting and generation speed. `replicate`: the seed
    folder it sits in (reproduce.sh's out/repro/seed<n>), "." for a run at the top."""
    log, ev = load_run(folder)
    ev = ev or {}
    return {"run": os.path.basename(folder.rstrip("/")), "replicate": replicate,
            "config": log[-1]["config"], "hidden_norm": log[-1]["hidden_norm"],
            "ppl": ev["per_depth"]["ppl"][:ev["n_loops"]] if ev else None,
            "halting": ev.get("halting"), "halting_paper": ev.get("halting_paper"),
            "lemma1": ev.get("lemma1"), "endpoint": ev.get("endpoint"),
            "speed": ev.get("speed")}


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


# Each claim: what it says, and how one of its figures is written (label, value).
CLAIMS = [
    ("rmsnorm's ||h_K|| >= 10x every scale-controlled run's", "{} x{:.1f}"),
    ("per-loop scale_visible and penalty runs have lower PPL than per-loop rmsnorm at every "
     "exit depth 2..K", "{}: smallest PPL gain {:.3f}"),
    ("Lemma 1: |cos(dCE/dh_K, h_K)| < 1e-6 per token for rmsnorm (float64; the norm's eps 1e-6 "
     "leaves about eps / mean(h_K^2)), clearly non-zero (mean > 1e-3) for scale_visible",
     "{}: {:.2g}"),
    ("loop norm keeps ||h_k|| flat across loops (max/min <= 1.5)", "{}: max/min {:.2f}"),
]
RULE = "held: held in every seed"


def judge(runs):
    """The claims on the runs of one seed: for each, its figures {label: value} and whether it
    held. A claim without the runs it needs did not hold (reported, not hidden)."""
    controlled = [r for r in runs if not is_baseline(r["config"])]
    values = [{}, {}, {}, {}]
    held = [False] * 4

    # (1) the blind spot: the rmsnorm final norm is >= 10x every scale-controlled run's
    for r in controlled:
        base = baseline_for(r, runs)
        if base:
            values[0][r["run"]] = base["hidden_norm"][-1] / r["hidden_norm"][-1]
    held[0] = bool(values[0]) and min(values[0].values()) >= 10

    # (2) scale-visible readout and norm penalty beat rmsnorm at every exit depth 2..K; a
    # terminal run's exits before K are not trained, so only per-loop runs are judged
    for r in controlled:
        base = baseline_for(r, runs)
        fix = r["config"]["readout"] == "scale_visible" or r["config"]["norm_penalty"] > 0
        fix = fix and r["config"]["supervision"] == "per_loop" and not r["config"]["loop_norm"]
        if fix and base and r["ppl"] and base["ppl"]:
            values[1][r["run"]] = min(b - p for p, b in zip(r["ppl"][1:], base["ppl"][1:]))
    held[1] = bool(values[1]) and min(values[1].values()) > 0

    # (3) Lemma 1 on the trained checkpoints
    base = [r for r in runs if r["lemma1"] and is_baseline(r["config"])]
    visible = [r for r in runs if r["lemma1"] and r["config"]["readout"] == "scale_visible"]
    values[2] = {f"{r['run']} max |cos|": r["lemma1"]["max_abs_cos"] for r in base}
    values[2] |= {f"{r['run']} mean |cos|": r["lemma1"]["mean_abs_cos"] for r in visible}
    held[2] = (bool(base) and bool(visible)
               and all(r["lemma1"]["max_abs_cos"] < 1e-6 for r in base)
               and all(r["lemma1"]["mean_abs_cos"] > 1e-3 for r in visible))

    # (4) loop norm keeps ||h_k|| flat across loops
    values[3] = {r["run"]: max(r["hidden_norm"]) / min(r["hidden_norm"])
                 for r in runs if r["config"]["loop_norm"]}
    held[3] = bool(values[3]) and max(values[3].values()) <= 1.5

    return [{"claim": text, "figure": figure(fmt, v) or "no runs to judge it on", "values": v,
             "held": h} for (text, fmt), v, h in zip(CLAIMS, values, held)]


def figure(fmt, values):
    return ", ".join(fmt.format(k, v) for k, v in sorted(values.items()))


def replicates(runs):
    """{replicate: its runs}, in the order of the seed folders."""
    out = {}
    for r in runs:
        out.setdefault(r["replicate"], []).append(r)
    return dict(sorted(out.items(), key=lambda kv: natural(kv[0])))


def natural(name):
    """seed2 before seed10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def judge_seeds(runs):
    """Each claim judged in every seed on its own; held when it held in every seed. The figure
    is each label's mean (and spread, with several seeds) over the seeds."""
    per_seed = {rep: judge(rs) for rep, rs in replicates(runs).items()}
    claims = []
    for i, (text, fmt) in enumerate(CLAIMS):
        seeds = {rep: c[i] for rep, c in per_seed.items()}
        labels = sorted({k for c in seeds.values() for k in c["values"]})
        stats = {k: spread([c["values"][k] for c in seeds.values() if k in c["values"]])
                 for k in labels}
        n_held = sum(c["held"] for c in seeds.values())
        summary = ", ".join(fmt.format(k, stats[k]["mean"]) + spread_text(stats[k])
                            for k in labels)
        claims.append({"claim": text, "held": n_held == len(seeds) and bool(seeds),
                       "held_in": f"{n_held}/{len(seeds)}", "figure": summary or
                       "no runs to judge it on", "figures": stats,
                       "per_seed": {rep: {"held": c["held"], "figure": c["figure"],
                                          "values": c["values"]} for rep, c in seeds.items()}})
    return claims


def spread_text(s, digits=3):
    return f" +- {s['std']:.{digits}g} (n={s['n']})" if s["n"] > 1 else ""


def print_claims(claims, width=100):
    print(f"{'#':<2} {'held':<5} {'seeds':<6} claim / figure measured (mean +- std over seeds)")

    def say(first, text, more=""):
        print(textwrap.fill(text, width, initial_indent=first, subsequent_indent=" " * 16 + more,
                            break_on_hyphens=False, break_long_words=False))
    for i, c in enumerate(claims, 1):
        say(f"{i:<2} {'yes' if c['held'] else 'NO':<5} {c['held_in']:<6} ", c["claim"])
        say(" " * 16, c["figure"], "  ")
        if len(c["per_seed"]) > 1:
            for rep, s in c["per_seed"].items():
                say(" " * 16, f"{rep}: {'held' if s['held'] else 'NOT held'}: {s['figure']}",
                    "  ")


# ---- the tables over seeds: norms, PPL per depth, halting, generation speed ---------------------

def pm(s, fmt="{:.3f}", std_fmt=None):
    """'mean+-std' of a spread, or the mean alone for one seed."""
    text = fmt.format(s["mean"])
    return text + "+-" + (std_fmt or fmt).format(s["std"]) if s["n"] > 1 else text


def conditions(runs, policy="logit_margin"):
    """One row per run name (condition), each figure as its spread over the seeds."""
    rows = []
    for name in dict.fromkeys(r["run"] for r in runs):  # each name once, in order
        rs = [r for r in runs if r["run"] == name and r["ppl"]]
        if not rs:
            continue
        K = len(rs[0]["ppl"])
        # its condition among the runs of its seed (runs of other seeds differ in the seed)
        mates = [r["config"] for r in runs if r["replicate"] == rs[0]["replicate"]]
        row = {"run": name, "condition": condition(rs[0]["config"], mates), "seeds": len(rs),
               "official": official_condition(rs[0]["config"]),
               "hidden_norm_K": spread([r["hidden_norm"][-1] for r in rs]),
               "ppl_per_depth": [spread([r["ppl"][k] for r in rs]) for k in range(K)],
               "halting": halting_spread([r["halting"] for r in rs])}
        row["ppl"] = row["ppl_per_depth"][-1]
        row["mean_loops"] = row["halting"]["token"][policy]["mean_loops"]
        papers = [r["halting_paper"] for r in rs if r.get("halting_paper")]
        if len(papers) == len(rs):
            row["halting_paper"] = halting_spread([{"sequence": h} for h in papers])["sequence"]
        fast = [r["speed"] for r in rs if r["speed"]]
        if fast:
            row["speed"] = speed_row(fast)
        rows.append(row)
    return rows


def halting_spread(haltings):
    """eval.json's halting entries of several seeds -> per unit and policy, the spread of its
    mean loops and of its PPL ratio."""
    out = {}
    for unit, policies in haltings[0].items():
        out[unit] = {}
        for p in policies:
            entries = [h[unit][p] for h in haltings]
            out[unit][p] = {"mean_loops": spread([e["mean_loops"] for e in entries]),
                            "ratio": spread([e["ratio"] for e in entries])}
    return out


def speed_row(speeds):
    """Generation tok/s at full depth and at the calibrated threshold, per batch size, with the
    exit's held-out PPL, as spreads over seeds, and each seed's tested loops; the held-out PPL at
    full depth and testing every loop."""
    out = {"policy": speeds[0]["policy"], "new_tokens": speeds[0]["new_tokens"],
           "ppl": {kind: spread([s["ppl"][kind] for s in speeds]) for kind in ("full", "exit")},
           "batch": {}}
    for b in speeds[0]["batch"]:
        runs = [s["batch"][b] for s in speeds]
        out["batch"][b] = {f"{kind}_{what}": spread([r[kind][what] for r in runs])
                           for kind in ("full", "exit") for what in ("tokens_per_s", "mean_loops")}
        # eval.json from before the schedule: no exit PPL per batch (every loop was tested)
        out["batch"][b]["exit_ppl"] = spread([r["exit"].get("ppl", s["ppl"]["exit"])
                                              for r, s in zip(runs, speeds)])
        out["batch"][b]["tested_loops"] = [r.get("tested_loops") for r in runs]
        for what in ("speed_up", "ideal", "of_ideal"):
            out["batch"][b][what] = spread([r[what] for r in runs])
        if all("one_loop_speed_up" in r for r in runs):  # the most an exit can give
            out["batch"][b]["one_loop"] = spread([r["one_loop_speed_up"] for r in runs])
    return out


# ---- the paper's endpoint metrics: loss placement x scale visibility ---------------------------

def rank(values):
    """Ranks 1..n, ties given the mean of the ranks they span (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in order[i:j + 1]:
            ranks[t] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs, ys):
    """Pearson's r, or NaN when either side does not vary (or has fewer than 2 points)."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else math.nan


def endpoint(runs):
    """The paper's endpoint table and correlation. Per run (over seeds): does the loss train
    every loop (per-loop)? does it see the scale (loss_sees_scale)? PPL at depth 1 and K, the
    CE gap ln PPL_1 - ln PPL_K, the radial fraction of the gradient (mean |cos(dCE/dh_k, h_k)|)
    at loops 1 and K, ||h_K||. Across every run of every seed: Pearson's and Spearman's
    correlation of log10 radial fraction at K (floored at 1e-12) with log10 ||h_K||, over all
    runs and over the paper's four core conditions (terminal / per-loop x RMSNorm / raw)."""
    done = [r for r in runs if r.get("endpoint") and r["ppl"]]
    rows = []
    for name in dict.fromkeys(r["run"] for r in done):
        rs = [r for r in done if r["run"] == name]
        radial = [r["endpoint"]["radial_fraction"]["mean_abs_cos"] for r in rs]
        rows.append({"run": name, "official": official_condition(rs[0]["config"]),
                     "per_loop_loss": rs[0]["config"]["supervision"] == "per_loop",
                     "scale_visible": loss_sees_scale(rs[0]["config"]),
                     "ppl_1": spread([r["ppl"][0] for r in rs]),
                     "ppl_K": spread([r["ppl"][-1] for r in rs]),
                     "ce_gap": spread([r["endpoint"]["ce_gap"] for r in rs]),
                     "radial_fraction_1": spread([v[0] for v in radial]),
                     "radial_fraction_K": spread([v[-1] for v in radial]),
                     "hidden_norm_K": spread([r["hidden_norm"][-1] for r in rs])})
    rows.sort(key=lambda row: (row["per_loop_loss"], row["scale_visible"]))
    core = set(list(OFFICIAL.values())[:4])
    correlation = {}
    for group, members in (("all runs", done),
                           ("the four core conditions",
                            [r for r in done if official_condition(r["config"]) in core])):
        xs = [math.log10(max(r["endpoint"]["radial_fraction"]["mean_abs_cos"][-1], 1e-12))
              for r in members]
        ys = [math.log10(r["hidden_norm"][-1]) for r in members]
        correlation[group] = {"n": len(members), "pearson": pearson(xs, ys),
                              "spearman": pearson(rank(xs), rank(ys))}
    return {"rows": rows, "correlation": correlation, "scale_visible": VISIBLE}


def print_endpoint(e):
    if not e["rows"]:
        return
    print("\nendpoint metrics (mean over seeds): loss placement x scale visible to the loss")
    print(f"{'run':<22} {'per-loop':>8} {'visible':>8} {'PPL k=1':>10} {'PPL k=K':>10} "
          f"{'CE gap':>8} {'radial 1':>9} {'radial K':>9} {'||h_K||':>9}  official 44M config")
    for r in e["rows"]:
        yes = {True: "yes", False: "no"}
        print(f"{r['run']:<22} {yes[r['per_loop_loss']]:>8} {yes[r['scale_visible']]:>8} "
              f"{r['ppl_1']['mean']:>10.3f} {r['ppl_K']['mean']:>10.3f} "
              f"{r['ce_gap']['mean']:>8.3f} {r['radial_fraction_1']['mean']:>9.2g} "
              f"{r['radial_fraction_K']['mean']:>9.2g} {r['hidden_norm_K']['mean']:>9.4g}  "
              f"{r['official'] or '-'}")
    for group, c in e["correlation"].items():
        print(f"log10 radial fraction at K vs log10 ||h_K||, {group} (n={c['n']}): "
              f"Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}")


def print_conditions(rows, policy="logit_margin"):
    if not rows:
        return
    n = max(r["seeds"] for r in rows)
    over = f"mean+-std over {n} seeds" if n > 1 else "one seed"
    print(f"\nper run ({over}; mean loops: calibrated halting, {policy} per token)")
    print(f"{'run':<22} {'condition':<52} {'||h_K||':>13} {'PPL':>13} {'mean loops':>11}  "
          f"official 44M config")
    for r in rows:
        norm = pm(r["hidden_norm_K"], "{:.4g}", "{:.3g}")
        print(f"{r['run']:<22} {r['condition']:<52} {norm:>13} "
              f"{pm(r['ppl']):>13} {pm(r['mean_loops'], '{:.2f}'):>11}  "
              f"{r['official'] or '- (not in the paper)'}")
    print("\nPPL at exit depth k = 1..K")
    for r in rows:
        print(f"{r['run']:<22} " + " ".join(f"{pm(s):>13}" for s in r["ppl_per_depth"]))
    print("\ncalibrated halting: mean loops, held-out PPL / full-depth PPL (its mean)")
    units = list(rows[0]["halting"])
    policies = list(rows[0]["halting"][units[0]])
    header = " | ".join(" ".join(f"{p + ' ' + u:<22}" for p in policies) for u in units)
    print(f"{'run':<22} {header}".rstrip())

    def cell(h):
        return f"{pm(h['mean_loops'], '{:.2f}')} x{h['ratio']['mean']:.4f}"
    for r in rows:
        cells = [" ".join(f"{cell(h):<22}" for h in r["halting"][u].values()) for u in units]
        print(f"{r['run']:<22} " + " | ".join(cells).rstrip())
    paper = [r for r in rows if "halting_paper" in r]
    if paper:
        print("\ncalibrated halting as the paper measures it (per sequence, calibrated and "
              "reported on the same batches): mean loops, PPL / full-depth PPL (its mean)")
        print(f"{'run':<22} " + " ".join(f"{p + ' sequence':<22}"
                                         for p in paper[0]["halting_paper"]).rstrip())
        for r in paper:
            cells = " ".join(f"{cell(h):<22}" for h in r["halting_paper"].values())
            print(f"{r['run']:<22} {cells}".rstrip())
    fast = [r for r in rows if "speed" in r]
    if fast:
        s = fast[0]["speed"]
        print(f"\nearly exit in wall-clock time: generation with the KV cache, {s['new_tokens']} "
              f"tokens, all K loops vs calibrated halting ({s['policy']} per token)")
        print(f"{'run':<22} {'batch':>5} {'full tok/s':>13} {'exit tok/s':>13} {'speed-up':>13} "
              f"{'loops used':>11} {'ideal':>6} {'of ideal':>13} {'PPL full':>13} "
              f"{'PPL exit':>13} {'1 loop':>13}  tests at (per seed)")
        for r in fast:
            for b, x in r["speed"]["batch"].items():
                tests = " ".join(tested_loops(t) for t in x["tested_loops"])
                print(f"{r['run']:<22} {b:>5} {pm(x['full_tokens_per_s'], '{:.0f}'):>13} "
                      f"{pm(x['exit_tokens_per_s'], '{:.0f}'):>13} "
                      f"{pm(x['speed_up'], '{:.2f}') + 'x':>13} "
                      f"{pm(x['exit_mean_loops'], '{:.2f}'):>11} {x['ideal']['mean']:>5.2f}x "
                      f"{pm(x['of_ideal'], '{:.2f}'):>13} "
                      f"{pm(r['speed']['ppl']['full']):>13} {pm(x['exit_ppl']):>13} "
                      f"{pm(x['one_loop'], '{:.2f}') + 'x' if 'one_loop' in x else '-':>13}  "
                      f"{tests}")
        print("1 loop: the speed-up of one loop without an exit test, the most an exit can give "
              "(what no exit saves: the embedding, the last readout, sampling)")


def tested_loops(loops):
    """eval.json's tested_loops as the table shows them: "1,3", "none", or "all" (an eval.json
    from before the schedule, which tested every loop)."""
    if loops is None:
        return "all"
    return ",".join(map(str, loops)) or "none"


def run_folders(out_dir):
    """(folder, replicate) of every run under out_dir: its run folders, and those of its seed
    folders (reproduce.sh's out/repro/seed<n>/<run>)."""
    found = []
    for d in sorted(os.listdir(out_dir), key=natural):
        path = os.path.join(out_dir, d)
        if os.path.isfile(os.path.join(path, "log.jsonl")):
            found.append((path, "."))
        elif os.path.isdir(path):
            found += [(os.path.join(path, r), d) for r in sorted(os.listdir(path))
                      if os.path.isfile(os.path.join(path, r, "log.jsonl"))]
    return found


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
    folders = run_folders(cfg.out_dir)
    if not folders:
        raise SystemExit(f"error: no run folders (with log.jsonl) under {cfg.out_dir}")
    runs = [run_figures(f, rep) for f, rep in folders]
    claims = judge_seeds(runs)
    print_claims(claims)
    rows = conditions(runs)
    print_conditions(rows)
    ends = endpoint(runs)
    print_endpoint(ends)
    path = os.path.join(cfg.out_dir, "claims.json")
    atomic_write_text(path, json.dumps({"rule": RULE, "claims": claims, "runs": rows,
                                        "endpoint": ends}, indent=1))
    print(f"wrote {path}")
    return claims


if __name__ == "__main__":
    main()
