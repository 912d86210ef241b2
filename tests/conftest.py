import atexit
import fnmatch
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# One intra-op thread, here and in every process the tests start (they inherit it), unless the
# environment says otherwise: the tests' models are tiny, so a second thread buys nothing, while
# on a machine whose cores are busy a team of OpenMP threads waits for its slowest at every op
# (5-10x slower). Set before anything imports torch (it reads this once, at import).
GIVEN_ENV = dict(os.environ)  # as the tests were started: for a command that must see it
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny run: seconds on a CPU
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_loops=3", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3",
        "--log_interval=1", "--init=gpt2"]


def pytest_collection(session):
    """Start the zygote of this environment while the tests are collected (seconds, on the other
    core), where they include tests that run the scripts."""
    files = [str(a) for a in session.config.args]
    if not files or any(f.rstrip("/").endswith("tests") or os.path.basename(f).split("::")[0]
                        in SCRIPT_TESTS for f in files):
        Zygote.of([sys.executable, "-m", "-"], dict(os.environ))


# the test files that run the scripts in processes
SCRIPT_TESTS = {"test_bench.py", "test_device.py", "test_eval.py", "test_faults.py",
                "test_options.py", "test_plots.py", "test_preempt.py", "test_reliability.py",
                "test_sample.py", "test_train.py"}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from prepare import shakespeare_text
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text(shakespeare_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def data_dir(text_file, tmp_path_factory):
    """data/<name> folders for the char and gpt2 tokenizers, made by prepare.py."""
    from prepare import main
    d = tmp_path_factory.mktemp("data")
    main([f"--input={text_file}", "--tokenizer=char", "--name=tiny_char", f"--data_dir={d}"])
    main([f"--input={text_file}", "--tokenizer=gpt2", "--name=tiny_gpt2", f"--data_dir={d}"])
    return d


def run(script, *args, env=None, timeout=120, **kw):
    """Run one of the project's scripts as a user would, with this interpreter (not whichever
    `python` is on PATH) and a time limit; returns the CompletedProcess (see run_cmd)."""
    return run_cmd([sys.executable, os.path.join(ROOT, script), *args], env=env,
                   timeout=timeout, **kw)


def run_cmd(cmd, env=None, timeout=120, cwd=ROOT, forked_children=False, **kw):
    """subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout).

    `python <script> ...` and `python -m <module> ...` run in a process forked from a zygote
    (tests/zygote.py) that has imported torch already: a real process, with its own exit
    status, stdout and stderr, that runs the script from its first line as __main__, without
    the seconds a fresh interpreter spends importing torch and tearing it down. Any other
    command, anything else given to subprocess.run, and every command when NANOLOOP_TEST_FRESH=1
    is set, runs as given. forked_children: the script's sys.executable is the zygote's python
    (SHIM), so that the Python processes it starts with sys.executable are forked too."""
    env = dict(os.environ) if env is None else dict(env)  # what subprocess.run would pass
    zygote = None if kw else Zygote.of(cmd, env)
    if zygote is None:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env,
                              timeout=timeout, **kw)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = zygote.start(cmd, cwd, env, subprocess.DEVNULL, out, err,
                            zygote.python if forked_children else None)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:  # as subprocess.run: kill it, then raise
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout, *(read(f, False) for f in (out, err)))
        return subprocess.CompletedProcess(cmd, proc.returncode, read(out), read(err))


def read(f, text=True):
    """What a process wrote to the file f, as subprocess.run(text=text) returns it: decoded
    with the locale's encoding, universal newlines."""
    f.seek(0)
    return io.TextIOWrapper(f).read() if text else f.read()


def popen(cmd, env=None, stdout=None, stderr=None, cwd=ROOT, fresh=False,
          forked_children=False):
    """subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True): as in
    run_cmd, `python <script>` and `python -m <module>` are forked from a zygote, unless fresh,
    and so are the Python processes it starts with sys.executable if forked_children.
    stdout and stderr: subprocess.PIPE, a file, or None (this process's)."""
    env = dict(os.environ) if env is None else dict(env)
    zygote = None if fresh else Zygote.of(cmd, env)
    if zygote is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
    return zygote.start(cmd, cwd, env, None, stdout, stderr,
                        zygote.python if forked_children else None)


def forked_pid(pid):
    """The process that the shim process `pid` (see SHIM) had a zygote fork for it, which a
    SIGKILL must reach itself (the shim passes the other signals on); else pid."""
    for zygote in Zygote.started.values():
        try:
            with open(os.path.join(zygote.folder, f"forked-{pid}")) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return pid


# The environment variables read at run time only, by the project, torchrun's workers or
# reproduce.sh, never while torch, numpy or matplotlib are imported: a process forked from a
# zygote may set these otherwise than the zygote was started with.
RUNTIME_ONLY = ["PYTEST_CURRENT_TEST", "NANOLOOP_*", "_", "SHLVL", "PWD", "OLDPWD",
                # torchrun gives its workers these
                "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_*", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                # reproduce.sh's knobs
                "SEEDS", "ITERS", "JOBS", "RUNS", "PYTHON", "SPEED_TOKENS"]


# Zygote.python: an executable that stands in for `python` where a test cannot run the command
# itself (a bash script's $PYTHON, a script's sys.executable): `python <script> ...` and
# `python -m <module> ...` (after a -u, where PYTHONUNBUFFERED asks the same: torchrun's workers)
# are forked from the first of its zygotes that takes the environment, with this process's
# stdin, stdout, stderr, folder and environment, and the signals it gets passed on (see
# forked_pid for SIGKILL); it ends as the child did. Anything else, an environment no zygote
# takes (or one not listening yet), or a torchrun worker that NANOLOOP_TEST_FRESH_WORKERS lists
# (by its RANK, or RANK@TORCHELASTIC_RESTART_COUNT: "1@2"), runs in the real interpreter.
SHIM = """#!@EXECUTABLE@ -S
import json, os, signal, socket, sys
real, argv, kind = @PYTHON@, sys.argv[1:], None
unbuffered = argv[:1] == ["-u"] and os.environ.get("PYTHONUNBUFFERED")
args = argv[1:] if unbuffered else argv  # the zygote's stdio is unbuffered as -u asks
if args[:1] == ["-m"] and len(args) > 1:
    kind, target, args = "module", args[1], args[2:]
elif args and not args[0].startswith("-"):
    kind, target, args = "script", args[0], args[1:]
worker = os.environ.get("RANK", "-"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
fresh = os.environ.get("NANOLOOP_TEST_FRESH_WORKERS", "").split(",")
if kind is None or worker[0] in fresh or "@".join(worker) in fresh:
    os.execv(real, [real, *argv])
request = {"kind": kind, "target": target, "args": args, "cwd": os.getcwd(),
           "env": dict(os.environ)}
for path in @SOCKETS@:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        continue
    socket.send_fds(conn, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
    replies = conn.makefile("rb")
    reply = json.loads(replies.readline())
    if "pid" in reply:
        break
else:
    os.execv(real, [real, *sys.argv[1:]])
pid = reply["pid"]
record = os.path.join(os.path.dirname(__file__), f"forked-{os.getpid()}")  # see forked_pid
with open(record, "w") as f:
    f.write(str(pid))
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda n, _: os.kill(pid, n))
code = os.waitstatus_to_exitcode(json.loads(replies.readline())["status"])
os.remove(record)
if code < 0:  # killed by a signal: so is this process
    if -code != signal.SIGKILL:  # whose handler cannot be set, nor needs to be
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def shim(path, sockets):
    with open(path, "w") as f:
        f.write(SHIM.replace("@EXECUTABLE@", sys.executable).replace(
            "@PYTHON@", repr(sys.executable)).replace("@SOCKETS@", repr(sockets)))
    os.chmod(path, 0o755)
    return path


def python(*envs):
    """The `python` for a command that runs the project's scripts in processes a test does not
    start itself (see SHIM), with a zygote for each of envs (this process's environment if none
    is given): the first listening one that takes a process's environment forks it."""
    zygotes = [Zygote.of([sys.executable, "-m", "-"], dict(env))
               for env in envs or [os.environ]]
    if None in zygotes:
        return sys.executable
    zygotes[0].wait()
    name = "python-" + "-".join(str(id(z)) for z in zygotes)
    return shim(os.path.join(zygotes[0].folder, name), [z.socket for z in zygotes])


class Zygote:
    """A started zygote per environment (torch reads some variables, OMP_NUM_THREADS say,
    when it is imported, so a process whose environment differs in one of those gets a zygote
    started in it), started on first use, ended with the session (its stdin closes)."""
    started = {}

    @classmethod
    def of(cls, cmd, env):
        """The zygote to fork cmd from, or None: cmd is not `python <script>` or `python -m
        <module>` with this interpreter, or NANOLOOP_TEST_FRESH is set."""
        if os.environ.get("NANOLOOP_TEST_FRESH") or len(cmd) < 2 or cmd[0] != sys.executable \
                or cmd[1].startswith("-") and (cmd[1] != "-m" or len(cmd) < 3):
            return None
        key = tuple(sorted((k, v) for k, v in env.items()
                           if not any(fnmatch.fnmatchcase(k, p) for p in RUNTIME_ONLY)))
        if key not in cls.started or cls.started[key].proc.poll() is not None:
            cls.started[key] = cls(env)
        return cls.started[key]

    def __init__(self, env):
        self.folder = tempfile.mkdtemp(prefix="nanoloop-zygote-")
        self.socket = os.path.join(self.folder, "socket")
        self.log = open(os.path.join(self.folder, "zygote.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "zygote.py"), self.socket,
             json.dumps(RUNTIME_ONLY)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log)
        self.ready = False  # it says so once it has imported torch (see wait): seconds
        self.python = shim(os.path.join(self.folder, "python"), [self.socket])
        atexit.register(self.close)

    def wait(self):
        """Wait for the zygote to listen; returns it."""
        if not self.ready:
            if self.proc.stdout.readline() != b"ready\n":
                self.log.seek(0)
                raise RuntimeError(f"the zygote did not start: {self.log.read()[-3000:]}")
            self.ready = True
        return self

    def close(self):
        self.proc.stdin.close()  # the zygote's cue to end
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def start(self, cmd, cwd, env, stdin, stdout, stderr, executable=None):
        """The process of cmd, forked; stdin, stdout, stderr as subprocess.Popen takes them;
        executable: its sys.executable, if not this interpreter."""
        kind, target, args = ("module", cmd[2], cmd[3:]) if cmd[1] == "-m" else \
            ("script", cmd[1], cmd[2:])
        self.wait()
        ends, sent, pipes = [], [], {}  # the child's descriptors; ours to close; our ends
        for i, how in enumerate((stdin, stdout, stderr)):
            if how is None:  # this process's own
                ends.append(i)
            elif how == subprocess.DEVNULL:
                ends.append(os.open(os.devnull, os.O_RDWR))
                sent.append(ends[-1])
            elif how == subprocess.PIPE:
                r, w = os.pipe()
                ends.append(r if i == 0 else w)
                sent.append(ends[-1])
                pipes[i] = w if i == 0 else r
            else:
                ends.append(how if isinstance(how, int) else how.fileno())
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        request = {"kind": kind, "target": target, "args": list(args), "cwd": str(cwd),
                   "env": env, "executable": executable}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], ends)
        for fd in sent:
            os.close(fd)
        proc = Forked(cmd, conn, pipes)
        reply = proc.reply(None)
        if "refused" in reply:
            raise RuntimeError(f"the zygote refused {cmd}: {reply['refused']} differs")
        proc.pid = reply["pid"]
        return proc


class Forked:
    """A process forked by a zygote, as subprocess.Popen(text=True) offers one: pid,
    returncode, poll, wait, send_signal, terminate, kill, communicate, and stdin, stdout and
    stderr for the streams given as subprocess.PIPE."""

    def __init__(self, args, conn, pipes):
        self.args, self.conn, self.unread = args, conn, b""
        self.pid = self.returncode = None
        self.stdin = open(pipes[0], "w") if 0 in pipes else None
        self.stdout = open(pipes[1]) if 1 in pipes else None
        self.stderr = open(pipes[2]) if 2 in pipes else None

    def reply(self, timeout):
        """The zygote's next line about this process, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.unread:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                return None
            chunk = self.conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the zygote that ran {self.args} ended")
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    def poll(self, timeout=0):
        if self.returncode is None:
            reply = self.reply(timeout)
            if reply is not None:
                self.returncode = os.waitstatus_to_exitcode(reply["status"])
                self.conn.close()
        return self.returncode

    def wait(self, timeout=None):
        if self.poll(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:  # as Popen: never signal a process already collected
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """Read stdout and stderr to their end, then wait; (stdout, stderr)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = {f: [] for f in (self.stdout, self.stderr) if f is not None}
        for f in streams:
            os.set_blocking(f.fileno(), False)
        open_ = list(streams)
        while open_:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select.select(open_, [], [], left)[0]
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for f in ready:
                chunk = os.read(f.fileno(), 1 << 16)
                if chunk:
                    streams[f].append(chunk)
                else:
                    open_.remove(f)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        out = [None, None]
        for i, f in enumerate((self.stdout, self.stderr)):
            if f is not None:
                out[i] = io.TextIOWrapper(io.BytesIO(b"".join(streams[f]))).read()
                f.close()
        return tuple(out)

def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_runs(data_dir, tmp_path_factory):
    """Tiny trained runs (rmsnorm, scale_visible, alpha), shared by the eval/plot/sample
    tests."""
    from train import main
    outs = {}
    for readout in ("rmsnorm", "scale_visible", "alpha"):
        out = tmp_path_factory.mktemp(readout)
        main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={out}",
                     f"--readout={readout}", "--max_iters=20", "--eval_interval=10"])
        outs[readout] = out
    return outs


@pytest.fixture(scope="session")
def finished_run(data_dir, tmp_path_factory):
    """finished_run(*flags): the folder of a tiny run trained (once a session) with TINY and
    these flags on tiny_char. Shared: a test that changes a run, or resumes it, copies it
    first."""
    from train import main
    made = {}

    def get(*flags):
        if flags not in made:
            out = tmp_path_factory.mktemp("finished")
            main(TINY + [f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={out}",
                         *flags])
            made[flags] = out
        return made[flags]
    return get
