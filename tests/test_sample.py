"""sample.py: generation with a KV cache per (loop, layer), adaptive exit, and --show_depth."""

import pytest
import torch

from conftest import run
from model import LoopedGPT, LoopedGPTConfig
from sample import KVCache, depth_colours, exit_step, generate, parse_depth, render_depth
from rundir import load_checkpoint, model_from_checkpoint


def tiny(**kw):
    args = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, n_loops=3)
    args.update(kw)
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig(**args)).eval()


def trained(folder):
    return model_from_checkpoint(load_checkpoint(str(folder / "ckpt.pt")), "cpu")


def test_generate_crops_context_and_respects_depth():
    model = tiny()
    out, loops = generate(model, torch.zeros(1, 3, dtype=torch.long), 20, temperature=0.0,
                          n_loops=2)
    assert out.shape == (1, 23) and (loops == 2).all()  # 23 > block_size 16: cropped, no error
    # greedy next token at depth 2 is the argmax of the depth-2 readout
    with torch.no_grad():
        logits, _, _ = model(out[:, :10], n_loops=2)
    assert out[0, 10] == logits[0, -1].argmax()


def test_kv_cache_rule_for_early_exit():
    """A token that exits at loop e gets loop e's keys/values at the deeper loops of the cache."""
    model = tiny(n_loops=3).double()
    idx = torch.randint(37, (2, 6), generator=torch.Generator().manual_seed(1))
    caches = {k: [KVCache(), KVCache()] for k in (1, 2, 3)}
    with torch.no_grad():
        exit_step(model, idx, 0, 3, caches, None, None)  # prefill at full depth
        logits, used = exit_step(model, idx[:, -1:], 6, 3, caches, "entropy", 1e9)  # all exit at 1
    assert used.tolist() == [1, 1]
    for k in (2, 3):
        for cache, exit_cache in zip(caches[k], caches[1]):
            for kv, exit_kv in ((cache.k, exit_cache.k), (cache.v, exit_cache.v)):
                assert kv.shape[2] == 7 and torch.equal(kv[:, :, -1], exit_kv[:, :, -1])
                assert not torch.equal(kv[:, :, :-1], exit_kv[:, :, :-1])  # prompt ran all loops
    with torch.no_grad():
        full = model.loop_states(idx)  # prefill entries equal a plain forward's at each loop
        uncached = exit_step(model, idx, 0, 3, None, None, None)[0]
    assert torch.allclose(model.readout(full[-1][:, -1], 3), uncached)


def test_kv_cache_matches_recompute_and_adaptive_runs(tiny_runs):
    model = trained(tiny_runs["scale_visible"]).double()
    prompt = torch.randint(model.config.vocab_size, (2, 5),
                           generator=torch.Generator().manual_seed(0))
    for k in (1, model.config.n_loops):
        a, _ = generate(model, prompt, 40, temperature=0, n_loops=k, use_cache=True)
        b, _ = generate(model, prompt, 40, temperature=0, n_loops=k, use_cache=False)
        assert torch.equal(a, b)  # 45 > block_size 32: the refill path runs too
    out, loops = generate(model, prompt, 20, temperature=0, exit_policy="max_prob",
                          exit_threshold=0.2)
    assert out.shape == (2, 25) and loops.shape == (2, 20)
    assert ((1 <= loops) & (loops <= model.config.n_loops)).all()


@pytest.mark.parametrize("colour", [True, False])
def test_depth_rendering_parses_back(colour):
    pieces = ["R", "O", "[", "]", "\n", "ab", "[x", " "]
    loops = [1, 4, 2, 3, 4, 1, 2, 3]
    text = render_depth(pieces, loops, 4, colour)
    if colour:
        assert "\x1b[" in text and "[1]" not in text
    assert parse_depth(text, 4, colour) == (pieces, loops)
    assert len(set(depth_colours(6))) == 6  # one distinct shade per loop


def test_sample_show_depth_marks_every_token(tiny_runs):
    out = str(tiny_runs["rmsnorm"])
    p = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=25",
            "--num_samples=1", "--exit_policy=logit_margin", "--exit_threshold=0.05",
            "--show_depth=True", "--temperature=0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n", 1)
    assert "[k], the loop it exited at" in lines[0]  # not a terminal: plain markers
    body = lines[1].split("---------------")[0]
    assert body.startswith("ROMEO:")
    pieces, loops = parse_depth(body[len("ROMEO:"):].rstrip("\n"), 3, False)
    assert len(loops) == 25 and all(1 <= k <= 3 for k in loops)
    mean = float(p.stdout.split("mean loops per generated token: ")[1].split()[0])
    assert abs(mean - sum(loops) / 25) < 0.006  # the markers are the exits that were counted
    # the same run, fixed depth: every token at loop 2
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=10", "--num_samples=1",
            "--n_loops=2", "--show_depth=True")
    body = p.stdout.split("\n", 1)[1].split("---------------")[0]
    assert body.count("[2]") >= 10 and "[1]" not in body and "[3]" not in body


def test_sample_fixed_and_adaptive_depth(tiny_runs):
    out = str(tiny_runs["rmsnorm"])
    p = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=40",
            "--num_samples=1", "--n_loops=2")
    assert p.returncode == 0, p.stderr
    text = p.stdout.split("---------------")[0].rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40
    assert "mean loops per generated token: 2.00 of 2" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=30", "--num_samples=1",
            "--exit_policy=entropy", "--exit_threshold=100")  # every token exits at loop 1
    assert p.returncode == 0 and "mean loops per generated token: 1.00 of 3" in p.stdout


def test_sample_bad_inputs(tiny_runs, tmp_path):
    p = run("sample.py", f"--out_dir={tiny_runs['rmsnorm']}", "--start=\u2603 snowman")
    assert p.returncode != 0 and "cannot be encoded" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={tmp_path}")
    assert p.returncode != 0 and "no checkpoint" in p.stderr
