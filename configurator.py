"""
Options for train.py, sample.py, eval.py and bench.py, in nanoGPT's style:

  python train.py config/paper_44m.py --readout=scale_visible --max_iters=2000

Each script declares OPTIONS = {name: (default, one line of help)}. A preset file is Python that
assigns some of those names; `--key=value` overrides it. The type of each value is the type of
its default; an unknown key, a bad value or a missing preset file is a one-line error.
"""

import argparse
import difflib
import os
import sys
from types import SimpleNamespace


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def parse(options, argv=None, description=""):
    """Returns (cfg, explicit): cfg has every option; explicit names those a preset or flag set."""
    argv = sys.argv[1:] if argv is None else list(argv)
    values, explicit = {k: d for k, (d, _) in options.items()}, set()
    ap = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = lambda msg: sys.exit(f"{ap.prog}: error: {msg} (options: --help)")  # one line, no usage dump
    ap.add_argument("presets", nargs="*", metavar="PRESET.py", help="preset files, applied in order")
    for name, (default, help_) in options.items():
        kind = _bool if isinstance(default, bool) else type(default)
        ap.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, metavar=type(default).__name__,
                        help=f"{help_} (default: {default!r})")
    args, unknown = ap.parse_known_args(argv)
    for arg in unknown:
        key = arg.lstrip("-").split("=")[0]
        close = difflib.get_close_matches(key, options, n=1)
        ap.error(f"unknown option {arg!r}" + (f"; did you mean --{close[0]}?" if close else
                                               "; see --help for the options"))
    for path in args.presets:
        if not path.endswith(".py") or not os.path.isfile(path):
            ap.error(f"preset file {path!r} does not exist (presets are .py files, e.g. config/train_cpu.py)")
        scope = {}
        exec(open(path).read(), {}, scope)
        for key, value in scope.items():
            if key.startswith("_"):
                continue
            if key not in options:
                ap.error(f"preset {path} sets unknown option {key!r}")
            default = options[key][0]
            if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
                ap.error(f"preset {path} sets {key}={value!r}; expected a {type(default).__name__}")
            values[key] = type(default)(value)
            explicit.add(key)
    for key, value in vars(args).items():
        if key != "presets":
            values[key] = value
            explicit.add(key)
    return SimpleNamespace(**values), explicit
