"""
Options for every script, in nanoGPT's style.

  python train.py config/paper_44m.py --readout=scale_visible --max_iters=2000

Each script declares OPTIONS = {name: (default, help, accepts)}. The default gives the type, the
help is one line, and `accepts` says which values are allowed (one_of, at_least, between or
check). A preset file is Python that assigns some of those names (it runs as code, as in nanoGPT:
use only presets you trust); `--key=value` overrides it. Every value, from a preset or a flag, is
checked before the script reads data, builds a model or writes a file: a bad one ends the script
with one line on stderr that names the flag, the value and what is accepted, and exit status 2.
"""

import argparse
import difflib
import math
import os
import sys
from types import SimpleNamespace

from device import DEVICE_RE, pick_device


class Accepts:
    """What an option accepts: `text` (shown in --help and errors), `test(value) -> bool`, and
    `refused`, a few values it turns down (examples for the tests)."""

    def __init__(self, text, test, refused=()):
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


def check(text, test, refused=()):
    """Any other rule: a predicate, said in words."""
    return Accepts(text, test, refused)


def config_options(config_class, skip=()):
    """OPTIONS rows for the fields of a dataclass whose fields carry model.knob metadata, so a
    model knob is declared once, in model.py, and appears in --help and the checks."""
    from dataclasses import fields
    return {f.name: (f.default, f.metadata["about"], check(f.metadata["accepted"],
                                                          f.metadata["ok"], f.metadata["bad"]))
            for f in fields(config_class) if f.name not in skip}


NONEMPTY = check("a non-empty path", lambda v: v != "", [""])
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
    if "device" in options:  # a device this machine lacks is bad input too
        device_or_exit(cfg.device)
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
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError:
        error(f"preset {path} is not UTF-8 text; save it as UTF-8")
    try:
        exec(compile(source, path, "exec"), {}, scope)
    except SyntaxError as e:
        error(f"preset {path} line {e.lineno}: {e.msg}; a preset is Python that assigns options")
    except Exception as e:  # an undefined name, a failing expression: the preset's own bug
        error(f"preset {path} fails: {type(e).__name__}: {e}")
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


def device_or_exit(name):
    """The device --device names (auto resolved), or the one-line error for a missing one."""
    device, why = pick_device(name)
    if why:
        error(why)
    return device
