"""
A looped GPT and the readout blind spot (arXiv 2606.24898), in one file.

A looped LM applies ONE weight-shared block of layers K times. After every loop k the hidden
state h_k is decoded by a readout and the tied LM head, and training uses dense per-loop
cross-entropy. h_k is also fed back as the input of loop k+1: it is runtime state.

The blind spot: a scale-invariant readout (RMSNorm) gives the same logits for h and c*h, so the
gradient of the loss is orthogonal to h_k and nothing in the loss controls ||h_k||. Meanwhile
every pre-norm residual layer adds to h, so the norm grows loop after loop (see `readout`).

The four knobs of the paper (LoopedGPTConfig):
  readout       "rmsnorm": lm_head(RMSNorm(h)) at every loop, scale-invariant (the blind spot).
                "scale_visible": lm_head(h), the loss sees the scale (fix 1).
                "final_only": scale-visible at loops k < K, RMSNorm at the last loop K.
  norm_penalty  lambda > 0 adds lambda * mean_k mean(h_k^2) to the loss (fix 2).
  loop_norm     RMSNorm the state between loops: scale-removing recurrence (fix 3).
  supervision   "per_loop": mean of the K cross-entropies (dense); "terminal": last loop only.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

READOUTS = ("rmsnorm", "scale_visible", "final_only")
SUPERVISIONS = ("per_loop", "terminal")


@dataclass
class LoopedGPTConfig:
    vocab_size: int = 50304
    block_size: int = 256
    n_layer: int = 8           # layers in the block that is looped
    n_head: int = 8
    n_embd: int = 512
    n_loops: int = 4           # K: how many times the block is applied
    readout: str = "rmsnorm"   # "rmsnorm" | "scale_visible" | "final_only"
    loop_norm: bool = False    # RMSNorm the state between loops
    supervision: str = "per_loop"  # "per_loop" | "terminal"
    norm_penalty: float = 0.0  # lambda of the explicit norm penalty
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        def bad(field, value, accepted):
            raise ValueError(f"LoopedGPTConfig.{field}={value!r} is invalid; accepted: {accepted}")
        if self.readout not in READOUTS:
            bad("readout", self.readout, " | ".join(READOUTS))
        if self.supervision not in SUPERVISIONS:
            bad("supervision", self.supervision, " | ".join(SUPERVISIONS))
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, getattr(self, f), "a positive integer")
        if not isinstance(self.n_loops, int) or self.n_loops < 1:
            bad("n_loops", self.n_loops, "an integer >= 1")
        if not self.norm_penalty >= 0:  # also catches NaN
            bad("norm_penalty", self.norm_penalty, "a number >= 0")
        if not 0 <= self.dropout < 1:
            bad("dropout", self.dropout, "a number in [0, 1)")
        if self.n_embd % self.n_head:
            bad("n_embd", self.n_embd, f"a multiple of n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # a [k, v] list for this (loop, layer); grown in place
            if cache:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        # one new token attends to the whole cache; a full sequence is causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden = 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=cfg.bias)  # gate and value
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * value))


class Layer(nn.Module):
    """Pre-norm: x + f(Norm(x)). The update f(.) does not shrink with ||x||, so the state grows."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.RMSNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.RMSNorm(cfg.n_embd), SwiGLU(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class LoopedGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.block = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))  # shared by all loops
        # Only the modules a configuration uses exist: no parameter that nothing trains.
        self.ln_f = nn.RMSNorm(cfg.n_embd) if cfg.readout != "scale_visible" else None
        self.loop_rmsnorm = nn.RMSNorm(cfg.n_embd, elementwise_affine=False) if cfg.loop_norm else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied embedding / LM head
        # Dense loss memory: K logits tensors [B, T, V] kept for backward dominate at large vocabs;
        # the chunked CE below recomputes them instead. Plain autograd is simpler and wins at small V.
        self.chunked_ce = cfg.vocab_size >= 8192
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * depth); the effective depth of a
        # looped model is n_layer * n_loops residual layers, so that is the depth used.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer * cfg.n_loops))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    # ---- the loops -------------------------------------------------------------------------

    def embed(self, idx, pos0=0):
        T = idx.size(1)
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of length {pos0 + T} is longer than block_size="
                             f"{self.config.block_size}; crop the input to the last block_size tokens")
        pos = torch.arange(pos0, pos0 + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def loop(self, h, k, cache=None):
        """Loop k (1-based): the state h_{k-1} in, h_k out, through the same layers every time."""
        if k > 1 and self.loop_rmsnorm is not None:
            h = self.loop_rmsnorm(h)  # fix 3: the next loop starts from unit RMS
        for i, layer in enumerate(self.block):
            h = layer(h, None if cache is None else cache[(k, i)])
        return h

    def loop_states(self, idx, n_loops=None):
        """[h_1, ..., h_K], each [B, T, C], taken before any between-loop normalization."""
        h, states = self.embed(idx), []
        for k in range(1, (n_loops or self.config.n_loops) + 1):
            h = self.loop(h, k)
            states.append(h)
        return states

    def readout(self, h, loop):
        # THE BLIND SPOT. RMSNorm(c*h) = RMSNorm(h) for any c > 0, so f(c h) = f(h) and
        # d/dc L(c h) at c=1 is <dL/dh, h> = 0: the loss never pushes on the norm of h_k,
        # while every pre-norm residual layer keeps adding to it. lm_head(h) sees the scale.
        return self.lm_head(self.ln_f(h) if self.normalizes(loop) else h)

    def normalizes(self, loop):
        """Does the readout at this loop RMSNorm the state (hide its scale)?"""
        cfg = self.config
        return cfg.readout == "rmsnorm" or (cfg.readout == "final_only" and loop == cfg.n_loops)

    def forward(self, idx, targets=None, n_loops=None):
        cfg, K = self.config, n_loops or self.config.n_loops
        states = self.loop_states(idx, K)
        stats = {"hidden_norm": torch.stack([h.detach().norm(dim=-1).mean() for h in states])}
        if targets is None:  # inference: only the last position of the last loop is decoded
            return self.readout(states[-1][:, [-1], :], K), None, stats
        ces, logits = [], None
        for k, h in enumerate(states, start=1):
            trained = cfg.supervision == "per_loop" or k == K
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                if k < K and self.chunked_ce:  # same math, no [B,T,V] logits kept or even allocated
                    x = self.ln_f(h) if self.normalizes(k) else h
                    ces.append(ChunkedReadoutCE.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten()))
                    continue
                logits = self.readout(h, k)  # the last loop's logits are returned, so kept anyway
                ces.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1))
        loss = torch.stack(ces).mean() if cfg.supervision == "per_loop" else ces[-1]
        if cfg.norm_penalty > 0:  # fix 2: make the scale visible to the loss explicitly
            loss = loss + cfg.norm_penalty * torch.stack([h.pow(2).mean() for h in states]).mean()
        stats["loop_ce"] = torch.stack(ces).detach()
        return logits, loss, stats

    # ---- training helpers (as in nanoGPT) ---------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matrices and embeddings; not norms, biases
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": nodecay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, n_readouts=None):
        """Training FLOPs per token (forward + backward): 6 per weight use, attention as in PaLM."""
        cfg, block = self.config, sum(p.numel() for p in self.block.parameters())
        n_readouts = n_readouts or (cfg.n_loops if cfg.supervision == "per_loop" else 1)
        return (6 * block * cfg.n_loops + 12 * cfg.n_layer * cfg.n_loops * cfg.n_embd * cfg.block_size
                + 6 * cfg.vocab_size * cfg.n_embd * n_readouts)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilization against `peak_flops`, the device's peak FLOP/s (e.g. 989e12, H100 bf16)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    # ---- inference: fixed or adaptive exit depth, with a cache per (loop, layer) -------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, n_loops=None,
                 exit_policy=None, exit_threshold=None, use_cache=True, return_loops=False):
        """Sample tokens after `idx` [B, T]. Depth: a fixed `n_loops` (default K), or adaptive per
        token: the first loop whose readout passes `exit_policy` at `exit_threshold` (at most K).
        use_cache keeps keys/values per (loop, layer), so a new token costs one position per loop.
        Cache rule for adaptive exit: a token that exits at loop e gets, at the deeper loops, the
        keys/values of loop e, so later tokens see its exit state. When the cache reaches
        block_size it is refilled from the last block_size // 2 tokens (without a cache the
        context is cropped to block_size every token, as in nanoGPT)."""
        K, bs = n_loops or self.config.n_loops, self.config.block_size
        cache, n_cached, loops_used = None, 0, []
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and n_cached < bs:
                x, pos0 = idx[:, -1:], n_cached
            else:  # (re)fill the cache, or recompute the cropped context without one
                x, pos0 = idx[:, -(bs // 2 if cache is not None else bs):], 0
                cache = {(k, i): [] for k in range(1, K + 1) for i in range(self.config.n_layer)} \
                    if use_cache else None
            logits, used = self._exit_step(x, pos0, K, cache, exit_policy, exit_threshold)
            n_cached = pos0 + x.size(1)
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
            loops_used.append(used)
        return (idx, torch.stack(loops_used, dim=1)) if return_loops else idx

    def _exit_step(self, x, pos0, K, cache, policy, threshold):
        """Run the loops on x; decode the last position; return its logits [B, V] and exit loop [B]."""
        h, chosen = self.embed(x, pos0), None
        done = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
        used = torch.full_like(done, K, dtype=torch.long)
        for k in range(1, K + 1):
            h = self.loop(h, k, cache)
            if cache is not None and done.any():  # rows that exited earlier: copy their exit K/V down
                for i in range(self.config.n_layer):
                    for kv, prev in zip(cache[(k, i)], cache[(k - 1, i)]):
                        kv[done, :, -1] = prev[done, :, -1]
            if policy is None:  # fixed depth: only the last loop is decoded
                chosen = self.readout(h[:, -1], k) if k == K else None
                continue
            logits = self.readout(h[:, -1], k)
            chosen = logits if chosen is None else torch.where(done[:, None], chosen, logits)
            newly = ~done & exits(exit_score(logits, policy), policy, threshold)
            used, done = torch.where(newly, k, used), done | newly
            if done.all() and x.size(1) == 1:  # everyone exited: skip the deeper loops, giving
                for (kk, i), kv in (cache or {}).items():  # their caches the exit loop's entries
                    if kk > k:
                        kv[:] = [torch.cat((c, e[:, :, -1:]), dim=2) for c, e in zip(kv, cache[(k, i)])]
                break
        return chosen, used


class ChunkedReadoutCE(torch.autograd.Function):
    """mean CE(x @ W^T, targets) over rows with target != -1, walking over row chunks so that no
    [N, V] logits tensor outlives its chunk: backward recomputes each chunk's logits from x and W
    (one extra readout matmul) and forms the gradient softmax - onehot there."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_elems=2 ** 23):
        # matmuls in autocast's dtype when it is on; softmax sums in fp32 (fp64 for fp64 inputs)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        chunk = max(1, chunk_elems // weight.size(0))
        valid = targets != -1
        lse = torch.empty(x.size(0), dtype=acc, device=x.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, x.size(0), chunk):
            logits = (x[s:s + chunk].to(dt) @ weight.to(dt).t()).to(acc)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s:s + chunk].clamp(min=0)[:, None])[:, 0]
            total += ((lse[s:s + chunk] - picked) * valid[s:s + chunk]).sum()
        n = valid.sum().clamp(min=1)
        ctx.save_for_backward(x, weight, targets, lse, n)
        ctx.dt, ctx.chunk = dt, chunk
        return total / n

    @staticmethod
    def backward(ctx, grad):
        x, weight, targets, lse, n = ctx.saved_tensors
        w, chunk = weight.to(ctx.dt), ctx.chunk
        dx, dw = torch.empty_like(x), torch.zeros_like(weight, dtype=lse.dtype)
        for s in range(0, x.size(0), chunk):
            xc, t = x[s:s + chunk].to(ctx.dt), targets[s:s + chunk]
            g = torch.exp((xc @ w.t()).to(lse.dtype) - lse[s:s + chunk, None])  # softmax
            g[torch.arange(len(t), device=g.device), t.clamp(min=0)] -= 1  # minus onehot
            g = (g * ((t != -1)[:, None] * (grad / n))).to(ctx.dt)
            dx[s:s + chunk] = g @ w
            dw += g.t() @ xc
        return dx, dw.to(weight.dtype), None, None


EXIT_POLICIES = ("max_prob", "logit_margin", "entropy")


def exit_score(logits, policy):
    """How sure a readout is, per token: max softmax prob, top-1 minus top-2 logit, or entropy."""
    if policy == "max_prob":
        return F.softmax(logits.float(), dim=-1).amax(dim=-1)
    if policy == "logit_margin":
        top2 = logits.float().topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if policy == "entropy":
        logp = F.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)
    raise ValueError(f"exit_policy={policy!r} is invalid; accepted: {' | '.join(EXIT_POLICIES)}")


def exits(score, policy, threshold):
    """A token exits when it is sure enough: score >= threshold (entropy: score <= threshold)."""
    return score <= threshold if policy == "entropy" else score >= threshold


def sample_next(logits, temperature=1.0, top_k=None):
    """One token per row from logits [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:  # sample among the top k only: cheaper than masking a 50k vocab
        v, ix = torch.topk(logits, min(top_k, logits.size(-1)))
        return ix.gather(-1, torch.multinomial(F.softmax(v, dim=-1), num_samples=1))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
