"""
Train a looped LM with a readout after every loop, and log what happens to ||h_k||.

  python prepare.py && python train.py                      # CPU default: the blind spot in ~3 min
  python train.py --readout=scale_visible                   # fix 1: the loss sees the scale
  python train.py config/paper_44m.py                       # the paper's 44M setting, on a GPU
  torchrun --nproc_per_node=8 train.py config/paper_44m.py  # DDP
  python train.py --init_from=resume --out_dir=out          # continue a killed run

Every eval_interval one JSON line goes to out_dir/log.jsonl (format in ../shared/DESIGN.md) and
out_dir/ckpt.pt is replaced atomically. `python train.py --help` lists every option.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configurator import parse
from model import LoopedGPT, LoopedGPTConfig

OPTIONS = {
    # I/O
    "out_dir": ("out", "folder for ckpt.pt and log.jsonl"),
    "eval_interval": (100, "evaluate, log and checkpoint every this many iterations"),
    "eval_iters": (20, "batches per split in each evaluation"),
    "log_interval": (10, "refresh the progress bar's loss every this many iterations"),
    "init_from": ("scratch", "scratch | resume (continue out_dir/ckpt.pt and its log)"),
    # data
    "dataset": ("shakespeare_char", "folder under data_dir made by prepare.py"),
    "data_dir": ("data", "where prepare.py wrote the datasets"),
    "batch_size": (8, "sequences per micro-batch, per process"),
    "block_size": (128, "sequence length"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step, per process"),
    # model: the looped block and the paper's four knobs
    "n_layer": (2, "layers in the looped block"),
    "n_head": (4, "attention heads"),
    "n_embd": (128, "width of the hidden state h_k"),
    "n_loops": (6, "K: how many times the block is applied"),
    "readout": ("rmsnorm", "rmsnorm (blind spot) | scale_visible | final_only"),
    "loop_norm": (False, "RMSNorm the state between loops (scale-removing recurrence)"),
    "supervision": ("per_loop", "per_loop (dense: mean of the K CEs) | terminal (last loop only)"),
    "norm_penalty": (0.0, "lambda: adds lambda * mean_k mean(h_k^2) to the loss (paper: 0.01)"),
    "dropout": (0.0, "dropout rate (paper: 0.1)"),
    "bias": (False, "biases in Linear layers"),
    # optimizer: AdamW
    "learning_rate": (6e-3, "peak learning rate"),
    "max_iters": (800, "optimizer steps in total"),
    "weight_decay": (0.0, "AdamW weight decay on matrices (paper: 0.01)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.95, "AdamW beta2"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 disables"),
    "lr_schedule": ("constant", "constant (paper, after warmup) | cosine (decay to min_lr at max_iters)"),
    "warmup_iters": (100, "linear warmup steps"),
    "min_lr": (6e-4, "final learning rate of the cosine schedule"),
    # system
    "device": ("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"),
    "dtype": ("auto", "auto (bfloat16 where supported, else float32) | float32 | bfloat16 | float16"),
    "compile": ("auto", "torch.compile the model: auto (on for CUDA, off on CPU) | True | False"),
    "seed": (1337, "seed for weights, data order and dropout"),
    "skip_nonfinite": (False, "skip steps whose loss is NaN/inf (checked every step) instead of stopping"),
}
MODEL_KEYS = [f.name for f in fields(LoopedGPTConfig)]
RUN_KEYS = MODEL_KEYS + ["dataset", "block_size"]  # what a resumed run may not change


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def atomic_save(obj, path):
    """torch.save to a temp file, fsync, rename: a kill at any moment leaves the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first (python train.py --out_dir={os.path.dirname(path) or '.'})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        assert isinstance(ckpt, dict) and {"model", "model_args"} <= ckpt.keys(), "not a nanoloop checkpoint"
        return ckpt
    except Exception as e:
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
            f"delete it and train again, or point to another out_dir")


def append_log(path, entry):
    """One line per evaluation; written whole then fsynced, so a kill leaves no torn line."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trim_log(path, before_iter):
    """On resume: cut the log back to the entries before the checkpoint's iteration (and any torn
    tail from a kill), so re-running from there leaves no duplicated line."""
    if not os.path.isfile(path):
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["iter"] >= before_iter:
                    break
            except (ValueError, KeyError):
                break
            keep += len(line)
    with open(path, "r+b") as f:
        f.truncate(keep)


def load_data(data_dir, dataset, block_size):
    """The memmapped token ids and meta.json that prepare.py wrote, or a clear error."""
    path = Path(data_dir) / dataset
    if not (path / "train.bin").is_file() or not (path / "meta.json").is_file():
        tok = dataset.rsplit("_", 1)[-1]
        die(f"no training data in {path}/ (train.bin, meta.json); make it with: python prepare.py"
            + (f" --tokenizer={tok}" if tok in ("gpt2", "word") else "")
            + ("" if dataset.startswith("shakespeare_") else f" --input=YOUR_FILES --name={dataset}"))
    meta = json.loads((path / "meta.json").read_text())
    data = {s: np.memmap(path / f"{s}.bin", dtype=meta.get("dtype", "uint16"), mode="r")
            for s in ("train", "val")}
    for s, d in data.items():
        if len(d) <= block_size + 1:
            die(f"{path}/{s}.bin has {len(d)} tokens, too few for --block_size={block_size}")
    return data, meta


def get_batch(d, batch_size, block_size, seed, device="cpu"):
    """Inputs and next-token targets at positions drawn from `seed` alone, so the data order
    survives a resume and is the same for every run with the same seed."""
    ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=torch.Generator().manual_seed(seed))
    x = torch.stack([torch.from_numpy(d[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def eval_seed(i, split):
    """Evaluation uses the same batches every time (and in eval.py), so curves are not noise."""
    return 10**9 + 7919 * i + (split == "val")


def fp16_warning(hidden_norm, n_embd, limit=32.0):
    """The blind spot drives ||h_k|| up; float16 overflows past 65,504, so x^2 (in norms and
    attention scores) overflows once |x| passes 256. Warn when a loop's per-element RMS passes
    `limit`, well before that."""
    k = max(range(len(hidden_norm)), key=lambda i: hidden_norm[i])
    rms = hidden_norm[k] / math.sqrt(n_embd)
    if rms > limit:
        return (f"warning: ||h_{k + 1}|| = {hidden_norm[k]:.4g} (per-element RMS {rms:.0f}) is nearing "
                f"float16's range (squares overflow past 256). Fixes: --readout=scale_visible, "
                f"--norm_penalty=0.01, --loop_norm=True, or --dtype=bfloat16")
    return None


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def resolve_system(cfg):
    """Device, dtype and compile from 'auto' and what the machine can do (falls back with a warning)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "auto":
        cfg.device = "cuda" if cuda else "cpu"
    elif cfg.device.startswith("cuda") and not cuda:
        die(f"--device={cfg.device} but torch sees no CUDA device; use --device=cpu")
    dev = cfg.device.split(":")[0]
    bf16_ok = dev == "cpu" or torch.cuda.is_bf16_supported()
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if dev == "cuda" and bf16_ok else "float32"
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        die(f"--dtype={cfg.dtype!r} is not one of: auto | float32 | bfloat16 | float16")
    if cfg.dtype == "bfloat16" and not bf16_ok:
        print("warning: this GPU has no bfloat16; falling back to float16 with a grad scaler", file=sys.stderr)
        cfg.dtype = "float16"
    if cfg.dtype == "float16" and dev == "cpu":
        print("warning: float16 autocast is not supported on CPU; falling back to float32", file=sys.stderr)
        cfg.dtype = "float32"
    if cfg.compile not in ("auto", "True", "False"):
        die(f"--compile={cfg.compile!r} is not one of: auto | True | False")
    cfg.compile = dev == "cuda" if cfg.compile == "auto" else cfg.compile == "True"
    return dev


def main(argv=None):
    cfg, explicit = parse(OPTIONS, argv, __doc__)
    for key, allowed in (("init_from", ("scratch", "resume")), ("lr_schedule", ("constant", "cosine"))):
        if getattr(cfg, key) not in allowed:
            die(f"--{key}={getattr(cfg, key)!r} is not one of: {' | '.join(allowed)}")

    # resuming restores the run's own settings; a changed model or data flag is an error
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        for key, saved in ckpt["config"].items():
            if key not in OPTIONS:
                continue
            if key in RUN_KEYS and key in explicit and getattr(cfg, key) != saved:
                die(f"--{key}={getattr(cfg, key)!r} differs from the checkpoint's {key}={saved!r}; "
                    f"drop the flag to resume, or use a new --out_dir to start a new run")
            if key not in explicit:  # flags given now (max_iters, say) win; the rest is the run's own
                setattr(cfg, key, saved)
    try:
        model_args = LoopedGPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS if k != "vocab_size"},
                                     vocab_size=1)
    except ValueError as e:
        die(str(e).replace("LoopedGPTConfig.", "--"))

    # DDP (torchrun sets RANK): NCCL on GPUs, gloo on CPU
    options = {k: getattr(cfg, k) for k in OPTIONS}  # as given ("auto" stays "auto"), for the log and resume
    ddp = int(os.environ.get("RANK", "-1")) != -1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if cfg.device == "auto" and torch.cuda.is_available():
            cfg.device = f"cuda:{local_rank}"
    dev = resolve_system(cfg)
    if ddp:
        from torch.distributed import init_process_group
        init_process_group(backend="nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            torch.cuda.set_device(cfg.device)
    master = rank == 0

    data, meta = load_data(cfg.data_dir, cfg.dataset, cfg.block_size)

    def batch(split, seed):
        return get_batch(data[split], cfg.batch_size, cfg.block_size, seed, cfg.device)

    # model and optimizer
    torch.manual_seed(cfg.seed + rank)
    model_args.vocab_size = meta["vocab_size"]
    if ckpt and ckpt["model_args"]["vocab_size"] != meta["vocab_size"]:
        die(f"the checkpoint's vocab_size {ckpt['model_args']['vocab_size']} does not match "
            f"{Path(cfg.data_dir) / cfg.dataset}/meta.json's {meta['vocab_size']}: was the dataset prepared again differently?")
    model = LoopedGPT(model_args).to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), dev)
    scaler = torch.amp.GradScaler(dev, enabled=cfg.dtype == "float16")
    iter_num = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        iter_num = ckpt["iter_num"]
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if dev == "cuda" else None)
    autocast = nullcontext() if cfg.dtype == "float32" else \
        torch.autocast(dev, dtype=getattr(torch, cfg.dtype))

    @torch.no_grad()
    def evaluate():
        """Mean CE at each loop on fixed batches of each split, and ||h_k|| on the val batches."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            ce, norm = 0, 0
            for i in range(cfg.eval_iters):
                with autocast:
                    _, _, stats = raw_model(*batch(split, eval_seed(i, split)))
                ce, norm = ce + stats["loop_ce"].float(), norm + stats["hidden_norm"].float()
            out[f"{split}_loop_ce"] = (ce / cfg.eval_iters).tolist()
        out["hidden_norm"] = (norm / cfg.eval_iters).tolist()  # the last split's: val
        model.train()
        return out

    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            trim_log(log_path, iter_num) if ckpt else open(log_path, "w").close()
        except OSError as e:
            die(f"cannot write to --out_dir={cfg.out_dir!r} ({e.strerror}); choose a writable folder")
        n_params = raw_model.get_num_params()
        print(f"{n_params / 1e6:.2f}M parameters, K={cfg.n_loops} loops, readout={cfg.readout}, "
              f"supervision={cfg.supervision}, norm_penalty={cfg.norm_penalty}, loop_norm={cfg.loop_norm}; "
              f"{cfg.device} {cfg.dtype}{' compiled' if cfg.compile else ''}"
              + (f", resuming at iter {iter_num}" if ckpt else ""))
    run_config = options | {"vocab_size": meta["vocab_size"], "world_size": world,
                            "resolved": {"device": cfg.device, "dtype": cfg.dtype, "compile": cfg.compile}}
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", unit="it", disable=not master,
               dynamic_ncols=True)
    t_start, t_last, iter_last = time.time(), time.time(), iter_num
    elapsed0 = ckpt["elapsed"] if ckpt else 0.0
    warned_fp16, skipped = False, 0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate, checkpoint (only finite models), then log: a kill between the two is repaired on resume
        if master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            ev = evaluate()
            tokens_per_sec = tokens_per_iter * (iter_num - iter_last) / max(1e-9, time.time() - t_last)
            if not all(map(math.isfinite, ev["train_loop_ce"] + ev["val_loop_ce"] + ev["hidden_norm"])):
                bad = next(k for k, c in enumerate(ev["val_loop_ce"], 1) if not math.isfinite(c))
                die(f"non-finite loss at iter {iter_num} (loop {bad}, ||h_{bad}|| = {ev['hidden_norm'][bad - 1]:.4g}); "
                    f"the last good checkpoint {ckpt_path} was kept")
            warning = None if warned_fp16 or cfg.dtype != "float16" else fp16_warning(ev["hidden_norm"], cfg.n_embd)
            if warning:
                tqdm.write(warning)
                warned_fp16 = True
            elapsed = elapsed0 + time.time() - t_start
            atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                         "model_args": asdict(raw_model.config), "iter_num": iter_num,
                         "config": run_config, "meta": meta, "elapsed": elapsed}, ckpt_path)
            append_log(log_path, {"iter": iter_num, "lr": lr, **ev, "tokens_per_sec": tokens_per_sec,
                                  "elapsed": elapsed, "skipped_steps": skipped, "config": run_config})
            norms = " ".join(f"{n:.3g}" for n in ev["hidden_norm"])
            tqdm.write(f"iter {iter_num}: val CE per loop {' '.join(f'{c:.3f}' for c in ev['val_loop_ce'])} "
                       f"| ||h_k|| {norms} | {tokens_per_sec:,.0f} tok/s")
            t_last, iter_last = time.time(), iter_num
        if iter_num >= cfg.max_iters:
            break

        # one optimizer step over gradient_accumulation_steps micro-batches
        for micro in range(cfg.gradient_accumulation_steps):
            X, Y = batch("train", (cfg.seed * 1_000_003 + iter_num) * 1009 + micro * 64 + rank)
            if ddp:  # all-reduce gradients only on the last micro-batch
                model.require_backward_grad_sync = micro == cfg.gradient_accumulation_steps - 1
            with autocast:
                _, loss, stats = model(X, Y)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        if cfg.skip_nonfinite and not torch.isfinite(loss):
            skipped += 1
            tqdm.write(f"warning: non-finite loss at iter {iter_num}; step skipped ({skipped} so far)")
            optimizer.zero_grad(set_to_none=True)
        else:
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if iter_num % cfg.log_interval == 0 and master:  # the only host sync of the step
            lossf = loss.item()
            if not math.isfinite(lossf) and not cfg.skip_nonfinite:
                ce = stats["loop_ce"].float().tolist()
                bad = next((k for k, c in enumerate(ce, 1) if not math.isfinite(c)), len(ce))
                die(f"non-finite loss at iter {iter_num} (loop {bad}, ||h_{bad}|| = "
                    f"{stats['hidden_norm'][bad - 1].item():.4g}); the last good checkpoint {ckpt_path} was kept")
            bar.set_postfix(loss=f"{lossf:.4f}", h_K=f"{stats['hidden_norm'][-1].item():.3g}", lr=f"{lr:.2e}")
        iter_num += 1
        bar.update(1)
    bar.close()
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
