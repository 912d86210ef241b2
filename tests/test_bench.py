"""bench.py and gpu_check.sh."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import bench
from conftest import ROOT, run
from standin import standin


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread for the steps run here: on a busy machine two threads wait on each other
    at every op (10x slower), and these tests check what is called, not how fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(*extra):
    """bench.py's options for a step of a few milliseconds."""
    cfg, _ = bench.parse("bench.py", bench.OPTIONS, ["--block_size=16", "--batch_size=2",
                                                     "--n_loops=2", "--steps=2", "--warmup=0",
                                                     "--gen_tokens=0", *extra])
    return cfg


def test_bench_runs_every_case_and_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # one vocabulary (a process per case, which bench.py starts with sys.executable: here
    # forked from conftest's zygote too): the other one's cases run in-process below
    p = run("bench.py", "--block_size=32", "--batch_size=2", "--n_loops=2", "--steps=1",
            "--warmup=0", "--rounds=1", "--gen_tokens=8", f"--json={out}", "--vocab=gpt2",
            timeout=120, forked_children=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"))  # as one_thread, for its processes
    assert p.returncode == 0, p.stderr[-2000:]
    for words in ("n_layer 2, n_head 4, n_embd 128, K 2",  # config/cpu.py's sizes
                  "cpu (threads=1)",
                  "peak memory: peak RSS (VmHWM", "vocab gpt2",
                  "terminal step time / flat step time", "the same, round by round",
                  "dense step time / official step time", "nanogpt model FLOP/s",
                  "dense peak memory / official peak memory",
                  "generation (gpt2), 24->32 tokens: cached"):
        assert words in p.stdout, p.stdout
    res = json.loads(out.read_text())
    cases = {(r["case"], r["vocab"]) for r in res["results"]}
    assert cases == {(c, v) for c in ("terminal", "dense", "official", "flat", "nanogpt")
                     for v in ("gpt2",)}
    by = {(r["case"], r["vocab"]): r for r in res["results"]}
    for r in res["results"]:
        assert r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1
        ref = by[("nanogpt", r["vocab"])]
        assert abs(r["vs_nanogpt"] * ref["model_flops_per_sec"] - r["model_flops_per_sec"]) \
            < 1e-6 * r["model_flops_per_sec"]
    # the dense loss adds one readout (6 V C per token) per loop before the last
    V, C = 50257, bench.read_preset("config/cpu.py", bench.TRAIN_OPTIONS)["n_embd"]
    dense, terminal = by[("dense", "gpt2")], by[("terminal", "gpt2")]
    assert dense["flops_per_token"] - terminal["flops_per_token"] == 6 * V * C * (2 - 1)
    ratios = res["ratios"]["gpt2"]
    t, f = by[("terminal", "gpt2")], by[("flat", "gpt2")]
    assert ratios["terminal step time / flat step time"] == t["step_s"] / f["step_s"]
    assert ratios["terminal step time / flat step time, by round"] == [t["step_s"] / f["step_s"]]


def test_bench_profile_lists_the_top_ops_of_the_step_it_runs(monkeypatch, capsys):
    """--profile: the ops of the very step that is timed, by self time per step, largest
    first, with their calls per step (the dense loss makes more matmuls than the terminal
    one: the readout of the exit of loop 1 of K=2)."""
    mm = {}
    for case in ("terminal", "dense"):
        r = bench.run_case(tiny("--profile=True", "--steps=1"), case, "char", "cpu", "float32")
        ops = r["top_ops"]
        assert len(ops) == 8 and [o[1] for o in ops] == sorted((o[1] for o in ops), reverse=True)
        assert 0 < sum(o[2] for o in ops) <= 1 + 1e-9
        mm[case] = {o[0]: o[3] for o in ops}["aten::mm"]
    assert mm["dense"] > mm["terminal"]
    monkeypatch.setattr(bench, "run_one", lambda cfg, case, vocab, *a: {
        "case": case, "vocab": vocab, "top_ops": [("aten::mm", 2.0, 0.5, 3)]})
    out = bench.main(["--profile=True", "--vocab=char", "--cases=dense,nanogpt"])
    assert [(r["case"], r["vocab"]) for r in out["profiles"]] == [("dense", "char"),
                                                                 ("nanogpt", "char")]
    assert "results" in out and out["results"] == []  # profiled, not timed
    with pytest.raises(SystemExit) as stop:
        bench.main(["--profile=True", "--compile_probe=True"])
    assert stop.value.code == 2 and "choose one" in capsys.readouterr().err


def test_bench_ce_sweep_times_every_chunk_count_and_marks_the_picked_one(tmp_path, capsys):
    """--ce_sweep: plain CE, then ReadoutCE at 1, 2, 4, ... chunks that split the rows evenly,
    the chunk count chunk_rows picks here marked; no peak memory on a CPU (its RSS keeps what
    earlier variants freed); and one mode at a time."""
    from model import chunk_rows
    out = bench.main(["--ce_sweep=True", "--vocab=gpt2", "--block_size=16", "--batch_size=3",
                      "--steps=1", "--warmup=0", "--rounds=1", f"--json={tmp_path}/s.json"])
    sweep = out["gpt2"]
    assert sweep["rows"] == 48
    rows = {name: (v["rows_per_chunk"], v["vocab_rows"]) for name, v in sweep["variants"].items()}
    assert rows == {"plain": (None, 50257), "1 chunk": (48, 50257), "2 chunks": (24, 50257),
                    "4 chunks": (12, 50257), "8 chunks": (6, 50257), "16 chunks": (3, 50257),
                    "24 chunks": (2, 50257),  # 32 asked for: 2 rows each make 24
                    # plain and the picked count again, V rounded up to a multiple of 64
                    "plain @50304": (None, 50304), "1 chunk @50304": (48, 50304)}
    assert sweep["padded_vocab"] == 50304
    assert sweep["picked_chunks"] == -(-48 // chunk_rows(48, 50257, "cpu")) == 1
    assert sweep["picked"] == "1 chunk"
    assert all(v["step_s"] > 0 and v["peak_mem_bytes"] is None
               for v in sweep["variants"].values())
    picked = [line for line in capsys.readouterr().out.splitlines() if "<- picked" in line]
    assert len(picked) == 1 and picked[0].startswith("1 chunk ")
    assert json.loads((tmp_path / "s.json").read_text())["gpt2"]["rows"] == 48
    # 30 rows in 16 chunks of 2 rows would be 15 chunks: each variant is named by its count
    sweep = bench.ce_sweep(tiny("--block_size=10", "--batch_size=3", "--rounds=1", "--steps=1"),
                           "char", "cpu", "float32")
    for name, v in sweep["variants"].items():
        made = None if v["rows_per_chunk"] is None else -(-30 // v["rows_per_chunk"])
        assert made is None or name.split(" @")[0] == f"{made} chunk" + "s" * (made > 1), name
    assert "15 chunks" in sweep["variants"] and "16 chunks" not in sweep["variants"]
    assert not any("@" in name for name in sweep["variants"])  # 69 -> 128 is no alignment test
    with pytest.raises(SystemExit) as stop:
        bench.main(["--ce_sweep=True", "--compile_probe=True"])
    assert stop.value.code == 2
    assert "--compile_probe and --ce_sweep are two different runs" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_bench_ce_sweep_on_a_standin_device(kind, monkeypatch):
    """The sweep's tensors live on the device (no CPU tensor meets them) and each timed step
    syncs the device before its clock reads."""
    synced = []
    monkeypatch.setattr(bench, "synchronize", lambda device: synced.append(device))
    with standin(kind) as device:
        out = bench.ce_sweep(tiny("--rounds=1", "--steps=1"), "gpt2", device, "float32")
    assert len(out["variants"]) == 1 + 6 + 2  # plain, 1..32 chunks of 32 rows, two padded
    assert synced and set(synced) == {device}


def test_bench_generation_times_full_depth_against_early_exit(tmp_path, capsys, monkeypatch):
    """--generation: tokens/s of full depth and early exit at each batch size, with the mean
    loops, the speed-up over full depth (the median of paired rounds), the ideal K / mean loops
    and their ratio; --compile adds the compiled graphs and what compiling costs; the ragged
    sweep gives ragged / dense speed by mean loops and batch size. One mode at a time."""
    compiled = []

    def generate(*args, compile=False, **kw):  # the compiled graphs are sample.py's tests'
        compiled.append(compile)
        return real_generate(*args, **kw)
    real_generate = bench.generate
    monkeypatch.setattr(bench, "generate", generate)
    monkeypatch.setattr(bench, "SWEEP_BATCHES", (1, 2))
    monkeypatch.setattr(bench, "SWEEP_LOOPS", (1.5, 2.0))  # 2.0 = K: nothing to calibrate
    out = bench.main(["--generation=True", "--n_loops=2", "--block_size=16", "--gen_tokens=4",
                      "--rounds=1", "--gen_batches=1,2", "--gen_loops=1.5", "--compile=True",
                      "--gen_ragged_sweep=True", f"--json={tmp_path}/g.json"])["generation"]
    assert out["K"] == 2 and out["source"] == "random weights" and out["threshold"] > 0
    for b in ("1", "2"):
        rows = out["batch"][b]
        assert set(rows) == {"full", "one loop", "exit", "full compiled", "exit compiled",
                             "compile"}
        assert rows["one loop"]["mean_loops"] == 1 and rows["one loop"]["ideal"] == 2
        for name in ("full", "full compiled"):
            assert rows[name]["mean_loops"] == 2 and rows[name]["speed_up"] == 1.0
        for name in ("exit", "exit compiled"):
            r = rows[name]
            assert 1 <= r["mean_loops"] <= 2 and r["tokens_per_s"] > 0
            assert r["ideal"] == 2 / r["mean_loops"] and r["of_ideal"] > 0
        assert rows["compile"]["full_speed"] > 0
    assert compiled.count(True) == 2 * 2 * (1 + 1)  # 2 variants, 2 batch sizes, 1 + 1 rounds
    assert set(out["ragged_sweep"]) == {"1.5"} and set(out["ragged_sweep"]["1.5"]) == {"1", "2"}
    printed = capsys.readouterr().out
    for words in ("K 2, block 16, vocab 69", "threads=1", "calibrated to 1.5 mean loops",
                  "speed-up", "of ideal", "compile, batch 2:", "ragged / dense"):
        assert words in printed, printed
    assert json.loads((tmp_path / "g.json").read_text())["generation"]["K"] == 2
    with pytest.raises(SystemExit) as stop:
        bench.main(["--generation=True", "--ce_sweep=True"])
    assert stop.value.code == 2
    assert "--ce_sweep and --generation are two different runs" in capsys.readouterr().err


def test_bench_early_exit_shares_of_the_ideal_are_per_round():
    """Each round's speed-up over its own ideal K / loops: a round that repeats one character
    (exits at loop 1) and runs 3x faster is at its ideal, as is one at 4 loops and 1.5x."""
    times = {"full": [3.0, 3.0, 3.0], "exit": [1.0, 2.0, 2.0]}
    loops = {"exit": [2.0, 4.0, 4.0]}
    r = bench.early_exit_row(times, loops, "full", "exit", 6, 100)
    assert r["mean_loops"] == 10 / 3 and r["ideal"] == 6 / (10 / 3)
    assert r["speed_up"] == 1.5 and r["of_ideal"] == 1.0 and r["tokens_per_s"] == 50


def test_bench_compile_cost_and_when_it_pays():
    times = {"full": [2.0, 2.0, 2.0], "full compiled": [1.0, 1.0, 1.0],
             "exit": [2.0, 2.0, 2.0], "exit compiled": [1.5, 1.5, 1.5]}
    first = {"full compiled": 11.0, "exit compiled": 11.5}
    cost = bench.compile_cost(times, first, 100)
    assert cost["compile_s"] == 20.0 and cost["full_speed"] == 2.0 and cost["exit_speed"] == 4 / 3
    assert cost["pays_after_tokens"] == 2000  # 20 s, saving 1 s per 100 tokens
    times["full compiled"] = [2.5] * 3  # compiled runs slower: compiling never pays
    assert bench.compile_cost(times, first, 100)["pays_after_tokens"] is None


def test_bench_sizes_default_to_the_cpu_preset_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default preset is found next to bench.py
    assert bench.sizes(tiny()) == (2, 4, 128, 8)  # config/cpu.py
    assert bench.sizes(tiny("--preset=")) == (8, 8, 512, 64)  # train.py's: the paper's 44M


def test_bench_steps_call_the_model_as_train_py_does(monkeypatch):
    """The bench times train.py's step: model(X, Y, return_logits=False) in train mode (and
    nanogpt's plain call)."""
    calls = []
    for cls in (bench.LoopedGPT, bench.PlainGPT):
        def spy(self, *args, _forward=cls.forward, **kwargs):
            calls.append((type(self).__name__, len(args), kwargs, self.training))
            return _forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", spy)
    for case in bench.CASES:
        bench.run_case(tiny(), case, "char", "cpu", "float32")
    assert len(calls) == 2 * len(bench.CASES)
    assert {name for name, *_ in calls} == {"LoopedGPT", "PlainGPT"}
    for name, n_args, kwargs, training in calls:
        expect = {"return_logits": False} if name == "LoopedGPT" else {}
        assert n_args == 2 and kwargs == expect and training, (name, kwargs)


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_bench_step_on_a_standin_device_syncs_before_every_clock(kind, monkeypatch):
    """Every case's step on a stand-in GPU (tests/standin.py): no CPU tensor meets a device
    tensor, and the device is synchronized right before each clock read."""
    events = []
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append(("sync", device)))
    clock = time.perf_counter
    monkeypatch.setattr(bench.time, "perf_counter", lambda: events.append(("clock",)) or clock())
    for vocab in bench.VOCABS:
        for case in bench.CASES:
            with standin(kind) as device:
                events.clear()
                bench.run_case(tiny(), case, vocab, device, "float32")
            clocks = [i for i, e in enumerate(events) if e == ("clock",)]
            assert len(clocks) == 2 * 2  # two steps, a start and an end each
            assert all(i > 0 and events[i - 1] == ("sync", device) for i in clocks), events


def test_bench_generation_clock_syncs_the_device_mps(monkeypatch):
    events = []
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append(("sync", device)))
    bench._timed(lambda: events.append(("work",)), "mps")
    assert events == [("sync", "mps"), ("work",), ("sync", "mps")]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA L40", 181),
    ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10G", None), ("NVIDIA GeForce GTX 1080", None)])
def test_bench_mfu_uses_the_exact_cuda_gpu_peak(name, tflops, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device)
                        or name)
    flops, text = bench.device_peak("cuda:1")
    assert asked == ["cuda:1"]  # this GPU, not the current one
    if tflops is None:
        assert flops == 0 and "pass --peak_tflops" in text
    else:
        assert flops == tflops * 1e12 and f"{tflops} TFLOP/s" in text and name in text
    assert bench.device_peak("cuda", override=100.0)[0] == 100e12  # --peak_tflops wins


def test_bench_mfu_without_a_known_peak_mps():
    flops, text = bench.device_peak("mps")
    assert flops == 0 and "no known peak for mps" in text


def test_bench_peak_memory_on_each_device(monkeypatch):
    """CUDA: the named GPU's counters; MPS: not measured (no torch.cuda call); macOS: no /proc."""
    asked = []

    def counter(value):
        return lambda device=None: asked.append(device) or value
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", counter(None))
    monkeypatch.setattr(torch.cuda, "memory_allocated", counter(100))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", counter(350))
    mark = bench.memory_mark("cuda:1")
    assert bench.memory_peak("cuda:1", mark) == 250 and asked == ["cuda:1"] * 3

    asked.clear()
    assert bench.peak_memory_how("mps") is None
    assert bench.memory_peak("mps", bench.memory_mark("mps")) is None and asked == []

    def no_proc(*args):
        raise AssertionError("/proc read off Linux")
    monkeypatch.setattr(bench, "proc_status_bytes", no_proc)
    monkeypatch.setattr(bench, "reset_peak_rss", no_proc)
    assert "getrusage" in bench.peak_memory_how("cpu", platform="darwin")
    mark = bench.memory_mark("cpu", platform="darwin")
    keep = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched: the peak rises
    added = bench.memory_peak("cpu", mark, platform="darwin")
    assert isinstance(added, int) and added >= 0 and keep.sum() > 0


def test_bench_report_without_peak_memory_mps(capsys):
    """MPS has no peak counter: the table says n/a and the memory ratios are left out."""
    results = [{"case": c, "step_s": 0.1, "tokens_per_sec": 100.0, "peak_mem_bytes": None,
                "flops_per_token": 10.0}
               for c in ("terminal", "dense", "flat")]
    ratios = bench.report(results, "char", 0.0, {"terminal": [0.1, 0.3], "flat": [0.2, 0.1]})
    out = capsys.readouterr().out
    assert "n/a" in out and "peak memory" not in out
    assert ratios["terminal step time / flat step time, by round"] == pytest.approx([0.5, 3])


def test_plain_gpt_reference_counts_flops_like_nanogpt():
    from bench import PlainGPT
    torch.manual_seed(0)  # the check below holds for any seed; a fixed one keeps it repeatable
    m = PlainGPT(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=8)
    n = sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel()  # nanoGPT's N
    assert m.flops_per_token() == 6 * n + 12 * 3 * 8 * 16
    x, y = torch.randint(100, (2, 2, 16))  # targets apart from the inputs: the tied
    _, loss, _ = m(x, y)  # embedding would otherwise tilt the logits toward them
    assert abs(loss.item() - math.log(100)) < 0.1  # near-uniform at init, as a GPT starts


GPU_CHECK = os.path.join(ROOT, "gpu_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the real check")
def test_gpu_check_stops_cleanly_without_a_cuda_gpu(tmp_path):
    # a `python` on PATH that is not ours: the script must run $PYTHON
    (tmp_path / "python").write_text("#!/bin/sh\necho 'the wrong python' >&2\nexit 99\n")
    (tmp_path / "python").chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{tmp_path}:{os.environ['PATH']}")
    p = subprocess.run(["bash", GPU_CHECK], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert p.returncode != 0 and "torch sees no CUDA device" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "the wrong python" not in p.stderr
    assert p.stdout == ""


def test_gpu_check_runs_every_python_through_PYTHON():
    """The GPU-absent test above reaches the first call only; the others are read here."""
    with open(GPU_CHECK) as f:
        code = [line for line in f if not line.lstrip().startswith("#")]
    calls = [line for line in code if re.search(r"\bpython3?\b", line)]
    bare = [line for line in calls if re.search(r"(^\s*|[;&|(]\s*|\$\()python3?\s", line)]
    assert bare == [], bare
    scripts = {s for line in code for s in re.findall(r'"\$\{PYTHON:-python\}" (\S+)', line)}
    assert {"bench.py", "train.py", "eval.py", "sample.py", "-c", "-"} <= scripts


def test_gpu_check_table_from_its_files(tmp_path):
    run_dir = tmp_path / "gpu_44m"
    run_dir.mkdir()
    result = {"case": "terminal", "vocab": "gpt2", "step_s": 0.0421, "mfu": 0.383,
              "tokens_per_sec": 389_000.0}
    (tmp_path / "gpu_bench.json").write_text(json.dumps({
        "device": "cuda", "gpu": "NVIDIA H200", "dtype": "bfloat16", "results": [result],
        "ratios": {"gpt2": {"terminal step time / flat step time": 1.0123}},
        "generation": {"cached": 812.5, "recompute": 301.0}}))
    variants = {"plain": {"step_s": 0.02833, "peak_mem_bytes": 7789.5 * 2**20},
                "4 chunks": {"step_s": 0.03086, "peak_mem_bytes": 3198.3 * 2**20},
                "8 chunks": {"step_s": 0.03178, "peak_mem_bytes": 1624.6 * 2**20},
                "plain @50304": {"step_s": 0.02125, "peak_mem_bytes": 7800.0 * 2**20},
                "4 chunks @50304": {"step_s": 0.02469, "peak_mem_bytes": 3200.0 * 2**20}}
    (tmp_path / "gpu_ce_sweep.json").write_text(json.dumps({"gpt2": {
        "rows": 16384, "picked_chunks": 4, "picked": "4 chunks", "padded_vocab": 50304,
        "variants": variants}}))
    top = [["aten::mm", 61.04, 0.41, 120], ["aten::_log_softmax", 20.5, 0.14, 4],
           ["aten::exp_", 9.96, 0.07, 16], ["aten::mul", 5.0, 0.03, 300]]
    (tmp_path / "gpu_profile.json").write_text(json.dumps({"profiles": [
        {"case": "dense", "vocab": "gpt2", "top_ops": top}]}))
    log = {"iter": 300, "val_loop_ce": [7.1, 6.2, 5.8, 5.4321], "hidden_norm": [10, 20, 40, 81.5],
           "tokens_per_sec": 250_000.0}
    (run_dir / "log.jsonl").write_text(json.dumps({**log, "iter": 150}) + "\n"
                                      + json.dumps(log) + "\n")
    halting = {"threshold": 2.5, "mean_loops": 3.21, "ppl": 230.0, "ratio": 1.0098}
    (run_dir / "eval.json").write_text(json.dumps({
        "n_loops": 4, "full_depth_ppl": 227.75, "target": 1.01,
        "halting": {"token": {"logit_margin": halting}}}))
    (tmp_path / "gpu_sample_fixed.txt").write_text(
        "text\n---------------\nmean loops per generated token: 4.00 of 4 (fixed depth)\n")
    table = bench.gpu_check_table(str(tmp_path))
    lines = table.splitlines()
    assert lines[0] == "gpu_check summary (NVIDIA H200, bfloat16)"
    for what, value in [("bench terminal (gpt2)", "42.1 ms / 38.3% / 389,000"),
                        ("bench terminal / flat step time (gpt2)", "x1.012"),
                        ("bench generation", "812.5 / 301.0"),
                        ("bench one exit's CE (gpt2), 4 chunks (picked) / plain CE",
                         "30.86 / 28.33 ms, 3198.3 / 7789.5 MiB"),
                        ("bench one exit's CE, V padded to 50,304: plain, picked / unpadded",
                         "x0.750, x0.800"),
                        ("profile dense (gpt2): top ops, ms a step",
                         "aten::mm 61.0, aten::_log_softmax 20.5, aten::exp_ 10.0"),
                        ("train iter 300: val CE at loop K / ||h_K||", "5.4321 / 81.5"),
                        ("eval full-depth val PPL", "227.750"),
                        ("eval calibrated mean loops", "3.21 of 4, PPL x1.0098"),
                        ("sample fixed", "4.00 of 4 (fixed depth)"),
                        ("sample adaptive", "-")]:  # a step that wrote nothing
        row = [line for line in lines if line.strip().startswith(what)]
        assert len(row) == 1 and row[0].rstrip().endswith(value), (what, table)
    assert bench.calibrated_exit(str(run_dir / "eval.json")) == \
        "--exit_policy=logit_margin --exit_threshold=2.5"
    halting["threshold"] = None  # no early exit kept the PPL target
    (run_dir / "eval.json").write_text(json.dumps({"halting": {"token": {"logit_margin":
                                                                         halting}}}))
    assert bench.calibrated_exit(str(run_dir / "eval.json")) == "--exit_policy=max_prob"
    assert bench.gpu_check_table(str(tmp_path / "nothing")).count(" -") == 7
