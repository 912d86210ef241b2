"""Bad input gets one clear line and a non-zero exit; a killed run loses nothing; NaN is caught."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, read_log, run


def train_args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny_char", f"--out_dir={out}", *extra]


def assert_clear_error(p, *words):
    assert p.returncode != 0, p.stdout[-500:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    for w in words:
        assert w in p.stderr, p.stderr[-1000:]


# ---- bad input (1-3 and 10-11 are in test_train.py / test_eval.py) ---------------------------

def test_missing_training_data_names_the_prepare_command_that_makes_it(tmp_path):
    p = run("train.py", f"--data_dir={tmp_path}", "--dataset=shakespeare_gpt2",
            f"--out_dir={tmp_path}/o")
    assert_clear_error(p, "no data in",
                       f"python prepare.py --tokenizer=gpt2 --data_dir={tmp_path}")
    p = run("train.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path}/o")
    cmd = p.stderr.split("make it with: ")[1].split()  # run the advice: the data is then there
    assert cmd[:2] == ["python", "prepare.py"]
    assert run(*cmd[1:]).returncode == 0
    assert (tmp_path / "shakespeare_char" / "train.bin").is_file()


@pytest.fixture(scope="module")
def trained(finished_run):
    """A finished run, shared with other tests: these read it, and leave it as it was."""
    return finished_run("--max_iters=4", "--eval_interval=2")


def test_corrupt_or_truncated_checkpoint(trained, data_dir, tmp_path):
    blob = (trained / "ckpt.pt").read_bytes()
    for name, content in (("truncated", blob[:len(blob) // 2]), ("garbage", b"not a checkpoint")):
        out = tmp_path / name
        out.mkdir()
        (out / "ckpt.pt").write_bytes(content)
        p = run("train.py", "--init_from=resume", f"--out_dir={out}", f"--data_dir={data_dir}")
        assert_clear_error(p, "corrupt or truncated", str(out))
        assert (out / "ckpt.pt").read_bytes() == content  # nothing overwritten
        p = run("sample.py", f"--out_dir={out}")
        assert_clear_error(p, "corrupt or truncated")


def test_resume_with_a_different_model_flag(trained, data_dir):
    before = (trained / "ckpt.pt").read_bytes()
    p = run("train.py", "--init_from=resume", f"--out_dir={trained}", f"--data_dir={data_dir}",
            "--readout=scale_visible")
    assert_clear_error(p, "--readout='scale_visible' differs from the checkpoint's "
                          "readout='rmsnorm'")
    assert (trained / "ckpt.pt").read_bytes() == before


def test_device_and_dtype_the_machine_cannot_do(data_dir, tmp_path):
    if not torch.cuda.is_available():
        p = run("train.py", *train_args(data_dir, tmp_path), "--device=cuda")
        assert_clear_error(p, "--device='cuda' is not available on this machine",
                           "devices here: cpu")
    p = run("train.py", *train_args(data_dir, tmp_path, "--device=cpu", "--dtype=float16",
                                    "--max_iters=2"))
    assert p.returncode == 0 and "using float32" in p.stderr  # documented fallback
    p = run("train.py", *train_args(data_dir, tmp_path, "--dtype=fp8"))
    assert_clear_error(p, "float32 | bfloat16 | float16")


def test_out_dir_that_cannot_be_written(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = run("train.py", *train_args(data_dir, blocker / "out"))
    assert_clear_error(p, "cannot write to --out_dir")


def test_resume_without_checkpoint(data_dir, tmp_path):
    p = run("train.py", "--init_from=resume", f"--out_dir={tmp_path}", f"--data_dir={data_dir}")
    assert_clear_error(p, "no checkpoint at")


def test_sample_with_empty_checkpoint_path():
    assert_clear_error(run("sample.py", "--out_dir="), "--out_dir='' is invalid")


class RunsCode:
    """Unpickling this calls `touch` on a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_checkpoint_with_pickled_code_is_refused_unrun(trained, data_dir, tmp_path):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    ckpt["config"]["note"] = RunsCode(tmp_path / "ran")
    out = tmp_path / "evil"
    out.mkdir()
    torch.save(ckpt, out / "ckpt.pt")
    for script, args in (("sample.py", []), ("eval.py", [f"--data_dir={data_dir}"]),
                         ("train.py", ["--init_from=resume", f"--data_dir={data_dir}"])):
        p = run(script, f"--out_dir={out}", *args)
        assert_clear_error(p, "refused unopened", "could run code")
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()
    torch.load(out / "ckpt.pt", weights_only=False)  # the unsafe loader would have run it
    assert (tmp_path / "ran").exists()


def test_prepare_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    for arg, words in ((tmp_path / "nope.txt", "comma-separated existing files"),
                       (tmp_path / "empty.txt", "is empty"),
                       (tmp_path / "blob.bin", "looks binary")):
        p = run("prepare.py", f"--input={arg}", f"--data_dir={tmp_path}/d")
        assert_clear_error(p, str(arg), words)
    assert not (tmp_path / "d").exists()


# ---- faults --------------------------------------------------------------------------------

def check_intact(out):
    """The checkpoint loads, and the log is whole lines with strictly increasing iterations."""
    if (out / "ckpt.pt").exists():
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        assert ckpt["iter_num"] % 3 == 0
    if (out / "log.jsonl").exists():
        raw = (out / "log.jsonl").read_text()
        assert raw == "" or raw.endswith("\n")
        iters = [json.loads(line)["iter"] for line in raw.splitlines()]
        assert iters == sorted(set(iters))


def test_kill_at_random_moments_then_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(data_dir, out, "--max_iters=30", "--eval_interval=3", "--n_embd=128",
                      "--n_head=4")
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(6):
        resume = ["--init_from=resume"] if (out / "ckpt.pt").exists() else []
        proc = subprocess.Popen([sys.executable, "train.py", *args, *resume], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + rng.uniform(1.5, 5.0)
        while time.time() < deadline and proc.poll() is None:
            if attempt % 2 and list(out.glob("ckpt.pt.*.tmp")):  # odd attempts: mid-write
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_intact(out)
    resume = ["--init_from=resume"] if (out / "ckpt.pt").exists() else []
    p = run("train.py", *args, *resume, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [e["iter"] for e in read_log(out)] == list(range(0, 31, 3))


def test_same_seed_same_losses(data_dir, tmp_path):
    from train import main
    for name in ("a", "b"):
        main(train_args(data_dir, tmp_path / name, "--max_iters=6", "--eval_interval=3",
                        "--dropout=0.1"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [e["val_loop_ce"] for e in a] == [e["val_loop_ce"] for e in b]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    p = run("train.py", *train_args(data_dir, tmp_path, "--learning_rate=1e30", "--warmup_iters=0",
                                    "--max_iters=20", "--eval_interval=10"))
    assert_clear_error(p, "non-finite loss at iter", "loop", "||h_", "last good checkpoint")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_skip_nonfinite_counts_skipped_steps(data_dir, tmp_path, monkeypatch):
    import model as model_module
    from train import main
    forward, calls = model_module.LoopedGPT.forward, {"n": 0}

    def flaky(self, idx, targets=None, **kw):  # step 3: a NaN loss
        logits, loss, stats = forward(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                loss = loss * float("nan")
        return logits, loss, stats
    monkeypatch.setattr(model_module.LoopedGPT, "forward", flaky)
    main(train_args(data_dir, tmp_path, "--max_iters=6", "--eval_interval=6",
                    "--skip_nonfinite=True"))
    last = read_log(tmp_path)[-1]
    assert last["skipped_steps"] == 1 and all(map(math.isfinite, last["val_loop_ce"]))


def test_fp16_overflow_warning():
    from train import fp16_warning
    assert fp16_warning([10.0, 20.0], n_embd=64) is None  # RMS 2.5
    msg = fp16_warning([100.0, 3000.0, 2000.0], n_embd=64)  # RMS 375 at loop 2
    assert "||h_2||" in msg and "scale_visible" in msg and "bfloat16" in msg


def test_checkpoint_from_another_version_is_named(trained, tmp_path):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    ckpt["model"]["block.0.mlp.c_fc.weight"] = torch.zeros(3, 3)  # an older layout, say
    out = tmp_path / "old"
    out.mkdir()
    torch.save(ckpt, out / "ckpt.pt")
    p = run("sample.py", f"--out_dir={out}")
    assert_clear_error(p, "do not fit this model.py", "train it again")
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_run_that_never_leaves_its_warmup_says_so(data_dir, tmp_path, capsys):
    from train import main

    def warmup_lines(name, *flags):
        main(train_args(data_dir, tmp_path / name, *flags))
        return [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("warmup:")]
    assert warmup_lines("a", "--max_iters=2", "--warmup_iters=2") == [
        "warmup: --max_iters=2 <= --warmup_iters=2, so the run never leaves its warmup: the "
        "learning rate ends at 0.002, short of --learning_rate=0.003"]
    assert warmup_lines("b", "--max_iters=3", "--warmup_iters=2") == []
    assert warmup_lines("c", "--max_iters=0", "--warmup_iters=2") == []  # evaluation only
