"""
Sample from a trained looped model, at a fixed exit depth or with adaptive per-token exit.

  python sample.py --out_dir=out --start="ROMEO:" --max_new_tokens=300
  python sample.py --n_loops=2                                       # exit after loop 2
  python sample.py --exit_policy=max_prob --exit_threshold=0.9       # adaptive depth per token

After the samples it prints the mean number of loops used per generated token.
"""

import sys

import torch

from configurator import parse
from model import EXIT_POLICIES, LoopedGPT, LoopedGPTConfig
from prepare import load_tokenizer
from train import die, load_checkpoint

OPTIONS = {
    "out_dir": ("out", "folder holding ckpt.pt from train.py"),
    "start": ("\n", "prompt text, or FILE:path to read it from a file"),
    "num_samples": (2, "how many samples"),
    "max_new_tokens": (300, "tokens generated per sample"),
    "temperature": (0.8, "1.0 = the model's distribution, < 1 sharper, 0 = greedy"),
    "top_k": (200, "sample only among the top_k tokens; 0 disables"),
    "seed": (1337, "random seed"),
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
    "n_loops": (0, "fixed exit depth k (0 = the trained K; more than K is allowed)"),
    "exit_policy": ("", "adaptive exit: max_prob | logit_margin | entropy (empty = fixed depth)"),
    "exit_threshold": (0.9, "exit when max_prob/logit_margin >= this, or entropy <= this"),
    "use_cache": (True, "KV cache per (loop, layer); False recomputes the context every token"),
}


def main(argv=None):
    cfg, _ = parse(OPTIONS, argv, __doc__)
    if cfg.exit_policy and cfg.exit_policy not in EXIT_POLICIES:
        die(f"--exit_policy={cfg.exit_policy!r} is not one of: {' | '.join(EXIT_POLICIES)}")
    if cfg.n_loops < 0 or cfg.max_new_tokens < 0 or cfg.num_samples < 1:
        die("--n_loops and --max_new_tokens must be >= 0 and --num_samples >= 1")
    if not cfg.out_dir:
        die("--out_dir is empty; give the folder that holds ckpt.pt (e.g. --out_dir=out)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = load_checkpoint(f"{cfg.out_dir}/ckpt.pt", device)
    model = LoopedGPT(LoopedGPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    encode, decode = load_tokenizer(ckpt["meta"])

    start = cfg.start
    if start.startswith("FILE:"):
        try:
            start = open(start[5:], encoding="utf-8").read()
        except OSError as e:
            die(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
    try:
        ids = encode(start)
    except ValueError as e:
        die(f"the start text cannot be encoded by this run's {ckpt['meta']['tokenizer']} tokenizer: {e}")
    if not ids:
        die("the start text encodes to no tokens; give at least one character (e.g. --start=\"\\n\")")
    ids = ids[-model.config.block_size:]  # crop a long prompt to the context, as nanoGPT does
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]

    torch.manual_seed(cfg.seed)
    depth = cfg.n_loops or model.config.n_loops
    if cfg.exit_policy and depth != model.config.n_loops:
        print(f"note: adaptive exit runs at most n_loops={depth} loops", file=sys.stderr)
    used = []
    for _ in range(cfg.num_samples):
        y, loops = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_k=cfg.top_k or None, n_loops=depth,
                                  exit_policy=cfg.exit_policy or None, exit_threshold=cfg.exit_threshold,
                                  use_cache=cfg.use_cache, return_loops=True)
        print(decode(y[0].tolist()))
        print("---------------")
        used.append(loops.float())
    mode = f"adaptive {cfg.exit_policy} >= {cfg.exit_threshold}" if cfg.exit_policy else "fixed depth"
    if cfg.exit_policy == "entropy":
        mode = f"adaptive entropy <= {cfg.exit_threshold}"
    mean = torch.cat(used, dim=1).mean().item() if cfg.max_new_tokens else float(depth)
    print(f"mean loops per generated token: {mean:.2f} of {depth} ({mode})")


if __name__ == "__main__":
    main()
