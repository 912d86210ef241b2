"""
A looped GPT and the readout blind spot (arXiv 2606.24898), in one file.

A looped LM applies ONE weight-shared block of layers K times. After every loop k the hidden
state h_k is decoded by a readout and the tied LM head, and training uses dense per-loop
cross-entropy. h_k is also fed back as the input of loop k+1: it is runtime state.

The blind spot: a scale-invariant readout (RMSNorm) gives the same logits for h and c*h, so the
gradient of the loss is orthogonal to h_k and nothing in the loss controls ||h_k||. Meanwhile
every pre-norm residual layer adds to h, so the norm grows loop after loop (see `readout`).

The paper's four knobs, each described once below (READOUTS, SUPERVISIONS, LoopedGPTConfig):
  readout       how h_k is decoded: through RMSNorm (scale hidden: the blind spot), raw (fix 1),
                RMSNorm at the last loop only, or the alpha readout in between
  supervision   which exits the loss trains: all K (dense) or the last one
  norm_penalty  lambda > 0 adds lambda * mean_k mean(h_k^2) to the loss (fix 2)
  loop_norm     RMSNorm the state between loops: scale-removing recurrence (fix 3)

Read in order: READOUTS and SUPERVISIONS, LoopedGPTConfig, Layer, LoopedGPT.loop / loop_states,
LoopedGPT.readout (the blind spot), LoopedGPT.forward (the losses), AlphaReadout. After the
mechanism: the early-exit scores that eval.py and sample.py use, then speed: RMSNorm with a
faster CPU backward and a memory-lean cross-entropy for large vocabularies.
"""

import math
from collections import namedtuple
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- the readouts and supervisions, each described once -----------------------------------
# Every script, label and test reads these tables; adding a readout or a supervision is one
# entry here. `loop` runs from 1 and may exceed K (eval.py decodes loops up to 3K, sample.py
# runs any --n_loops), so each rule must say what it does there.

# A readout is what the LM head sees of the state h_k. Each entry IS the readout:
#   norm(cfg)                  the module it owns (a norm's gain, alpha's parameters), or None:
#                              the model makes it once, as model.readout_norm
#   decode(norm, h, loop, K)   what the LM head sees at loop `loop` of a run of K loops; every
#                              consumer (training, evaluation, generation, Lemma 1) calls this
#   hides_scale(cfg, loop, K)  does decode see h and c*h (c > 0) alike? A declaration, which
#                              tests/test_model.py checks against the behaviour for every entry
Readout = namedtuple("Readout", "about norm decode hides_scale")


def readout_rmsnorm(cfg):
    """The readout's RMSNorm, with a learned gain (the paper's decode norm)."""
    return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


READOUTS = {
    "rmsnorm": Readout(
        "lm_head(RMSNorm(h)) at every loop: scale-invariant, the blind spot",
        norm=readout_rmsnorm,
        decode=lambda norm, h, loop, K: norm(h),
        hides_scale=lambda cfg, loop, K: True),
    "scale_visible": Readout(
        "lm_head(h) at every loop: the loss sees the scale (fix 1)",
        norm=None,
        decode=lambda norm, h, loop, K: h,
        hides_scale=lambda cfg, loop, K: False),
    "final_only": Readout(
        "scale-visible at every loop but the last one, K, which is RMSNorm'd",
        norm=readout_rmsnorm,
        decode=lambda norm, h, loop, K: norm(h) if loop == K else h,
        hides_scale=lambda cfg, loop, K: loop == K),
    "alpha": Readout(
        "lm_head(gamma(s) u) with s = RMS(h), u = h / s, gamma = s_ref^(1-alpha) s^alpha: "
        "alpha 0 hides the scale, alpha 1 is scale_visible (see the readout_* knobs)",
        norm=lambda cfg: AlphaReadout(cfg),
        decode=lambda norm, h, loop, K: norm(h, loop),
        hides_scale=lambda cfg, loop, K: cfg.readout_alpha == 0 and not cfg.readout_alpha_learned),
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


def loss_weights(supervision, K):
    """The supervision's weights w_1..w_K for a run of K loops: each finite and >= 0, one > 0
    (else a one-line ValueError naming the entry)."""
    try:
        weights = [float(SUPERVISIONS[supervision].weight(k, K)) for k in range(1, K + 1)]
    except Exception as e:  # a fork's rule may raise anything (1 / (K - loop)): one line
        raise ValueError(f"supervision {supervision!r}: its weight(loop, K) failed for K={K} "
                         f"({type(e).__name__}: {e}); it must return a number") from None
    if not all(0 <= w < math.inf for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"supervision {supervision!r} gives the weights {weights} for K={K} "
                         f"loops; each must be a finite number >= 0, and one must be > 0")
    return weights


READOUT_CES = ("auto", "chunked", "plain")
INITS = ("torch", "gpt2")
S_REFS = ("ema", "fixed", "learned")


def knob(default, about, accepted, ok, bad, applies=None):
    """A config field with its one-line help, the accepted values in words, their check, some
    values the check must refuse (tests/test_options.py tries each on the command line and in
    Python) and, for a knob of one readout or of the loop norm, the (field, value) it applies
    with: set to anything but its default with another, it is refused. train.py's --help, its
    checks and its banner are built from these."""
    return field(default=default, metadata={"about": about, "accepted": accepted, "ok": ok,
                                            "bad": list(bad), "applies": applies})


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _flag(v):
    return isinstance(v, bool)


def _names(table):
    return " | ".join(table)


def _described(table):
    """Each entry of a table in words, for --help."""
    return "; ".join(f"{name}: {entry.about}" for name, entry in table.items())


ALPHA = ("readout", "alpha")  # the knobs that apply to the alpha readout only


@dataclass
class LoopedGPTConfig:
    # The defaults are the paper's 44M model, with its official code's values (config/ holds
    # the presets).
    vocab_size: int = knob(50304, "tokens in the vocabulary (train.py takes it from the data)",
                           "an integer >= 1", _positive_int, [0, -5])
    block_size: int = knob(256, "sequence length (positions)", "an integer >= 1",
                           _positive_int, [0, -1])
    n_layer: int = knob(8, "layers in the block that is looped", "an integer >= 1",
                        _positive_int, [0])
    n_head: int = knob(8, "attention heads", "an integer >= 1", _positive_int, [0])
    n_embd: int = knob(512, "width of the hidden state h_k (a multiple of n_head)",
                       "an integer >= 1", _positive_int, [0, -8])
    n_loops: int = knob(4, "K: how many times the block is applied", "an integer >= 1",
                        _positive_int, [0, -2])
    readout: str = knob("rmsnorm", "how h_k is decoded. " + _described(READOUTS),
                        _names(READOUTS), lambda v: v in READOUTS, ["", "no such readout"])
    loop_norm: bool = knob(False, "RMSNorm the state between loops (scale-removing recurrence)",
                           "True | False", _flag, [1, "True"])
    supervision: str = knob("per_loop", "which exits the loss trains. " +
                            _described(SUPERVISIONS), _names(SUPERVISIONS),
                            lambda v: v in SUPERVISIONS, ["", "no such supervision"])
    norm_penalty: float = knob(0.0, "lambda: adds lambda * mean_k mean(h_k^2) to the loss "
                               "(paper: 0.01)", "a finite number >= 0",
                               lambda v: 0 <= v < math.inf,  # NaN fails both comparisons
                               [-0.01, -1.0])
    # the alpha readout's knobs (the paper's defaults: alpha learned from 0.5, s_ref an EMA)
    readout_alpha: float = knob(0.5, "alpha readout: alpha (its start when learned); 0 hides "
                                "the scale, 1 shows it whole", "a number in [0, 1]",
                                lambda v: 0 <= v <= 1, [-0.1, 1.5], ALPHA)
    readout_alpha_learned: bool = knob(True, "alpha readout: learn alpha (a sigmoid of a "
                                       "parameter) or keep it fixed", "True | False", _flag,
                                       [1, "yes"], ALPHA)
    readout_s_ref: str = knob("ema", "alpha readout: s_ref is an EMA (decay 0.99) of the "
                              "batch's mean log RMS(h) in training, fixed at 1, or learned",
                              " | ".join(S_REFS), lambda v: v in S_REFS, ["", "mean"], ALPHA)
    readout_alpha_per_loop: bool = knob(False, "alpha readout: one alpha and s_ref per loop "
                                        "(loops past K use loop K's)", "True | False", _flag,
                                        [0, "no"], ALPHA)
    loop_norm_gain: bool = knob(True, "a learned gain on the between-loop RMSNorm (the "
                                "paper's)", "True | False", _flag, [1, "True"],
                                ("loop_norm", True))
    # the recipe
    init: str = knob("torch", "initial weights: torch (PyTorch's defaults, the paper's: "
                     "embeddings and the tied head N(0, 1), Linear kaiming-uniform, gains 1) or "
                     "gpt2 (N(0, 0.02), residual projections / sqrt(2 n_layer K))",
                     " | ".join(INITS), lambda v: v in INITS, ["", "xavier"])
    norm_eps: float = knob(1e-6, "eps of every RMSNorm (paper: 1e-6)", "a finite number > 0",
                           lambda v: 0 < v < math.inf, [0.0, -1e-6])
    dropout: float = knob(0.0, "dropout on the embeddings, the attention probabilities and the "
                          "SwiGLU output (paper: 0.1)", "a number in [0, 1)",
                          lambda v: 0 <= v < 1, [-0.1, 1.0, 1.5])
    bias: bool = knob(False, "biases in Linear layers", "True | False", _flag, [0, "no"])
    # "chunked" never keeps an exit's [B, T, V] logits (ReadoutCE); "plain" is ordinary
    # autograd; "auto" is chunked for vocabularies of 8192 and more, where those dominate memory
    readout_ce: str = knob("auto", "CE of loops < K: chunked (memory-lean), plain, or auto "
                           "(chunked for vocabularies >= 8192)", " | ".join(READOUT_CES),
                           lambda v: v in READOUT_CES, ["", "fast"])

    def __post_init__(self):
        why = config_error(vars(self), "")
        if why:
            raise ValueError(f"LoopedGPTConfig: {why}")

    def trained_loops(self):
        """The exits the loss trains, 1..K (the others are only measured)."""
        weights = loss_weights(self.supervision, self.n_loops)
        return [k for k, w in enumerate(weights, start=1) if w > 0]


def config_error(values, flag):
    """The first thing wrong with these knob values ({field: value}, every field), in one line,
    or None. `flag` goes before a knob's name: "--" on the command line."""
    for f in fields(LoopedGPTConfig):
        value = values[f.name]
        try:
            ok = f.metadata["ok"](value)
        except TypeError:  # a string where a number belongs, say
            ok = False
        if not ok:
            return f"{flag}{f.name}={value!r} is invalid; accepted: {f.metadata['accepted']}"
    if values["n_embd"] % values["n_head"]:
        return (f"{flag}n_embd={values['n_embd']} is invalid; accepted: a multiple of "
                f"{flag}n_head={values['n_head']}")
    for f in fields(LoopedGPTConfig):
        if values[f.name] != f.default and not knob_applies(f.name, values):
            owner, value = f.metadata["applies"]
            return (f"{flag}{f.name}={values[f.name]!r} applies only with {flag}{owner}={value}; "
                    f"drop it, or set {flag}{owner}={value}")
    try:
        loss_weights(values["supervision"], values["n_loops"])
    except ValueError as e:
        return str(e)
    return None


def knob_applies(name, values):
    """Does this knob mean anything with these values? (readout_alpha only with the alpha
    readout, say.) Banners and labels show only the knobs that do."""
    applies = LoopedGPTConfig.__dataclass_fields__[name].metadata["applies"]
    return applies is None or values.get(applies[0]) == applies[1]


# ---- the block of layers that every loop applies -------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout  # on the attention probabilities, not after the projection
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, kv_cache=None):
        if kv_cache is not None:  # generation: the cache stores the keys and values (see
            B, T, C = x.shape      # Layer.decode, which generation calls)
            y = kv_cache.attend(self.c_attn(x).view(B * T, 3 * C), self.n_head)
            return self.c_proj(y.view(B, T, C))
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        # a whole sequence is causal; one new token attends to everything cached before it
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


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
        # nn.RMSNorm, with a faster CPU backward (end of file)
        self.ln_1 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, kv_cache=None):
        if kv_cache is not None:  # generation: see decode
            return self.decode(x.reshape(-1, x.size(-1)), kv_cache).view(x.shape)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    # ---- generation: forward with a KV cache, in as few ops as possible ----------------------
    # A decode step is hundreds of ops on a few hundred numbers each, so an op's cost is its
    # call: the modules' calls, RMSNorm's autograd Function and each transpose of a weight
    # would be most of the time. decode runs the same arithmetic on weights prepared once per
    # generation (decode_weights), rows [B * T, C], and no dropout (inference only).

    def decode_weights(self):
        """decode's weights, made once per generation: each matrix transposed for torch.mm, and
        each RMSNorm's gain and sqrt(C) folded into the matrix that reads its output, since
        linear(RMSNorm(x)) = x W'^T / sqrt(sum x^2 + C eps) with W' = W diag(gain) sqrt(C); the
        SwiGLU's gate and fc side by side (one matmul). Also sqrt(C eps) of each norm."""
        a, m = self.attn, self.mlp
        C = a.c_proj.weight.size(0)

        def folded(linear, norm):
            w = linear.weight * math.sqrt(C)
            return (w if norm.weight is None else w * norm.weight).t()

        def root_c_eps(norm):
            return torch.tensor(math.sqrt(C * norm_eps(norm, a.c_proj.weight.dtype)),
                                dtype=a.c_proj.weight.dtype, device=a.c_proj.weight.device)

        gate_fc = torch.cat((folded(m.c_gate, self.ln_2), folded(m.c_fc, self.ln_2)), dim=1)
        gate_fc_bias = None if m.c_gate.bias is None else torch.cat((m.c_gate.bias, m.c_fc.bias))
        return (folded(a.c_attn, self.ln_1), a.c_attn.bias, root_c_eps(self.ln_1),
                a.c_proj.weight.t(), a.c_proj.bias,
                gate_fc, gate_fc_bias, root_c_eps(self.ln_2), m.c_proj.weight.t(), m.c_proj.bias)

    def decode(self, x, kv_cache):
        """forward on rows x [B * T, C] with a KV cache (sample.KVCache's): its attend(qkv,
        n_head) stores this step's keys and values and attends over every position it holds,
        and its `weights` are this layer's decode_weights() (made here if it has none)."""
        weights = getattr(kv_cache, "weights", None) or self.decode_weights()
        qkv, qkv_b, eps_1, proj, proj_b, gate_fc, gate_fc_b, eps_2, out, out_b = weights
        y = kv_cache.attend(normed_linear(x, qkv, qkv_b, eps_1), self.attn.n_head)
        x = linear_added(x, y, proj, proj_b)
        gate, fc = normed_linear(x, gate_fc, gate_fc_b, eps_2).chunk(2, dim=-1)
        return linear_added(x, F.silu(gate).mul_(fc), out, out_b)


def norm_eps(norm, dtype):
    return torch.finfo(dtype).eps if norm.eps is None else norm.eps


def normed_linear(x, w, bias, root_c_eps):
    """linear(RMSNorm(x)) for rows x, from decode_weights' folded w: four ops."""
    rms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), root_c_eps)
    y = torch.mm(x, w)
    return y.div_(rms) if bias is None else torch.addcdiv(bias, y, rms)


def linear_added(x, y, w, bias):
    """x + linear(y), the residual, for rows and a transposed weight: one op (two under
    autocast, which would make addmm's sum low precision: the residual stays in x's dtype)."""
    if matmul_dtype(x) != x.dtype:
        x = x + torch.mm(y, w)
    else:
        x = torch.addmm(x, y, w)
    return x if bias is None else x.add_(bias)


def decode_rms_norm(norm, x):
    """An RMSNorm module on rows x, without its autograd Function (the between-loop norm)."""
    rms = x.square().mean(dim=-1, keepdim=True).add_(norm_eps(norm, x.dtype)).rsqrt_()
    y = x * rms
    return y if norm.weight is None else y.mul_(norm.weight)


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
        entry = READOUTS[cfg.readout]
        self.readout_norm = entry.norm(cfg) if entry.norm else None
        self.loop_rmsnorm = None
        if cfg.loop_norm:
            self.loop_rmsnorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps,
                                        elementwise_affine=cfg.loop_norm_gain)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the head is the embedding's matrix
        self.chunked_ce = cfg.readout_ce == "chunked" or (
            cfg.readout_ce == "auto" and cfg.vocab_size >= 8192)
        if cfg.init == "gpt2":
            self.apply(gpt2_init)
            # GPT-2 scales residual projections by 1/sqrt(2 * depth); the effective depth of a
            # looped model is n_layer * n_loops residual layers, so that is the depth used.
            residual_std = 0.02 / math.sqrt(2 * cfg.n_layer * cfg.n_loops)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=residual_std)
        # init "torch": every module keeps PyTorch's default, as the paper's code does; h_0 then
        # starts at an RMS of about sqrt(2) (two N(0, 1) embeddings), not about 0.03

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
        # positions pos0..pos0+T-1 are rows of the position table: a slice, no lookup
        return self.drop(self.wte(idx) + self.wpe.weight[pos0:pos0 + T])

    def loop(self, h, k, kv_caches=None):
        """Loop k (1-based): the state h_{k-1} in, h_k out, through the same layers every time."""
        if kv_caches is not None:  # generation: the rows of h, each layer with its cache
            rows = h.reshape(-1, h.size(-1))
            if k > 1 and self.loop_rmsnorm is not None:
                rows = decode_rms_norm(self.loop_rmsnorm, rows)
            for layer, cache in zip(self.block, kv_caches):
                rows = layer.decode(rows, cache)
            return rows.view(h.shape)
        if k > 1 and self.loop_rmsnorm is not None:
            h = self.loop_rmsnorm(h)  # fix 3: every loop starts from the same RMS
        for layer in self.block:
            h = layer(h)
        return h

    def loop_states(self, idx, n_loops=None):
        """[h_1, ..., h_K], each [B, T, C], taken before any between-loop normalization."""
        h = self.embed(idx)
        states = []
        for k in range(1, (n_loops or self.config.n_loops) + 1):
            h = self.loop(h, k)
            states.append(h)
        return states

    def readout(self, h, loop, n_loops=None):
        """Logits of the state h after loop `loop` (1-based), through the tied LM head. The rule
        of a run of n_loops loops (default: the trained K, so that loop k < K is an early exit
        of the trained model; eval.py's variable depth decodes a run of K' loops as its own)."""
        # THE BLIND SPOT. RMSNorm(c*h) = RMSNorm(h) for any c > 0, so f(c h) = f(h) and
        # d/dc L(c h) at c=1 is <dL/dh, h> = 0: the loss never pushes on the norm of h_k,
        # while every pre-norm residual layer keeps adding to it. lm_head(h) sees the scale.
        return self.lm_head(self.readout_input(h, loop, n_loops))

    def readout_input(self, h, loop, n_loops=None):
        """What the LM head sees at this loop: the readout's decode (READOUTS)."""
        K = n_loops or self.config.n_loops
        return READOUTS[self.config.readout].decode(self.readout_norm, h, loop, K)

    def readout_copy(self, device="cpu", dtype=torch.float64):
        """The readout as a function (h, loop) -> logits, on copies of its weights moved to
        `device` in `dtype`: Lemma 1 decodes in float64 on the CPU (MPS has no float64). The same
        decode as `readout` calls, not a second implementation of it."""
        entry = READOUTS[self.config.readout]
        norm = None
        if entry.norm:  # a fresh one of the same kind, holding these weights (through the CPU)
            norm = entry.norm(self.config).to(dtype)  # in dtype first: loading keeps every bit
            norm.load_state_dict({k: v.cpu() for k, v in self.readout_norm.state_dict().items()})
            norm = norm.to(device).eval()
        w = self.lm_head.weight.detach().cpu().to(device, dtype)
        K = self.config.n_loops
        return lambda h, loop: F.linear(entry.decode(norm, h, loop, K), w)

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

        weights = loss_weights(cfg.supervision, K)
        ces = []
        for k, h in enumerate(states[:-1], start=1):
            if weights[k - 1] > 0:
                ces.append(self.early_exit_ce(h, k, targets))
            elif all_exits:  # measured, not trained
                with torch.no_grad():
                    ces.append(self.early_exit_ce(h, k, targets))
            else:
                ces.append(torch.full((), float("nan"), device=idx.device))
                track = getattr(self.readout_norm, "track", None)
                if self.training and track:  # a readout that keeps statistics sees every
                    track(h, k)              # loop, as when every exit is decoded
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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             decay="all"):
        """AdamW. decay: "all" parameters (the paper's code: AdamW over model.parameters()) or
        "matrices" (nanoGPT's: matrices and embeddings, not gains or biases)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if decay == "all":
            groups = [{"params": params, "weight_decay": weight_decay}]
        else:
            groups = [{"params": [p for p in params if p.dim() >= 2],
                       "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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


def gpt2_init(module):
    """GPT-2's initialization: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---- the alpha readout: between RMSNorm and the raw readout ---------------------------------

class AlphaReadout(nn.Module):
    """gamma(s) * u per token, with s = RMS(h), u = h / s and gamma(s) = s_ref^(1-alpha) s^alpha.
    alpha = 0 gives s_ref * u: RMSNorm without a gain, blind to the scale. alpha = 1 gives
    s * u = h: the raw readout. In between the loss sees s^alpha. No per-channel gain.
    alpha is fixed, or learned as a sigmoid of a parameter; s_ref is fixed at 1, learned, or an
    EMA of the batch's mean log s over training steps (a buffer: saved in the checkpoint, moved
    only in training mode). With readout_alpha_per_loop each loop has its own alpha and s_ref;
    loops past K use loop K's."""

    EMA_DECAY = 0.99

    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_loops if cfg.readout_alpha_per_loop else 1
        self.eps = cfg.norm_eps
        if cfg.readout_alpha_learned:
            a = min(max(cfg.readout_alpha, 1e-4), 1 - 1e-4)  # a sigmoid never reaches 0 or 1
            self.alpha_logit = nn.Parameter(torch.full((n,), math.log(a / (1 - a))))
        else:
            self.register_buffer("alpha_fixed", torch.full((n,), float(cfg.readout_alpha)))
        self.ema = cfg.readout_s_ref == "ema"
        if cfg.readout_s_ref == "learned":
            self.log_s_ref = nn.Parameter(torch.zeros(n))
        else:
            self.register_buffer("log_s_ref", torch.zeros(n))  # s_ref = 1 until the EMA moves
        if self.ema:
            self.register_buffer("ema_steps", torch.zeros(n, dtype=torch.long))

    def alpha(self):
        """alpha per loop (one value unless readout_alpha_per_loop)."""
        if hasattr(self, "alpha_logit"):
            return torch.sigmoid(self.alpha_logit)
        return self.alpha_fixed

    def forward(self, h, loop):
        i = min(loop, len(self.log_s_ref)) - 1
        s = h.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=self.eps)
        log_s = s.log()
        if self.training:
            self.track(h, loop, log_s)
        log_s_ref = self.log_s_ref[i]
        if not log_s_ref.requires_grad:  # a copy: the next loop's EMA step writes the buffer
            log_s_ref = log_s_ref.clone()
        alpha = self.alpha()[i]
        gamma = torch.exp((1 - alpha) * log_s_ref + alpha * log_s)
        return gamma * (h / s)

    @torch.no_grad()
    def track(self, h, loop, log_s=None):
        """One EMA step of s_ref towards this batch's mean log RMS(h) (the first step takes it)."""
        if not self.ema:
            return
        i = min(loop, len(self.log_s_ref)) - 1
        if log_s is None:
            log_s = h.pow(2).mean(dim=-1).sqrt().clamp(min=self.eps).log()
        mean = log_s.mean(dtype=torch.promote_types(log_s.dtype, torch.float32))
        mean = mean.to(self.log_s_ref.dtype)
        moved = self.EMA_DECAY * self.log_s_ref[i] + (1 - self.EMA_DECAY) * mean
        self.log_s_ref[i] = torch.where(self.ema_steps[i] == 0, mean, moved)
        self.ema_steps[i] += 1


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
        w = self.weight
        fast = x.is_cpu and x.dtype in (torch.float32, torch.float64)
        fast = fast and len(self.normalized_shape) == 1 and (w is None or w.dtype == x.dtype)
        if not fast or torch.compiler.is_compiling():
            return super().forward(x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if not torch.is_grad_enabled():  # evaluation, generation: no backward, no Function
            return rms_normed(x, w, rms_inverse(x, eps))
        return RMSNormCPU.apply(x, w, eps)


def rms_inverse(x, eps):
    """r = 1 / sqrt(mean_c x^2 + eps), per row."""
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
    return r.div_(x.size(-1)).add_(eps).rsqrt_()


def rms_normed(x, weight, r):
    y = x * r
    return y if weight is None else y.mul_(weight)


class RMSNormCPU(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean_c x^2 + eps) per row; w may be None (no gain)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = rms_inverse(x, eps)
        ctx.save_for_backward(x, weight, r)
        ctx.eps = eps
        return rms_normed(x, weight, r)

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
