"""
A started Python that forks a fresh process for each script a test runs as a user would.

`python train.py ...` spends most of a tiny run importing torch and, at exit, tearing it down
(seconds each on a CI core). This process imports the third-party modules the scripts import
(torch, numpy, tqdm, matplotlib, and the bulk of what torch._dynamo imports when a script makes
an AdamW: sympy, torch.fx's symbolic shapes, torch.distributed.fsdp; not torch._dynamo itself,
whose atexit hooks change how an uncaught KeyboardInterrupt ends a process: a script that
imports it does so in its own process), runs nothing, and then, for each request, forks.

The child is a real, separate process (its own pid, exit status, stdout and stderr, signals)
that runs the script from its first line as `__main__`, with the script's argv, folder,
environment and sys.path, and ends as `python script.py` ends: the interpreter itself prints an
uncaught exception's traceback and turns SystemExit or KeyboardInterrupt into the exit status,
because the script runs at this module's top level (the last statement below) and nothing here
catches what it raises. The project's own modules are not imported here: each child imports
them afresh.

What a child shares with this process, and a fresh interpreter would not: the third-party
modules above, imported already (under this process's environment: conftest.run keeps one
zygote per environment), frozen out of the garbage collector's passes (gc.freeze, as prefork
servers do: a child's collections and its exit skip them); and the str hash seed. numpy's
global RNG is reseeded in each child, and Python's `random` reseeds itself after a fork, from
the OS as a fresh process's are.

Protocol, on the file descriptors given as argv[1] (requests) and argv[2] (replies): one JSON
line per request {script, args, cwd, env, stdout, stderr} (stdout and stderr: files the child
writes); the reply is {"pid": ...} at once, then {"status": waitstatus} when the child ends.
"""

import gc
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # as plot_norms.py does before importing pyplot
import matplotlib.pyplot  # noqa: E402,F401
import numpy  # noqa: E402
import sympy  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch.distributed.fsdp  # noqa: E402,F401
import torch.fx.experimental.symbolic_shapes  # noqa: E402,F401
import tqdm  # noqa: E402,F401

gc.freeze()


def serve(requests, replies):
    """Answer requests until the test session closes the pipe; returns in a forked child only,
    with its request."""
    with os.fdopen(requests, "r") as inbox, os.fdopen(replies, "w") as outbox:
        for line in inbox:
            req = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return req  # leaving the with closes the pipes in the child
            outbox.write(json.dumps({"pid": pid}) + "\n")
            outbox.flush()
            _, status = os.waitpid(pid, 0)
            outbox.write(json.dumps({"status": status}) + "\n")
            outbox.flush()
    os._exit(0)


def become(req):
    """Turn this forked child into `python <script> <args>` started in req's folder and
    environment, with stdin empty and stdout and stderr going to req's files."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    numpy.random.seed()  # from the OS, as a fresh process's
    sys.argv = [req["script"], *req["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
    return req["script"]


_script = become(serve(int(sys.argv[1]), int(sys.argv[2])))
del serve, become

import runpy  # noqa: E402

runpy.run_path(_script, run_name="__main__")
