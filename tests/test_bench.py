"""bench.py and gpu_check.sh."""

import json
import math
import os
import subprocess

import pytest
import torch

from conftest import ROOT, run


def test_bench_runs_every_case_and_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    p = run("bench.py", "--block_size=32", "--batch_size=2", "--n_loops=2", "--steps=1",
            "--warmup=0", "--rounds=1", "--gen_tokens=8", f"--json={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    for words in ("vocab gpt2", "vocab char", "terminal step time / flat step time",
                  "dense executed FLOP/s / terminal executed FLOP/s", "nanogpt model FLOP/s",
                  "generation (gpt2), 24->32 tokens: cached"):
        assert words in p.stdout, p.stdout
    res = json.loads(out.read_text())
    cases = {(r["case"], r["vocab"]) for r in res["results"]}
    assert cases == {(c, v) for c in ("terminal", "dense", "dense_plain", "flat", "nanogpt")
                     for v in ("gpt2", "char")}
    by = {(r["case"], r["vocab"]): r for r in res["results"]}
    for r in res["results"]:
        assert r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1
        ref = by[("nanogpt", r["vocab"])]
        assert abs(r["vs_nanogpt"] * ref["model_flops_per_sec"] - r["model_flops_per_sec"]) \
            < 1e-6 * r["model_flops_per_sec"]
    # executed FLOPs add one readout matmul per chunked loop (gpt2 dense), nothing elsewhere
    V, C = 50257, 128
    dense = by[("dense", "gpt2")]
    assert dense["executed_flops_per_token"] - dense["flops_per_token"] == 2 * V * C * (2 - 1)
    assert by[("dense", "char")]["executed_flops_per_token"] == \
        by[("dense", "char")]["flops_per_token"]
    ratios = res["ratios"]["gpt2"]
    t, f = by[("terminal", "gpt2")], by[("flat", "gpt2")]
    assert ratios["terminal step time / flat step time"] == t["step_s"] / f["step_s"]


def test_plain_gpt_reference_counts_flops_like_nanogpt():
    from bench import PlainGPT
    m = PlainGPT(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=8)
    n = sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel()  # nanoGPT's N
    assert m.flops_per_token() == 6 * n + 12 * 3 * 8 * 16
    x = torch.randint(100, (2, 16))
    _, loss, _ = m(x, x)
    assert abs(loss.item() - math.log(100)) < 0.1  # near-uniform at init, as a GPT starts


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check")
def test_gpu_check_stops_cleanly_without_a_gpu():
    p = subprocess.run(["bash", os.path.join(ROOT, "gpu_check.sh")], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode != 0 and "torch sees no CUDA device" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
