"""eval.py (per-depth PPL, adaptive exit, calibrated halting), plot_norms.py and sample.py."""

import json
import math
import os

import torch

from conftest import run
from eval import adaptive_exit, calibrate, collect, evaluate, load_model
from train import eval_seed, get_batch, load_data


def val_batches(out_dir, data_dir, n=3):
    model, ckpt = load_model(out_dir, "cpu")
    data, _ = load_data(data_dir, ckpt["config"]["dataset"], ckpt["config"]["block_size"])
    return model, [get_batch(data["val"], 4, ckpt["config"]["block_size"], eval_seed(i, "val")) for i in range(n)]


def test_per_depth_at_K_equals_models_own_val_ce(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir)
    out = evaluate(model, batches, n_thresholds=5)
    with torch.no_grad():
        own = sum(model(x, y)[1].item() for x, y in batches) / len(batches)  # per_loop: mean of K CEs
        last = sum(model(x, y)[2]["loop_ce"][-1].item() for x, y in batches) / len(batches)
    K = model.config.n_loops
    assert len(out["per_depth"]["ppl"]) == 2 * K
    assert abs(out["per_depth"]["ce"][K - 1] - last) < 1e-5
    assert abs(sum(out["per_depth"]["ce"][:K]) / K - own) < 1e-5


def test_adaptive_exit_extremes(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["scale_visible"], data_dir)
    K = model.config.n_loops
    ce, scores = collect(model, batches, K)
    full = math.exp(ce[K - 1].mean().item())
    loops, ppl = adaptive_exit(ce, scores["max_prob"], "max_prob", 1.01, K)  # nobody passes
    assert loops == K and abs(ppl - full) < 1e-9
    loops, ppl = adaptive_exit(ce, scores["entropy"], "entropy", 1e9, K)  # everybody passes
    assert loops == 1 and abs(ppl - math.exp(ce[0].mean().item())) < 1e-9


def test_calibrated_halting_lands_near_target(tiny_runs, data_dir):
    model, batches = val_batches(tiny_runs["rmsnorm"], data_dir)
    K = model.config.n_loops
    ce, scores = collect(model, batches, K)
    for policy in ("max_prob", "logit_margin", "entropy"):
        cal = calibrate(ce, scores[policy], policy, K, 1.01)
        assert cal["ratio"] <= 1.01 + 1e-9
        early = math.exp(ce[0].mean().item()) / math.exp(ce[K - 1].mean().item())
        if early > 1.02:  # exiting everyone at loop 1 is too costly: the search must stop near 1.01
            assert cal["ratio"] > 1.0, cal
        assert K >= cal["mean_loops"] >= 1


def test_eval_cli_writes_json(tiny_runs, data_dir):
    p = run("eval.py", f"--out_dir={tiny_runs['rmsnorm']}", f"--data_dir={data_dir}", "--eval_iters=2")
    assert p.returncode == 0, p.stderr
    ev = json.load(open(os.path.join(tiny_runs["rmsnorm"], "eval.json")))
    assert set(ev["calibrated"]) == {"max_prob", "logit_margin", "entropy"}
    assert "calibrated halting (max_prob)" in p.stdout


def test_plot_norms_png_and_table(tiny_runs, tmp_path):
    out = tmp_path / "fig.png"
    p = run("plot_norms.py", str(tiny_runs["rmsnorm"]), str(tiny_runs["scale_visible"]), f"--out={out}")
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert "rmsnorm, per-loop" in p.stdout and "scale_visible, per-loop" in p.stdout


def test_plot_norms_bad_folders(tmp_path):
    p = run("plot_norms.py", str(tmp_path))
    assert p.returncode != 0 and "no log.jsonl" in p.stderr and str(tmp_path) in p.stderr
    (tmp_path / "log.jsonl").write_text("")
    p = run("plot_norms.py", str(tmp_path))
    assert p.returncode != 0 and "empty" in p.stderr
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 0, "val_loss": 3.0}) + "\n")
    p = run("plot_norms.py", str(tmp_path))
    assert p.returncode != 0 and "another format" in p.stderr and "Traceback" not in p.stderr


def test_sample_fixed_and_adaptive_depth(tiny_runs):
    out = str(tiny_runs["rmsnorm"])
    p = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=40", "--num_samples=1",
            "--n_loops=2")
    assert p.returncode == 0, p.stderr
    text = p.stdout.split("---------------")[0].rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40
    assert "mean loops per generated token: 2.00 of 2" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=30", "--num_samples=1",
            "--exit_policy=entropy", "--exit_threshold=100")  # every token exits at loop 1
    assert p.returncode == 0 and "mean loops per generated token: 1.00 of 3" in p.stdout


def test_sample_bad_inputs(tiny_runs, tmp_path):
    p = run("sample.py", f"--out_dir={tiny_runs['rmsnorm']}", "--start=\u2603 snowman")
    assert p.returncode != 0 and "cannot be encoded" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={tmp_path}")
    assert p.returncode != 0 and "no checkpoint" in p.stderr


def test_kv_cache_matches_recompute_and_adaptive_runs(tiny_runs):
    model, _ = load_model(tiny_runs["scale_visible"], "cpu")
    model = model.double()
    prompt = torch.randint(model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    for k in (1, model.config.n_loops):
        a = model.generate(prompt, 20, temperature=0, n_loops=k, use_cache=True)
        b = model.generate(prompt, 20, temperature=0, n_loops=k, use_cache=False)
        assert torch.equal(a, b)
    out, loops = model.generate(prompt, 20, temperature=0, exit_policy="max_prob", exit_threshold=0.2,
                                return_loops=True)
    assert out.shape == (2, 25) and loops.shape == (2, 20)
    assert ((1 <= loops) & (loops <= model.config.n_loops)).all()


# ---- the paper's diagnostics -----------------------------------------------------------------

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
    assert clamped_loop_ce(model, x, y, ref_norms=own) == plain
    clamped = clamped_loop_ce(model, x, y)  # loop-1 reference: the state's growth removed
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
    out = tiny_runs["scale_visible"]
    for name in ("decomposition", "clamp", "scale", "spread"):
        p = run("eval.py", f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_iters=1", f"--run={name}")
        assert p.returncode == 0, p.stderr
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert {"decomposition", "clamp", "scale", "spread"} <= ev.keys()


def test_seven_condition_table(data_dir, tmp_path):
    from conftest import TINY
    from eval import main
    preset = tmp_path / "tiny.py"
    preset.write_text("dataset = 'tiny_char'\n")
    rows = main([f"--out_dir={tmp_path / 't1'}", f"--data_dir={data_dir}", "--run=table1", "--seeds=2",
                 f"--preset={preset}", "--train_args=" + " ".join(TINY + ["--max_iters=4", "--eval_interval=4"])])
    assert len(rows) == 7 and all(r["seeds"] == 2 for r in rows)
    assert len({r["condition"] for r in rows}) == 7
    assert all(math.isfinite(r["ppl"]["mean"]) and r["hidden_norm_K"]["std"] >= 0 for r in rows)
