"""
Measure training and generation speed and memory of the looped model, all in one run.

  python bench.py                                        # CPU: both vocabularies (~6 min)
  python bench.py --preset=config/paper_44m.py --vocab=gpt2 --compile=True   # a GPU

Sizes come from train.py's defaults (n_layer 2, n_head 4, n_embd 128, batch 8) or a --preset
file, with the bench's own K=4 and sequence 256. For each vocabulary (GPT-2's 50,257 tokens and
Shakespeare's 69 characters) it times training steps (forward + backward + AdamW, fastest after
warm-up) of:
  terminal     the looped model, loss on the last loop only
  dense        the same with dense per-loop loss (readout_ce auto: chunked at GPT-2's vocab)
  dense_plain  dense per-loop loss through plain autograd (K logits tensors kept for backward)
  flat         a non-looped LoopedGPT of the same compute: n_layer * K layers, applied once
  nanogpt      a plain GPT written the way nanoGPT writes it (LayerNorm, GELU MLP, same width,
               heads, context and batch, depth n_layer * K): the reference for speed
and prints each case's achieved model FLOP/s relative to nanogpt, and the other ratios below.
Step time: the fastest timed step, over --rounds rounds that run every case in turn, so that
other work on the machine and slow drifts touch all cases alike.
Model FLOPs per token: 6 per weight use plus attention, as in nanoGPT and PaLM. Executed
FLOPs also count the logits that the chunked CE recomputes in backward.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU each case runs in a fresh
subprocess, resets its peak RSS (VmHWM) just before the first step and reports that peak minus
the RSS at that moment: what the steps themselves added (activations, gradients, optimizer).
MFU is against this CPU's measured fp32 matmul throughput, or the GPU's bf16 peak.
"""

import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import DEVICE, at_least, check, device_or_exit, error, parse, read_preset
from device import keep_freed_memory, pick_dtype
from model import LoopedGPT, LoopedGPTConfig
from sample import generate
from train import OPTIONS as TRAIN_OPTIONS

CASES = ("terminal", "dense", "dense_plain", "flat", "nanogpt")
VOCABS = {"gpt2": 50257, "char": 69}
KNOWN_PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "A10": 125, "4090": 165}


def subset(names):
    return check(f"comma-separated, from: {', '.join(names)}",
                 lambda v: v != "" and set(v.split(",")) <= set(names), ["", "nope"])


OPTIONS = {
    "preset": ("", "a train.py preset for the sizes ('' = train.py's defaults)",
               check("'' or a .py preset file that exists",
                     lambda v: v == "" or (v.endswith(".py") and os.path.isfile(v)),
                     ["config/nope.py"])),
    "vocab": ("gpt2,char", "vocabularies to run", subset(VOCABS)),
    "n_loops": (4, "K", at_least(1)),
    "block_size": (256, "sequence length", at_least(2)),
    "batch_size": (0, "sequences per step (0 = the preset's)", at_least(0)),
    "steps": (5, "timed training steps per case and round", at_least(1)),
    "rounds": (2, "rounds over all cases; each case keeps its best round", at_least(1)),
    "warmup": (1, "untimed steps per case first", at_least(0)),
    "cases": (",".join(CASES), "training cases to run", subset(CASES)),
    "gen_tokens": (128, "tokens generated in the generation benchmark (0 skips it)",
                   at_least(0)),
    "device": ("auto", "auto: cuda, then mps, then cpu", DEVICE),
    "dtype": ("auto", "auto: bfloat16 on GPUs that have it, else float32",
              check("auto | float32 | bfloat16", lambda v: v in ("auto", "float32", "bfloat16"),
                    ["float8"])),
    "compile": (False, "torch.compile the model", None),
    "peak_tflops": (0.0, "the GPU's peak TFLOP/s for MFU (0 = look up the GPU's name)",
                    at_least(0.0)),
    "json": ("", "also write the results to this JSON file",
             check("'' or a path ending in .json", lambda v: v == "" or v.endswith(".json"),
                   ["out.txt"])),
    "one_case": ("", "internal: run one case (case@vocab) and print its result as JSON",
                 check("'' or case@vocab", lambda v: v == "" or (
                     v.count("@") == 1 and v.split("@")[0] in CASES
                     and v.split("@")[1] in VOCABS), ["dense@klingon"])),
}


def together(cfg, explicit):
    if cfg.gen_tokens >= cfg.block_size:
        return (f"--gen_tokens={cfg.gen_tokens} must be below --block_size={cfg.block_size} "
                f"(the prompt fills the rest of the context)")
    return None


# ---- a plain GPT, written the way nanoGPT writes it: the speed reference --------------------

class PlainBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(PlainBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss, {}

    def flops_per_token(self):
        """nanoGPT's count: 6 per parameter (positions excluded) plus attention, as in PaLM."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        attention = 12 * len(self.blocks) * self.wte.weight.size(1) * self.block_size
        return 6 * n + attention


# ---- one case -------------------------------------------------------------------------------

def sizes(cfg):
    """n_layer, n_head, n_embd, batch_size from train.py's defaults or the preset."""
    values = {k: spec[0] for k, spec in TRAIN_OPTIONS.items()}
    if cfg.preset:
        values.update(read_preset(cfg.preset, TRAIN_OPTIONS))
    return values["n_layer"], values["n_head"], values["n_embd"], values["batch_size"]


def build(cfg, case, vocab):
    n_layer, n_head, n_embd, _ = sizes(cfg)
    V = VOCABS[vocab]
    if case == "nanogpt":
        return PlainGPT(V, cfg.block_size, n_layer * cfg.n_loops, n_head, n_embd)
    n_loops = cfg.n_loops
    if case == "flat":  # same compute, no loop: all n_layer * K layers applied once
        n_layer, n_loops = n_layer * cfg.n_loops, 1
    return LoopedGPT(LoopedGPTConfig(
        vocab_size=V, block_size=cfg.block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        n_loops=n_loops, supervision="terminal" if case == "terminal" else "per_loop",
        readout_ce="plain" if case == "dense_plain" else "auto"))


def executed_flops_per_token(model):
    """Model FLOPs plus the forward readout matmul that the chunked CE repeats in backward."""
    flops = model.flops_per_token()
    if isinstance(model, LoopedGPT) and model.chunked_ce and model.config.supervision == "per_loop":
        flops += 2 * model.config.vocab_size * model.config.n_embd * (model.config.n_loops - 1)
    return flops


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


def run_case(cfg, case, vocab, device, dtype):
    torch.manual_seed(0)
    model = build(cfg, case, vocab).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-4,
                            fused=device.startswith("cuda"))
    step_model = torch.compile(model) if cfg.compile else model
    B = cfg.batch_size or sizes(cfg)[3]
    V = VOCABS[vocab]
    x = torch.randint(V, (B, cfg.block_size), device=device)
    y = torch.randint(V, (B, cfg.block_size), device=device)
    kind = device.split(":")[0]
    autocast = torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    kwargs = {} if case == "nanogpt" else {"all_exits": False}  # as train.py's step
    rss0 = rss_bytes()
    reset_peak_rss()
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(cfg.warmup + cfg.steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            _, loss, _ = step_model(x, y, **kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = min(times)  # the least disturbed step
    peak = torch.cuda.max_memory_allocated() if kind == "cuda" else rss_bytes("VmHWM") - rss0
    return {"case": case, "vocab": vocab, "step_s": dt,
            "tokens_per_sec": B * cfg.block_size / dt, "peak_mem_bytes": peak,
            "flops_per_token": model.flops_per_token(),
            "executed_flops_per_token": executed_flops_per_token(model)}


def run_one(cfg, case, vocab, device, dtype, argv):
    """One case; on CPU in a fresh process, so that its peak RSS is its own."""
    if not device.startswith("cpu"):
        return run_case(cfg, case, vocab, device, dtype)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                        f"--one_case={case}@{vocab}"], capture_output=True, text=True)
    if p.returncode:
        error(f"case {case}@{vocab} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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


def bench_generation(cfg, vocab, device):
    torch.manual_seed(0)
    model = build(cfg, "dense", vocab).to(device).eval()
    V = model.config.vocab_size
    prompt = torch.randint(V, (1, cfg.block_size - cfg.gen_tokens), device=device)
    out = {}
    for use_cache in (True, False):
        seconds = _timed(lambda: generate(model, prompt, cfg.gen_tokens, temperature=1.0,
                                          top_k=50, use_cache=use_cache))
        out["cached" if use_cache else "recompute"] = cfg.gen_tokens / seconds
    return out


# ---- the report -----------------------------------------------------------------------------

def report(results, vocab, peak_flops):
    """Print one vocabulary's table and ratios; return the ratios."""
    by = {r["case"]: r for r in results}
    print(f"\nvocab {vocab} ({VOCABS[vocab]:,} tokens)")
    print(f"{'case':<12} {'tok/s':>9} {'step ms':>9} {'peak MiB':>9} {'model GFLOP/s':>14} "
          f"{'MFU':>6} {'vs nanogpt':>11}")
    for r in results:
        r["model_flops_per_sec"] = r["flops_per_token"] * r["tokens_per_sec"]
        r["executed_flops_per_sec"] = r["executed_flops_per_token"] * r["tokens_per_sec"]
        r["mfu"] = r["model_flops_per_sec"] / peak_flops if peak_flops else None
    ref = by.get("nanogpt")
    for r in results:
        rel = r["model_flops_per_sec"] / ref["model_flops_per_sec"] if ref else float("nan")
        r["vs_nanogpt"] = rel
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['case']:<12} {r['tokens_per_sec']:>9,.0f} {r['step_s'] * 1e3:>9.1f} "
              f"{r['peak_mem_bytes'] / 2**20:>9.1f} {r['model_flops_per_sec'] / 1e9:>14.2f} "
              f"{mfu:>6} {rel:>10.2f}x")
    ratios = {}

    def ratio(name, value, target, above):
        ratios[name] = value
        met = value >= target if above else value <= target
        sign = ">=" if above else "<="
        print(f"  {name:<58} x{value:.3f}  (target {sign} {target}: "
              f"{'met' if met else 'NOT met'})")

    t, d, flat = by.get("terminal"), by.get("dense"), by.get("flat")
    if t and flat:
        ratio("terminal step time / flat step time", t["step_s"] / flat["step_s"], 1.05, False)
    if t and d:
        ratio("dense executed FLOP/s / terminal executed FLOP/s",
              d["executed_flops_per_sec"] / t["executed_flops_per_sec"], 0.95, True)
        ratio("dense peak memory / terminal peak memory",
              d["peak_mem_bytes"] / t["peak_mem_bytes"], 1.2, False)
    # at GPT-2's vocabulary the dense step also recomputes logits that model FLOPs do not
    # count: the executed-FLOP/s ratio above is its target there
    for case in ("terminal", "dense") if vocab == "char" else ("terminal",):
        if case in by and ref:
            ratio(f"{case} model FLOP/s / nanogpt model FLOP/s", by[case]["vs_nanogpt"], 1.0,
                  True)
    if "dense_plain" in by and t:
        print(f"  {'dense_plain peak memory / terminal peak memory':<58} "
              f"x{by['dense_plain']['peak_mem_bytes'] / t['peak_mem_bytes']:.3f}")
    return ratios


def main(argv=None):
    cfg, _ = parse("bench.py", OPTIONS, argv, __doc__, together=together)
    device = device_or_exit(cfg.device)
    keep_freed_memory()
    dtype = pick_dtype(device, cfg.dtype)
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.one_case:  # child process: one case, one JSON line
        case, vocab = cfg.one_case.split("@")
        print(json.dumps(run_case(cfg, case, vocab, device, dtype)))
        return None
    argv = sys.argv[1:] if argv is None else list(argv)
    if kind == "cuda":
        name = torch.cuda.get_device_name()
        peak = cfg.peak_tflops or next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), 0)
        peak_flops = peak * 1e12
        peak_src = f"{name}, {peak} TFLOP/s" if peak else "unknown GPU: pass --peak_tflops"
    elif kind == "cpu":
        peak_flops = cpu_matmul_peak()
        peak_src = f"this CPU's measured fp32 matmul peak, {peak_flops / 1e9:.1f} GFLOP/s"
    else:
        peak_flops, peak_src = 0.0, "no known peak for this device"
    n_layer, n_head, n_embd, batch = sizes(cfg)
    print(f"n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}, K {cfg.n_loops}, sequence "
          f"{cfg.block_size}, batch {cfg.batch_size or batch}, {device} {dtype}; MFU against "
          f"{peak_src}")
    summary = {"device": device, "dtype": dtype, "peak_flops": peak_flops, "config": vars(cfg),
               "results": [], "ratios": {}}
    for vocab in cfg.vocab.split(","):
        best = {}
        for _ in range(cfg.rounds):
            for case in cfg.cases.split(","):
                r = run_one(cfg, case, vocab, device, dtype, argv)
                if case not in best or r["step_s"] < best[case]["step_s"]:
                    best[case] = r
        results = list(best.values())
        summary["ratios"][vocab] = report(results, vocab, peak_flops)
        summary["results"] += results
    if cfg.gen_tokens:
        vocab = cfg.vocab.split(",")[0]
        g = bench_generation(cfg, vocab, device)
        print(f"\ngeneration ({vocab}), {cfg.block_size - cfg.gen_tokens}->{cfg.block_size} "
              f"tokens: cached {g['cached']:,.1f} tok/s, recompute {g['recompute']:,.1f} tok/s, "
              f"x{g['cached'] / g['recompute']:.1f}")
        summary["generation"] = g
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(summary, f, indent=1, default=lambda v: None if math.isnan(v) else v)
    return summary


if __name__ == "__main__":
    main()
