"""
Measure training and generation speed and memory of the looped model, all in one run.

  python bench.py                                   # CPU: GPT-2 vocab, K=4, seq 256 (~2 min)
  python bench.py --preset=44m --peak_tflops=989    # a GPU: the paper's 44M model, bf16 + compile

Training cases (forward + backward + AdamW step, median over timed steps after warm-up):
  terminal     the looped model, loss on the last loop only
  dense        the same with dense per-loop loss (memory-lean chunked readout CE for loops < K)
  dense_plain  dense per-loop loss through plain autograd (K logits tensors kept for backward)
  reference    a non-looped model of the same compute: n_layer * K layers, applied once
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU each case runs in a fresh
subprocess, resets its peak RSS (VmHWM) just before the first step and reports that peak minus
the RSS at that moment, i.e. what the steps themselves added (activations, gradients, optimizer
state), with no other case's memory in the same process.
MFU: model FLOPs per token (model.flops_per_token) x tokens/s over the peak: on CPU the peak is
this machine's fp32 matmul throughput, measured in the same run; on CUDA --peak_tflops, or a known
GPU's bf16 dense peak. Generation: tokens/s of sampling with the KV cache against full
recompute, from a 128-token prompt to a 256-token context.
"""

import json
import statistics
import subprocess
import sys
import time

import torch

from configurator import parse
from model import LoopedGPT, LoopedGPTConfig

PRESETS = {  # n_layer, n_head, n_embd, batch_size
    "cpu": (2, 4, 128, 8),
    "44m": (8, 8, 512, 64),
    "129m": (12, 12, 768, 32),
}
KNOWN_PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "A10": 125, "4090": 165}

OPTIONS = {
    "preset": ("cpu", "model size: cpu | 44m | 129m (the paper's settings)"),
    "vocab": ("gpt2", "gpt2 (50,257 tokens) | char (69 tokens, Shakespeare)"),
    "n_loops": (4, "K"),
    "block_size": (256, "sequence length"),
    "batch_size": (0, "sequences per step (0 = the preset's)"),
    "steps": (5, "timed training steps per case"),
    "warmup": (1, "untimed steps per case first"),
    "cases": ("terminal,dense,dense_plain,reference", "training cases to run, comma-separated"),
    "gen_tokens": (128, "tokens generated in the generation benchmark (0 skips it)"),
    "device": ("auto", "auto | cpu | cuda"),
    "dtype": ("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"),
    "compile": (False, "torch.compile the model (CUDA)"),
    "peak_tflops": (0.0, "the device's peak TFLOP/s for MFU on CUDA (0 = look up the GPU's name)"),
    "json": ("", "also write the results to this JSON file"),
    "one_case": ("", "internal: run a single case and print its result as JSON"),
}


def model_config(cfg, case):
    n_layer, n_head, n_embd, _ = PRESETS[cfg.preset]
    vocab = 50257 if cfg.vocab == "gpt2" else 69
    if case == "reference":  # same compute, no loop: all n_layer * K layers applied once
        n_layer, n_loops = n_layer * cfg.n_loops, 1
    else:
        n_loops = cfg.n_loops
    return LoopedGPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, n_loops=n_loops,
                           supervision="terminal" if case == "terminal" else "per_loop")


def rss_bytes(field="VmRSS"):
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, from /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs (no-op where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(cfg, case, device, dtype):
    torch.manual_seed(0)
    model = LoopedGPT(model_config(cfg, case)).to(device)
    model.chunked_ce = case != "dense_plain"  # dense_plain: K logits tensors through plain autograd
    opt = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), device)
    step_model = torch.compile(model) if cfg.compile else model
    B = cfg.batch_size or PRESETS[cfg.preset][3]
    x = torch.randint(model.config.vocab_size, (B, cfg.block_size), device=device)
    y = torch.randint(model.config.vocab_size, (B, cfg.block_size), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss0 = rss_bytes()
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(cfg.warmup + cfg.steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            _, loss, _ = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_bytes("VmHWM") - rss0
    return {"case": case, "step_s": dt, "tokens_per_sec": B * cfg.block_size / dt, "peak_mem_bytes": peak,
            "flops_per_token": model.flops_per_token(), "params": model.get_num_params()}


def cpu_matmul_peak(n=2048, reps=5):
    """This machine's fp32 matmul throughput (FLOP/s): the best of a few n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_generation(cfg, device):
    torch.manual_seed(0)
    model = LoopedGPT(model_config(cfg, "dense")).to(device).eval()
    prompt = torch.randint(model.config.vocab_size, (1, cfg.block_size - cfg.gen_tokens), device=device)
    out = {}
    for use_cache in (True, False):
        t = _timed(lambda c=use_cache: model.generate(prompt, cfg.gen_tokens, temperature=1.0, top_k=50, use_cache=c))
        out["cached" if use_cache else "recompute"] = cfg.gen_tokens / t
    return out


def main(argv=None):
    cfg, _ = parse(OPTIONS, argv, __doc__)
    if cfg.preset not in PRESETS or cfg.vocab not in ("gpt2", "char"):
        sys.exit(f"error: --preset must be one of {' | '.join(PRESETS)} and --vocab gpt2 | char")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = ("bfloat16" if device == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    if cfg.one_case:  # child process: one case, one JSON line
        print(json.dumps(run_case(cfg, cfg.one_case, device, dtype)))
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    results = []
    for case in [c for c in cfg.cases.split(",") if c]:
        if device == "cuda":
            r = run_case(cfg, case, device, dtype)
        else:  # a fresh process per case, so its peak RSS is its own
            p = subprocess.run([sys.executable, __file__, *argv, f"--one_case={case}"], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"error: case {case} failed:\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{case:<12} {r['tokens_per_sec']:>10,.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  "
              f"peak mem {r['peak_mem_bytes'] / 2**20:8.1f} MiB", flush=True)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = cfg.peak_tflops or next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), 0)
        peak_flops, peak_src = peak * 1e12, f"{name}, {peak} TFLOP/s" if peak else "unknown GPU: pass --peak_tflops"
    else:
        peak_flops = cpu_matmul_peak()
        peak_src = f"measured fp32 matmul peak of this CPU, {peak_flops / 1e9:.1f} GFLOP/s"
    for r in results:
        r["mfu"] = r["flops_per_token"] * r["tokens_per_sec"] / peak_flops if peak_flops else None
    by = {r["case"]: r for r in results}
    print(f"MFU against {peak_src}: " + ", ".join(
        f"{r['case']} {r['mfu']:.1%}" for r in results if r["mfu"] is not None))
    summary = {"results": results, "peak_flops": peak_flops, "device": device, "dtype": dtype,
               "config": vars(cfg)}
    if "terminal" in by:
        t = by["terminal"]
        for case in ("dense", "dense_plain", "reference"):
            if case in by:
                r = by[case]
                print(f"{case} / terminal: time x{r['step_s'] / t['step_s']:.2f}, "
                      f"peak memory x{r['peak_mem_bytes'] / t['peak_mem_bytes']:.2f}")
        # the readout's share of a terminal step's FLOPs, and what a dense step adds in theory
        m = LoopedGPT(model_config(cfg, "terminal"))
        share = m.flops_per_token(n_readouts=1)
        dense_extra = m.flops_per_token(n_readouts=cfg.n_loops) / share
        print(f"FLOP model: a dense step does x{dense_extra:.2f} the FLOPs of a terminal step "
              f"(+33% more on the chunked loops for the logits recomputed in backward)")
        summary["dense_flop_ratio"] = dense_extra
    if cfg.gen_tokens:
        g = bench_generation(cfg, device)
        print(f"generation, {cfg.block_size - cfg.gen_tokens}->{cfg.block_size} tokens: cached "
              f"{g['cached']:,.1f} tok/s, recompute {g['recompute']:,.1f} tok/s, x{g['cached'] / g['recompute']:.1f}")
        summary["generation"] = g
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
