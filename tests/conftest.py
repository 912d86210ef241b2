import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

# One intra-op thread, here and in every process the tests start (they inherit it), unless the
# environment says otherwise: the tests' models are tiny, so a second thread buys nothing, while
# on a machine whose cores are busy a team of OpenMP threads waits for its slowest at every op
# (5-10x slower). Set before anything imports torch (it reads this once, at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny run: seconds on a CPU
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_loops=3", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3",
        "--log_interval=1", "--init=gpt2"]


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
    `python` is on PATH) and a time limit; returns the CompletedProcess.

    The process is forked from a zygote (tests/zygote.py) that has imported torch already: a
    real process, with its own exit status, stdout and stderr, that runs the script from its
    first line as __main__, without the seconds a fresh interpreter spends importing torch.
    NANOLOOP_TEST_FRESH=1 starts a fresh interpreter for each instead, as does anything that
    subprocess.run is given beyond the script, its arguments, environment and time limit."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    if kw or os.environ.get("NANOLOOP_TEST_FRESH"):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=timeout, **kw)
    env = dict(os.environ) if env is None else dict(env)  # what subprocess.run would pass
    return Zygote.of(env).run(cmd, env, timeout)


class Zygote:
    """A started zygote per environment (torch reads some variables, OMP_NUM_THREADS say,
    when it is imported), started on first use; each ends when the session does (its request
    pipe closes)."""
    started = {}
    VARYING = {"PYTEST_CURRENT_TEST"}  # pytest sets it per test; no import reads it

    @classmethod
    def of(cls, env):
        key = tuple(sorted((k, v) for k, v in env.items() if k not in cls.VARYING))
        if key not in cls.started or cls.started[key].proc.poll() is not None:
            cls.started[key] = cls(env)
        return cls.started[key]

    def __init__(self, env):
        self.folder = tempfile.mkdtemp(prefix="nanoloop-zygote-")
        req_r, req_w = os.pipe()
        self.replies, rep_w = os.pipe()
        self.log = open(os.path.join(self.folder, "zygote.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "zygote.py"), str(req_r), str(rep_w)],
            cwd=ROOT, env=env, pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=self.log)
        os.close(req_r)
        os.close(rep_w)
        self.requests = os.fdopen(req_w, "w")
        self.unread = b""
        atexit.register(self.close)

    def close(self):
        self.requests.close()  # the zygote's cue to end
        self.proc.wait()
        os.close(self.replies)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def reply(self, timeout=None):
        """The next reply, or None after `timeout` seconds without one (read unbuffered, so
        that a reply already read is never waited for)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.unread:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.replies], [], [], left)[0]:
                return None
            chunk = os.read(self.replies, 4096)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError(f"the zygote ended: {self.log.read()[-3000:]}")
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd, env, timeout):
        """subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout), the process forked from the zygote."""
        out, err = (os.path.join(self.folder, name) for name in ("stdout", "stderr"))
        self.requests.write(json.dumps({"script": cmd[1], "args": cmd[2:], "cwd": ROOT,
                                        "env": env, "stdout": out, "stderr": err}) + "\n")
        self.requests.flush()
        pid = self.reply()["pid"]
        done = self.reply(timeout)
        if done is None:  # as subprocess.run: kill it, then raise
            os.kill(pid, signal.SIGKILL)
            self.reply()
        outputs = []
        for path in (out, err):
            # text=True: the locale's encoding, universal newlines (bytes in TimeoutExpired)
            with open(path, "rb" if done is None else "r") as f:
                outputs.append(f.read())
            os.remove(path)
        if done is None:
            raise subprocess.TimeoutExpired(cmd, timeout, *outputs)
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(done["status"]),
                                           *outputs)


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
