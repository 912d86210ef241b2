"""The world around the options, for real: damaged files, a read-only or full disk, Ctrl-C, two
runs in one folder, the log's promise. Each fault ends in one line that names the file and the
way out, with nothing already on disk lost."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, popen, read_log, run, run_cmd


def train_args(data_dir, out, *extra, dataset="tiny_char"):
    return [*TINY, f"--data_dir={data_dir}", f"--dataset={dataset}", f"--out_dir={out}", *extra]


def one_line_error(p, status, *words):
    err = p.stderr.strip()
    assert p.returncode == status, (p.returncode, err[-500:])
    assert "Traceback" not in err, err[-1500:]
    last = err.splitlines()[-1]
    for w in words:
        assert w in last, last
    return last


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


# ---- damaged or foreign files --------------------------------------------------------------

def damage(folder, how):
    meta = folder / "meta.json"
    if how == "empty train.bin":
        (folder / "train.bin").write_bytes(b"")
    elif how == "train.bin cut mid-token":
        data = (folder / "train.bin").read_bytes()
        (folder / "train.bin").write_bytes(data[:-1])
    elif how == "no val.bin":
        (folder / "val.bin").unlink()
    elif how == "empty meta.json":
        meta.write_text("")
    elif how == "meta.json cut":
        meta.write_text(meta.read_text()[:40])
    elif how == "meta.json lacks vocab_size":
        m = json.loads(meta.read_text())
        del m["vocab_size"]
        meta.write_text(json.dumps(m))
    elif how == "meta.json of other .bin files":  # a re-prepare killed half-way, say
        m = json.loads(meta.read_text())
        m["train_tokens"] += 1000
        meta.write_text(json.dumps(m))


@pytest.mark.parametrize("how,file", [
    ("empty train.bin", "train.bin"), ("train.bin cut mid-token", "train.bin"),
    ("no val.bin", "val.bin"), ("empty meta.json", "meta.json"), ("meta.json cut", "meta.json"),
    ("meta.json lacks vocab_size", "meta.json"), ("meta.json of other .bin files", "train.bin")])
def test_damaged_dataset_is_one_line_naming_the_file(how, file, data_dir, tmp_path):
    shutil.copytree(data_dir / "tiny_char", tmp_path / "data" / "broken")
    damage(tmp_path / "data" / "broken", how)
    p = run("train.py", *train_args(tmp_path / "data", tmp_path / "out", "--max_iters=0",
                                     dataset="broken"))
    one_line_error(p, 1, file, "prepare")
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_prepare_killed_between_files_leaves_no_mismatched_meta(data_dir, tmp_path, text_file):
    """prepare.py takes meta.json away before it replaces the .bin files: a kill between them
    leaves a folder that train.py calls missing data, not one it trains on wrongly."""
    from prepare import main
    folder = tmp_path / "d" / "re"
    shutil.copytree(data_dir / "tiny_char", folder)
    calls = []
    real_replace = os.replace

    def killed_after_first_bin(src, dst):
        calls.append(dst)
        if str(dst).endswith("train.bin"):
            real_replace(src, dst)
            raise KeyboardInterrupt  # the kill
        real_replace(src, dst)
    os.replace = killed_after_first_bin
    try:
        with pytest.raises(KeyboardInterrupt):
            main([f"--input={text_file}", "--tokenizer=gpt2", f"--data_dir={tmp_path / 'd'}",
                  "--name=re"])
    finally:
        os.replace = real_replace
    assert not (folder / "meta.json").exists()
    p = run("train.py", *train_args(tmp_path / "d", tmp_path / "out", dataset="re"))
    one_line_error(p, 1, "no data in", "prepare.py")


@pytest.mark.parametrize("text,words", [
    (b"n_layer = = 2\n", "line 1"), (b"n_layer = undefined_name\n", "NameError"),
    (b"dataset = '\xff\xfe'\n", "not UTF-8")])
def test_broken_preset_is_one_line(text, words, tmp_path):
    preset = tmp_path / "broken.py"
    preset.write_bytes(text)
    p = run("train.py", str(preset), f"--out_dir={tmp_path / 'out'}")
    one_line_error(p, 2, str(preset), words)
    assert not (tmp_path / "out").exists()


# ---- the disk ---------------------------------------------------------------------------------

@contextlib.contextmanager
def immutable(path):
    """chattr +i: not writable even by root (chmod does not stop root)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def copy_of_finished(finished_run, tmp_path, *flags):
    """A copy, in tmp_path/out, of a run that train.py finished with these flags."""
    out = tmp_path / "out"
    shutil.copytree(finished_run(*flags), out)
    return out


def test_read_only_out_dir_is_refused_before_anything(data_dir, tmp_path, finished_run):
    out = copy_of_finished(finished_run, tmp_path, "--max_iters=2")
    before = digest(out)
    with immutable(out):
        p = run("train.py", *train_args(data_dir, out, "--init_from=resume", "--max_iters=4"))
        one_line_error(p, 1, "cannot write to --out_dir", "Operation not permitted")
    assert digest(out) == before  # the log was not trimmed, the checkpoint not touched


@contextlib.contextmanager
def small_disk(path, size):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_at_checkpoint_keeps_the_old_one(data_dir, tmp_path):
    """A disk with room for one checkpoint, not for the temp file of the next: the run stops with
    one line, the first checkpoint and the log are whole, and the run resumes elsewhere."""
    probe = tmp_path / "probe"
    assert run("train.py", *train_args(data_dir, probe, "--max_iters=0")).returncode == 0
    size = (probe / "ckpt.pt").stat().st_size
    with small_disk(tmp_path / "disk", f"{int(size * 1.5) // 1024 + 8}k") as disk:
        out = disk / "out"
        p = run("train.py", *train_args(data_dir, out, "--max_iters=4", "--eval_interval=2"))
        one_line_error(p, 1, "the disk is full", "ckpt.pt", "resume")
        assert [e["iter"] for e in read_log(out)] == [0]
        assert not list(out.glob("*.tmp"))
        kept = out / "ckpt.pt"
        shutil.copytree(out, tmp_path / "moved")
    import torch
    assert torch.load(tmp_path / "moved" / "ckpt.pt", weights_only=True)["iter_num"] == 0
    del kept
    p = run("train.py", *train_args(data_dir, tmp_path / "moved", "--init_from=resume",
                                     "--max_iters=4", "--eval_interval=2"))
    assert p.returncode == 0, p.stderr[-1000:]
    assert [e["iter"] for e in read_log(tmp_path / "moved")] == [0, 2, 4]


def test_out_dir_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    p = run("train.py", *train_args(data_dir, tmp_path / "out", "--max_iters=0"))
    one_line_error(p, 1, "is a file, not a folder")


# ---- interruptions ------------------------------------------------------------------------------

def start(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return popen([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_log(out, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "log.jsonl").exists() and len(read_log(out)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-1000:]
        time.sleep(0.05)
    raise AssertionError("the run did not log in time")


def test_ctrl_c_twice_stops_at_once(data_dir, tmp_path):
    """One Ctrl-C ends the step and checkpoints it, as SIGTERM does (test_preempt.py). A second
    one before that stops at once, as Ctrl-C did before: here in a long first evaluation."""
    out = tmp_path / "out"
    proc = start(train_args(data_dir, out, "--max_iters=100000", "--eval_iters=2000"))
    assert "parameters on" in proc.stdout.readline()  # the signal handlers are in place
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-1500:]
    assert err.strip().splitlines()[-1] == "interrupted at iter 0: no checkpoint was written yet"
    assert not (out / "ckpt.pt").exists() and not list(out.glob("*.tmp"))


def test_second_run_in_one_folder_is_refused_and_a_killed_run_leaves_no_lock(data_dir, tmp_path):
    out = tmp_path / "out"
    first = start(train_args(data_dir, out, "--max_iters=100000", "--eval_interval=5"))
    try:
        wait_for_log(out, 1, first)
        second = run("train.py", *train_args(data_dir, out, "--init_from=resume",
                                              "--max_iters=10"))
        one_line_error(second, 1, str(out), "in use by train.py", f"pid {first.pid}")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run("train.py", *train_args(data_dir, out, "--init_from=resume",
                                         f"--max_iters={read_log(out)[-1]['iter'] + 5}"))
    assert third.returncode == 0, third.stderr[-1000:]


def test_scratch_run_keeps_the_run_already_in_the_folder(data_dir, tmp_path, finished_run):
    out = copy_of_finished(finished_run, tmp_path, "--max_iters=2")
    before = digest(out)
    p = run("train.py", *train_args(data_dir, out, "--max_iters=2", "--readout=scale_visible"))
    one_line_error(p, 1, "already holds a run", "--init_from=resume", "--overwrite=True")
    assert digest(out) == before
    p = run("train.py", *train_args(data_dir, out, "--max_iters=2", "--overwrite=True",
                                     "--readout=scale_visible"))
    assert p.returncode == 0 and read_log(out)[-1]["config"]["readout"] == "scale_visible"


# ---- the log: appended, never rewritten ------------------------------------------------------

def test_extending_a_finished_run_keeps_every_line(data_dir, tmp_path, finished_run):
    out = copy_of_finished(finished_run, tmp_path, "--max_iters=4", "--eval_interval=2")
    finished = (out / "log.jsonl").read_bytes()
    p = run("train.py", *train_args(data_dir, out, "--init_from=resume", "--max_iters=8",
                                     "--eval_interval=2"))
    assert p.returncode == 0, p.stderr[-1000:]
    assert (out / "log.jsonl").read_bytes().startswith(finished)
    log = read_log(out)
    assert [e["iter"] for e in log] == [0, 2, 4, 6, 8]
    assert all(e["tokens_per_sec"] > 0 for e in log[1:])


def test_hand_edited_log_lines_lose_nothing_on_resume(data_dir, tmp_path, finished_run):
    from rundir import read_log as lenient
    out = copy_of_finished(finished_run, tmp_path, "--max_iters=4", "--eval_interval=2")
    lines = (out / "log.jsonl").read_text().splitlines(True)
    edited = lines[0] + "\n" + "# my note: lr looked high here\n" + "".join(lines[1:])
    (out / "log.jsonl").write_text(edited)
    p = run("train.py", *train_args(data_dir, out, "--init_from=resume", "--max_iters=6",
                                     "--eval_interval=2"))
    assert p.returncode == 0, p.stderr[-1000:]
    assert (out / "log.jsonl").read_text().startswith(edited)
    assert [e["iter"] for e in lenient(out / "log.jsonl")] == [0, 2, 4, 6]


def test_kill_between_checkpoint_and_log_entry_is_repaired_with_the_real_entry(data_dir,
                                                                              tmp_path,
                                                                              finished_run):
    import torch
    out = copy_of_finished(finished_run, tmp_path, "--max_iters=4", "--eval_interval=2")
    lines = (out / "log.jsonl").read_text().splitlines(True)
    (out / "log.jsonl").write_text("".join(lines[:-1]))  # the kill came before the last line
    p = run("train.py", *train_args(data_dir, out, "--init_from=resume", "--max_iters=4"))
    assert p.returncode == 0, p.stderr[-1000:]
    assert (out / "log.jsonl").read_text() == "".join(lines)
    assert torch.load(out / "ckpt.pt", weights_only=True)["log_entry"]["tokens_per_sec"] > 0


# ---- eval.py: the run's own data, checked before the work, nothing lost to a late failure ------

@pytest.fixture
def run_copy(tiny_runs, tmp_path):
    shutil.copytree(tiny_runs["rmsnorm"], tmp_path / "run")
    return tmp_path / "run"


def test_eval_finds_the_data_the_run_was_trained_on(run_copy, tmp_path):
    """From another folder, without --data_dir: the run's recorded data_dir is used."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = run_cmd([sys.executable, os.path.join(ROOT, "eval.py"), f"--out_dir={run_copy}",
                 "--eval_iters=1", "--n_thresholds=2"], cwd=elsewhere)
    assert p.returncode == 0, p.stderr[-1000:]


def test_eval_on_a_dataset_prepared_again_differently(run_copy, data_dir, tmp_path):
    import torch
    ckpt = torch.load(run_copy / "ckpt.pt", weights_only=True)
    shutil.copytree(data_dir / "tiny_char", tmp_path / "d" / "tiny_char")
    meta = tmp_path / "d" / "tiny_char" / "meta.json"
    m = json.loads(meta.read_text())
    m["chars"] = m["chars"] + ["\u00e9"]  # one more character: another vocabulary
    m["vocab_size"] += 1
    meta.write_text(json.dumps(m))
    p = run("eval.py", f"--out_dir={run_copy}", f"--data_dir={tmp_path / 'd'}")
    one_line_error(p, 1, "meta.json has vocab_size", str(ckpt["config"]["vocab_size"]))


def test_eval_all_refuses_a_prompt_it_cannot_encode_before_the_work(run_copy):
    before = digest(run_copy)
    p = run("eval.py", f"--out_dir={run_copy}", "--run=all", "--start=\u4e2d\u6587")
    one_line_error(p, 1, "--start=", "cannot be encoded")
    assert digest(run_copy) == before


def test_eval_on_a_damaged_eval_json(run_copy):
    (run_copy / "eval.json").write_text('{"per_depth": {"k": [1, 2')
    p = run("eval.py", f"--out_dir={run_copy}", "--run=scale", "--eval_iters=1")
    one_line_error(p, 1, "eval.json is damaged", "run eval.py again")


def test_eval_keeps_the_parts_done_before_a_late_failure(run_copy, monkeypatch):
    import eval as eval_script

    def broken(*args, **kw):
        raise RuntimeError("a late failure")
    monkeypatch.setattr(eval_script, "spread", broken)
    with pytest.raises(RuntimeError, match="a late failure"):
        eval_script.main([f"--out_dir={run_copy}", "--run=all", "--eval_iters=1",
                          "--n_thresholds=2"])
    done = json.loads((run_copy / "eval.json").read_text())
    assert {"per_depth", "halting", "halting_paper", "lens", "lemma1", "lemma2",
            "variable_depth", "clamp", "scale"} <= done.keys()


@pytest.mark.parametrize("script,args", [
    ("plot_norms.py", ["--out=no/such/folder/fig.png"]),
    ("plot_norms.py", ["--depth_map=no/such/folder/map.png"]),
    ("bench.py", ["--json=no/such/folder/bench.json", "--steps=1"])])
def test_output_file_in_a_missing_folder_is_named_before_the_work(script, args, run_copy):
    if script == "plot_norms.py":
        args = [str(run_copy), *args]
    p = run(script, *args)
    one_line_error(p, 1, "does not exist")
