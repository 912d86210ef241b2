"""
A looped GPT and the readout blind spot (arXiv 2606.24898), in one file.

A looped LM applies ONE weight-shared block of layers K times. After every loop k the hidden
state h_k is decoded by a readout and the tied LM head, and training uses dense per-loop
cross-entropy. h_k is also fed back as the input of loop k+1: it is runtime state.

The blind spot: a scale-invariant readout (RMSNorm) gives the same logits for h and c*h, so the
gradient of the loss is orthogonal to h_k and nothing in the loss controls ||h_k||. Meanwhile
every pre-norm residual layer adds to h, so the norm grows loop after loop (see `readout`).

The paper's four knobs, each described once below (READOUTS, SUPERVISIONS, LoopedGPTConfig):
  readout       how h_k is decoded: through RMSNorm (scale hidden: the blind spot) or not (fix 1)
  supervision   which exits the loss trains: all K (dense) or the last one
  norm_penalty  lambda > 0 adds lambda * mean_k mean(h_k^2) to the loss (fix 2)
  loop_norm     RMSNorm the state between loops: scale-removing recurrence (fix 3)

Read in order: READOUTS and SUPERVISIONS, LoopedGPTConfig, Layer, LoopedGPT.loop / loop_states,
LoopedGPT.readout (the blind spot), LoopedGPT.forward (the losses). After the mechanism: the
early-exit scores that eval.py and sample.py use, then speed: RMSNorm with a faster CPU backward
and a memory-lean cross-entropy for large vocabularies.
"""

import math
from collections import namedtuple
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- the readouts and supervisions, each described once -----------------------------------
# Every script, label and test reads these tables; adding a readout or a supervision is one
# entry here. `loop` runs from 1 and may exceed K (eval.py decodes loops K+1..2K, sample.py
# runs any --n_loops), so each rule must say what it does there.

Readout = namedtuple("Readout", "about hides_scale")
READOUTS = {
    # hides_scale(loop, K): does the LM head see RMSNorm(h_loop), which is blind to ||h||?
    "rmsnorm": Readout("lm_head(RMSNorm(h)) at every loop: scale-invariant, the blind spot",
                       lambda loop, K: True),
    "scale_visible": Readout("lm_head(h) at every loop: the loss sees the scale (fix 1)",
                             lambda loop, K: False),
    "final_only": Readout("scale-visible at every loop but the trained last one, K, which is "
                          "RMSNorm'd", lambda loop, K: loop == K),
}

Supervision = namedtuple("Supervision", "about weight")
SUPERVISIONS = {
    # weight(loop, K): this exit's share of the loss; 0 = measured, never trained or decoded in a
    # training step. The loss is sum_k weight_k * CE_k / sum_k weight_k.
    "per_loop": Supervision("dense: the mean of the K exits' cross-entropies",
                            lambda loop, K: 1.0),
    "terminal": Supervision("the last loop's cross-entropy only",
                            lambda loop, K: float(loop == K)),
}

READOUT_CES = ("auto", "chunked", "plain")


def knob(default, about, accepted, ok):
    """A config field with its one-line help, the accepted values in words and their check.
    train.py's --help, its checks and its banner are built from these."""
    return field(default=default, metadata={"about": about, "accepted": accepted, "ok": ok})


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _names(table):
    return " | ".join(table)


def _described(table):
    """Each entry of a table in words, for --help."""
    return "; ".join(f"{name}: {entry.about}" for name, entry in table.items())


@dataclass
class LoopedGPTConfig:
    # The defaults are the paper's 44M model (config/ holds the presets).
    vocab_size: int = knob(50304, "tokens in the vocabulary (train.py takes it from the data)",
                           "an integer >= 1", _positive_int)
    block_size: int = knob(256, "sequence length (positions)", "an integer >= 1", _positive_int)
    n_layer: int = knob(8, "layers in the block that is looped", "an integer >= 1",
                        _positive_int)
    n_head: int = knob(8, "attention heads", "an integer >= 1", _positive_int)
    n_embd: int = knob(512, "width of the hidden state h_k (a multiple of n_head)",
                       "an integer >= 1", _positive_int)
    n_loops: int = knob(4, "K: how many times the block is applied", "an integer >= 1",
                        _positive_int)
    readout: str = knob("rmsnorm", "how h_k is decoded. " + _described(READOUTS),
                        _names(READOUTS), lambda v: v in READOUTS)
    loop_norm: bool = knob(False, "RMSNorm the state between loops (scale-removing recurrence)",
                           "True | False", lambda v: isinstance(v, bool))
    supervision: str = knob("per_loop", "which exits the loss trains. " +
                            _described(SUPERVISIONS), _names(SUPERVISIONS),
                            lambda v: v in SUPERVISIONS)
    norm_penalty: float = knob(0.0, "lambda: adds lambda * mean_k mean(h_k^2) to the loss "
                               "(paper: 0.01)", "a finite number >= 0",
                               lambda v: 0 <= v < math.inf)  # NaN fails both comparisons
    dropout: float = knob(0.0, "dropout rate (paper: 0.1)", "a number in [0, 1)",
                          lambda v: 0 <= v < 1)
    bias: bool = knob(False, "biases in Linear layers", "True | False",
                      lambda v: isinstance(v, bool))
    # "chunked" never keeps an exit's [B, T, V] logits (ReadoutCE); "plain" is ordinary
    # autograd; "auto" is chunked for vocabularies of 8192 and more, where those dominate memory
    readout_ce: str = knob("auto", "CE of loops < K: chunked (memory-lean), plain, or auto "
                           "(chunked for vocabularies >= 8192)", " | ".join(READOUT_CES),
                           lambda v: v in READOUT_CES)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                ok = f.metadata["ok"](value)
            except TypeError:  # a string where a number belongs, say
                ok = False
            if not ok:
                raise ValueError(f"LoopedGPTConfig.{f.name}={value!r} is invalid; accepted: "
                                 f"{f.metadata['accepted']}")
        if self.n_embd % self.n_head:
            raise ValueError(f"LoopedGPTConfig.n_embd={self.n_embd} is invalid; accepted: a "
                             f"multiple of n_head={self.n_head}")

    def trained_loops(self):
        """The exits the loss trains, 1..K (the others are only measured)."""
        weight = SUPERVISIONS[self.supervision].weight
        return [k for k in range(1, self.n_loops + 1) if weight(k, self.n_loops) > 0]


# ---- the block of layers that every loop applies -------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:  # generation (sample.py): prepend the earlier positions
            k, v = kv_cache.extend(k, v)
        dropout = self.dropout if self.training else 0.0
        # a whole sequence is causal; one new token attends to everything cached before it
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # two projections rather than one split in halves: a split's backward concatenates
        # the two gradients, a copy of the widest activation
        self.c_gate = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


class Layer(nn.Module):
    """Pre-norm: x + f(Norm(x)). The update f(.) does not shrink with ||x||, so the state grows."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd)  # nn.RMSNorm, with a faster CPU backward (end of file)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


# ---- the looped model ----------------------------------------------------------------------

class LoopedGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.block = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))  # shared by all loops
        # Only the modules a configuration uses exist: no parameter that nothing trains.
        hides_scale = READOUTS[cfg.readout].hides_scale
        self.ln_f = None
        if any(hides_scale(k, cfg.n_loops) for k in range(1, cfg.n_loops + 1)):
            self.ln_f = RMSNorm(cfg.n_embd)
        self.loop_rmsnorm = None
        if cfg.loop_norm:  # no gain: the point is to remove the scale, not to learn one
            self.loop_rmsnorm = RMSNorm(cfg.n_embd, elementwise_affine=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied embedding / LM head
        self.chunked_ce = cfg.readout_ce == "chunked" or (
            cfg.readout_ce == "auto" and cfg.vocab_size >= 8192)
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * depth); the effective depth of a
        # looped model is n_layer * n_loops residual layers, so that is the depth used.
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer * cfg.n_loops)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def embed(self, idx, pos0=0):
        """h_0: token + position embedding of idx [B, T], whose first position is pos0."""
        T = idx.size(1)
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of length {pos0 + T} is longer than block_size="
                             f"{self.config.block_size}; crop the input to the last "
                             f"block_size tokens")
        pos = torch.arange(pos0, pos0 + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def loop(self, h, k, kv_caches=None):
        """Loop k (1-based): the state h_{k-1} in, h_k out, through the same layers every time."""
        if k > 1 and self.loop_rmsnorm is not None:
            h = self.loop_rmsnorm(h)  # fix 3: every loop starts from unit RMS
        for i, layer in enumerate(self.block):
            h = layer(h, None if kv_caches is None else kv_caches[i])
        return h

    def loop_states(self, idx, n_loops=None):
        """[h_1, ..., h_K], each [B, T, C], taken before any between-loop normalization."""
        h = self.embed(idx)
        states = []
        for k in range(1, (n_loops or self.config.n_loops) + 1):
            h = self.loop(h, k)
            states.append(h)
        return states

    def readout(self, h, loop):
        """Logits of the state h after loop `loop` (1-based), through the tied LM head."""
        # THE BLIND SPOT. RMSNorm(c*h) = RMSNorm(h) for any c > 0, so f(c h) = f(h) and
        # d/dc L(c h) at c=1 is <dL/dh, h> = 0: the loss never pushes on the norm of h_k,
        # while every pre-norm residual layer keeps adding to it. lm_head(h) sees the scale.
        return self.lm_head(self.readout_input(h, loop))

    def readout_input(self, h, loop):
        """What the LM head sees at this loop: RMSNorm(h) (scale hidden) or h (scale visible)."""
        cfg = self.config
        hides_scale = READOUTS[cfg.readout].hides_scale(loop, cfg.n_loops)
        return self.ln_f(h) if hides_scale else h

    def forward(self, idx, targets=None, n_loops=None, all_exits=None, return_logits=True):
        """Run n_loops loops (default K). Returns (logits, loss, stats):
        logits  the last loop's readout, [B, T, V] with targets, [B, 1, V] (last position) without;
                None with return_logits=False, which lets a training step decode the last loop
                with the lean CE too (no [B, T, V] tensor kept at large vocabularies)
        loss    sum_k w_k CE_k / sum_k w_k, the supervision's weights w_k (per_loop: mean_k CE_k;
                terminal: CE_K), plus norm_penalty * mean_k mean(h_k^2)
        stats   detached, one entry per loop: hidden_norm (mean per-token ||h_k||) and loop_ce.
        all_exits: decode every exit, also those the loss does not train. Default: only in eval
        mode; a training step skips them (their loop_ce is NaN), so it pays only for what it
        trains."""
        cfg = self.config
        K = n_loops or cfg.n_loops
        if all_exits is None:
            all_exits = not self.training
        states = self.loop_states(idx, K)
        with torch.no_grad():
            stats = {"hidden_norm": torch.stack([h.norm(dim=-1).mean() for h in states])}
        if targets is None:  # inference: only the last position of the last loop is decoded
            return self.readout(states[-1][:, [-1], :], K), None, stats

        weights = [SUPERVISIONS[cfg.supervision].weight(k, K) for k in range(1, K + 1)]
        ces = []
        for k, h in enumerate(states[:-1], start=1):
            if weights[k - 1] > 0:
                ces.append(self.early_exit_ce(h, k, targets))
            elif all_exits:  # measured, not trained
                with torch.no_grad():
                    ces.append(self.early_exit_ce(h, k, targets))
            else:
                ces.append(torch.full((), float("nan"), device=idx.device))
        if return_logits or not self.chunked_ce:
            logits = self.readout(states[-1], K)
            ces.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1))
        else:
            logits = None
            ces.append(self.early_exit_ce(states[-1], K, targets))

        loss = sum(w * ce for w, ce in zip(weights, ces) if w > 0) / sum(weights)
        if cfg.norm_penalty > 0:  # fix 2: make the scale visible to the loss explicitly
            penalty = torch.stack([h.pow(2).mean() for h in states]).mean()
            loss = loss + cfg.norm_penalty * penalty
        stats["loop_ce"] = torch.stack(ces).detach()
        return logits, loss, stats

    def early_exit_ce(self, h, k, targets):
        """CE of the readout of h_k whose logits are not returned: at large vocabularies
        ReadoutCE never keeps (or even allocates) all [B, T, V] of them."""
        if self.chunked_ce:
            x = self.readout_input(h, k).flatten(0, 1)
            w = self.lm_head.weight
            with_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            rows = chunk_rows(x.size(0), w.size(0), x.device.type)
            return ReadoutCE.apply(x, w, targets.flatten(), rows, with_grad, matmul_dtype(x))
        logits = self.readout(h, k)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    # ---- training helpers (as in nanoGPT) ---------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings; not norms, biases
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW: one kernel for all parameters, CUDA only
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type == "cuda")

    def flops_per_token(self, n_readouts=None):
        """Training FLOPs per token (forward + backward): 6 per weight use, attention as in PaLM.
        n_readouts: readouts trained per token (default: the exits the supervision trains)."""
        cfg = self.config
        block = sum(p.numel() for p in self.block.parameters())
        if n_readouts is None:
            n_readouts = len(cfg.trained_loops())
        layers = 6 * block * cfg.n_loops
        attention = 12 * cfg.n_layer * cfg.n_loops * cfg.n_embd * cfg.block_size
        readouts = 6 * cfg.vocab_size * cfg.n_embd * n_readouts
        return layers + attention + readouts


# ---- early exit: how sure is a readout? (eval.py's halting, sample.py's adaptive depth) ----

# each policy's score, and how it passes a threshold: a token exits when it is sure enough
EXIT_POLICIES = {"max_prob": ">=", "logit_margin": ">=", "entropy": "<="}


def exit_score(logits, policy):
    """Per token: max softmax prob, top-1 minus top-2 logit, or entropy (lower is surer)."""
    logits = logits.float()
    if policy == "max_prob":
        return F.softmax(logits, dim=-1).amax(dim=-1)
    if policy == "logit_margin":
        top2 = logits.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if policy == "entropy":
        logp = F.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)
    raise ValueError(f"exit_policy={policy!r} is invalid; accepted: {' | '.join(EXIT_POLICIES)}")


def exits(score, policy, threshold):
    """Does each score pass the threshold? (score >= t, or score <= t for entropy)"""
    return score <= threshold if EXIT_POLICIES[policy] == "<=" else score >= threshold


def strict_to_loose(thresholds, policy):
    """Sort candidate thresholds from the one fewest tokens pass to the one most pass."""
    return sorted(thresholds, reverse=EXIT_POLICIES[policy] == ">=")


# ---- speed: RMSNorm on a CPU ----------------------------------------------------------------

class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm: the same weights and eps, the same result up to rounding. On a CPU in eager
    mode torch runs it as about fifteen elementwise ops, forward and backward, 2-3x LayerNorm's
    fused kernel; the hand-written backward of RMSNormCPU needs half as many. Elsewhere torch's
    own: fused on CUDA, and torch.compile fuses it itself."""

    def forward(self, x):
        fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        fast = fast and len(self.normalized_shape) == 1
        fast = fast and (self.weight is None or self.weight.dtype == x.dtype)
        if not fast or torch.compiler.is_compiling():
            return super().forward(x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return RMSNormCPU.apply(x, self.weight, eps)


class RMSNormCPU(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean_c x^2 + eps) per row; w may be None (no gain)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        r = r.div_(x.size(-1)).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        ctx.eps = eps
        y = x * r
        return y if weight is None else y.mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        C = x.size(-1)
        if torch.is_grad_enabled():  # create_graph=True: r as a function of x, for 2nd derivatives
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        gw = g if weight is None else g * weight  # the gradient at x * r
        # dL/dx = r * gw - x * r^3 * mean_c(gw * x): the second term removes the radial part
        # (exactly, but for eps), which is why dL/dx is orthogonal to x: the blind spot
        gx = g * x
        with torch.autocast("cpu", enabled=False):  # these two matmuls stay in x's dtype
            dot = gx.sum(-1, keepdim=True) if weight is None else (gx @ weight).unsqueeze(-1)
            dw = None
            if weight is not None and ctx.needs_input_grad[1]:
                dw = gx.reshape(-1, C).t() @ r.reshape(-1)  # sum over rows of g * x * r
        dx = gw * r
        dx.addcmul_(x, dot * r.pow(3), value=-1 / C)
        return dx, dw, None


# ---- a lean CE for the exits at large vocabularies ---------------------------------------

# logits elements per chunk: a few large chunks on a GPU (few kernel launches), cache-sized ones
# on a CPU; and at most COMPILED_CHUNKS under torch.compile, which unrolls the chunk loop
CHUNK_ELEMS = {"cuda": 2 ** 28, "mps": 2 ** 26}
CPU_CHUNK_ELEMS = 2 ** 23
COMPILED_CHUNKS = 4  # each one a copy of the CE code in the compiled graph
AUTOCAST_KINDS = ("cpu", "cuda", "mps")


def chunk_rows(n_rows, vocab_size, device_type):
    """Rows of logits per chunk on this kind of device: as many equal chunks as the budget
    needs (all rows when they fit in one)."""
    rows = max(1, CHUNK_ELEMS.get(device_type, CPU_CHUNK_ELEMS) // vocab_size)
    chunks = -(-n_rows // rows)
    if torch.compiler.is_compiling():
        chunks = min(chunks, COMPILED_CHUNKS)
    return max(1, -(-n_rows // max(1, chunks)))


def matmul_dtype(x):
    """The dtype autocast gives a matmul of x here (x's own dtype where autocast is off, and
    for float64, which autocast leaves alone)."""
    kind = x.device.type
    if x.dtype != torch.float64 and kind in AUTOCAST_KINDS and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class ReadoutCE(torch.autograd.Function):
    """mean CE(x @ W^T, targets) over rows with target != -1, and its gradients, in one pass
    over row chunks. Each chunk's log-softmax is turned into softmax - onehot in its own buffer
    and used at once for that chunk's dx rows and its share of dW, so no [N, V] logits tensor
    outlives its chunk and none is ever recomputed: the three matmuls of plain autograd with
    the memory of one chunk. The loss is a scalar, so backward only scales the stored gradients
    by the incoming one."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows_per_chunk, with_grad, dt):
        # dt: the matmuls' dtype (autocast's); log-softmax in fp32 (fp64 for fp64 inputs)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        valid = targets != -1
        n = valid.sum().clamp(min=1)
        w = weight.to(dt)
        total = torch.zeros((), dtype=acc, device=x.device)
        dx = torch.empty_like(x) if with_grad else None
        dw = torch.zeros_like(weight, dtype=acc) if with_grad else None
        for s in range(0, x.size(0), rows_per_chunk):
            rows = slice(s, s + rows_per_chunk)
            xc = x[rows].to(dt)
            t = targets[rows].clamp(min=0)
            logp = torch.log_softmax(xc @ w.t(), dim=-1, dtype=acc)  # the chunk's one buffer
            ce = -logp.gather(1, t[:, None])[:, 0]
            total += (ce * valid[rows]).sum()
            if not with_grad:
                continue
            g = logp.exp_()  # softmax, in place
            g[torch.arange(len(t), device=g.device), t] -= 1  # minus onehot: d CE / d logits
            g = g.to(dt)
            keep = valid[rows, None].to(dt)  # an ignored row adds nothing (on the narrow side)
            dx[rows] = (g @ w) * keep
            xs = xc * keep
            if dw.dtype == dt:
                dw.addmm_(g.t(), xs)  # accumulate without a [V, C] temporary per chunk
            else:  # autocast: low-precision products, summed in fp32
                dw += g.t() @ xs
        if with_grad:
            # the mean's 1/n once, in full precision: x / n in fp16 would fall below its range
            dx.div_(n)
            dw.div_(n)
            ctx.save_for_backward(dx, dw.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return grad * dx, grad * dw, None, None, None, None
