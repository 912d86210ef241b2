"""
Options for every script, in nanoGPT's style, and the device rules they share.

  python train.py config/paper_44m.py --readout=scale_visible --max_iters=2000

Each script declares OPTIONS = {name: (default, help, accepts)}. The default gives the type, the
help is one line, and `accepts` says which values are allowed (one_of, at_least, between or
check). A preset file is Python that assigns some of those names (it runs as code, as in nanoGPT:
use only presets you trust); `--key=value` overrides it. Every value, from a preset or a flag, is
checked before the script reads data, builds a model or writes a file: a bad one ends the script
with one line on stderr that names the flag, the value and what is accepted, and exit status 2.
"""

import argparse
import ctypes
import difflib
import math
import os
import re
import sys
from types import SimpleNamespace


class Accepts:
    """What an option accepts: `text` (shown in --help and errors), `test(value) -> bool`, and
    `refused`, a few values it turns down (examples for the tests)."""

    def __init__(self, text, test, refused):
        self.text = text
        self.test = test
        self.refused = list(refused)


def one_of(*values):
    text = " | ".join(v if v else "'' (empty)" for v in values)
    return Accepts(text, lambda v: v in values, ["nope"])


def at_least(lo):
    kind = "an integer" if isinstance(lo, int) else "a number"
    return Accepts(f"{kind} >= {lo}", lambda v: v >= lo, [lo - 1])


def between(lo, hi, open_lo=False, open_hi=False):
    """A number in [lo, hi], with either end open."""
    text = f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"

    def test(v):
        above = v > lo if open_lo else v >= lo
        below = v < hi if open_hi else v <= hi
        return above and below
    return Accepts(text, test, [lo - 1, hi + 1])


def check(text, test, refused):
    """Any other rule: a predicate, said in words."""
    return Accepts(text, test, refused)


NONEMPTY = check("a non-empty path", lambda v: v != "", [""])
DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
DEVICE = check("auto | cpu | cuda | cuda:N | mps (one this machine has)",
               lambda v: DEVICE_RE.fullmatch(v) is not None, ["tpu", "cuda:x"])


PROG = [os.path.basename(sys.argv[0])]  # the script's name, set by parse


def error(msg):
    """Bad input: one line on stderr and exit status 2, as argparse does."""
    print(f"{PROG[0]}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def _int(s):
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _float(s):
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


CONVERT = {bool: _bool, int: _int, float: _float, str: str}


def accepted(default, accepts):
    """What an option accepts, in words."""
    if isinstance(default, bool):
        return "True | False"
    return accepts.text


def refusal(name, value, default, accepts):
    """None if the option takes this value, else the one-line error."""
    bad = f"--{name}={value!r} is invalid; accepted: {accepted(default, accepts)}"
    if isinstance(default, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return bad
    return None if accepts.test(value) else bad


def parse(prog, options, argv=None, description="", positional=None, together=None):
    """Returns (cfg, explicit): cfg has every option (and the positional list, if any);
    explicit names the options a preset or flag set. `prog` is the script's name for errors.
    Positional arguments are preset files, unless `positional` = (name, help) names them
    otherwise. `together(cfg, explicit)` checks options that only make sense together: it
    returns an error line or None."""
    PROG[0] = prog
    argv = sys.argv[1:] if argv is None else list(argv)
    values = {k: spec[0] for k, spec in options.items()}
    explicit = set()
    ap = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = lambda msg: error(f"{msg} (options: --help)")  # one line, no usage dump
    pos_name, pos_help = positional or ("presets", "preset files (Python), applied in order")
    ap.add_argument(pos_name, nargs="*" if positional is None else "+", help=pos_help)
    for name, (default, help_, accepts) in options.items():
        kind = type(default)
        text = f"{help_} [{accepted(default, accepts)}] (default: {default!r})"
        ap.add_argument(f"--{name}", type=CONVERT[kind], default=argparse.SUPPRESS,
                        metavar=kind.__name__, help=text.replace("%", "%%"))
    args, unknown = ap.parse_known_args(argv)
    for arg in unknown:
        key = arg.lstrip("-").split("=")[0]
        close = difflib.get_close_matches(key, options, n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the options"
        error(f"unknown option {arg!r}{hint}")
    if positional is None:
        for path in args.presets:
            preset = read_preset(path, options)
            values.update(preset)
            explicit.update(preset)
    for key, value in vars(args).items():
        if key != pos_name:
            values[key] = value
            explicit.add(key)
    for name, (default, _, accepts) in options.items():
        msg = refusal(name, values[name], default, accepts)
        if msg:
            error(msg)
    cfg = SimpleNamespace(**values)
    if "device" in options:
        pick_device(cfg.device)  # a device this machine lacks is bad input too
    msg = together(cfg, explicit) if together else None
    if msg:
        error(msg)
    if positional is not None:
        setattr(cfg, pos_name, getattr(args, pos_name))
    return cfg, explicit


def read_preset(path, options):
    """The options a preset file sets, type-checked against the defaults."""
    if not path.endswith(".py") or not os.path.isfile(path):
        error(f"preset file {path!r} does not exist (presets are .py files, "
              f"e.g. config/paper_44m.py)")
    scope = {}
    with open(path) as f:
        exec(f.read(), {}, scope)
    values = {}
    for key, value in scope.items():
        if key.startswith("_"):
            continue
        if key not in options:
            error(f"preset {path} sets unknown option {key!r}")
        default = options[key][0]
        int_as_float = isinstance(default, float) and type(value) is int
        if type(value) is not type(default) and not int_as_float:
            error(f"preset {path} sets {key}={value!r}; expected a {type(default).__name__}")
        values[key] = type(default)(value)
    return values


# ---- the machine: devices, dtypes, memory ------------------------------------------------

def devices_here():
    import torch
    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        here.append("mps")
    return here


def pick_device(name):
    """'auto' is CUDA, then Apple's MPS, then the CPU; a named device must exist here."""
    here = devices_here()
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if d in here)
    if name not in here:
        error(f"--device={name!r} is not available on this machine; devices here: "
              f"{', '.join(here)}")
    return name


def pick_dtype(device, name):
    """'auto' is bfloat16 on a CUDA GPU that has it, else float32. A dtype the device cannot run
    falls back, with a warning: bfloat16 -> float16 on old GPUs; float16 -> float32 off CUDA."""
    import torch
    kind = device.split(":")[0]
    bf16 = kind == "cpu" or (kind == "cuda" and torch.cuda.is_bf16_supported()) or (
        kind == "mps" and torch.backends.mps.is_macos_or_newer(14, 0))
    if name == "auto":
        return "bfloat16" if kind == "cuda" and bf16 else "float32"
    if name == "bfloat16" and not bf16:
        fallback = "float16" if kind == "cuda" else "float32"
        print(f"warning: {device} has no bfloat16; falling back to {fallback}", file=sys.stderr)
        return fallback
    if name == "float16" and kind != "cuda":
        print(f"warning: float16 autocast is not supported on {kind}; falling back to float32",
              file=sys.stderr)
        return "float32"
    return name


def keep_freed_memory():
    """Let the process reuse the memory it frees, on Linux with glibc; elsewhere do nothing.
    glibc hands freed blocks of a few MB (a [B, T, 4C] activation) back to the OS and page-faults
    fresh, zeroed pages in at the next allocation: 3,000-4,000 faults a CPU training step. Keeping
    them measured 327 -> 311 ms per default CPU step and 135 -> 95 ms per evaluation forward."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks under 32 MB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and free heap is kept, up to 1 GB
