"""
A started Python that forks a fresh process for each script a test runs as a user would.

`python train.py ...` spends most of a tiny run importing torch and, at exit, tearing it down
(seconds each on a CI core). This process imports the third-party modules the scripts import
(torch, numpy, tqdm, matplotlib, and the bulk of what torch._dynamo imports when a script makes
an AdamW: sympy, torch.fx's symbolic shapes, torch.distributed.fsdp; not torch._dynamo itself,
whose atexit hooks change how an uncaught KeyboardInterrupt ends a process: a script that
imports it does so in its own process), runs nothing, and then, for each request, forks.

The child is a real, separate process (its own pid, exit status, stdin, stdout and stderr,
signals) that runs the script (or `-m` module) from its first line as `__main__`, with the
request's argv, folder, environment and sys.path, and ends as `python script.py` ends: the
interpreter itself prints an uncaught exception's traceback and turns SystemExit or
KeyboardInterrupt into the exit status, because the script runs at this module's top level (the
last statements below) and nothing here catches what it raises. The project's own modules are
not imported here: each child imports them afresh.

What a child shares with this process, and a fresh interpreter would not: the third-party
modules above, imported already (under this process's environment: conftest keeps one zygote
per environment, but for the project's own NANOLOOP_* variables, which only the project's
modules read), frozen out of the garbage collector's passes (gc.freeze, as prefork servers do:
a child's collections and its exit skip them); and the str hash seed. numpy's global RNG is
reseeded in each child, and Python's `random` reseeds itself after a fork, from the OS as a
fresh process's are. Its parent is this process, not the one that asked for it. And its end:
once the interpreter has finalized (atexit, threads, stdio, modules), as `python` does, the
process ends with exit()'s status without running the C++ destructors of the libraries loaded
here (torch's take a quarter of a second, in every child).

Protocol: `python zygote.py SOCKET PATTERNS` listens on the Unix socket SOCKET, prints "ready",
and ends when its stdin closes. A client connects and sends one JSON line {kind: "script" |
"module", target, args, cwd, env, executable (the child's sys.executable, if not this
interpreter's)} with three file descriptors (the child's stdin, stdout and
stderr); the reply is {"pid": ...} at once, then {"status": waitstatus} when the child ends. A
request whose environment differs from this process's in a variable that no pattern in the JSON
list PATTERNS matches (the variables read at run time only) is refused: {"refused": name}. A
client that hangs up before its child ends takes the child with it (SIGTERM, and SIGKILL 5 s
later), as does the end of the session.
"""

import ctypes
import fnmatch
import gc
import json
import os
import select
import signal
import socket
import sys
import time

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
STARTED_IN = dict(os.environ)


def refused(env, runtime_only):
    """The first variable that `env` sets otherwise than this process was started with, and
    that something could have read while the modules above were imported."""
    for name in sorted(set(env) | set(STARTED_IN)):
        if env.get(name) != STARTED_IN.get(name) and \
                not any(fnmatch.fnmatchcase(name, p) for p in runtime_only):
            return name
    return None


def receive(conn):
    """A request and the three descriptors sent with it (None if the client left)."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, got, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if not chunk:
            for fd in fds + got:
                os.close(fd)
            return None, []
        data, fds = data + chunk, fds + got
    return json.loads(data), fds


def end(running, ending, pidfd, grace=5.0):
    """Begin to end a child whose client is gone: SIGTERM (a torchrun launcher then ends its
    workers), and SIGKILL after `grace` seconds."""
    os.kill(running[pidfd][0], signal.SIGTERM)
    ending[pidfd] = time.monotonic() + grace


def serve(path, runtime_only):
    """Fork a child per request until stdin closes; returns in a forked child only, with its
    request and descriptors."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    running = {}  # pidfd -> (pid, connection)
    ending = {}  # pidfd -> when to SIGKILL the child, after the SIGTERM its end began with
    over = False  # the test session is over: end the children, then this process
    while True:
        now = time.monotonic()
        for pidfd, deadline in ending.items():
            if deadline is not None and now >= deadline:
                os.kill(running[pidfd][0], signal.SIGKILL)
                ending[pidfd] = None
        if over and not running:
            os._exit(0)
        conns = {conn.fileno(): pidfd for pidfd, (_, conn) in running.items()
                 if pidfd not in ending}
        waits = [d - now for d in ending.values() if d is not None]
        ready = select.select([*([] if over else [0, listener]), *running, *conns], [], [],
                              max(0.0, min(waits)) if waits else None)[0]
        if 0 in ready and not os.read(0, 1 << 16):
            over = True
        for fd in ready:
            if fd in running:  # a child ended
                pid, conn = running.pop(fd)
                ending.pop(fd, None)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                except OSError:
                    pass  # its client left
                conn.close()
            elif fd in conns and conns[fd] in running:  # its client hung up before it ended
                end(running, ending, conns[fd])
        if over:
            for pidfd in running:
                if pidfd not in ending:
                    end(running, ending, pidfd)
            continue
        if listener in ready:
            conn, _ = listener.accept()
            req, fds = receive(conn)
            if req is None:
                conn.close()
                continue
            why = refused(req["env"], runtime_only)
            if why is not None:
                print(f"refused {req['target']}: {why} differs", file=sys.stderr, flush=True)
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for pidfd, (_, other) in running.items():
                    os.close(pidfd)
                    other.close()
                conn.close()
                return req, fds
            for fd in fds:
                os.close(fd)
            running[os.pidfd_open(pid)] = (pid, conn)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def become(req, fds):
    """Turn this forked child into `python <script or -m module> <args>` started in req's folder
    and environment, with the descriptors sent as its stdin, stdout and stderr."""
    for fd, sent in enumerate(fds):
        os.dup2(sent, fd)
        os.close(sent)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    numpy.random.seed()  # from the OS, as a fresh process's
    # After the interpreter has finalized (atexit, threads, stdio, modules), exit() runs the C
    # destructors of the libraries imported here (a quarter of a second, for torch's): the first
    # of them, registered last, ends the process there with exit()'s status.
    libc = ctypes.CDLL(None)
    libc.on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libc.on_exit(ctypes.cast(libc._exit, ctypes.c_void_p), None)
    if req.get("executable"):  # the client's python, which forks what it runs from here too
        sys.executable = req["executable"]
    if req["kind"] == "script":
        sys.argv = [req["target"], *req["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(req["target"]))
    else:  # python -m: argv[0] becomes the module's file, sys.path[0] the folder it runs in
        sys.argv = ["-m", *req["args"]]
        sys.path[0] = os.getcwd()
    return req["kind"], req["target"]


_kind, _target = become(*serve(sys.argv[1], json.loads(sys.argv[2])))
del serve, become, receive, refused, end

import runpy  # noqa: E402

if _kind == "script":
    runpy.run_path(_target, run_name="__main__")
else:
    runpy._run_module_as_main(_target)  # what `python -m` calls
