"""
Sample from a trained looped model, at a fixed exit depth or with adaptive per-token exit.

  python sample.py --out_dir=out --start="ROMEO:" --max_new_tokens=300
  python sample.py --n_loops=2                                       # exit after loop 2
  python sample.py --exit_policy=max_prob --exit_threshold=0.9       # adaptive depth per token
  python sample.py --exit_policy=max_prob --show_depth=True          # see where each token exited
  python sample.py --exit_policy=logit_margin --exit_threshold=2 --exit_at=1,3   # test 2 loops

After the samples it prints the mean number of loops used per generated token. With
--show_depth=True each generated token is shaded by the loop it exited at (256-colour ANSI on a
terminal; `text[k]` markers when stdout is not a terminal or NO_COLOR is set).

Generation lives here: a KV cache per (loop, layer), so a new token costs one position per loop,
and adaptive exit, where each token stops at the first loop whose readout is sure enough.
"""

import math
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F

from configurator import (DEVICE, NONEMPTY, at_least, check, device_or_exit, error, one_of,
                          parse)
from model import EXIT_POLICIES, exit_score, exits, matmul_dtype
from prepare import load_tokenizer
from rundir import die, load_checkpoint, model_from_checkpoint


def readable_prompt(v):
    return v != "" and (not v.startswith("FILE:") or os.path.isfile(v[5:]))


def loop_numbers(v):
    """--exit_at's loops: "1,3" -> [1, 3]; "" -> None (every loop)."""
    return [int(k) for k in v.split(",")] if v else None


def loop_list(v):
    return v == "" or all(k.isdigit() and int(k) >= 1 for k in v.split(","))


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
    "exit_at": ("", "adaptive exit: the loops whose exit test runs, e.g. 1,3 (empty = every "
                    "loop); a loop without one runs no readout. eval.py --run=speed prints the "
                    "loops whose test pays for itself on this machine",
                check("empty, or loop numbers >= 1 separated by commas", loop_list,
                      ["0", "1,x", "2,,3", "-1"])),
    "use_cache": (True, "KV cache per (loop, layer); False recomputes the context every token",
                  None),
    "ragged": ("auto", "adaptive exit: run the deeper loops on the rows still running only. "
                       "auto: on a CPU, where it measured at least as fast as the whole batch "
                       "(bench.py --generation=True --gen_ragged_sweep=True); not on a GPU "
                       "(not yet measured)", one_of("auto", "True", "False")),
    "compile": (False, "compile each loop of a decode step with its exit test (torch.compile; "
                       "CUDA graphs on a GPU). Off: on the CPU demo compiling took about a "
                       "minute and the graphs then ran at 0.6-0.9x eager's speed, so it never "
                       "pays there (bench.py --generation=True --compile=True); on a GPU not "
                       "yet measured", None),
    "show_depth": (False, "mark each generated token with the loop it exited at", None),
}


def together(cfg, explicit):
    if "exit_threshold" in explicit and not cfg.exit_policy:
        return "--exit_threshold needs --exit_policy (max_prob | logit_margin | entropy)"
    if cfg.exit_at and not cfg.exit_policy:
        return "--exit_at needs --exit_policy (max_prob | logit_margin | entropy)"
    if cfg.exit_policy == "max_prob" and cfg.exit_threshold > 1:
        return (f"--exit_threshold={cfg.exit_threshold!r} is invalid with --exit_policy=max_prob;"
                f" accepted: a probability in [0, 1] (no token could ever exit above 1)")
    return None


# ---- generation: a static KV cache per (loop, layer), fixed or adaptive exit ---------------
# A decode step of the CPU demo is some 300 ops on vectors of 128 numbers: its time is the ops'
# calls, not their arithmetic. So the cache is written in place (no concatenation), the layers
# run on weights prepared once per generation (model.Layer.decode), the exit decision is read
# back once per loop, and with --compile each loop and its exit test are one compiled graph.

class KVCache:
    """Keys and values of every (loop, layer), preallocated for block_size positions and written
    in place at each step's positions: nothing is concatenated or allocated per token. loops[k]
    is what model.loop(h, k, kv_caches) takes: one LoopCache per layer, each with its own buffer
    [B, block_size, 2, H, D] (position-major: a step's keys and values are one slice of the
    attention's input projection, written with one op)."""

    def __init__(self, model, B, K, static=False):
        cfg = model.config
        w = model.lm_head.weight
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        dtype = matmul_dtype(w)  # under autocast the keys come out of a matmul in its dtype
        weights = [layer.decode_weights() for layer in model.block]
        # Eager attention reads only the positions written (or settled) at its loop, but for
        # a ragged batch's rows that have left it, whose outputs are dropped (each row attends
        # on its own). So the buffers start empty: a loop no token reaches is never written,
        # its pages never touched. A compiled graph reads a whole buffer, masked, so there they
        # start at zero (0 * a garbage NaN would be NaN).
        alloc = torch.zeros if static else torch.empty
        self.loops = {}
        for k in range(1, K + 1):
            above = self.loops.get(k - 1, [None] * len(weights))
            self.loops[k] = [LoopCache(self, alloc(B, cfg.block_size, 2, H, D, dtype=dtype,
                                                   device=w.device), layer_weights, up)
                             for layer_weights, up in zip(weights, above)]
        self.positions = torch.arange(cfg.block_size, device=w.device)
        self.B = B
        self.rows = None  # ragged: the batch rows still running (an index tensor), else all
        self.queries = torch.zeros(B, H, 1, D, dtype=dtype, device=w.device)  # ragged scratch
        if static:  # for CUDA graphs: buffers a graph writes must keep their address
            for k in self.loops:
                for cache in self.loops[k]:
                    torch._dynamo.mark_static_address(cache.kv)
        self.step(0, 1)

    def step(self, pos, T):
        """The next T tokens go to positions pos..pos+T-1 (a (re)fill starts at 0)."""
        self.T, self.end = T, pos + T
        self.pos = self.positions[pos:self.end]  # tensors, so a compiled graph takes any step
        self.last = self.positions[self.end - 1:self.end]
        self.mask = None  # causal
        self.frozen = None  # a fill's rows past their exit loop at its positions: [B, T] or None
        if pos == 0:  # a fill: the notes of the exit rule's copies (per loop) name positions
            self.pending = {k: [] for k in self.loops}  # of the old window: dropped

    def only(self, pos):
        """This loop of a fill runs the positions `pos` only (a sorted index tensor): each
        query sees the keys at its own position and before."""
        self.T, self.pos = pos.numel(), pos
        self.mask = self.positions[:self.end] <= pos[:, None]

    def exit_rule(self, used):
        """The early-exit rule at this step's last position, once its loops are done: a token
        that exited at loop e gets loop e's keys and values at every deeper loop, so that later
        tokens see its exit state. used: each row's exit loop, on the host. Only noted here:
        a deeper loop copies them when it next runs (settle), so a loop no token reaches costs
        nothing (a model that exits at loop 1 never touches the deeper loops' buffers)."""
        last = self.end - 1
        for k in range(min(used) + 1, len(self.loops) + 1):
            rows = {b for b, e in enumerate(used) if e < k}
            self.pending[k].append((last, None if len(rows) == len(used) else rows))

    def keep_exited(self, k, done):
        """The exit rule during a loop that ran every row: after loop k (> 1), the rows done
        before it take back loop k - 1's keys and values at the step's last position."""
        for cache in self.loops[k]:
            kept = torch.where(done[:, None, None, None, None],
                               cache.above.kv.index_select(1, self.last),
                               cache.kv.index_select(1, self.last))
            cache.kv.index_copy_(1, self.last, kept)

    def keep_above(self, k, positions):
        """The exit rule for the positions (a list) that loop k does not run in a fill: every
        row takes loop k - 1's keys and values there, when loop k next runs (settle)."""
        self.pending[k].extend((p, None) for p in positions)

    def settle(self, k):
        """Before loop k runs: the positions noted since it last ran or the cache was last
        filled (exit_rule, keep_above) take loop k - 1's keys and values, in the rows that
        exited before loop k. Loop k - 1 has settled already: every step runs its loops in
        order. (Fixed depth notes nothing, so it never settles.)"""
        pending = self.pending.get(k)
        if not pending:
            return
        self.pending[k] = []
        pos = torch.tensor([p for p, _ in pending], device=self.positions.device)
        mask = None
        if any(rows is not None for _, rows in pending):  # some rows only, at some positions
            B = self.B
            mask = [[rows is None or b in rows for _, rows in pending] for b in range(B)]
            mask = torch.tensor(mask, device=pos.device).view(B, len(pending), 1, 1, 1)
        for cache in self.loops[k]:
            above = cache.above.kv.index_select(1, pos)
            if mask is not None:
                above = torch.where(mask, above, cache.kv.index_select(1, pos))
            cache.kv.index_copy_(1, pos, above)


class LoopCache:
    """One (loop, layer) of a KVCache: its buffer, its layer's decode weights (Layer.decode
    takes them from here) and the cache above (loop k - 1), and the attention of Layer.decode."""

    def __init__(self, cache, kv, weights, above):
        self.cache = cache
        self.kv = kv
        self.weights = weights
        self.above = above
        self.keys = kv[:, :, 0].transpose(1, 2)  # [B, H, block_size, D]: views of kv
        self.values = kv[:, :, 1].transpose(1, 2)

    def attend(self, qkv, n_head):
        """Store this step's keys and values and attend over every position held: qkv [B * T,
        3C], the attention's input projection (of the running rows only, when the batch is
        ragged) -> [B * T, C]."""
        c = self.cache
        new = qkv.view(-1, c.T, 3, n_head, qkv.size(-1) // (3 * n_head))
        q = new.select(2, 0).transpose(1, 2)  # [B, H, T, D] (select, narrow: cheaper calls
        if c.rows is None:                     # than indexing with slices)
            kv = new.narrow(2, 1, 2)
            if c.frozen is not None:  # the exit rule, before any query sees these keys
                above = self.above.kv.index_select(1, c.pos)
                kv = torch.where(c.frozen[:, :, None, None, None], above, kv)
            self.kv.index_copy_(1, c.pos, kv)
        else:  # a ragged batch, one token: the running rows' queries join the others' stale
            # ones in one attention over the whole batch, whose other rows are dropped after
            # (on a CPU, gathering the running rows' keys and values cost as much as it saved)
            self.kv.index_put_((c.rows, c.pos), new[:, 0, 1:])
            q = c.queries.index_copy_(0, c.rows, q)
        if torch.compiler.is_compiling():  # one graph for every position: the whole buffer
            y = masked_attention(q, self.kv, c.positions <= c.pos[:, None])
        else:  # the positions held; a fill (T > 1, from position 0) is causal
            end = c.end
            y = F.scaled_dot_product_attention(q, self.keys.narrow(2, 0, end),
                                               self.values.narrow(2, 0, end), attn_mask=c.mask,
                                               is_causal=c.mask is None and c.T > 1)
        if c.rows is not None:
            y = y.index_select(0, c.rows)
        return y.transpose(1, 2).reshape(qkv.size(0), -1)


def masked_attention(q, kv, mask):
    """Attention of q [B, H, T, D] over a whole KV buffer, mask [T, block_size]: for a compiled
    graph, where matmuls and a softmax fuse (the CPU's SDPA kernel took 4x as long in one)."""
    # views made in the graph: with the buffers as slices of one tensor, Inductor read stale
    # keys through views passed in
    keys = kv[:, :, 0].transpose(1, 2)
    values = kv[:, :, 1].transpose(1, 2)
    att = (q @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    return att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ values


def sample_next(logits, temperature=1.0, top_k=None):
    """One token per row from logits [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.size(-1):  # among the top k only: cheaper than masking 50k
        v, ix = torch.topk(logits, top_k)
        return ix.gather(-1, draw(F.softmax(v, dim=-1)))
    return draw(F.softmax(logits, dim=-1))


def draw(probs):
    """One index per row of probs [B, n], drawn with those probabilities: the row's argmax of
    p_i / E_i with E_i ~ Exp(1) independent. E_i / p_i is exponential with rate p_i, and the
    smallest of such exponentials is entry i with probability p_i / sum(p). A few ops where
    torch.multinomial costs as much as a layer of the CPU demo's decode step. E is kept above 0:
    some devices' exponential_ returns an exact 0 now and then, and p / 0 would pick any entry,
    even one of probability 0 (0 / 0 is NaN, which argmax takes for the largest)."""
    e = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return probs.div_(e).argmax(dim=-1, keepdim=True)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, n_loops=None,
             exit_policy=None, exit_threshold=None, use_cache=True, ragged=None, compile=False,
             exit_at=None):
    """Sample tokens after `idx` [B, T]; returns (idx with them, exit loop of each [B, new]), both
    on the model's device. Depth: a fixed `n_loops` (default K), or adaptive per token: the first
    loop whose readout passes `exit_policy` at `exit_threshold` (at most n_loops), of the loops
    `exit_at` (default: every loop; a loop not in it runs no readout and no test). With the
    cache, each prompt token runs the loops it would run as a step of its own (its readout's
    exit test), and an exited token's deeper keys and values are its exit loop's. When the cache
    reaches block_size it is refilled from the last block_size // 2 tokens, each running the
    loops it ran before. Without a cache the context is cropped to block_size every token, as
    in nanoGPT, and all of it but the last token runs every loop. ragged: with the cache,
    adaptive exit runs the deeper loops on the rows still running only (None: where it pays,
    see use_ragged). compile: each loop of a one-token step of the whole batch is a compiled
    graph (see compiled_steps; a ragged batch runs eagerly). The model runs as in eval mode."""
    with torch.inference_mode():  # lighter than no_grad: no version counters, no view tracking
        out, loops = _generate(model, idx, max_new_tokens, temperature, top_k, n_loops,
                               exit_policy, exit_threshold, use_cache, ragged, compile, exit_at)
    return out.clone(), loops.clone()  # ordinary tensors again, for any later use


def _generate(model, idx, max_new_tokens, temperature, top_k, n_loops, policy, threshold,
              use_cache, ragged, compile, exit_at):
    K = n_loops or model.config.n_loops
    tested = set(range(1, K)) if exit_at is None else {k for k in exit_at if k < K}
    if not tested:  # no loop tests an exit: every token runs all K loops, as at fixed depth
        policy = None
    bs = model.config.block_size
    idx = idx.to(model.lm_head.weight.device)  # the prompt, the tokens and the caches live there
    B, P = idx.shape
    if ragged is None:
        ragged = use_ragged(idx.device, B) and not compile
    ragged = ragged and use_cache  # the rows that leave keep their keys in the cache
    steps = compiled_steps(COMPILE_BACKEND) if compile else (fixed_loop, exit_loop)
    out = torch.empty(B, P + max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, :P] = idx
    cache = KVCache(model, B, K, static=compile) if use_cache else None
    n_cached = 0  # positions the cache holds (0: not filled yet)
    loops_used = []
    prompt_exits = None  # adaptive exit: (the first filled position, exit loops of the prompt's
    #                      positions from there, but its last, [B][...]), from its fill
    for t in range(P, P + max_new_tokens):
        if compile and idx.device.type == "cuda":  # a new step: the graphs' last outputs are
            torch.compiler.cudagraph_mark_step_begin()  # read (or cloned) by now
        if cache is not None and 0 < n_cached < bs:
            x, pos0 = out[:, t - 1:t], n_cached
        else:  # (re)fill the cache, or recompute the cropped context without one
            window = bs // 2 if cache is not None and n_cached else bs
            x, pos0 = out[:, max(0, t - window):t], 0
        one = x.size(1) == 1
        earlier = None
        if not one and cache is not None and policy is not None and loops_used:  # a refill
            earlier = exit_loops(loops_used, prompt_exits, P, t - x.size(1), t - 1)
        logits, used = exit_step(model, x, pos0, K, cache, policy, threshold,
                                 ragged and one, steps if one else (fixed_loop, exit_loop), tested,
                                 earlier)
        if prompt_exits is None and cache is not None and policy is not None:
            prompt_exits = (t - x.size(1), [row[:-1] for row in cache.exit_of] if not one
                            else [[]] * B)
        n_cached = pos0 + x.size(1)
        out[:, t:t + 1] = sample_next(logits, temperature, top_k)
        loops_used.append(used)
    return out, torch.stack(loops_used, dim=1)


def exit_loops(loops_used, prompt_exits, P, start, end):
    """The exit loops of positions start..end-1 as lists [B][end - start]: a prompt token's
    from the prompt's fill (prompt_exits: its first position, and the exit loops from there
    to the prompt's last, excluded), a generated token's (and the prompt's last) from the step
    that took it as its last position (loops_used[i]: position P - 1 + i)."""
    first, prompt = prompt_exits
    steps = torch.stack(loops_used[max(0, start - P + 1):end - P + 1], dim=1).tolist()
    return [row[start - first:end - first] + later for row, later in zip(prompt, steps)]


def who_exited(done):
    """(has every row exited, has any), in one read from the device: the one host sync per loop
    of adaptive exit on a GPU, paid for by skipping the deeper loops of the whole batch when
    every row has exited."""
    every, some = torch.stack((done.all(), done.any())).tolist()
    return every, some


def exit_step(model, x, pos0, K, cache, policy, threshold, ragged=False,
              steps=None, tested=None, earlier=None):
    """Run the loops on x [B, T] at positions pos0..; decode its last position. Returns logits
    [B, V] and exit loops [B]. Cache rule for adaptive exit: a token that exits at loop e gets,
    at the deeper loops, the keys/values of loop e, so later tokens see its exit state.
    ragged: the rows that exit leave the batch (ragged_exit_step); else every row runs until
    every row has exited. steps: the functions that run one loop (compiled or not). tested:
    the loops < K with an exit test (default: all). earlier: for a fill of the cache, the exit
    loops known of its first positions ([B][n] lists, n < T: a refill's all but the last;
    default none: every position is decided in the fill, as for a prompt; see fill_step)."""
    fixed, adaptive = steps or (fixed_loop, exit_loop)
    if cache is not None:
        cache.step(pos0, x.size(1))
    h = model.embed(x, pos0)
    B, T = x.shape
    caches = cache.loops if cache is not None else {k: None for k in range(1, K + 1)}
    if policy is None:  # fixed depth: only the last loop is decoded
        for k in range(1, K + 1):
            h = fixed(model, h, k, caches[k])
        return model.readout(h[:, -1], K), torch.full((B,), K, dtype=torch.long, device=h.device)
    if tested is None:
        tested = range(1, K)
    if cache is not None and T > 1:
        if earlier is None:
            earlier = [[]] * B
        return fill_step(model, h, K, cache, policy, threshold, tested, earlier)
    if ragged:
        return ragged_exit_step(model, h, K, cache, policy, threshold, tested)
    chosen = None
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    used = torch.full((B,), K, dtype=torch.long, device=h.device)
    some = False  # has a row exited?
    for k in range(1, K + 1):
        test = k in tested
        if cache is not None:
            cache.settle(k)
        h, chosen, done, used = adaptive(model, h, k, caches[k], chosen, done, used, policy,
                                         threshold, test, some, test or k == K)
        if test:  # skip the deeper loops once every row has exited
            every, some = who_exited(done)
            if every:
                if cache is not None:  # the loops skipped hold loop k's entries
                    cache.exit_rule([k] * B)
                break
    return chosen, used.clone()  # kept past the step (a CUDA graph's output is overwritten)


def fill_step(model, h, K, cache, policy, threshold, tested, earlier):
    """exit_step for a fill of the cache, h [B, T, C] from position 0: each position runs the
    loops its token runs in a step of its own. The first n = len(earlier[0]) positions (a
    refill's all but the last) ran theirs already, earlier[b][j]; the others (every position
    of a prompt, a refill's last) are decided here, each by the exit test of its own readout,
    as if fed one token a step. So a fill costs about what those steps cost. Loop k runs the
    positions some row still runs, each query seeing every position's loop-k keys; a position
    past its exit loop (in every row, or in some rows only) takes loop k - 1's keys and values,
    which are its exit loop's. Returns the last position's logits and exit loops, and leaves
    every position's exit loop in cache.exit_of ([B][T] lists)."""
    B, T = h.shape[:2]
    n = len(earlier[0])
    # each position's exit loop per row; K also stands for "not decided yet" at j >= n
    exit_of = [list(row) + [K] * (T - n) for row in earlier]
    chosen = None
    held = list(range(T))  # the positions h holds
    for k in range(1, K + 1):
        # a position runs while some row has not exited there (an undecided one holds K)
        running = [j for j in range(T) if max(row[j] for row in exit_of) >= k]
        if len(running) < T:  # the others keep their exit loop's entries at this loop too
            cache.keep_above(k, sorted(set(range(T)) - set(running)))
        if not running:
            continue
        cache.settle(k)
        if running != held:
            where = {j: i for i, j in enumerate(held)}
            h = h.index_select(1, torch.tensor([where[j] for j in running], device=h.device))
            held = running
            cache.only(torch.tensor(running, device=h.device))
        past = [[row[j] < k for j in running] for row in exit_of]
        if any(map(any, past)):  # rows past their exit at running positions
            cache.frozen = torch.tensor(past, dtype=torch.bool, device=h.device)
            cache.frozen = cache.frozen.view(B, len(running))
        h = model.loop(h, k, cache.loops[k])
        cache.frozen = None
        live = [j for j in running if j >= n]  # decided here: a suffix of running
        if not live or (k < K and k not in tested):
            continue
        if k < K:
            passed, logits = fill_tests(model, h[:, -len(live):], k, policy, threshold)
        elif live[-1] == T - 1:  # every row still running exits at the last loop
            passed, logits = None, model.readout(h[:, -1], k)
        else:  # loop K, and the last position exited in every row before: nothing to decide
            break
        if live[-1] == T - 1:  # the last position's logits: of each row's exit loop
            done_before = [row[T - 1] < k for row in exit_of]
            if chosen is None or not any(done_before):
                chosen = logits
            else:
                kept = torch.tensor(done_before, device=h.device)
                chosen = torch.where(kept[:, None], chosen, logits)
        if passed is None:
            break
        for row, row_passed in zip(exit_of, exit_decisions(passed)):
            for j, p in zip(live, row_passed):
                if p and row[j] == K:
                    row[j] = k
    cache.exit_of = exit_of
    return chosen, torch.tensor([row[T - 1] for row in exit_of], device=h.device)


# a fill's exit tests read out slices of positions of at most this many logits (16 MB in
# float32), or of one position where the batch's logits at one position are more
READOUT_FLOATS = 2 ** 22


def fill_tests(model, h, k, policy, threshold):
    """The exit test of every position of h [B, m, C] after loop k: (passed [B, m], the last
    position's logits [B, V]). The readout goes in slices of positions, so that a long prompt's
    logits at GPT-2's vocabulary (B * m * 50,257 floats) are never all held at once."""
    B, m = h.shape[:2]
    size = max(1, READOUT_FLOATS // (B * model.lm_head.weight.size(0)))
    passed = []
    for part in h.split(size, dim=1):
        logits = model.readout(part, k)
        passed.append(exits(exit_score(logits, policy), policy, threshold))
    passed = passed[0] if len(passed) == 1 else torch.cat(passed, dim=1)
    return passed, logits[:, -1]


def fixed_loop(model, h, k, caches):
    """Loop k of fixed depth."""
    return model.loop(h, k, caches)


def exit_loop(model, h, k, caches, chosen, done, used, policy, threshold, test, some=True,
              decode=True):
    """Loop k of adaptive exit on every row, with its readout (if `decode`) and exit test (if
    `test`; never at the last loop, where every row exits): the rows that exit here take this
    loop's logits and k, the rows done before keep theirs, and (if `some` row is done) their
    keys and values of the loop above (exit rule)."""
    h = model.loop(h, k, caches)
    if caches is not None and k > 1 and some:
        caches[0].cache.keep_exited(k, done)
    if not decode:  # a loop without an exit test, before the last: nothing to read out
        return h, chosen, done, used
    logits = model.readout(h[:, -1], k)
    chosen = logits if chosen is None else torch.where(done[:, None], chosen, logits)
    if test:
        newly = ~done & exits(exit_score(logits, policy), policy, threshold)
        used = torch.where(newly, k, used)
        done = done | newly
    return h, chosen, done, used


def ragged_exit_step(model, h, K, cache, policy, threshold, tested):
    """exit_step for one token per row, each loop run on the rows still running only: the exit
    decisions are read back at every tested loop (a list on the host), the rows that exit leave
    h, and the cache writes the others' keys and values in their own rows."""
    B = h.size(0)
    running = list(range(B))  # the batch row of each row of h
    used = [K] * B
    chosen = None
    for k in range(1, K + 1):
        cache.settle(k)
        h = model.loop(h, k, cache.loops[k])
        if k < K and k not in tested:
            continue
        logits = model.readout(h[:, -1], k)
        if k == K:
            passed = [True] * len(running)
        else:
            passed = exit_decisions(exits(exit_score(logits, policy), policy, threshold))
        if not any(passed):
            continue
        for b, p in zip(running, passed):
            if p:
                used[b] = k
        if chosen is None and all(passed):  # the whole batch at once
            chosen = logits
            break
        if chosen is None:
            chosen = logits.new_empty(B, logits.size(-1))
        leave = [i for i, p in enumerate(passed) if p]
        chosen[[running[i] for i in leave]] = logits[leave]
        stay = [i for i, p in enumerate(passed) if not p]
        if not stay:
            break
        h = h[stay]
        running = [running[i] for i in stay]
        cache.rows = torch.tensor(running, device=h.device)
    cache.rows = None
    cache.exit_rule(used)
    return chosen, torch.tensor(used, device=h.device)


def exit_decisions(passed):
    """The exit decisions as lists: a ragged batch's running rows [B'] and a fill's positions
    still undecided [B][m], read back once per tested loop."""
    return passed.tolist()


def use_ragged(device, B):
    """A ragged batch where it was measured to pay: on a CPU, at every batch size (batch 1
    too, where it reads each decision back and keeps no tensors of who is done). Not on a GPU,
    where it is not yet measured (each loop's gather and the cache's row writes are kernels)."""
    return device.type == "cpu"


_COMPILED = {}
COMPILE_BACKEND = "inductor"  # tests trace with "aot_eager": the same graphs, no C++ to build


def compiled_steps(backend="inductor"):
    """fixed_loop and exit_loop, compiled: one graph per loop k (the loop, and for adaptive exit
    its readout, exit test and bookkeeping), CUDA graphs on a GPU ("reduce-overhead"). Shapes
    are static: the KV buffers are written at a position tensor and attention spans the whole
    buffer, masked (LoopCache.attend), so one graph serves every position."""
    if backend not in _COMPILED:
        # one graph per loop, batch size and policy: more than torch's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if backend == "inductor" and torch.cuda.is_available() else None
        _COMPILED[backend] = tuple(torch.compile(fn, backend=backend, mode=mode, dynamic=False)
                                   for fn in (fixed_loop, exit_loop))
    return _COMPILED[backend]


# ---- what early exit saves, measured (eval.py --run=speed, bench.py --generation) --------

def paired(times, ref, name):
    """The median over rounds of ref's time / name's time: name's speed-up over ref."""
    return statistics.median(a / b for a, b in zip(times[ref], times[name]))


def early_exit_row(times, loops, ref, name, K, tokens):
    """A variant's tokens/s (median round), mean loops (over the rounds), speed-up over ref,
    the ideal K / mean loops, and the speed-up's share of the ideal: the median over rounds of
    each round's share, since the loops a round uses vary with its samples (a round that falls
    into repeating one character exits early throughout)."""
    mean_loops = statistics.mean(loops[name])
    shares = [a / b / (K / m) for a, b, m in zip(times[ref], times[name], loops[name])]
    return {"tokens_per_s": tokens / statistics.median(times[name]), "mean_loops": mean_loops,
            "speed_up": paired(times, ref, name), "ideal": K / mean_loops,
            "of_ideal": statistics.median(shares)}


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
    exit_at = loop_numbers(cfg.exit_at)
    if exit_at and max(exit_at) >= depth:
        error(f"--exit_at={cfg.exit_at} is invalid for {depth} loops; accepted: loops 1.."
              f"{depth - 1} (at loop {depth} every token exits anyway)")
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if cfg.show_depth:
        print(depth_legend(depth, colour))
    used = []
    for _ in range(cfg.num_samples):
        y, loops = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, n_loops=depth, exit_policy=cfg.exit_policy or None,
                            exit_threshold=cfg.exit_threshold, use_cache=cfg.use_cache,
                            ragged={"auto": None, "True": True, "False": False}[cfg.ragged],
                            compile=cfg.compile, exit_at=exit_at)
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
        if exit_at:
            mode += f", tested at loops {cfg.exit_at}"
    mean = torch.cat(used, dim=1).mean().item()
    print(f"mean loops per generated token: {mean:.2f} of {depth} ({mode})")


if __name__ == "__main__":
    main()
