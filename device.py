"""
Where a script runs: the device rules every script shares, as plain functions.

  pick_device    --device=auto is CUDA, then Apple's MPS, then the CPU
  ddp_device     under torchrun every CUDA device means cuda:LOCAL_RANK
  pick_dtype     --dtype=auto: bfloat16 on GPUs with native bf16 (compute capability >= 8.0),
                 float16 with a grad scaler on older ones (V100, T4), float32 elsewhere
  peak_tflops    a GPU's dense bf16/fp16 peak, by its exact model, for MFU
  synchronize    wait for the device before reading a clock

The rules take plain values (a name, a capability, a world size) so that tests check them on a
machine without a GPU; the `*_here` helpers ask torch about this machine.
"""

import ctypes
import re
import sys
from contextlib import nullcontext

import torch

DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


def devices_here():
    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        here.append("mps")
    return here


def pick_device(name, here=None):
    """'auto' is CUDA, then MPS, then the CPU. Returns (device, None), or (None, why) when this
    machine lacks the named device."""
    here = devices_here() if here is None else here
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if d in here)
    if name not in here:
        return None, f"--device={name!r} is not available on this machine; devices here: " \
                     f"{', '.join(here)}"
    if name == "cuda":  # the first visible GPU, by index: torch.cuda.set_device needs one
        return "cuda:0", None
    return name, None


def ddp_device(device, local_rank):
    """Under torchrun each process owns one GPU: any CUDA device (cuda, cuda:0, ...) becomes
    cuda:LOCAL_RANK, so `--device=cuda:0` cannot pile every rank onto GPU 0. Returns
    (device, None) or (None, why)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return f"cuda:{local_rank}", None
    if kind == "mps":
        return None, "torchrun with --device=mps is not supported (a Mac has one GPU and no " \
                     "multi-process backend for it); run python train.py without torchrun"
    return device, None


def dtype_for(kind, name, cuda_capability=(0, 0), mps_bf16=False):
    """(dtype, warning or None) for a device kind. bfloat16 needs a GPU that computes it
    natively: compute capability 8.0 (Ampere) or newer. Older GPUs (V100 7.0, T4 7.5) only
    emulate it, slowly, so they get float16 with a grad scaler. MPS has bf16 on macOS 14+."""
    bf16 = kind == "cpu" or (kind == "cuda" and cuda_capability >= (8, 0)) or (
        kind == "mps" and mps_bf16)
    if name == "auto":
        if kind == "cuda":
            return ("bfloat16" if bf16 else "float16"), None
        return "float32", None
    if name == "bfloat16" and not bf16:
        fallback = "float16" if kind == "cuda" else "float32"
        return fallback, f"warning: this {kind} device has no native bfloat16; using {fallback}"
    if name == "float16" and kind != "cuda":
        return "float32", f"warning: float16 autocast is not supported on {kind}; using float32"
    return name, None


def pick_dtype(device, name):
    """dtype_for on this machine's device, printing its warning."""
    kind = device.split(":")[0]
    capability = torch.cuda.get_device_capability(device) if kind == "cuda" else (0, 0)
    mps_bf16 = kind == "mps" and torch.backends.mps.is_macos_or_newer(14, 0)
    dtype, warning = dtype_for(kind, name, capability, mps_bf16)
    if warning:
        print(warning, file=sys.stderr)
    return dtype


def autocast(device, dtype):
    """Mixed precision for the forward pass; float32 runs as it is."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))


def synchronize(device):
    """Wait for queued GPU work, so that a clock read after it measures the work."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def rng_state(device):
    """The RNG states a resumed run needs for the same dropout masks: the CPU's and the GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif str(device) == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and str(device) == "mps":
        torch.mps.set_rng_state(state["mps"])


# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from the vendor's data
# sheets. A rule matches when all its words are words of the GPU's name, so "L4" is not "L40S"
# and an H100 PCIe is not an H100 SXM. First match wins: the specific rules come first.
PEAK_TFLOPS = [
    (("H100", "PCIe"), 756), (("H100", "NVL"), 835), (("H100",), 989),
    (("H200", "NVL"), 835), (("H200",), 989), (("GH200",), 989),
    (("A100",), 312), (("L40S",), 362), (("L40",), 181), (("L4",), 121),
    (("A10",), 125), (("RTX", "4090"), 165), (("V100",), 125), (("T4",), 65),
]


def peak_tflops(gpu_name):
    """The GPU's peak from PEAK_TFLOPS, or None for a GPU not listed (pass --peak_tflops)."""
    words = set(re.split(r"[\s\-_]+", gpu_name.upper()))
    for rule, tflops in PEAK_TFLOPS:
        if {w.upper() for w in rule} <= words:
            return tflops
    return None


def keep_freed_memory():
    """Let the process reuse the memory it frees, on Linux with glibc; elsewhere do nothing.
    glibc hands freed blocks of a few MB (a [B, T, 4C] activation) back to the OS and
    page-faults fresh, zeroed pages in at the next allocation, thousands of times a CPU step
    (the README's speed section has the numbers)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks under 32 MB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and free heap is kept, up to 1 GB
