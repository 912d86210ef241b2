"""Preemption and elastic restarts, for real: a scheduler's SIGTERM, SLURM's SIGUSR1 or Ctrl-C at
random moments, a second signal or a SIGKILL in the middle of the checkpoint write, and a
torchrun group that is signalled or loses a process. After each, the same command with
--init_from=auto goes on, and the run ends with exactly (torch.equal) the weights, optimizer
state and RNG states of a run never stopped, and a log that holds every evaluation once.

Nothing is mocked: real processes get real signals. The one test hook is
NANOLOOP_TEST_SAVE_DELAY (rundir.py), which makes a checkpoint write slow enough to be hit."""

import json
import os
import random
import re
import signal
import socket
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, forked_pid, popen, read_log

# dropout: a resume must continue the RNG. eval_interval does not change the weights (an
# evaluation draws nothing from the RNG), so each test picks its own.
COMMON = [*TINY, "--dropout=0.1", "--device=cpu"]
# --sampling=epochs in one process (the data position is a place in the epoch stream: 52
# steps an epoch at stride 256, so the run crosses into a second), the default windows under
# torchrun, whose run needs no more steps than its two stops at random moments and a margin
STEPS = 60
GROUP_STEPS = 32
ONE = [*COMMON, f"--max_iters={STEPS}", "--sampling=epochs", "--stride=256"]
GROUP = [*COMMON, f"--max_iters={GROUP_STEPS}"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# torchrun's processes are forked from a zygote (seconds of a core saved per start), but for
# rank 1 of the last group (restart 2), which starts fresh: a forked process that ends right
# after a collective (rank 1 at a run's end: 3 runs in 20) hangs in torch's teardown of the
# group, whose gloo thread needs the GIL to free that collective's tensors (test_device.torchrun).
# A process stopped by a signal ends after a barrier (no tensors), one whose collective failed
# holds it (its traceback) while it exits, and rank 0 evaluates and writes after a run's last
# collective: none hung in 24 runs of the test's two restarts, each rank SIGKILLed in 12.
GROUP_ENV = dict(ENV, NANOLOOP_TEST_FRESH_WORKERS="1@2")


def train_cmd(data_dir, out, *extra, args=ONE):
    return [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--data_dir={data_dir}",
            "--dataset=tiny_char", f"--out_dir={out}", *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(data_dir, out, *extra, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "--monitor-interval=0.1", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *train_cmd(data_dir, out, *extra, args=GROUP)[1:]]


def launch(cmd, logs, env=ENV, fresh=False, forked_children=False):
    """Start cmd with stdout and stderr in files under `logs` (a pipe nobody reads can fill up
    and stall the process); forked from a zygote (conftest.popen), unless fresh, and so are the
    Python processes it starts if forked_children."""
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.out")))
    with open(logs / f"{n}.out", "w") as o, open(logs / f"{n}.err", "w") as e:
        proc = popen(cmd, env=env, stdout=o, stderr=e, fresh=fresh,
                     forked_children=forked_children)
    proc.out, proc.err = logs / f"{n}.out", logs / f"{n}.err"
    return proc


def wait_until(test, proc, timeout=120):
    deadline = time.time() + timeout
    while not test():
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.err.read_text()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def finish(proc, timeout=180):
    proc.wait(timeout=timeout)
    return proc.returncode, proc.out.read_text(), proc.err.read_text()


def logged(out, at_least):
    """The log's last evaluation is at iteration `at_least` or later (the run is past it). Only
    its last whole line is parsed: this is polled every few milliseconds, on a core the run
    needs."""
    path = out / "log.jsonl"
    whole = path.read_bytes().split(b"\n")[:-1] if path.exists() else []
    return bool(whole) and json.loads(whole[-1])["iter"] >= at_least


def stop_line(err, name, last=True):
    """The one line a stop ends with (the last, but for torchrun's report after it), and the
    iteration it names."""
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-2000:]  # one process writes, one line
    m = re.fullmatch(rf"stopped by {name}: the checkpoint of iter (\d+) is written; resume "
                     rf"with: .* --init_from=resume --out_dir=\S+ \(or run the same command "
                     rf"with --init_from=auto\)", lines[0])
    assert m, lines[0]
    assert not last or err.strip().splitlines()[-1] == lines[0]
    return int(m.group(1))


def unevaluated_checkpoint(out, n):
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == n and "log_entry" not in ckpt
    assert not list(out.glob("ckpt.pt.*.tmp"))


class Reference:
    """A run never stopped, started in the background at once and awaited when needed: one
    process per (command, environment, fresh)."""

    def __init__(self, out, logs, *runs):
        self.out = out
        self.procs = [launch(cmd, logs, env, fresh=fresh) for cmd, env, fresh in runs]

    def checkpoint(self):
        for proc in self.procs:
            rc, _, err = finish(proc)
            assert rc == 0, err[-2000:]
        return torch.load(self.out / "ckpt.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_run")
    return Reference(out, tmp_path_factory.mktemp("one_run_logs"),
                     (train_cmd(data_dir, out, "--eval_interval=1000"), ENV, False))


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    """Two processes in the environment torchrun gives its workers, without the launcher; rank
    1, which ends right after a collective, fresh (see GROUP_ENV)."""
    out = tmp_path_factory.mktemp("ddp_run")
    cmd = train_cmd(data_dir, out, "--eval_interval=1000", args=GROUP)
    group = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    return Reference(out, tmp_path_factory.mktemp("ddp_run_logs"),
                     *[(cmd, dict(ENV, **group, RANK=str(r), LOCAL_RANK=str(r)), r > 0)
                       for r in range(2)])


def assert_same_run(out, reference, evals):
    """Exactly the reference's weights, AdamW moments and every process's RNG state, and every
    evaluation logged once."""
    got, want = torch.load(out / "ckpt.pt", weights_only=True), reference.checkpoint()
    assert got["iter_num"] == want["iter_num"] == evals[-1]
    for name, w in want["model"].items():
        assert torch.equal(got["model"][name], w), name
    for i, state in want["optimizer"]["state"].items():
        for key, v in state.items():
            assert torch.equal(got["optimizer"]["state"][i][key], v), (i, key)
    assert len(got["rng"]) == len(want["rng"])
    for a, b in zip(got["rng"], want["rng"]):
        assert torch.equal(a["cpu"], b["cpu"])
    assert [e["iter"] for e in read_log(out)] == evals


# ---- --init_from=auto ---------------------------------------------------------------------------

def test_auto_resumes_a_run_starts_where_there_is_none_and_refuses_a_log_alone(data_dir, tmp_path,
                                                                            capsys):
    from rundir import start_mode
    from train import main
    out = tmp_path / "out"
    assert start_mode(str(out)) == ("scratch", None)  # no folder
    out.mkdir()
    (out / "log.jsonl").write_text("")  # a run stopped before its first checkpoint...
    (out / "ckpt.pt.123.tmp").write_bytes(b"half")  # ...killed in the middle of writing it
    assert start_mode(str(out)) == ("scratch", None)
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={out}",
            "--eval_interval=2", "--init_from=auto"]
    main([*args, "--max_iters=2"])
    assert not list(out.glob("*.tmp")) and start_mode(str(out)) == ("resume", None)
    main([*args, "--max_iters=4"])  # the same command, to more steps: it goes on
    assert "resuming at iter 2" in capsys.readouterr().out
    assert [e["iter"] for e in read_log(out)] == [0, 2, 4]

    (out / "ckpt.pt").unlink()  # a log of three evaluations, and its checkpoint gone
    with pytest.raises(SystemExit) as e:
        main([*args, "--max_iters=4"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.splitlines() == [err], err
    assert "holds a log of 3 evaluations (the last at iter 4) but no ckpt.pt" in err
    assert [e["iter"] for e in read_log(out)] == [0, 2, 4]  # untouched
    with pytest.raises(SystemExit) as e:
        main([*args, "--overwrite=True"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.splitlines() == [err] and "--overwrite=True" in err


# ---- one process ----------------------------------------------------------------------------

def test_signals_at_random_moments_and_during_the_checkpoint_write(data_dir, tmp_path, one_run):
    """Ctrl-C at a random moment stops as SIGTERM does: the step ends, that iteration is
    written, exit 130 and one line. Ctrl-C, SIGUSR1 and SIGTERM again while that checkpoint is
    being written, and SIGTERM while the process exits, change nothing: the write finishes,
    whole, and the status stays 130. Then SIGTERM at a random moment,
    and SIGKILL while its checkpoint is being written (a grace period that ran out): the
    previous checkpoint is whole, and the same command removes the temp file, goes on from it
    and ends as a run never stopped."""
    out = tmp_path / "run"
    cmd = train_cmd(data_dir, out, "--eval_interval=1000", "--init_from=auto")
    slow = dict(ENV, NANOLOOP_TEST_SAVE_DELAY="1.5")
    rng = random.Random(32)
    proc = launch(cmd, tmp_path / "logs", env=slow)
    wait_until(lambda: logged(out, 0), proc)
    time.sleep(rng.uniform(0.05, 0.3))
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: list(out.glob("ckpt.pt.*.tmp")), proc)
    for again in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
        proc.send_signal(again)
        time.sleep(0.05)
    while "stopped by" not in proc.err.read_text() and proc.poll() is None:
        time.sleep(0.005)
    while proc.poll() is None:  # SIGTERM while it exits, as torchrun's own may come late
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    rc, _, err = finish(proc)
    assert rc == 130 and "Traceback" not in err, err[-2000:]
    first = stop_line(err, "SIGINT")
    assert f"resume with: python train.py --init_from=resume --out_dir={out} " in err
    unevaluated_checkpoint(out, first)
    assert [e["iter"] for e in read_log(out)] == [0]

    proc = launch(cmd, tmp_path / "logs", env=slow)
    wait_until(lambda: "resuming at iter" in proc.out.read_text(), proc)
    time.sleep(rng.uniform(0.05, 0.3))
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: list(out.glob("ckpt.pt.*.tmp")), proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert list(out.glob("ckpt.pt.*.tmp"))  # what a SIGKILL mid-write leaves behind
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == first  # whole

    rc, out_text, err = finish(launch(cmd, tmp_path / "logs"))
    assert rc == 0, err[-2000:]
    assert f"resuming at iter {first}" in out_text
    assert not list(out.glob("ckpt.pt.*.tmp"))
    assert_same_run(out, one_run, [0, STEPS])


# ---- torchrun: two gloo processes -----------------------------------------------------------

def workers(launcher):
    """{rank: pid} of the train.py processes torchrun started (a forked one's own, not its
    shim's: conftest.forked_pid)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, StopIteration):
            continue  # gone meanwhile
        if ppid == launcher.pid and b"RANK" in env:
            found[int(env[b"RANK"])] = forked_pid(int(pid))
    return found


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds ranks in /proc")


@needs_proc
def test_torchrun_stops_together_and_restarts_a_group_that_lost_a_process(data_dir, tmp_path,
                                                                          ddp_run):
    """Under torchrun --max-restarts=2 with --init_from=auto. SIGTERM to rank 1 alone at a
    random moment: rank 0, never signalled, stops after the same step, writes the one
    checkpoint and the one line; torchrun restarts the group, which resumes there. Then SIGKILL
    to a rank (a GPU fault, an OOM kill): the other's collective fails (one line), torchrun
    restarts the group, which resumes from the last checkpoint. The run ends as one never
    stopped. --eval_interval=1: the stop lands on an iteration due for evaluation, which the
    stop skips and the resumed group must do first."""
    out = tmp_path / "run"
    cmd = torchrun_cmd(data_dir, out, "--eval_interval=1", "--init_from=auto", restarts=2)
    rng = random.Random(7)
    proc = launch(cmd, tmp_path / "logs", env=GROUP_ENV, forked_children=True)
    target = rng.randrange(4, 12)
    wait_until(lambda: logged(out, target), proc)
    time.sleep(rng.uniform(0, 0.03))
    os.kill(workers(proc)[1], signal.SIGTERM)
    wait_until(lambda: "resuming at iter" in proc.out.read_text(), proc)
    n = stop_line(proc.err.read_text(), "SIGTERM", last=False)
    assert f"2 processes, resuming at iter {n}" in proc.out.read_text()

    target = n + rng.randrange(4, 12)
    wait_until(lambda: logged(out, target), proc)
    time.sleep(rng.uniform(0, 0.03))
    os.kill(workers(proc)[rng.choice([0, 1])], signal.SIGKILL)
    rc, out_text, err = finish(proc)
    assert rc == 0, err[-3000:]
    resumed = [int(k) for k in re.findall(r"2 processes, resuming at iter (\d+)", out_text)]
    assert len(resumed) == 2 and resumed[1] >= target, resumed
    assert stop_line(err, "SIGTERM", last=False) == n  # no other stop
    # the survivor's collective failed: one line that says what restarts it
    assert "a collective failed at iter" in err and "--init_from=auto" in err, err[-3000:]
    assert_same_run(out, ddp_run, list(range(GROUP_STEPS + 1)))
