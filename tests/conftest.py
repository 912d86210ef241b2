import json
import os
import subprocess
import sys

import pytest

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
    `python` is on PATH) and a time limit; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout, **kw)


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
