"""
See the blind spot: plot the hidden-state norms and per-depth perplexity of one or more runs.

  python plot_norms.py out/rmsnorm out/scale_visible      # out/norms_rmsnorm+scale_visible.png
  python plot_norms.py out/a out/b --out=fig.png --depth_map=depth_map.png

Reads each run's log.jsonl (and eval.json from eval.py, when present) and writes one PNG of nine
panels, by default beside the runs and named after them (so a plot of other runs never replaces
it; --out chooses):
  ||h_K|| over training            ||h_k|| per loop (and to 3K)   the spread of ||h_K|| over tokens
  PPL per exit depth (and to 3K)   PPL under adaptive exit        PPL of the readout of alpha * h_K
  Lemma 2: radial increment a_k    Lemma 2: angular step x s_k    the compute-quality frontier
and prints a table. A panel whose data no run has yet says which eval.py command fills it. Runs
are labelled by their condition (readout, supervision, penalty, loop norm) and key=value for
every other setting that differs between the runs (and means something for the run), read from
each log's config. --depth_map also draws each run's held-out passage with every token shaded
by the loop it exits at under calibrated halting (eval.py's depth_map), one row per run.
"""

import hashlib
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from configurator import check, one_of, parse  # noqa: E402
from model import EXIT_POLICIES, LoopedGPTConfig, knob_applies  # noqa: E402
from rundir import read_log, writable_parent  # noqa: E402
from train import IO_KEYS  # noqa: E402

LOG_KEYS = ("iter", "val_loop_ce", "hidden_norm", "config")


def png_path(optional):
    text = "a path ending in .png" + (", or '' for none" if optional else "")
    return check(text, lambda v: v.endswith(".png") or (optional and v == ""), ["fig.jpg"])


OPTIONS = {
    "out": ("", "the figure to write ('': norms_<run names>.png in the runs' common folder)",
            png_path(True)),
    "policy": ("logit_margin", "exit policy of the table's mean-loops column",
               one_of(*EXIT_POLICIES)),
    "exit_unit": ("token", "exit unit of the table's mean-loops column",
                  one_of("token", "sequence")),
    "depth_map": ("", "also write the depth map of the runs to this PNG", png_path(True)),
}


# Not settings of an experiment: where its files go, and over how many processes its global
# batch was shared. device, dtype and compile are compared as they ran ("resolved"), not as
# given ("auto").
NOT_SETTINGS = (*IO_KEYS, "world_size", "resolved")
CONDITION_KEYS = ("readout", "supervision", "norm_penalty", "loop_norm")  # said in words


def settings(config):
    """A run's settings from its logged config; a setting it lacks (an older train.py) is ?."""
    ran = config | config.get("resolved", {})
    return {k: v for k, v in ran.items() if k not in NOT_SETTINGS}


def differing(configs):
    """The settings, other than the condition's, whose value is not the same in all `configs`."""
    runs = [settings(c) for c in configs]
    keys = dict.fromkeys(k for run in runs for k in run)  # in the order of the logs
    return [k for k in keys if k not in CONDITION_KEYS
            and any(run.get(k, "?") != runs[0].get(k, "?") for run in runs)]


def applies(key, config):
    """Does this setting mean anything for this run? (A knob of the alpha readout does not for
    an rmsnorm run.)"""
    return key not in LoopedGPTConfig.__dataclass_fields__ or knob_applies(key, config)


def condition(config, compared=()):
    """'rmsnorm, per-loop, penalty 0.01, loop norm': the run's place in the paper's grid, then
    key=value for every other setting that differs between the runs compared (`compared`: their
    configs) and means something for this run, so that runs which differ in anything (K, data,
    width, seed, a new model knob) are told apart."""
    parts = [config["readout"], config["supervision"].replace("_", "-")]
    if config.get("norm_penalty"):
        parts.append(f"penalty {config['norm_penalty']:g}")
    if config.get("loop_norm"):
        parts.append("loop norm")
    mine = settings(config)
    parts += [f"{k}={mine.get(k, '?')}" for k in differing(compared) if applies(k, config)]
    return ", ".join(parts)


def labels(runs):
    """{folder: label}: each run's condition among the runs compared; runs whose settings are all
    the same (a run and its copy) are told apart by their folder names."""
    configs = [log[-1]["config"] for log, _ in runs.values()]
    conditions = {folder: condition(log[-1]["config"], configs)
                  for folder, (log, _) in runs.items()}
    taken = list(conditions.values())
    out = {}
    for folder, label in conditions.items():
        if taken.count(label) > 1:
            label = f"{label} ({os.path.basename(folder.rstrip('/'))})"
        out[folder] = label
    return out


def load_run(folder):
    """(log entries, eval.json or None); a bad folder is a one-line SystemExit naming it."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {folder}: no log.jsonl (is this a train.py out_dir?)")
    log = read_log(path)  # lines that are not entries (hand-edited, blank) are skipped
    for entry in log:
        missing = [k for k in LOG_KEYS if k not in entry]
        if missing:
            raise SystemExit(f"error: {folder}: log.jsonl is from another format (iter "
                             f"{entry['iter']} lacks {', '.join(missing)}); re-run train.py "
                             f"to get a current log")
    if not log:
        raise SystemExit(f"error: {folder}: log.jsonl is empty (the run has not evaluated yet)")
    ev_path = os.path.join(folder, "eval.json")
    if not os.path.isfile(ev_path):
        return log, None
    try:
        with open(ev_path, encoding="utf-8") as f:
            ev = json.load(f)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {ev_path} is damaged ({type(e).__name__}); run python eval.py "
                         f"--out_dir={folder} again")
    if not isinstance(ev, dict):
        raise SystemExit(f"error: {ev_path} is not eval.py's output; run eval.py again")
    if "per_depth" in ev and "halting" not in ev:
        raise SystemExit(f"error: {folder}: eval.json is from an older eval.py; run "
                         f"python eval.py --out_dir={folder} again")
    return log, ev if "halting" in ev else None


def table(runs, policy, unit):
    print(f"{'run':<24} {'condition':<46} {'||h_K||':>9} {'PPL':>7}  {'mean loops':>10}  "
          f"PPL at k = 1..K")
    rows = []
    label = labels(runs)
    for folder, (log, ev) in runs.items():
        last = log[-1]
        if ev:
            ppl_k = ev["per_depth"]["ppl"][:ev["n_loops"]]
            loops = ev["halting"][unit][policy]["mean_loops"]
        else:
            ppl_k = [math.exp(c) for c in last["val_loop_ce"]]
            loops = float("nan")
        cond = label[folder]
        name = os.path.basename(folder.rstrip("/"))
        print(f"{name:<24} {cond:<46} {last['hidden_norm'][-1]:9.4g} {ppl_k[-1]:7.3f}  "
              f"{loops:10.2f}  " + " ".join(f"{p:.3f}" for p in ppl_k))
        rows.append({"run": name, "condition": cond, "hidden_norm_K": last["hidden_norm"][-1],
                     "ppl": ppl_k[-1], "mean_loops": loops, "ppl_per_depth": ppl_k})
    return rows


def hint(ax, text):
    """An empty panel says which command fills it."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.35", wrap=True,
            transform=ax.transAxes)


def plot(runs, out):
    """The figure: training norms, per-loop norms and their spread; PPL per depth, adaptive
    exit, scale sensitivity; Lemma 2's two series and the compute-quality frontier. The panels
    of the bottom two rows read eval.json, and say what to run when no run has it."""
    fig, ax = plt.subplots(3, 3, figsize=(18, 13))
    label = labels(runs)
    folder = next(iter(runs))
    need = {}  # panel -> the eval.py command that fills it
    for folder, (log, ev) in runs.items():
        ev = ev or {}
        iters = [e["iter"] for e in log]
        line = ax[0, 0].plot(iters, [e["hidden_norm"][-1] for e in log], label=label[folder])[0]
        c = line.get_color()
        norms = log[-1]["hidden_norm"]
        ax[0, 1].plot(range(1, len(norms) + 1), norms, "o-", color=c)
        if "variable_depth" in ev:  # ||h_K'|| of runs of K' = 1..3K loops
            v = ev["variable_depth"]
            ax[0, 1].plot(v["k"], v["hidden_norm"], ":", color=c)
        if "per_depth" in ev:
            K = ev["n_loops"]
            ax[1, 0].plot(ev["per_depth"]["k"], ev["per_depth"]["ppl"], "o-", color=c,
                          markevery=[K - 1])
            a = ev["adaptive"]
            cal = ev["halting"][a["exit_unit"]][a["policy"]]
            ax[1, 1].plot(a["mean_loops"], a["ppl"], ".-", color=c)
            ax[1, 1].plot([cal["mean_loops"]], [cal["ppl"]], "*", color=c, markersize=12)
        else:
            ppl = [math.exp(x) for x in log[-1]["val_loop_ce"]]
            ax[1, 0].plot(range(1, len(ppl) + 1), ppl, "o-", color=c)
            need[(1, 1)] = f"python eval.py --out_dir={folder}"
        if "variable_depth" in ev:
            v = ev["variable_depth"]
            ax[1, 0].plot(v["k"], v["ppl"], ":", color=c)
        panels = (("spread", (0, 2), "spread"), ("scale", (1, 2), "scale"),
                  ("lemma2", (2, 0), "lemma2"), ("lemma2", (2, 1), "lemma2"),
                  ("frontier", (2, 2), "speed"))
        for key, where, run in panels:
            if key not in ev:
                need.setdefault(where, f"python eval.py --out_dir={folder} --run={run}")
        if "spread" in ev:
            ax[0, 2].stairs(ev["spread"]["hist_counts"], ev["spread"]["hist_edges"], color=c)
        if "scale" in ev:
            ppl = [math.exp(x) for x in ev["scale"]["ce"]]
            ax[1, 2].plot(ev["scale"]["alpha"], ppl, "o-", color=c)
        if "lemma2" in ev:
            lem = ev["lemma2"]
            steps = range(1, lem["n_loops"])
            ax[2, 0].plot(steps, lem["radial_increment"], ".-", color=c)
            ax[2, 1].plot(steps, lem["angular_step_x_s"], ".-", color=c)
        if "frontier" in ev:
            f = ev["frontier"]
            ax[2, 2].plot(f["tokens_per_s"], f["ppl"], "o-", color=c)
            for k, x, y in zip(f["k"], f["tokens_per_s"], f["ppl"]):
                ax[2, 2].annotate(f"k={k}", (x, y), textcoords="offset points",
                                  xytext=(4, 4), fontsize=7, color=c)
    for (i, j), command in need.items():
        if not ax[i, j].has_data():
            hint(ax[i, j], f"no data yet; fill it with\n{command}")
    for a in (ax[1, 0], ax[1, 1], ax[2, 2]):  # PPL over orders of magnitude (an untrained exit)
        ys = [y for line in a.get_lines() for y in line.get_ydata() if y > 0]
        if ys and max(ys) > 3 * min(ys):
            a.set_yscale("log")
    ax[0, 0].set(yscale="log", xlabel="iteration", ylabel="||h_K|| (final loop)",
                 title="final hidden norm in training")
    ax[0, 1].set(yscale="log", xlabel="loop k", ylabel="||h_k||",
                 title="hidden norm per loop, end of training (dotted: runs of 1..3K loops)")
    ax[0, 2].set(xscale="log", xlabel="per-token ||h_K||", ylabel="tokens",
                 title="spread of the final norm over tokens")
    ax[1, 0].set(xlabel="exit depth k (big dot: trained K)", ylabel="val PPL",
                 title="PPL at each exit depth (dotted: a run of k loops, its own rule)")
    policies = sorted({ev["adaptive"]["policy"] for _, ev in runs.values()
                       if ev and "adaptive" in ev})
    sweep = f"adaptive exit ({', '.join(policies)})" if policies else "adaptive exit"
    ax[1, 1].set(xlabel="mean loops used", ylabel="held-out val PPL",
                 title=f"{sweep}; star: calibrated halting")
    ax[1, 2].set(xscale="log", yscale="log", xlabel="alpha", ylabel="val PPL at loop K",
                 title="readout of alpha * h_K (scale sensitivity)")
    ax[2, 0].set(xlabel="loop k (30 loops, far past K)", ylabel="a_k = <u_k, h_k+1 - h_k>",
                 title="Lemma 2: radial increment (about constant)")
    ax[2, 1].set(xlabel="loop k", ylabel="||u_k+1 - u_k|| * s_k",
                 title="Lemma 2: angular step x RMS (about constant)")
    ax[2, 2].set(xscale="log", xlabel="tokens/s of a full forward at depth k",
                 ylabel="val PPL at exit k", title="compute-quality frontier")
    ax[0, 0].legend(fontsize=8)
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_depth_map(runs, out, columns=64):
    """One row per run: its passage on a character grid, each token's characters shaded by the
    loop the token exits at (light: early, dark: late)."""
    maps = {f: ev["depth_map"] for f, (_, ev) in runs.items() if ev and ev.get("depth_map")}
    if not maps:
        raise SystemExit("error: --depth_map needs eval.json from eval.py (--run=depth or all) "
                         "in at least one run")
    layouts = {f: layout(m, columns) for f, m in maps.items()}
    rows = [1 + max(r for r, _, _, _ in cells) for cells in layouts.values()]
    height = sum(0.26 * r + 0.6 for r in rows)
    fig, axes = plt.subplots(len(maps), 1, figsize=(0.16 * columns, height), squeeze=False,
                             gridspec_kw={"height_ratios": rows})
    cmap = plt.get_cmap("YlOrRd")
    label = labels(runs)

    def shade(k, K):  # light for loop 1, dark for loop K
        return cmap(0.1 + 0.85 * (k - 1) / max(1, K - 1))
    for ax, (folder, m), n_rows in zip(axes[:, 0], maps.items(), rows):
        K = m["n_loops"]
        for r, c, ch, k in layouts[folder]:
            ax.add_patch(plt.Rectangle((c, -r - 1), 1, 1, color=shade(k, K)))
            ax.text(c + 0.5, -r - 0.5, ch, ha="center", va="center", fontsize=7,
                    family="monospace", color="white" if k > (K + 1) // 2 else "black")
        mean = sum(m["exit_loop"]) / len(m["exit_loop"])
        ax.set_title(f"{label[folder]}: mean exit loop "
                     f"{mean:.2f} of {K} ({m['policy']}, per {m['exit_unit']}, calibrated)",
                     fontsize=9, loc="left")
        ax.set_xlim(0, columns)
        ax.set_ylim(-n_rows, 0)
        ax.axis("off")
    K = max(m["n_loops"] for m in maps.values())
    handles = [plt.Rectangle((0, 0), 1, 1, color=shade(k, K)) for k in range(1, K + 1)]
    fig.legend(handles, [f"exit at loop {k}" for k in range(1, K + 1)], loc="lower center",
               ncol=K, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def layout(m, columns):
    """(row, column, character, exit loop) for every character of the passage."""
    tokens = m["tokens"] or [str(i) + " " for i in m["ids"]]
    cells, r, c = [], 0, 0
    for token, k in zip(tokens, m["exit_loop"]):
        for ch in token:
            if ch == "\n":
                cells.append((r, c, "\u21b5", k))  # show the newline, then wrap
                r, c = r + 1, 0
                continue
            if c >= columns:
                r, c = r + 1, 0
            cells.append((r, c, ch, k))
            c += 1
    return cells


def default_out(folders):
    """norms_<run>+<run>.png in the runs' common folder: named after what it draws, so that a
    plot of other runs never replaces it (a long list of names is cut and hashed)."""
    paths = [os.path.abspath(f.rstrip("/")) for f in folders]
    parent = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = "+".join(os.path.basename(p) for p in paths)
    if len(names) > 80:
        names = names[:60] + "-" + hashlib.sha1(names.encode()).hexdigest()[:8]
    out = os.path.join(parent, f"norms_{names}.png")
    return os.path.relpath(out) if out.startswith(os.getcwd() + os.sep) else out


def main(argv=None):
    cfg, _ = parse("plot_norms.py", OPTIONS, argv, __doc__,
                   positional=("runs", "train.py out_dir folders"))
    for path, flag in ((cfg.out, "--out"), (cfg.depth_map, "--depth_map")):
        if path:  # checked before the work, not when the figure is saved
            writable_parent(path, flag)
    out = cfg.out or default_out(cfg.runs)
    writable_parent(out, "--out")
    runs = {folder: load_run(folder) for folder in cfg.runs}
    rows = table(runs, cfg.policy, cfg.exit_unit)
    plot(runs, out)
    print(f"wrote {out}")
    if cfg.depth_map:
        plot_depth_map(runs, cfg.depth_map)
        print(f"wrote {cfg.depth_map}")
    return rows


if __name__ == "__main__":
    main()
