"""The paper's recipe on the data side: the presets' values, the epoch sampler (coverage, order,
DDP shares, resume, --epochs) and prepare.py's word tokenizer and validation files, each against
a reference written out here."""

import json
import math
import os

import numpy as np
import pytest

from conftest import ROOT, TINY, read_log

# ---- the presets -------------------------------------------------------------------------------

# The official values (configs/44m of the paper's code; the 129M sizes and batch from the paper),
# written out by hand, not read from train.py or the presets.
OFFICIAL_COMMON = {
    "n_loops": 4, "block_size": 256, "init": "torch", "norm_eps": 1e-6, "dropout": 0.1,
    "bias": False, "loop_norm": False, "loop_norm_gain": True,
    "gradient_accumulation_steps": 1, "learning_rate": 3e-4, "lr_schedule": "constant",
    "warmup_iters": 0, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01,
    "weight_decay_on": "all", "grad_clip": 1.0, "seed": 42,
    "sampling": "epochs", "stride": 128, "epochs": 4.0,
}
OFFICIAL = {
    "paper_44m.py": OFFICIAL_COMMON | {"n_layer": 8, "n_head": 8, "n_embd": 512,
                                       "batch_size": 64},
    "paper_129m.py": OFFICIAL_COMMON | {"n_layer": 12, "n_head": 12, "n_embd": 768,
                                        "batch_size": 32},
}
# nanoloop's own choices in the presets (no official counterpart): the offline dataset and how
# often it evaluates
OWN = {"dataset": "shakespeare_gpt2", "eval_interval": 500, "eval_iters": 50}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_paper_presets_hold_the_official_values(preset):
    """Value by value, each set by the preset itself; the preset sets nothing else."""
    from configurator import parse, read_preset
    from train import OPTIONS
    path = os.path.join(ROOT, "config", preset)
    expected = OFFICIAL[preset] | OWN
    assert set(read_preset(path, OPTIONS)) == set(expected)
    cfg, _ = parse("train.py", OPTIONS, [path])
    for key, value in expected.items():
        got = getattr(cfg, key)
        assert (got, type(got)) == (value, type(value)), (preset, key, got)


def test_cpu_preset_still_runs(data_dir, tmp_path):
    """config/cpu.py parses and trains a step (its values are decided elsewhere)."""
    from train import main
    main([os.path.join(ROOT, "config", "cpu.py"), f"--data_dir={data_dir}",
          "--dataset=tiny_char", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_iters=1",
          "--n_layer=1", "--n_embd=32", "--n_loops=2", "--batch_size=2", "--block_size=16"])
    assert [e["iter"] for e in read_log(tmp_path)] == [0, 1]


# ---- the epoch sampler -------------------------------------------------------------------------

N_TOKENS, BLOCK, STRIDE = 1000, 16, 7
# the official window starts: every start from 0 at the stride whose block_size + 1 tokens fit
STARTS = list(range(0, N_TOKENS - BLOCK, STRIDE))  # 0, 7, ..., 980: 141 windows


def rank_batches(seed, step, batch_size, accumulation, world, rank, count):
    """The window starts of one step that process `rank` of `world` trains on, as train.py's
    loop draws them: {micro-batch index: its starts (this process's rows)}."""
    from rundir import epoch_starts
    from train import first_sample, micro_batches
    pairs, why = micro_batches(batch_size, accumulation, world, rank)
    assert why is None
    out = {}
    for micro, rows in pairs:
        first = first_sample(step, micro, batch_size, accumulation)
        starts = epoch_starts(count, STRIDE, seed, first, batch_size)
        out[(micro, rows.start or 0)] = starts[rows]
    return out


def stream(seed, steps, batch_size, accumulation, world, count):
    """Every window the run trains on, step by step, micro-batch by micro-batch, each process's
    rows in rank order: the global batches of `world` processes, laid end to end."""
    out = []
    for step in range(steps):
        shares = {}
        for rank in range(world):
            shares.update(rank_batches(seed, step, batch_size, accumulation, world, rank, count))
        for key in sorted(shares):
            out += shares[key]
    return out


def test_window_count_matches_the_official_starts():
    from rundir import n_windows
    assert n_windows(N_TOKENS, BLOCK, STRIDE) == len(STARTS) == 141
    assert n_windows(BLOCK + 2, BLOCK, 5) == 1  # the smallest dataset load_data takes
    assert n_windows(1001, 16, 8) == len(range(0, 1001 - 16, 8))


def test_epoch_stream_visits_every_window_once_per_epoch_on_any_number_of_processes():
    """Over steps that cover two epochs (global batch 12: batches straddle epochs), each epoch
    is every start once; the order differs between epochs and seeds; 1, 2, 3 or 4 processes
    (rows or micro-batches shared out) train the very same windows in each step."""
    from rundir import epoch_order
    count, batch_size, accumulation = len(STARTS), 4, 3
    steps = math.ceil(2 * count / (batch_size * accumulation))  # 24 steps, 288 windows
    one = stream(7, steps, batch_size, accumulation, 1, count)
    assert len(one) == steps * 12 == 288
    first, second, extra = one[:count], one[count:2 * count], one[2 * count:]
    assert sorted(first) == sorted(second) == STARTS
    assert first != second  # each epoch its own order
    assert len(set(extra)) == len(extra) and set(extra) <= set(STARTS)  # epoch 3 began
    assert one != stream(8, steps, batch_size, accumulation, 1, count)  # seeds differ
    assert sorted(stream(8, steps, batch_size, accumulation, 1, count)[:count]) == STARTS
    for world in (2, 3, 4):
        epoch_order.cache_clear()
        assert stream(7, steps, batch_size, accumulation, world, count) == one, world


def test_a_steps_batch_does_not_depend_on_what_ran_before():
    """Every step draws what the uninterrupted run draws, in a fresh process (a resume) or in
    one that drew other steps, of other epochs, before (the order's cache holds them)."""
    from rundir import epoch_order
    count = len(STARTS)
    whole = stream(3, 30, 4, 2, 1, count)
    for warm_up in ([], [0, 40], [25, 2, 17]):
        epoch_order.cache_clear()
        for step in warm_up:
            rank_batches(3, step, 4, 2, 1, 0, count)
        resumed = stream(3, 30, 4, 2, 1, count)  # computed after the warm-up
        assert resumed == whole
        epoch_order.cache_clear()
        assert rank_batches(3, 13, 4, 2, 1, 0, count)[(1, 0)] == whole[13 * 8 + 4:13 * 8 + 8]


def test_epochs_sets_max_iters():
    """--epochs=e: ceil(e x windows / global batch) steps, worked out by hand."""
    from train import epoch_steps
    assert epoch_steps(4, 141, 12) == 47  # 564 / 12 = 47 exactly
    assert epoch_steps(4, 140, 12) == 47  # 560 / 12 = 46.7: the last step takes 4 of epoch 5
    assert epoch_steps(1, 12, 12) == 1 and epoch_steps(2, 13, 12) == 3
    assert epoch_steps(0.5, 141, 4) == 18  # 70.5 windows: 71, in 18 batches of 4


def tiny_dataset(folder, n_train, n_val=200):
    """A char dataset folder of n_train tokens whose ids are their positions mod 50."""
    folder.mkdir(parents=True)
    chars = [chr(65 + i) for i in range(50)]
    for split, n in (("train", n_train), ("val", n_val)):
        (np.arange(n) % 50).astype(np.uint16).tofile(folder / f"{split}.bin")
    meta = {"tokenizer": "char", "vocab_size": 50, "chars": chars, "dtype": "uint16",
            "train_tokens": n_train, "val_tokens": n_val}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_training_goes_through_the_epochs_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """train.py --sampling=epochs --epochs=2 end to end: the windows it trains on are two
    shuffled passes over every start (370 tokens, block 16, stride 12: 30 windows; global batch
    8: ceil(60 / 8) = 8 steps, the last with 4 windows of a third epoch), and a run killed after
    3 steps and resumed trains on the same windows in the same order."""
    import train
    tiny_dataset(tmp_path / "data" / "t", 370)
    starts = list(range(0, 370 - 16, 12))
    assert len(starts) == 30
    seen = []
    real = train.windows_batch

    def recording(d, s, block_size, device="cpu"):
        seen.extend(s)
        return real(d, s, block_size, device)
    monkeypatch.setattr(train, "windows_batch", recording)
    common = [*TINY, f"--data_dir={tmp_path / 'data'}", "--dataset=t", "--block_size=16",
              "--stride=12", "--gradient_accumulation_steps=2", "--sampling=epochs",
              "--eval_interval=100", "--eval_iters=1"]
    train.main(common + [f"--out_dir={tmp_path / 'whole'}", "--epochs=2"])
    banner = capsys.readouterr().out
    assert "30 windows of 17 tokens at stride 12" in banner and "--epochs=2 is 8 steps" in banner
    whole = list(seen)
    seen.clear()
    assert read_log(tmp_path / "whole")[-1]["iter"] == 8 and len(whole) == 64
    assert sorted(whole[:30]) == sorted(whole[30:60]) == starts and whole[:30] != whole[30:60]
    assert len(set(whole[60:])) == 4 and set(whole[60:]) <= set(starts)
    train.main(common + [f"--out_dir={tmp_path / 'cut'}", "--max_iters=3"])
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'cut'}",
                f"--data_dir={tmp_path / 'data'}", "--epochs=2"])
    assert seen == whole
    assert read_log(tmp_path / "cut")[-1]["iter"] == 8


def test_epochs_and_max_iters_together(tmp_path, capsys):
    """A --max_iters flag overrides a preset's epochs; both as flags, or both in a preset, is
    one line; a resumed epochs run refuses a changed stride (it would repeat windows)."""
    import train
    tiny_dataset(tmp_path / "data" / "t", 370)
    preset = tmp_path / "p.py"
    preset.write_text("epochs = 2\nsampling = 'epochs'\nstride = 12\n")
    args = [*TINY, f"--data_dir={tmp_path / 'data'}", "--dataset=t", "--block_size=16",
            "--eval_iters=1", f"--out_dir={tmp_path / 'o'}"]
    train.main([str(preset), *args, "--max_iters=1"])
    assert [e["iter"] for e in read_log(tmp_path / "o")] == [0, 1]
    capsys.readouterr()
    both = tmp_path / "both.py"
    both.write_text("epochs = 2\nmax_iters = 5\n")
    for argv in ([*args, "--epochs=2", "--max_iters=1"], [str(both), *args]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "both set the length of the run" in err, err
        assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        train.main(["--init_from=resume", f"--out_dir={tmp_path / 'o'}",
                    f"--data_dir={tmp_path / 'data'}", "--stride=6", "--max_iters=2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "--stride=6 differs from the checkpoint's stride=12" in err


# ---- prepare.py: the word tokenizer and --val_input -------------------------------------------

# Lines with their newlines; the "\t \n", " \n" and "\n" lines hold only whitespace and are
# dropped. Counted line by line over train and validation (regex \s+ | [A-Za-z0-9_]+ | [^\w\s]):
# " " 16, " \n" 4; twice: "=", "Cats" (once in each file), "a", "b", "c" (once in each), "."
# and "val" (only in validation); once (not kept): "once", "d", "\n".
TRAIN = " = Cats = \n \n b a c . \n\n a b once . \n\t \n"
VAL = " c Cats val val \n  \n d\n"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# by count, then ties in code-point order: "." < "=" < "Cats" < "a" < "b" < "c" < "val"
VOCAB = SPECIALS + [" ", " \n", ".", "=", "Cats", "a", "b", "c", "val"]
# The kept lines joined with a blank line: the runs " \n" + "\n\n" + " " are one token,
# " \n\n\n ", which no line has: <unk>, as "once", "d" and "\n" are.
TRAIN_TOKENS = [" ", "=", " ", "Cats", " ", "=", "<unk>", "b", " ", "a", " ", "c", " ", ".",
                "<unk>", "a", " ", "b", " ", "<unk>", " ", ".", " \n"]
VAL_TOKENS = [" ", "c", " ", "Cats", " ", "val", " ", "val", "<unk>", "<unk>", "<unk>"]


def prepared(tmp_path, *extra, train=TRAIN, val=VAL):
    from prepare import main
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "val.txt").write_text(val)
    args = [f"--input={tmp_path / 'train.txt'}", "--tokenizer=word", "--name=w",
            f"--data_dir={tmp_path / 'data'}", *extra]
    out = main(args)
    meta = json.loads((out / "meta.json").read_text())
    ids = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]).tolist() for s in ("train", "val")}
    return meta, ids


def test_word_vocabulary_and_splits_as_the_papers_code(tmp_path):
    from prepare import load_tokenizer, word_splits
    meta, ids = prepared(tmp_path, f"--val_input={tmp_path / 'val.txt'}")
    assert meta["words"] == VOCAB and meta["vocab_size"] == len(VOCAB)
    assert [VOCAB[i] for i in ids["train"]] == TRAIN_TOKENS
    assert [VOCAB[i] for i in ids["val"]] == VAL_TOKENS
    assert meta["train_tokens"] == len(TRAIN_TOKENS) and meta["val_tokens"] == len(VAL_TOKENS)
    encode, decode = load_tokenizer(meta)
    assert decode(ids["val"]) == " c Cats val val<unk><unk><unk>"
    # val.bin is the kept lines joined with a blank line, encoded (any newline run in the join
    # is one <unk>, so the text is checked too)
    _, train_text, val_text = word_splits([TRAIN], [VAL], 0.1)
    assert val_text == " c Cats val val \n" + "\n\n" + " d\n"
    assert encode(val_text) == ids["val"] and encode(train_text) == ids["train"]
    assert encode("Cats zebra") == [VOCAB.index("Cats"), VOCAB.index(" "), 3]  # unknown: <unk>


def test_word_vocabulary_cap_keeps_the_most_frequent(tmp_path, monkeypatch):
    """At most WORD_VOCAB entries, the specials included: the ties cut in code-point order."""
    import prepare
    monkeypatch.setattr(prepare, "WORD_VOCAB", 8)
    meta, _ = prepared(tmp_path, f"--val_input={tmp_path / 'val.txt'}")
    assert meta["words"] == SPECIALS + [" ", " \n", ".", "="]


def test_word_split_without_val_input_falls_between_lines(tmp_path):
    """The kept lines (of 11, 10, 14, 17 and 3 characters: 55) split at 90%: the first line
    whose start is at 49.5 characters or more, so the last line alone is validation."""
    train = " = Cats = \n \n b a c . \n a b once . \n c Cats val val \n  \n d\n"
    meta, ids = prepared(tmp_path, train=train)
    assert [meta["words"][i] for i in ids["val"]] == [" ", "<unk>", "<unk>"]  # " d\n"
    assert meta["words"][:4] == SPECIALS and "Cats" in meta["words"]


def test_word_encoding_in_chunks_keeps_whitespace_runs_whole():
    """prepare.py encodes big text in chunks; a cut inside a whitespace run would make two
    tokens of one."""
    from prepare import encode_text, load_tokenizer
    meta = {"tokenizer": "word", "words": VOCAB + [" \n\n\n "]}
    encode, _ = load_tokenizer(meta)
    text = "\n\n".join([" a b \n", " c . \n", " val \n"] * 20)
    whole = encode(text)
    assert whole.count(len(VOCAB)) == 59  # every join is the one token " \n\n\n "
    for chunk in (1, 3, 7, 20):
        assert encode_text(encode, text, "t", whole_runs=True, chunk=chunk).tolist() == whole


def test_older_meta_with_unk_first_still_loads():
    from prepare import load_tokenizer
    encode, decode = load_tokenizer({"tokenizer": "word", "words": ["<unk>", "a", " "]})
    assert encode("a b") == [1, 2, 0] and decode([1, 2, 0]) == "a <unk>"


def test_char_with_val_input_keeps_the_files_whole(tmp_path):
    """char and gpt2 keep the text as it is: val.bin is the validation file, train.bin the
    training file, and the characters of both are the vocabulary."""
    from prepare import load_tokenizer, main
    (tmp_path / "a.txt").write_text("abc\n\nab\n")
    (tmp_path / "b.txt").write_text("xyz \n")
    out = main([f"--input={tmp_path / 'a.txt'}", f"--val_input={tmp_path / 'b.txt'}",
                f"--data_dir={tmp_path}", "--name=c"])
    meta = json.loads((out / "meta.json").read_text())
    _, decode = load_tokenizer(meta)
    for split, text in (("train", "abc\n\nab\n"), ("val", "xyz \n")):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert decode(ids) == text
    assert meta["chars"] == sorted(set("abc\n xyz"))


def test_val_input_with_val_fraction_is_one_line(tmp_path, capsys):
    from prepare import main
    (tmp_path / "a.txt").write_text("abc\n")
    with pytest.raises(SystemExit) as e:
        main([f"--input={tmp_path / 'a.txt'}", f"--val_input={tmp_path / 'a.txt'}",
              "--val_fraction=0.2", f"--data_dir={tmp_path / 'd'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "drop --val_fraction" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()
