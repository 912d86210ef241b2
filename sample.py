"""
Sample from a trained looped model, at a fixed exit depth or with adaptive per-token exit.

  python sample.py --out_dir=out --start="ROMEO:" --max_new_tokens=300
  python sample.py --n_loops=2                                       # exit after loop 2
  python sample.py --exit_policy=max_prob --exit_threshold=0.9       # adaptive depth per token
  python sample.py --exit_policy=max_prob --show_depth=True          # see where each token exited

After the samples it prints the mean number of loops used per generated token. With
--show_depth=True each generated token is shaded by the loop it exited at (256-colour ANSI on a
terminal; `text[k]` markers when stdout is not a terminal or NO_COLOR is set).

Generation lives here: a KV cache per (loop, layer), so a new token costs one position per loop,
and adaptive exit, where each token stops at the first loop whose readout is sure enough.
"""

import os
import re
import sys

import torch
import torch.nn.functional as F

from configurator import DEVICE, NONEMPTY, at_least, check, device_or_exit, one_of, parse
from model import EXIT_POLICIES, exit_score, exits
from prepare import load_tokenizer
from rundir import die, load_checkpoint, model_from_checkpoint


def readable_prompt(v):
    return v != "" and (not v.startswith("FILE:") or os.path.isfile(v[5:]))


OPTIONS = {
    "out_dir": ("out", "folder holding ckpt.pt from train.py", NONEMPTY),
    "start": ("\n", "prompt text, or FILE:path to read it from a file",
              check("non-empty text, or FILE:path of an existing file", readable_prompt,
                    ["", "FILE:/no/such/prompt.txt"])),
    "num_samples": (2, "how many samples", at_least(1)),
    "max_new_tokens": (300, "tokens generated per sample", at_least(1)),
    "temperature": (0.8, "1.0 = the model's distribution, < 1 sharper, 0 = greedy",
                    at_least(0.0)),
    "top_k": (200, "sample only among the top_k tokens; 0 disables", at_least(0)),
    "seed": (1337, "random seed", at_least(0)),
    "device": ("auto", "auto: cuda, then mps, then cpu", DEVICE),
    "n_loops": (0, "fixed exit depth k (0 = the trained K; more than K is allowed)", at_least(0)),
    "exit_policy": ("", "adaptive exit: max_prob | logit_margin | entropy (empty = fixed depth)",
                    one_of("", *EXIT_POLICIES)),
    "exit_threshold": (0.9, "exit when max_prob (<= 1) or logit_margin >= this, or entropy <= "
                            "this; needs --exit_policy", at_least(0.0)),
    "use_cache": (True, "KV cache per (loop, layer); False recomputes the context every token",
                  None),
    "show_depth": (False, "mark each generated token with the loop it exited at", None),
}


def together(cfg, explicit):
    if "exit_threshold" in explicit and not cfg.exit_policy:
        return "--exit_threshold needs --exit_policy (max_prob | logit_margin | entropy)"
    if cfg.exit_policy == "max_prob" and cfg.exit_threshold > 1:
        return (f"--exit_threshold={cfg.exit_threshold!r} is invalid with --exit_policy=max_prob;"
                f" accepted: a probability in [0, 1] (no token could ever exit above 1)")
    return None


# ---- generation: a KV cache per (loop, layer), fixed or adaptive exit -----------------------

class KVCache:
    """Keys and values of one (loop, layer) for the positions seen so far, [B, H, T, D]."""

    def __init__(self):
        self.k = None
        self.v = None

    def extend(self, k, v):
        if self.k is not None:
            k = torch.cat((self.k, k), dim=2)
            v = torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


def sample_next(logits, temperature=1.0, top_k=None):
    """One token per row from logits [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:  # sample among the top k only: cheaper than masking a 50k vocab
        v, ix = torch.topk(logits, min(top_k, logits.size(-1)))
        return ix.gather(-1, torch.multinomial(F.softmax(v, dim=-1), num_samples=1))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, n_loops=None,
             exit_policy=None, exit_threshold=None, use_cache=True):
    """Sample tokens after `idx` [B, T]; returns (idx with them, exit loop of each [B, new]), both
    on the model's device. Depth: a fixed `n_loops` (default K), or adaptive per token: the first
    loop whose readout passes `exit_policy` at `exit_threshold` (at most n_loops). When the cache
    reaches block_size it is refilled from the last block_size // 2 tokens, which run every loop
    again (only the last one's exit is decided anew); without a cache the context is cropped to
    block_size every token, as in nanoGPT."""
    K = n_loops or model.config.n_loops
    bs = model.config.block_size
    idx = idx.to(model.lm_head.weight.device)  # the prompt, the tokens and the caches live there
    caches = None
    n_cached = 0
    loops_used = []
    for _ in range(max_new_tokens):
        if use_cache and caches is not None and n_cached < bs:
            x, pos0 = idx[:, -1:], n_cached
        else:  # (re)fill the cache, or recompute the cropped context without one
            x, pos0 = idx[:, -(bs // 2 if caches is not None else bs):], 0
            if use_cache:
                caches = {k: [KVCache() for _ in model.block] for k in range(1, K + 1)}
        logits, used = exit_step(model, x, pos0, K, caches, exit_policy, exit_threshold)
        n_cached = pos0 + x.size(1)
        idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
        loops_used.append(used)
    return idx, torch.stack(loops_used, dim=1)


def who_exited(done):
    """(has every row exited, has any), in one read from the device: the one host sync per loop
    of adaptive exit on a GPU, paid for by skipping the deeper loops of the whole batch when
    every row has exited, and the exited rows' cache copies while none has."""
    every, some = torch.stack((done.all(), done.any())).tolist()
    return every, some


def exit_step(model, x, pos0, K, caches, policy, threshold):
    """Run the loops on x; decode its last position. Returns logits [B, V] and exit loops [B].
    Cache rule for adaptive exit: a token that exits at loop e gets, at the deeper loops, the
    keys/values of loop e, so later tokens see its exit state."""
    h = model.embed(x, pos0)
    chosen = None
    done = torch.zeros(x.size(0), dtype=torch.bool, device=h.device)
    used = torch.full((x.size(0),), K, dtype=torch.long, device=h.device)
    some_exited = False  # has a row exited at an earlier loop? (True where not read back)
    for k in range(1, K + 1):
        h = model.loop(h, k, None if caches is None else caches[k])
        if policy is None:  # fixed depth: only the last loop is decoded
            if k == K:
                chosen = model.readout(h[:, -1], k)
            continue
        if caches is not None and some_exited:
            # rows that exited: their token's K/V here are those of the loop above (and so of
            # its exit loop). A masked copy of every row, not an if per row.
            exited = done[:, None, None]  # [B, 1, 1], over heads and head dims
            for cache, above in zip(caches[k], caches[k - 1]):
                cache.k[:, :, -1] = torch.where(exited, above.k[:, :, -1], cache.k[:, :, -1])
                cache.v[:, :, -1] = torch.where(exited, above.v[:, :, -1], cache.v[:, :, -1])
        logits = model.readout(h[:, -1], k)
        chosen = logits if chosen is None else torch.where(done[:, None], chosen, logits)
        newly = ~done & exits(exit_score(logits, policy), policy, threshold)
        used = torch.where(newly, k, used)
        done = done | newly
        # Skip the deeper loops once every row has exited. A prefill cannot: its earlier
        # positions need every loop's keys/values, so it reads nothing back.
        if k < K and (caches is None or x.size(1) == 1):
            every, some_exited = who_exited(done)
            if every:
                if caches is not None:  # the skipped deeper loops cache this loop's entries
                    for deeper in range(k + 1, K + 1):
                        for cache, exit_cache in zip(caches[deeper], caches[k]):
                            cache.extend(exit_cache.k[:, :, -1:], exit_cache.v[:, :, -1:])
                break
        else:
            some_exited = True
    return chosen, used


# ---- showing the depth of each token -------------------------------------------------------

def depth_colours(K):
    """A 256-colour background per exit loop, light (early exit) to dark (late)."""
    ramp = [229, 222, 215, 209, 203, 167, 131, 95, 59, 238]
    return [ramp[round(i * (len(ramp) - 1) / max(1, K - 1))] for i in range(K)]


def render_depth(pieces, loops, K, colour):
    """The generated pieces, each marked with the loop it exited at: shaded, or `text[k]`."""
    if not colour:
        return "".join(f"{p}[{k}]" for p, k in zip(pieces, loops))
    bg = depth_colours(K)
    out = []
    for piece, k in zip(pieces, loops):
        fg = 16 if k <= (K + 1) // 2 else 255  # dark text on the light shades
        out.append(f"\x1b[38;5;{fg};48;5;{bg[k - 1]}m{piece}\x1b[0m")
    return "".join(out)


def depth_legend(K, colour):
    if not colour:
        return f"each generated token is followed by [k], the loop it exited at (1..{K})"
    return "exit loop: " + render_depth([f" {k} " for k in range(1, K + 1)], range(1, K + 1),
                                        K, True)


def parse_depth(text, K, colour):
    """(pieces, loops) back from render_depth's output."""
    if colour:
        bg = depth_colours(K)
        marks = re.findall(r"\x1b\[38;5;\d+;48;5;(\d+)m(.*?)\x1b\[0m", text, flags=re.S)
        return [p for _, p in marks], [bg.index(int(c)) + 1 for c, _ in marks]
    marks = re.findall(r"(.*?)\[(\d+)\]", text, flags=re.S)
    return [p for p, _ in marks], [int(k) for _, k in marks]


def main(argv=None):
    cfg, _ = parse("sample.py", OPTIONS, argv, __doc__, together=together)
    device = device_or_exit(cfg.device)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))  # on the CPU: only the
    # model goes to the device, not the optimizer's state
    model = model_from_checkpoint(ckpt, device)
    encode, decode = load_tokenizer(ckpt["meta"])

    start = cfg.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except UnicodeDecodeError:
            die(f"the prompt file {start[5:]} is not UTF-8 text; save it as UTF-8")
        except OSError as e:
            die(f"cannot read the prompt file {start[5:]} ({e.strerror})")
    try:
        ids = encode(start)
    except ValueError as e:
        die(f"the start text cannot be encoded by this run's {ckpt['meta']['tokenizer']} "
            f"tokenizer: {e}")
    if not ids:
        die("the start text encodes to no tokens; give at least one character "
            "(e.g. --start=\"\\n\")")
    ids = ids[-model.config.block_size:]  # crop a long prompt to the context, as nanoGPT does
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]

    torch.manual_seed(cfg.seed)
    depth = cfg.n_loops or model.config.n_loops
    if cfg.exit_policy and depth != model.config.n_loops:
        print(f"note: adaptive exit runs at most n_loops={depth} loops", file=sys.stderr)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if cfg.show_depth:
        print(depth_legend(depth, colour))
    used = []
    for _ in range(cfg.num_samples):
        y, loops = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, n_loops=depth, exit_policy=cfg.exit_policy or None,
                            exit_threshold=cfg.exit_threshold, use_cache=cfg.use_cache)
        new = y[0, len(ids):].tolist()
        if cfg.show_depth:
            pieces = [decode([t]) for t in new]
            print(decode(ids) + render_depth(pieces, loops[0].tolist(), depth, colour))
        else:
            print(decode(y[0].tolist()))
        print("---------------")
        used.append(loops.float())
    mode = "fixed depth"
    if cfg.exit_policy:
        mode = f"adaptive {cfg.exit_policy} {EXIT_POLICIES[cfg.exit_policy]} {cfg.exit_threshold}"
    mean = torch.cat(used, dim=1).mean().item()
    print(f"mean loops per generated token: {mean:.2f} of {depth} ({mode})")


if __name__ == "__main__":
    main()
