"""
Measure training and generation speed and memory of the looped model, all in one run.

  python bench.py                                        # CPU: both vocabularies (~6 min)
  python bench.py --preset=config/paper_44m.py --vocab=gpt2 --compile=True   # a GPU
  python bench.py --ce_sweep=True --vocab=gpt2        # one exit's CE: plain vs each chunk count
  python bench.py --generation=True                   # generation: full depth vs early exit

Sizes come from the --preset file, by default the CPU demo config/cpu.py (n_layer 2, n_head 4,
n_embd 128, batch 8; '' = train.py's own defaults, the paper's 44M model), with the bench's own
K=4 and sequence 256. For each vocabulary (GPT-2's 50,257 tokens and Shakespeare's 69
characters) it times training steps (forward + backward + AdamW, fastest after warm-up) of:
  terminal     the looped model, loss on the last loop only
  dense        the same with dense per-loop loss (readout_ce auto: ReadoutCE at GPT-2's vocab)
  official     dense per-loop loss the way the paper's official code computes it: plain
               autograd, all K [B, T, V] logits and their log-softmax kept for backward
  flat         a non-looped LoopedGPT of the same compute: n_layer * K layers, applied once
  nanogpt      a plain GPT written the way nanoGPT writes it (LayerNorm, GELU MLP, same width,
               heads, context and batch, depth n_layer * K): the reference for speed
and prints each case's achieved model FLOP/s relative to nanogpt, and the other ratios below.
Each step calls the model as train.py's step does: model(X, Y, return_logits=False) in training
mode, so the looped model decodes only the exits its loss trains, each with the lean CE at large
vocabularies (nanogpt returns its logits, as nanoGPT does).
Step time: the fastest timed step, over --rounds rounds that run every case in turn, so that
other work on the machine and slow drifts touch all cases alike. The device is synchronized
before every clock read (CUDA and MPS run asynchronously).
Model FLOPs per token: 6 per weight use plus attention, as in nanoGPT and PaLM (ReadoutCE
recomputes nothing, so these are the FLOPs executed).
Peak memory: what the steps added to the memory in use just before the first step (gradients,
optimizer state, activations). CUDA: torch.cuda.max_memory_allocated. CPU: each case runs in
a fresh subprocess; on Linux its peak RSS (VmHWM, reset just before the first step), elsewhere
the rise of getrusage's peak RSS. MPS has no peak counter: not measured.
MFU is against this CPU's measured fp32 matmul throughput, or the GPU's dense bf16 peak
(device.peak_tflops, by the GPU's exact model; --peak_tflops for one not listed).

--generation=True times sample.generate instead (see bench_early_exit): the preset's model
(its K and block size; 69 characters), random weights or --gen_ckpt's, one CPU thread, prompts
of 32 random tokens and --gen_tokens new ones, at each --gen_batches size: full depth against
adaptive exit (logit_margin, its threshold calibrated to a mean of --gen_loops loops) and
against one loop without an exit test (the most any exit can give), the
variants alternating round by round over --rounds rounds after a warm-up, timed by this
thread's CPU time on a CPU (--gen_clock: other work on a shared machine stretches the wall
clock, and not alike for all variants). It prints tokens/s, mean loops, the speed-up over full
depth (the median of the rounds' paired ratios), the ideal speed-up K / mean loops and the
speed-up's share of it; with --compile=True also the compiled graphs, their compile time (wall
clock) and the tokens after which compiling pays; with --gen_ragged_sweep=True how a ragged
batch compares with a dense one by batch size and mean loops.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import DEVICE, at_least, check, device_or_exit, error, one_of, parse
from configurator import read_preset
from device import autocast, keep_freed_memory, peak_tflops, pick_dtype, synchronize
from model import LoopedGPT, LoopedGPTConfig, ReadoutCE, chunk_rows, matmul_dtype
from rundir import load_checkpoint, model_from_checkpoint, writable_parent
from sample import early_exit_row, generate, paired
from train import OPTIONS as TRAIN_OPTIONS

try:
    import resource  # peak RSS where /proc is not (macOS); Windows has neither
except ImportError:
    resource = None

CASES = ("terminal", "dense", "official", "flat", "nanogpt")
VOCABS = {"gpt2": 50257, "char": 69}
HERE = os.path.dirname(os.path.abspath(__file__))


def subset(names):
    return check(f"comma-separated, from: {', '.join(names)}",
                 lambda v: v != "" and set(v.split(",")) <= set(names), ["", "nope"])


def preset_path(v):
    """A preset as given, else relative to this folder (the default works from any folder);
    None when neither exists."""
    for path in (v, os.path.join(HERE, v)):
        if path.endswith(".py") and os.path.isfile(path):
            return path
    return None


OPTIONS = {
    "preset": ("config/cpu.py", "a train.py preset for the sizes ('' = train.py's defaults: "
                                "the paper's 44M model)",
               check("'' or a .py preset file that exists",
                     lambda v: v == "" or preset_path(v) is not None, ["config/nope.py"])),
    "vocab": ("gpt2,char", "vocabularies to run", subset(VOCABS)),
    "n_loops": (4, "K", at_least(1)),
    "block_size": (256, "sequence length", at_least(2)),
    "batch_size": (0, "sequences per step (0 = the preset's)", at_least(0)),
    "steps": (5, "timed training steps per case and round", at_least(1)),
    "rounds": (2, "rounds over all cases; each case keeps its best round", at_least(1)),
    "warmup": (1, "untimed steps per case first", at_least(0)),
    "cases": (",".join(CASES), "training cases to run", subset(CASES)),
    "gen_tokens": (128, "tokens generated in the generation benchmarks (0 skips the one after "
                        "the training steps)", at_least(0)),
    "device": ("auto", "auto: cuda, then mps, then cpu", DEVICE),
    "dtype": ("auto", "auto: bfloat16 on GPUs that have it, float16 (with a grad scaler) on "
                      "older GPUs, float32 on CPU and MPS, as train.py",
              one_of("auto", "float32", "bfloat16", "float16")),
    "compile": (False, "torch.compile the model", None),
    "peak_tflops": (0.0, "the device's peak TFLOP/s for MFU (0 = the GPU's from its exact name, "
                         "the CPU's measured)", at_least(0.0)),
    "json": ("", "also write the results to this JSON file",
             check("'' or a path ending in .json", lambda v: v == "" or v.endswith(".json"),
                   ["out.txt"])),
    "compile_probe": (False, "instead of timing steps: torch.compile the dense case with each "
                             "readout CE (plain, chunked) and report its graph size and "
                             "compile time", None),
    "profile": (False, "instead of timing steps: profile --steps steps of each case after "
                       "--warmup (torch.profiler) and print its top ops by self time per step",
                None),
    "ce_sweep": (False, "instead of timing steps: time one exit's readout CE (forward + "
                        "backward) at the preset's batch, plain autograd against ReadoutCE at "
                        "1, 2, 4, ... chunks, with each one's peak memory", None),
    "generation": (False, "instead of timing steps: time generation, full depth against "
                          "early exit, and the ideal speed-up K / mean loops (see above)", None),
    "gen_batches": ("1,8", "--generation: batch sizes",
                    check("comma-separated integers >= 1", lambda v: all(
                        b.isdigit() and int(b) >= 1 for b in v.split(",")), ["", "0", "a"])),
    "gen_loops": (5.0, "--generation: early exit's mean loops, which its threshold is calibrated "
                       "to (the CPU demo's scale-controlled runs halt after 4.9-5.4 of 6)",
                  at_least(1.0)),
    "gen_ckpt": ("", "--generation: a ckpt.pt to generate from (default: random weights)",
                 check("'' or an existing file", lambda v: v == "" or os.path.isfile(v),
                       ["/no/such/ckpt.pt"])),
    "gen_ragged_sweep": (False, "--generation: also time a ragged batch against a dense one by "
                                "batch size (1-16) and mean loops (5.5-2)", None),
    "gen_clock": ("auto", "--generation: time by the wall clock, or by the CPU time of this "
                          "thread (auto: CPU time on a CPU, where other work on a shared machine "
                          "would stretch the wall clock; wall on a GPU)",
                  one_of("auto", "wall", "cpu")),
    "one_case": ("", "internal: run one case (case@vocab) and print its result as JSON",
                 check("'' or case@vocab", lambda v: v == "" or (
                     v.count("@") == 1 and v.split("@")[0] in CASES
                     and v.split("@")[1] in VOCABS), ["dense@klingon"])),
}


def together(cfg, explicit):
    modes = [m for m in ("profile", "compile_probe", "ce_sweep", "generation")
             if getattr(cfg, m)]
    if len(modes) > 1:
        return f"--{modes[0]} and --{modes[1]} are two different runs: choose one"
    if not modes and cfg.gen_tokens >= cfg.block_size:  # generation runs with timed steps only
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


# ---- the model of each case ----------------------------------------------------------------

def preset_values(cfg):
    """train.py's options as the preset sets them (train.py's defaults where it does not)."""
    values = {k: spec[0] for k, spec in TRAIN_OPTIONS.items()}
    if cfg.preset:
        values.update(read_preset(preset_path(cfg.preset), TRAIN_OPTIONS))
    return values


def sizes(cfg):
    """n_layer, n_head, n_embd, batch_size from the preset, or train.py's defaults."""
    values = preset_values(cfg)
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
        readout_ce="plain" if case == "official" else "auto"))


# ---- what torch.compile makes of the readout CE ------------------------------------------

def compile_probe(cfg, vocab, device, dtype):
    """Compile one dense training step with each readout CE and report the graphs' size (nodes
    of the forward and backward graphs AOT autograd makes, over all graph breaks) and the
    seconds the first compiled step takes beyond a second one, Inductor's caches off. The chunk
    loop of ReadoutCE is unrolled by the compiler, so its chunk count (at most
    model.COMPILED_CHUNKS under compile) sets the graph size."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.backends.common import aot_autograd
    inductor_config.force_disable_caches = True  # every compile from scratch, none reused
    torch.compile(lambda a: a * 2)(torch.ones(2, device=device))  # the compiler's own start-up
    results = {}
    for ce in ("plain", "chunked"):
        nodes = []

        def count(gm, example_inputs):
            nodes.append(len(gm.graph.nodes))
            return gm
        n_layer, n_head, n_embd, batch = sizes(cfg)
        B = cfg.batch_size or batch
        x = torch.randint(VOCABS[vocab], (B, cfg.block_size), device=device)
        row = {}
        for backend in (aot_autograd(fw_compiler=count, bw_compiler=count), "inductor"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = LoopedGPT(LoopedGPTConfig(
                vocab_size=VOCABS[vocab], block_size=cfg.block_size, n_layer=n_layer,
                n_head=n_head, n_embd=n_embd, n_loops=cfg.n_loops, readout_ce=ce))
            step = torch.compile(model.to(device).train(), backend=backend)
            times = []
            for _ in range(2 if backend == "inductor" else 1):
                synchronize(device)
                t0 = time.perf_counter()
                with autocast(device, dtype):
                    _, loss, _ = step(x, x, return_logits=False)
                loss.backward()
                synchronize(device)
                times.append(time.perf_counter() - t0)
            if backend == "inductor":
                row.update(compile_s=times[0] - times[1], step_s=times[1])
        row.update(graph_nodes=sum(nodes), graphs=len(nodes))
        results[ce] = row
        print(f"readout_ce={ce:<8} {row['graph_nodes']:>6} nodes in {row['graphs']} forward and "
              f"backward graphs; Inductor compile {row['compile_s']:7.1f} s, then "
              f"{row['step_s']:.2f} s a step", flush=True)
    for key in ("graph_nodes", "compile_s"):
        print(f"  chunked / plain {key}: x{results['chunked'][key] / results['plain'][key]:.2f}")
    return results


# ---- one exit's readout CE alone: plain against ReadoutCE at each chunk count ------------

def ce_sweep(cfg, vocab, device, dtype):
    """Fastest forward + backward of one exit's CE (over --rounds rounds of --steps after
    --warmup) and its peak memory: plain autograd, which keeps the [N, V] logits, against
    ReadoutCE at 1, 2, 4, ... chunks. Marks the chunk count chunk_rows picks on this device.
    Plain and the picked count run again with V rounded up to a multiple of 64 (GPT-2's 50,257
    to 50,304, as nanoGPT pads it) where that adds under 1%: GPU matmuls can be slower on rows
    of an odd length."""
    _, _, n_embd, batch = sizes(cfg)
    N = (cfg.batch_size or batch) * cfg.block_size
    V = VOCABS[vocab]
    padded = -(-V // 64) * 64
    torch.manual_seed(0)
    x = torch.randn(N, n_embd, device=device, requires_grad=True)
    w = (0.02 * torch.randn(V, n_embd, device=device)).requires_grad_()
    t = torch.randint(V, (N,), device=device)

    def step(rows, weight):
        x.grad = weight.grad = None
        with autocast(device, dtype):
            if rows is None:
                loss = F.cross_entropy(x @ weight.t(), t)
            else:
                loss = ReadoutCE.apply(x, weight, t, rows, True, matmul_dtype(x))
        loss.backward()

    def label(chunks):
        return f"{chunks} chunk{'s' if chunks > 1 else ''}"
    rows = chunk_rows(N, V, device.split(":")[0])
    picked = -(-N // rows)
    sizes_tried = {-(-N // 2 ** i) for i in range(8) if 2 ** i <= N} | {rows}  # 1..128 chunks
    variants = {"plain": (None, w)}
    for size in sorted(sizes_tried, reverse=True):  # each named by the chunks its rows make
        variants.setdefault(label(-(-N // size)), (size, w))
    if padded != V and padded - V < V / 100:
        # zero rows below: the softmax spans their zero logits too, which is the same work
        extra = torch.zeros(padded - V, n_embd, device=device)
        wide = torch.cat([w.detach(), extra]).requires_grad_()
        variants[f"plain @{padded}"] = (None, wide)
        variants[f"{label(picked)} @{padded}"] = (rows, wide)
    # CUDA counts the peak exactly; a CPU process's RSS keeps what earlier variants freed
    cuda = device.startswith("cuda")
    best = {}
    for _ in range(cfg.rounds):
        for name, (rows, weight) in variants.items():
            for _ in range(cfg.warmup):
                step(rows, weight)
            x.grad = weight.grad = None  # the last step's gradients are not this one's memory
            mark = memory_mark(device) if cuda else None
            seconds = min(_timed(lambda: step(rows, weight), device) for _ in range(cfg.steps))
            peak = memory_peak(device, mark)
            if name not in best or seconds < best[name]["step_s"]:
                best[name] = {"rows_per_chunk": rows, "vocab_rows": weight.size(0),
                              "step_s": seconds, "peak_mem_bytes": peak}
    pad_note = f"; @{padded}: V padded to {padded:,}" if f"plain @{padded}" in best else ""
    print(f"\none exit's CE at vocab {vocab} ({V:,}): {N:,} rows x {n_embd}, {device} {dtype}; "
          f"chunk_rows picks {label(picked)} here{pad_note}")
    print(f"{'variant':<18} {'ms':>9} {'x plain':>8} {'peak MiB':>9}"
          f"{'' if cuda else '  (peak memory: measured on CUDA only)'}")
    for name, r in best.items():
        note = "  <- picked" if name == label(picked) else ""
        ratio = r["step_s"] / best["plain"]["step_s"]
        print(f"{name:<18} {r['step_s'] * 1e3:>9.2f} {ratio:>8.3f} "
              f"{mib(r['peak_mem_bytes']):>9}{note}")
    return {"rows": N, "picked_chunks": picked, "picked": label(picked), "padded_vocab": padded,
            "variants": best}


# ---- peak memory: what the steps add, measured as each device allows -----------------------

def peak_memory_how(device, platform=sys.platform):
    """How peak memory is measured on this device, in words; None where it is not."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return "torch.cuda.max_memory_allocated"
    if kind == "mps":
        return None  # torch.mps counts the memory in use but keeps no peak
    if platform.startswith("linux"):
        return "peak RSS (VmHWM in /proc, reset before the first step)"
    if resource is not None:
        return "rise of the peak RSS (getrusage; it cannot be reset, so a lower bound)"
    return None  # Windows: no resource module


def proc_status_bytes(field):
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, from Linux's /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs (no-op where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rusage_peak_bytes(platform):
    """The process's peak RSS so far: ru_maxrss is in bytes on macOS, in KiB elsewhere."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform == "darwin" else peak * 1024


def memory_mark(device, platform=sys.platform):
    """Start a peak-memory measurement: reset the peak where the device can, and return what
    to subtract from it (the memory in use now, or the peak so far); None: not measured."""
    if peak_memory_how(device, platform) is None:
        return None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if platform.startswith("linux"):
        rss = proc_status_bytes("VmRSS")
        reset_peak_rss()
        return rss
    return rusage_peak_bytes(platform)


def memory_peak(device, mark, platform=sys.platform):
    """Bytes added at the peak since memory_mark returned `mark`; None where not measured."""
    if mark is None:
        return None
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) - mark
    if platform.startswith("linux"):
        return proc_status_bytes("VmHWM") - mark
    return rusage_peak_bytes(platform) - mark


# ---- one case -------------------------------------------------------------------------------

def run_case(cfg, case, vocab, device, dtype):
    torch.manual_seed(0)
    kind = device.split(":")[0]
    model = build(cfg, case, vocab).to(device).train()  # a training step: train mode
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-4,
                            fused=kind == "cuda")
    scaler = torch.amp.GradScaler(kind, enabled=dtype == "float16")  # as train.py's step
    step_model = torch.compile(model) if cfg.compile else model
    B = cfg.batch_size or sizes(cfg)[3]
    V = VOCABS[vocab]
    x = torch.randint(V, (B, cfg.block_size), device=device)
    y = torch.randint(V, (B, cfg.block_size), device=device)

    def one_step():
        with autocast(device, dtype):
            # as train.py's step: the exits the loss trains, no logits kept for the caller
            kw = {"return_logits": False} if isinstance(model, LoopedGPT) else {}
            _, loss, _ = step_model(x, y, **kw)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    if cfg.profile:
        return {"case": case, "vocab": vocab, "top_ops": profile_steps(cfg, one_step, device)}
    mark = memory_mark(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        synchronize(device)  # the clock starts when earlier GPU work is done
        t0 = time.perf_counter()
        one_step()
        synchronize(device)  # and stops when this step's GPU work is
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = min(times)  # the least disturbed step
    return {"case": case, "vocab": vocab, "step_s": dt, "step_s_all": times,
            "tokens_per_sec": B * cfg.block_size / dt, "peak_mem_bytes": memory_peak(device, mark),
            "flops_per_token": model.flops_per_token()}


def profile_steps(cfg, one_step, device, top=8):
    """[(op, self ms per step, share of all self time, calls per step)] of the `top` ops over
    cfg.steps steps, by self time on the device where it has one (CUDA), else on the CPU."""
    from torch.profiler import ProfilerActivity, profile
    kind = device.split(":")[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "cuda" else [])
    for _ in range(cfg.warmup):
        one_step()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(cfg.steps):
            one_step()
        synchronize(device)
    attr = "self_device_time_total" if kind == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in ops) or 1
    return [(e.key, getattr(e, attr) / 1e3 / cfg.steps, getattr(e, attr) / total,
             e.count / cfg.steps) for e in ops[:top]]


def print_profile(r):
    print(f"\n{r['case']} @ {r['vocab']}: top ops by self time, per step")
    for name, ms, share, calls in r["top_ops"]:
        print(f"  {name[:62]:<62} {ms:9.1f} ms {share:6.1%} {calls:7g} calls")


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


def device_peak(device, override=0.0):
    """(peak FLOP/s for MFU, where it comes from in words); 0 where unknown."""
    kind = device.split(":")[0]
    if override:
        return override * 1e12, f"--peak_tflops={override:g}"
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = peak_tflops(name)  # by the exact model: an L4 is not an L40S
        if tflops is None:
            return 0.0, f"{name}: no known peak, pass --peak_tflops"
        return tflops * 1e12, f"{name}'s dense bf16 peak, {tflops} TFLOP/s"
    if kind == "cpu":
        flops = cpu_matmul_peak()
        return flops, f"this CPU's measured fp32 matmul peak, {flops / 1e9:.1f} GFLOP/s"
    return 0.0, f"no known peak for {kind}: pass --peak_tflops"


def _timed(fn, device="cpu"):
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def bench_generation(cfg, vocab, device):
    """Tokens per second of sample.py's generate, with and without its KV cache (float32, as
    sample.py runs)."""
    torch.manual_seed(0)
    model = build(cfg, "dense", vocab).to(device).eval()
    V = model.config.vocab_size
    prompt = torch.randint(V, (1, cfg.block_size - cfg.gen_tokens), device=device)
    out = {}
    for use_cache in (True, False):
        def run(n):
            return generate(model, prompt, n, temperature=1.0, top_k=50, use_cache=use_cache)
        run(2)  # warm-up: a GPU's first calls pick and load their kernels
        seconds = _timed(lambda: run(cfg.gen_tokens), device)
        out["cached" if use_cache else "recompute"] = cfg.gen_tokens / seconds
    return out


# ---- generation: full depth against early exit, and the ideal speed-up ----------------------

GEN_PROMPT = 32  # prompt tokens, as eval.py --run=speed
SWEEP_BATCHES = (1, 2, 4, 8, 16)
SWEEP_LOOPS = (5.5, 5.0, 4.0, 3.0, 2.0)


def generation_model(cfg, explicit, device):
    """(the model generation is timed on, where it comes from): --gen_ckpt's, else the preset's
    knobs with its K and block size (unless given on the command line), 69 characters and
    random weights (speed does not depend on what they say)."""
    if cfg.gen_ckpt:
        return model_from_checkpoint(load_checkpoint(cfg.gen_ckpt), device), cfg.gen_ckpt
    values = preset_values(cfg)
    for name in ("n_loops", "block_size"):
        if name in explicit:
            values[name] = getattr(cfg, name)
    knobs = {f.name: values[f.name] for f in fields(LoopedGPTConfig) if f.name in values}
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(**{**knobs, "vocab_size": VOCABS["char"]}))
    return model.eval().to(device), "random weights"


def exit_kwargs(threshold, **more):
    return {"exit_policy": "logit_margin", "exit_threshold": threshold, **more}


def calibrate_exit(model, prompts, target, tokens=64):
    """The logit_margin threshold at which `tokens` generated after `prompts` use `target` loops
    per token on average (the nearest of a bisection: fewer tokens pass a higher threshold)."""
    def mean_loops(t):
        torch.manual_seed(0)
        return generate(model, prompts, tokens, **exit_kwargs(t))[1].float().mean().item()
    lo, hi = 0.0, 1.0
    while mean_loops(hi) < target and hi < 2 ** 20:
        lo, hi = hi, 2 * hi
    best = hi
    for _ in range(12):
        mid = (lo + hi) / 2
        m = mean_loops(mid)
        if abs(m - target) < abs(mean_loops(best) - target):
            best = mid
        lo, hi = (mid, hi) if m < target else (lo, mid)
    return best


def time_generation(model, prompts, tokens, variants, rounds, device, clock="wall"):
    """Each variant's seconds and mean loops per round, and its first run's seconds (round 0,
    by the wall clock, untimed otherwise: it warms up a GPU's kernels and builds compiled
    graphs). Every round runs each variant in turn, with the round's seed, so slow drifts and
    other work on the machine touch them alike. clock: "wall", or "cpu", this thread's CPU time
    (one CPU thread)."""
    times = {name: [] for name in variants}
    first = {}
    loops = {}
    for r in range(rounds + 1):
        for name, kw in variants.items():
            torch.manual_seed(r)  # the same samples for every variant of a round
            out = []

            def run():
                out.append(generate(model, prompts, tokens, **kw))
            if clock == "cpu" and r:
                start = time.thread_time()
                run()
                seconds = time.thread_time() - start
            else:  # the first run by the wall clock: compiling runs in other processes too
                seconds = _timed(run, device)
            if r:
                times[name].append(seconds)
                loops.setdefault(name, []).append(out[0][1].float().mean().item())
            else:
                first[name] = seconds
    return times, first, loops


def bench_early_exit(cfg, explicit, device):
    """Generation tokens/s at full depth against early exit (and compiled, with --compile), at
    each batch size, with the mean loops, the speed-up over full depth and the ideal K / mean
    loops. One CPU thread, as the issue measures (a team of threads waits for its slowest at
    each of the thousands of tiny ops)."""
    on_cpu = device.startswith("cpu")
    if on_cpu:
        torch.set_num_threads(1)
    clock = cfg.gen_clock if cfg.gen_clock != "auto" else "cpu" if on_cpu else "wall"
    model, source = generation_model(cfg, explicit, device)
    K, V = model.config.n_loops, model.config.vocab_size
    batches = [int(b) for b in cfg.gen_batches.split(",")]
    torch.manual_seed(0)
    prompts = torch.randint(V, (max(batches + [8]), GEN_PROMPT), device=device)
    threshold = calibrate_exit(model, prompts[:8], cfg.gen_loops, min(64, cfg.gen_tokens))
    c = model.config
    print(f"generation: n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}, K {K}, "
          f"block {c.block_size}, vocab {V}, readout {c.readout}, {source}; {device}"
          f"{' (threads=1)' if on_cpu else ''}; {GEN_PROMPT}-token prompts, "
          f"{cfg.gen_tokens} new tokens, {cfg.rounds} rounds; {clock} clock")
    print(f"early exit: logit_margin >= {threshold:.4g} (calibrated to {cfg.gen_loops} mean "
          f"loops at batch 8)")
    # one loop without a test: the most an exit can give (it saves nothing outside the loops)
    variants = {"full": {}, "one loop": {"n_loops": 1}, "exit": exit_kwargs(threshold)}
    if cfg.compile:
        variants.update({"full compiled": {"compile": True},
                         "exit compiled": exit_kwargs(threshold, compile=True)})
    out = {"source": source, "K": K, "threshold": threshold, "tokens": cfg.gen_tokens,
           "clock": clock, "batch": {}}
    print(f"{'batch':>5} {'variant':<14} {'tok/s':>8} {'loops':>6} {'speed-up':>9} "
          f"{'ideal':>6} {'of ideal':>9}   (medians over rounds; loops: their mean)")
    for b in batches:
        times, first, loops = time_generation(model, prompts[:b], cfg.gen_tokens, variants,
                                              cfg.rounds, device, clock)
        rows = {}
        for name in variants:
            ref = "full compiled" if name.endswith("compiled") else "full"
            r = early_exit_row(times, loops, ref, name, K, b * cfg.gen_tokens)
            rows[name] = r
            print(f"{b:>5} {name:<14} {r['tokens_per_s']:>8,.0f} {r['mean_loops']:>6.2f} "
                  f"{r['speed_up']:>8.3f}x {r['ideal']:>5.3f}x {r['of_ideal']:>9.3f}")
        if cfg.compile:
            rows["compile"] = compile_cost(times, first, cfg.gen_tokens)
        out["batch"][str(b)] = rows
    if cfg.compile:
        for b, rows in out["batch"].items():
            cost = rows["compile"]
            pays = "never" if cost["pays_after_tokens"] is None else \
                f"after {cost['pays_after_tokens']:,.0f} tokens"
            print(f"compile, batch {b}: {cost['compile_s']:.1f} s for its first "
                  f"{cfg.gen_tokens} tokens (both depths), compiled/eager speed "
                  f"{cost['full_speed']:.2f}x full depth, {cost['exit_speed']:.2f}x early exit: "
                  f"pays {pays}")
    if cfg.gen_ragged_sweep:
        out["ragged_sweep"] = ragged_sweep(model, prompts, cfg, device, clock)
    return {"generation": out}


def compile_cost(times, first, tokens):
    """The seconds compiling took (the first compiled runs, by the wall clock, beyond their
    steady time), the compiled graphs' speed over eager, and the tokens after which compiling
    pays."""
    compile_s = sum(first[n] - statistics.median(times[n])
                    for n in ("full compiled", "exit compiled"))
    saved = statistics.median(times["full"]) - statistics.median(times["full compiled"])
    return {"compile_s": compile_s,
            "full_speed": paired(times, "full", "full compiled"),
            "exit_speed": paired(times, "exit", "exit compiled"),
            "pays_after_tokens": compile_s / saved * tokens if saved > 0 else None}


def ragged_sweep(model, prompts, cfg, device, clock):
    """A ragged batch's speed over a dense one's (> 1: ragged pays), by batch size and by the
    mean loops the threshold gives (the fewer, the more rows leave the batch early)."""
    print("\nragged / dense early-exit speed, by mean loops (rows) and batch size (columns)")
    print(f"{'loops':>6} " + " ".join(f"{b:>7}" for b in SWEEP_BATCHES))
    big = torch.randint(model.config.vocab_size, (max(SWEEP_BATCHES), GEN_PROMPT),
                        generator=torch.Generator().manual_seed(1)).to(device)
    table = {}
    for target in SWEEP_LOOPS:
        if target >= model.config.n_loops:
            continue
        threshold = calibrate_exit(model, prompts[:8], target, min(64, cfg.gen_tokens))
        row = {}
        for b in SWEEP_BATCHES:
            variants = {"dense": exit_kwargs(threshold, ragged=False),
                        "ragged": exit_kwargs(threshold, ragged=True)}
            times, _, loops = time_generation(model, big[:b], cfg.gen_tokens, variants,
                                              cfg.rounds, device, clock)
            row[str(b)] = {"ragged_speed": paired(times, "dense", "ragged"),
                           "mean_loops": statistics.mean(loops["ragged"])}
        table[str(target)] = row
        print(f"{target:>6} " + " ".join(f"{r['ragged_speed']:>6.2f}x" for r in row.values()))
    return table


# ---- the report -----------------------------------------------------------------------------

def mib(n_bytes):
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def report(results, vocab, peak_flops, rounds=None):
    """Print one vocabulary's table and ratios; return the ratios. rounds: each case's step
    time in every round, for the terminal/flat ratio round by round."""
    by = {r["case"]: r for r in results}
    print(f"\nvocab {vocab} ({VOCABS[vocab]:,} tokens)")
    print(f"{'case':<12} {'tok/s':>9} {'step ms':>9} {'peak MiB':>9} {'model GFLOP/s':>14} "
          f"{'MFU':>6} {'vs nanogpt':>11}")
    for r in results:
        r["model_flops_per_sec"] = r["flops_per_token"] * r["tokens_per_sec"]
        r["mfu"] = r["model_flops_per_sec"] / peak_flops if peak_flops else None
    ref = by.get("nanogpt")
    for r in results:
        rel = r["model_flops_per_sec"] / ref["model_flops_per_sec"] if ref else None
        r["vs_nanogpt"] = rel
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['case']:<12} {r['tokens_per_sec']:>9,.0f} {r['step_s'] * 1e3:>9.1f} "
              f"{mib(r['peak_mem_bytes']):>9} {r['model_flops_per_sec'] / 1e9:>14.2f} "
              f"{mfu:>6} {'n/a' if rel is None else f'{rel:.2f}x':>11}")
    ratios = {}

    def ratio(name, value, target, above):
        ratios[name] = value
        if target is None:
            print(f"  {name:<58} x{value:.3f}")
            return
        met = value >= target if above else value <= target
        sign = ">=" if above else "<="
        print(f"  {name:<58} x{value:.3f}  (target {sign} {target}: "
              f"{'met' if met else 'NOT met'})")

    def measured(r):  # a peak memory to divide by: not on MPS, and a rise of 0 says nothing
        return r is not None and bool(r["peak_mem_bytes"])

    t, d, flat = by.get("terminal"), by.get("dense"), by.get("flat")
    if t and flat:
        ratio("terminal step time / flat step time", t["step_s"] / flat["step_s"], 1.05, False)
        if rounds:  # each round's two steps ran back to back: the drift-free comparison
            each = [a / b for a, b in zip(rounds["terminal"], rounds["flat"])]
            ratios["terminal step time / flat step time, by round"] = each
            print(f"  {'  the same, round by round':<58} "
                  + " ".join(f"x{v:.3f}" for v in each))
    official = by.get("official")
    if d and official:  # the dense loss against the official code's way of computing it
        ratio("dense step time / official step time", d["step_s"] / official["step_s"],
              0.75 if vocab == "gpt2" else 0.8, False)
    if measured(d) and measured(official):
        # a target where the official way's K kept logits are the memory: a large vocabulary
        ratio("dense peak memory / official peak memory",
              d["peak_mem_bytes"] / official["peak_mem_bytes"],
              0.45 if vocab == "gpt2" else None, False)
    if measured(t) and measured(d):
        ratio("dense peak memory / terminal peak memory",
              d["peak_mem_bytes"] / t["peak_mem_bytes"], 1.2, False)
    for case in ("terminal", "dense"):
        if case in by and ref:
            ratio(f"{case} model FLOP/s / nanogpt model FLOP/s", by[case]["vs_nanogpt"], 1.0,
                  True)
    return ratios


# ---- gpu_check.sh's summary: one table from the files its steps wrote ----------------------

GPU_CHECK_FILES = {  # under gpu_check.sh's out folder
    "bench": "gpu_bench.json", "sweep": "gpu_ce_sweep.json", "profile": "gpu_profile.json",
    "log": "gpu_44m/log.jsonl", "eval": "gpu_44m/eval.json",
    "fixed": "gpu_sample_fixed.txt", "adaptive": "gpu_sample_adaptive.txt"}
SAMPLE_LOOPS = "mean loops per generated token:"  # sample.py's last line


def calibrated_exit(eval_path, policy="logit_margin"):
    """sample.py's adaptive-exit flags at the threshold eval.py calibrated for `policy` (token
    exits); sample.py's own default (max_prob >= 0.9) where no threshold kept the PPL target."""
    with open(eval_path) as f:
        threshold = json.load(f)["halting"]["token"][policy]["threshold"]
    if threshold is None:
        return "--exit_policy=max_prob"
    return f"--exit_policy={policy} --exit_threshold={threshold!r}"


def gpu_check_table(out="out"):
    """What gpu_check.sh measured, as one table of (what, value) rows; a step whose file is
    missing shows '-'."""
    paths = {k: os.path.join(out, name) for k, name in GPU_CHECK_FILES.items()}
    rows = []
    bench = _read_json(paths["bench"])
    if bench:
        title = f"{bench.get('gpu', bench['device'])}, {bench['dtype']}"
        for r in bench["results"]:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            rows.append((f"bench {r['case']} ({r['vocab']}): step / MFU / tok/s",
                         f"{r['step_s'] * 1e3:.1f} ms / {mfu} / {r['tokens_per_sec']:,.0f}"))
        for vocab, ratios in bench["ratios"].items():
            if "terminal step time / flat step time" in ratios:
                rows.append((f"bench terminal / flat step time ({vocab})",
                             f"x{ratios['terminal step time / flat step time']:.3f}"))
        if "generation" in bench:
            g = bench["generation"]
            rows.append(("bench generation, fixed depth: cached / recompute tok/s",
                         f"{g['cached']:,.1f} / {g['recompute']:,.1f}"))
    else:
        title = "no bench results"
        rows.append(("bench", "-"))
    sweep = _read_json(paths["sweep"])
    if sweep:
        vocab, s = next(iter(sweep.items()))  # gpu_check.sh sweeps GPT-2's vocabulary
        picked, plain = s["variants"][s["picked"]], s["variants"]["plain"]
        rows.append((f"bench one exit's CE ({vocab}), {s['picked']} (picked) / plain CE",
                     f"{picked['step_s'] * 1e3:.2f} / {plain['step_s'] * 1e3:.2f} ms, "
                     f"{mib(picked['peak_mem_bytes'])} / {mib(plain['peak_mem_bytes'])} MiB"))
        padded = s.get("padded_vocab")
        if f"plain @{padded}" in s["variants"]:  # does an aligned row length speed it up?
            times = [s["variants"][f"{name} @{padded}"]["step_s"] / s["variants"][name]["step_s"]
                     for name in ("plain", s["picked"])]
            rows.append((f"bench one exit's CE, V padded to {padded:,}: plain, picked / unpadded",
                         f"x{times[0]:.3f}, x{times[1]:.3f}"))
    else:
        rows.append(("bench one exit's CE", "-"))
    profile = _read_json(paths["profile"])
    for r in (profile or {}).get("profiles", []):  # where a step's time goes, on the GPU
        top = ", ".join(f"{name} {ms:.1f}" for name, ms, _, _ in r["top_ops"][:3])
        rows.append((f"profile {r['case']} ({r['vocab']}): top ops, ms a step", top))
    if not profile:
        rows.append(("profile", "-"))
    log = _read_jsonl_last(paths["log"])
    if log:
        rows.append((f"train iter {log['iter']}: val CE at loop K / ||h_K||",
                     f"{log['val_loop_ce'][-1]:.4f} / {log['hidden_norm'][-1]:.4g}"))
        rows.append(("train tok/s (last interval)", f"{log['tokens_per_sec']:,.0f}"))
    else:
        rows.append(("train", "-"))
    ev = _read_json(paths["eval"])
    if ev and "halting" in ev:
        K = ev["n_loops"]
        h = ev["halting"]["token"]["logit_margin"]
        rows.append(("eval full-depth val PPL", f"{ev['full_depth_ppl']:.3f}"))
        rows.append((f"eval calibrated mean loops (logit_margin, PPL <= x{ev['target']})",
                     f"{h['mean_loops']:.2f} of {K}, PPL x{h['ratio']:.4f}"))
    else:
        rows.append(("eval", "-"))
    for key in ("fixed", "adaptive"):
        rows.append((f"sample {key}: {SAMPLE_LOOPS[:-1]}", _sample_loops(paths[key])))
    width = max(len(what) for what, _ in rows)
    lines = [f"gpu_check summary ({title})"]
    lines += [f"  {what:<{width}}  {value}" for what, value in rows]
    return "\n".join(lines)


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _read_jsonl_last(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _sample_loops(path):
    """The rest of sample.py's mean-loops line: '3.20 of 4 (adaptive logit_margin >= 2.5)'."""
    if not os.path.isfile(path):
        return "-"
    with open(path) as f:
        found = [line for line in f if line.startswith(SAMPLE_LOOPS)]
    return found[-1][len(SAMPLE_LOOPS):].strip() if found else "-"


def main(argv=None):
    cfg, explicit = parse("bench.py", OPTIONS, argv, __doc__, together=together)
    device = device_or_exit(cfg.device)
    keep_freed_memory()
    dtype = pick_dtype(device, cfg.dtype)
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.set_device(device)  # compile, streams and memory stats on this GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.json:  # checked before minutes of work, not after
        writable_parent(cfg.json, "--json")
    if cfg.generation:  # sample.generate, not training steps
        return write_json(cfg, bench_early_exit(cfg, explicit, device))
    if cfg.compile_probe or cfg.ce_sweep:  # each vocabulary in turn; no training steps timed
        measure = compile_probe if cfg.compile_probe else ce_sweep
        return write_json(cfg, {v: measure(cfg, v, device, dtype) for v in cfg.vocab.split(",")})
    if cfg.one_case:  # child process: one case, one JSON line
        case, vocab = cfg.one_case.split("@")
        print(json.dumps(run_case(cfg, case, vocab, device, dtype)))
        return None
    argv = sys.argv[1:] if argv is None else list(argv)
    peak_flops, peak_src = device_peak(device, cfg.peak_tflops)
    memory_how = peak_memory_how(device) or f"not measured on {kind}"
    n_layer, n_head, n_embd, batch = sizes(cfg)
    threads = f" (threads={torch.get_num_threads()})" if kind == "cpu" else ""
    print(f"n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}, K {cfg.n_loops}, sequence "
          f"{cfg.block_size}, batch {cfg.batch_size or batch}, {device}{threads} {dtype}"
          f"{' compiled' if cfg.compile else ''}; MFU against {peak_src}; peak memory: "
          f"{memory_how}")
    summary = {"device": device, "dtype": dtype, "peak_flops": peak_flops, "peak_src": peak_src,
               "peak_memory": memory_how, "config": vars(cfg), "results": [], "ratios": {}}
    if kind == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    if cfg.profile:  # profiled, not timed
        summary["profiles"] = [run_one(cfg, case, vocab, device, dtype, argv)
                               for vocab in cfg.vocab.split(",") for case in cfg.cases.split(",")]
        for r in summary["profiles"]:
            print_profile(r)
        return write_json(cfg, summary)
    for vocab in cfg.vocab.split(","):
        best = {}
        rounds = {case: [] for case in cfg.cases.split(",")}
        for _ in range(cfg.rounds):
            for case in cfg.cases.split(","):
                r = run_one(cfg, case, vocab, device, dtype, argv)
                rounds[case].append(r["step_s"])
                if case not in best or r["step_s"] < best[case]["step_s"]:
                    best[case] = r
        results = list(best.values())
        summary["ratios"][vocab] = report(results, vocab, peak_flops, rounds)
        summary["results"] += results
    if cfg.gen_tokens:
        vocab = cfg.vocab.split(",")[0]
        g = bench_generation(cfg, vocab, device)
        print(f"\ngeneration ({vocab}), {cfg.block_size - cfg.gen_tokens}->{cfg.block_size} "
              f"tokens: cached {g['cached']:,.1f} tok/s, recompute {g['recompute']:,.1f} tok/s, "
              f"x{g['cached'] / g['recompute']:.1f}")
        summary["generation"] = g
    return write_json(cfg, summary)


def write_json(cfg, summary):
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
