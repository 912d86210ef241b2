"""
See the blind spot: plot the hidden-state norms and per-depth perplexity of one or more runs.

  python plot_norms.py out/rmsnorm out/scale_visible ... [--out=norms.png] [--policy=max_prob]

Reads each run's log.jsonl (and eval.json from eval.py, when present) and writes one PNG:
  1. ||h_K|| over training iterations (log y)   2. ||h_k|| against loop k at the end of training
  3. val PPL against exit depth k               4. val PPL against mean loops under adaptive exit
and prints a table. Runs are labelled by their condition, read from the log's config.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

LOG_KEYS = ("iter", "val_loop_ce", "hidden_norm", "config")


def condition(config, with_lr=False):
    """'rmsnorm, per-loop, penalty 0.01, loop norm': the run's place in the paper's grid (and its
    learning rate, when the runs compared do not share one)."""
    parts = [config["readout"], config["supervision"].replace("_", "-")]
    if config.get("norm_penalty"):
        parts.append(f"penalty {config['norm_penalty']:g}")
    if config.get("loop_norm"):
        parts.append("loop norm")
    if with_lr:
        parts.append(f"lr {config['learning_rate']:g}")
    return ", ".join(parts)


def load_run(folder):
    """(log entries, eval.json or None); a bad folder is a one-line SystemExit naming it."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {folder}: no log.jsonl (is this a train.py out_dir?)")
    log = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except ValueError:
                raise SystemExit(f"error: {folder}: log.jsonl line {n} is not JSON")
            missing = [k for k in LOG_KEYS if k not in entry]
            if missing:
                raise SystemExit(f"error: {folder}: log.jsonl is from another format (line {n} lacks "
                                 f"{', '.join(missing)}); re-run train.py to get a current log")
            log.append(entry)
    if not log:
        raise SystemExit(f"error: {folder}: log.jsonl is empty (the run has not evaluated yet)")
    ev_path = os.path.join(folder, "eval.json")
    if not os.path.isfile(ev_path):
        return log, None
    with open(ev_path) as f:
        return log, json.load(f)


def mixed_lr(runs):
    return len({log[-1]["config"]["learning_rate"] for log, _ in runs.values()}) > 1


def table(runs, policy):
    rows = []
    for folder, (log, ev) in runs.items():
        last = log[-1]
        ppl_k = ev["per_depth"]["ppl"][:ev["n_loops"]] if ev else [math.exp(c) for c in last["val_loop_ce"]]
        cal = ev["calibrated"][policy]["mean_loops"] if ev else float("nan")
        rows.append((folder, condition(last["config"], mixed_lr(runs)), last["hidden_norm"][-1], ppl_k[-1], ppl_k, cal))
    print(f"{'run':<24} {'condition':<46} {'||h_K||':>9} {'PPL':>7}  {'mean loops':>10}  PPL at k = 1..K")
    for folder, cond, norm, ppl, ppl_k, cal in rows:
        print(f"{os.path.basename(folder.rstrip('/')):<24} {cond:<46} {norm:9.4g} {ppl:7.3f}  {cal:10.2f}  "
              + " ".join(f"{p:.3f}" for p in ppl_k))
    return rows


def plot(runs, out, policy):
    diag = any(ev and "spread" in ev for _, ev in runs.values())  # eval.py --run=spread/all: more panels
    fig, ax = plt.subplots(2, 3 if diag else 2, figsize=(18 if diag else 12, 9))
    for folder, (log, ev) in runs.items():
        label = condition(log[-1]["config"], mixed_lr(runs))
        line = ax[0, 0].plot([e["iter"] for e in log], [e["hidden_norm"][-1] for e in log], label=label)[0]
        c = line.get_color()
        norms = log[-1]["hidden_norm"]
        ax[0, 1].plot(range(1, len(norms) + 1), norms, "o-", color=c)
        if ev:
            K = ev["n_loops"]
            ax[1, 0].plot(ev["per_depth"]["k"], ev["per_depth"]["ppl"], "o-", color=c, markevery=[K - 1])
            a, cal = ev["adaptive"][policy], ev["calibrated"][policy]
            ax[1, 1].plot(a["mean_loops"], a["ppl"], ".-", color=c)
            ax[1, 1].plot([cal["mean_loops"]], [cal["ppl"]], "*", color=c, markersize=12)
        else:
            ppl = [math.exp(x) for x in log[-1]["val_loop_ce"]]
            ax[1, 0].plot(range(1, len(ppl) + 1), ppl, "o-", color=c)
        if diag and ev and "spread" in ev:
            e, n = ev["spread"]["hist_edges"], ev["spread"]["hist_counts"]
            ax[0, 2].stairs(n, e, color=c)
        if diag and ev and "scale" in ev:
            ax[1, 2].plot(ev["scale"]["alpha"], [math.exp(x) for x in ev["scale"]["ce"]], "o-", color=c)
    ax[0, 0].set(yscale="log", xlabel="iteration", ylabel="||h_K|| (final loop)", title="final hidden norm in training")
    ax[0, 1].set(yscale="log", xlabel="loop k", ylabel="||h_k||", title="hidden norm per loop, end of training")
    ax[1, 0].set(xlabel="exit depth k (big dot: trained K)", ylabel="val PPL", title="perplexity at each exit depth")
    ax[1, 1].set(xlabel="mean loops used", ylabel="val PPL",
                 title=f"adaptive exit ({policy}); star: calibrated halting at 1.01x")
    if diag:
        ax[0, 2].set(xscale="log", xlabel="per-token ||h_K||", ylabel="tokens", title="spread of the final norm over tokens")
        ax[1, 2].set(xscale="log", yscale="log", xlabel="alpha", ylabel="val PPL at loop K", title="readout of alpha * h_K (scale sensitivity)")
    ax[0, 0].legend(fontsize=8)
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="train.py out_dir folders")
    ap.add_argument("--out", default="norms.png", help="PNG to write (default: norms.png)")
    ap.add_argument("--policy", default="max_prob", choices=["max_prob", "logit_margin", "entropy"],
                    help="adaptive-exit policy drawn in panel 4 and tabled (default: max_prob)")
    args = ap.parse_args(argv)
    runs = {folder: load_run(folder) for folder in args.runs}
    table(runs, args.policy)
    plot(runs, args.out, args.policy)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
