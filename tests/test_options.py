"""Every option of every script is checked before any work, from the scripts' own OPTIONS tables:
a bad value is one short line on stderr naming the flag, exit status 2, and no file touched."""

import hashlib
import importlib
import shutil

import pytest

from conftest import run

SCRIPTS = ("train", "sample", "eval", "bench", "prepare", "plot_norms", "experiments")
WRONG_TYPE = {int: ["ten", "1.5"], float: ["abc"], bool: ["maybe"], str: []}


def bad_values(default, accepts):
    """(value, how) pairs the option must refuse: out of range (the values its declaration
    names: for a model knob, model.knob's `bad`, which tests/test_model.py holds against the
    config's own check), wrong type, NaN/inf."""
    values = []
    if not isinstance(default, bool):
        values = [(v, "range") for v in accepts.refused]
    values += [(v, "type") for v in WRONG_TYPE[type(default)]]
    if isinstance(default, float):
        values += [("nan", "nan"), ("inf", "inf"), ("-inf", "inf")]
    return values


def cases():
    out = []
    for script in SCRIPTS:
        options = importlib.import_module(script).OPTIONS
        for name, (default, _, accepts) in options.items():
            for value, how in bad_values(default, accepts):
                out.append(pytest.param(script, name, str(value), id=f"{script}-{name}-{how}"))
            if isinstance(default, str) and script != "plot_norms":  # a preset can mistype it
                out.append(pytest.param(script, name, 3, id=f"{script}-{name}-preset_type"))
    return out


@pytest.fixture(scope="module")
def workdir(tiny_runs, tmp_path_factory):
    """A folder holding a finished run (checkpoint, log, eval.json) to point the scripts at."""
    root = tmp_path_factory.mktemp("options")
    shutil.copytree(tiny_runs["rmsnorm"], root / "run")
    return root


def snapshot(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def base_args(script, name, options, workdir):
    """Good arguments for everything but the option under test."""
    args = []
    if script == "plot_norms":
        args.append(str(workdir / "run"))
    if "out_dir" in options and name != "out_dir":
        args.append(f"--out_dir={workdir / 'run'}")
    return args


@pytest.mark.parametrize("script,name,value", cases())
def test_every_bad_value_is_one_line_and_touches_nothing(script, name, value, workdir,
                                                         capsys, monkeypatch):
    module = importlib.import_module(script)
    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    args = base_args(script, name, module.OPTIONS, workdir)
    if isinstance(value, str):
        args.append(f"--{name}={value}")
    else:  # a preset file that assigns a wrong type
        preset = workdir.parent / f"preset_{script}_{name}.py"
        preset.write_text(f"{name} = {value!r}\n")
        args.insert(0, str(preset))
    with pytest.raises(SystemExit) as e:
        module.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert name in err and "Traceback" not in err, err
    assert 0 < len(err.splitlines()) <= 3, err
    assert snapshot(workdir) == before


def test_every_option_of_every_script_has_bad_values():
    for script in SCRIPTS:
        for name, (default, _, accepts) in importlib.import_module(script).OPTIONS.items():
            kinds = {how for _, how in bad_values(default, accepts)}
            if not isinstance(default, bool):
                assert "range" in kinds, (script, name)
            if not isinstance(default, str):
                assert "type" in kinds, (script, name)
    assert len(cases()) > 250


def test_help_shows_what_each_option_accepts(capsys):
    """--help (in-process; one script's --help as a user runs it is in test_train.py)."""
    for script in SCRIPTS:
        module = importlib.import_module(script)
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for name, (default, _, accepts) in module.OPTIONS.items():
            assert f"--{name}" in out, (script, name)
            text = "True | False" if isinstance(default, bool) else accepts.text
            assert "".join(text.split()) in "".join(out.split()), (script, name)


@pytest.mark.parametrize("script,args,words", [
    ("train.py", ["--batch_size=0"], "--batch_size=0 is invalid; accepted: an integer >= 1"),
    ("train.py", ["--beta2=1.5"], "--beta2=1.5 is invalid; accepted: a number in [0.0, 1.0)"),
    ("train.py", ["--learning_rate=nan"], "--learning_rate=nan is invalid"),
    ("sample.py", ["--temperature=-1"], "--temperature=-1.0 is invalid"),
    ("sample.py", ["--exit_policy=max_prob", "--exit_threshold=1.5"], "no token could ever"),
    ("eval.py", ["--target=0.5"], "--target=0.5 is invalid; accepted: a number >= 1.0"),
    ("bench.py", ["--cases=dense,warp"], "--cases='dense,warp' is invalid"),
    ("prepare.py", ["--val_fraction=1"], "--val_fraction=1.0 is invalid"),
    ("plot_norms.py", ["out", "--out=fig.jpg"], "--out='fig.jpg' is invalid"),
    ("experiments.py", ["--seeds=0"], "--seeds=0 is invalid"),
])
def test_as_a_user_sees_it(script, args, words, tmp_path):
    if script in ("train.py", "sample.py", "eval.py", "experiments.py"):
        args = [*args, f"--out_dir={tmp_path}"]
    p = run(script, *args)
    assert p.returncode == 2
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_options_that_only_make_sense_together(workdir, capsys):
    import eval as eval_script
    import sample
    import train
    for module, args, words in (
            (sample, ["--exit_threshold=0.5"], "--exit_threshold needs --exit_policy"),
            (train, ["--lr_schedule=cosine", "--min_lr=0.1", "--learning_rate=0.01"],
             "--min_lr=0.1 is above --learning_rate=0.01"),
            (train, ["--epochs=2", "--max_iters=5"],
             "--epochs=2 and --max_iters=5 both set the length of the run"),
            (eval_script, ["--start=ROMEO:"], "--start is the prompt of --run=lens"),
            (eval_script, ["--max_depth=2"], "--max_depth=2 is invalid for this run; accepted: "
                                             "0 (= 2K) or at least its K=3 loops")):
        with pytest.raises(SystemExit) as e:
            module.main([f"--out_dir={workdir / 'run'}", *args])
        assert e.value.code == 2 and words in capsys.readouterr().err


# Every bound, written here (not read from the OPTIONS tables): (script, option, values just
# outside that must be refused, values at or inside the edge that must be accepted).
BOUNDS = [
    ("train", "eval_interval", [0], [1]), ("train", "eval_iters", [0], [1]),
    ("train", "log_interval", [0], [1]), ("train", "batch_size", [0], [1]),
    ("train", "gradient_accumulation_steps", [0], [1]), ("train", "block_size", [0], [1]),
    ("train", "n_layer", [0], [1]), ("train", "n_head", [0], [1]), ("train", "n_embd", [0], [1]),
    ("train", "n_loops", [0], [1]), ("train", "norm_penalty", [-1e-9, "inf"], [0.0, 0.01]),
    ("train", "dropout", [-0.01, 1.0], [0.0, 0.99]), ("train", "learning_rate", [0.0, -1e-3],
                                                      [1e-9]),
    ("train", "max_iters", [-1], [0]), ("train", "weight_decay", [-0.01], [0.0]),
    ("train", "beta1", [-0.1, 1.0], [0.0, 0.999]), ("train", "beta2", [1.0], [0.0, 0.999]),
    ("train", "grad_clip", [-0.1], [0.0]), ("train", "warmup_iters", [-1], [0]),
    ("train", "min_lr", [-1e-9], [0.0]), ("train", "seed", [-1], [0]),
    ("train", "readout", ["RMSNorm", "scale-visible"], ["rmsnorm", "scale_visible",
                                                        "final_only"]),
    ("train", "supervision", ["dense"], ["per_loop", "terminal"]),
    ("train", "init_from", ["gpt2"], ["scratch", "resume"]),
    ("train", "dtype", ["fp16", "half"], ["auto", "float32", "bfloat16", "float16"]),
    ("train", "dataset", ["a/b", ""], ["mytext"]), ("train", "device", ["gpu", "cuda:"], ["cpu"]),
    ("train", "sampling", ["epoch", "random"], ["windows", "epochs"]),
    ("train", "stride", [0, -1], [1, 128]), ("train", "epochs", [-0.5, "inf"], [0.0, 0.5, 4]),
    ("sample", "num_samples", [0], [1]), ("sample", "max_new_tokens", [0], [1]),
    ("sample", "temperature", [-0.1], [0.0]), ("sample", "top_k", [-1], [0]),
    ("sample", "n_loops", [-1], [0]), ("sample", "exit_threshold", [-0.1], [0.0]),
    ("sample", "exit_policy", ["margin"], ["", "max_prob", "logit_margin", "entropy"]),
    ("eval", "eval_iters", [0], [1]), ("eval", "batch_size", [-1], [0]),
    ("eval", "max_depth", [-1], [0]), ("eval", "n_thresholds", [1], [2]),
    ("eval", "target", [0.999], [1.0]), ("eval", "exit_unit", ["word"], ["token", "sequence"]),
    ("eval", "run", ["diagnostics"], ["depth", "lens", "lemma1", "spread", "all"]),
    ("bench", "block_size", [1], [2]), ("bench", "steps", [0], [1]), ("bench", "rounds", [0], [1]),
    ("bench", "warmup", [-1], [0]), ("bench", "gen_tokens", [-1], [0]),
    ("bench", "n_loops", [0], [1]), ("bench", "peak_tflops", [-1.0], [0.0]),
    ("prepare", "val_fraction", [0.0, 1.0], [0.01, 0.99]),
    ("prepare", "tokenizer", ["bpe"], ["char", "gpt2", "word"]),
    ("experiments", "seeds", [0], [1]), ("experiments", "run", ["table"], ["table1", "claims"]),
]


@pytest.mark.parametrize("script,name,refused,accepted", BOUNDS,
                         ids=[f"{s}-{n}" for s, n, _, _ in BOUNDS])
def test_option_bounds_written_out(script, name, refused, accepted, capsys):
    from configurator import parse
    module = importlib.import_module(script)
    for value in refused:
        with pytest.raises(SystemExit) as e:
            parse(script, module.OPTIONS, [f"--{name}={value}"])
        assert e.value.code == 2 and f"--{name}=" in capsys.readouterr().err
    for value in accepted:
        cfg, _ = parse(script, module.OPTIONS, [f"--{name}={value}"])
        assert str(getattr(cfg, name)) == str(module.OPTIONS[name][0].__class__(value))
