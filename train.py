"""
Train a looped LM with a readout after every loop, and log what happens to ||h_k||.

  python prepare.py && python train.py                      # CPU default: the blind spot in ~3 min
  python train.py --readout=scale_visible                   # fix 1: the loss sees the scale
  python train.py config/paper_44m.py                       # the paper's 44M setting, on a GPU
  torchrun --nproc_per_node=8 train.py config/paper_44m.py  # DDP
  python train.py --init_from=resume --out_dir=out          # continue a killed run

Every eval_interval one JSON line goes to out_dir/log.jsonl (its keys are in the README) and
out_dir/ckpt.pt is replaced atomically. `python train.py --help` lists every option.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configurator import DEVICE, NONEMPTY, at_least, between, check, one_of, parse, pick_device
from configurator import keep_freed_memory, pick_dtype
from model import READOUT_CES, READOUTS, SUPERVISIONS, LoopedGPT, LoopedGPTConfig

POSITIVE = check("a number > 0", lambda v: v > 0, [0.0, -1.0])
FOLDER_NAME = check("a folder name (no '/')", lambda v: v != "" and "/" not in v, ["", "a/b"])
# the defaults are the CPU preset: Shakespeare characters, a 2-layer block looped 6 times
OPTIONS = {
    # I/O
    "out_dir": ("out", "folder for ckpt.pt and log.jsonl", NONEMPTY),
    "eval_interval": (100, "evaluate, log and checkpoint every this many iterations",
                      at_least(1)),
    "eval_iters": (20, "batches per split in each evaluation", at_least(1)),
    "log_interval": (10, "refresh the progress bar every this many iterations", at_least(1)),
    "init_from": ("scratch", "scratch, or resume (continue out_dir/ckpt.pt and its log)",
                  one_of("scratch", "resume")),
    # data
    "dataset": ("shakespeare_char", "folder under data_dir made by prepare.py", FOLDER_NAME),
    "data_dir": ("data", "where prepare.py wrote the datasets", NONEMPTY),
    "batch_size": (8, "sequences per micro-batch, per process", at_least(1)),
    "block_size": (128, "sequence length", at_least(1)),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step, per process",
                                    at_least(1)),
    # model: the looped block and the paper's four knobs
    "n_layer": (2, "layers in the looped block", at_least(1)),
    "n_head": (4, "attention heads", at_least(1)),
    "n_embd": (128, "width of the hidden state h_k (a multiple of n_head)", at_least(1)),
    "n_loops": (6, "K: how many times the block is applied", at_least(1)),
    "readout": ("rmsnorm", "how h_k is decoded (rmsnorm: the blind spot)", one_of(*READOUTS)),
    "loop_norm": (False, "RMSNorm the state between loops (scale-removing recurrence)", None),
    "supervision": ("per_loop", "per_loop (dense: mean of the K CEs) or terminal (last loop)",
                    one_of(*SUPERVISIONS)),
    "norm_penalty": (0.0, "lambda: adds lambda * mean_k mean(h_k^2) to the loss (paper: 0.01)",
                     at_least(0.0)),
    "dropout": (0.0, "dropout rate (paper: 0.1)", between(0.0, 1.0, open_hi=True)),
    "bias": (False, "biases in Linear layers", None),
    "readout_ce": ("auto", "CE of loops < K: chunked (memory-lean), plain, or auto (chunked "
                           "for vocabularies >= 8192)", one_of(*READOUT_CES)),
    # optimizer: AdamW
    "learning_rate": (6e-3, "peak learning rate", POSITIVE),
    "max_iters": (800, "optimizer steps in total (0: evaluate the initial model only)",
                  at_least(0)),
    "weight_decay": (0.0, "AdamW weight decay on matrices (paper: 0.01)", at_least(0.0)),
    "beta1": (0.9, "AdamW beta1", between(0.0, 1.0, open_hi=True)),
    "beta2": (0.95, "AdamW beta2", between(0.0, 1.0, open_hi=True)),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 disables", at_least(0.0)),
    "lr_schedule": ("constant", "constant (paper, after warmup) or cosine (to min_lr at the end)",
                    one_of("constant", "cosine")),
    "warmup_iters": (100, "linear warmup steps", at_least(0)),
    "min_lr": (6e-4, "final learning rate of the cosine schedule (<= learning_rate)",
               at_least(0.0)),
    # system
    "device": ("auto", "auto: cuda, then mps, then cpu", DEVICE),
    "dtype": ("auto", "auto: bfloat16 on GPUs that have it, else float32",
              one_of("auto", "float32", "bfloat16", "float16")),
    "compile": ("auto", "torch.compile the model (auto: on CUDA only)",
                one_of("auto", "True", "False")),
    "seed": (1337, "seed for weights, data order and dropout", at_least(0)),
    "skip_nonfinite": (False, "skip steps whose loss is NaN/inf instead of stopping", None),
}
MODEL_KEYS = [f.name for f in fields(LoopedGPTConfig)]
RUN_KEYS = MODEL_KEYS + ["dataset"]  # what a resumed run may not change


def together(cfg, explicit):
    if cfg.lr_schedule == "cosine" and cfg.min_lr > cfg.learning_rate:
        return (f"--min_lr={cfg.min_lr!r} is above --learning_rate={cfg.learning_rate!r}; "
                f"the cosine schedule decays from learning_rate down to min_lr")
    if cfg.n_embd % cfg.n_head:
        return f"--n_embd={cfg.n_embd} is invalid; accepted: a multiple of --n_head={cfg.n_head}"
    return None


def die(msg):
    """A failure found while working (missing data, bad checkpoint): one line, exit status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- files: checkpoint, log, data ----------------------------------------------------------

def atomic_save(obj, path):
    """torch.save to a temp file, fsync, rename: a kill at any moment leaves the old or new file."""
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
    """The checkpoint dict. Loaded with torch's safe unpickler (tensors and plain data only), so
    a checkpoint from someone else cannot run code here."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        die(f"no checkpoint at {path}; train one first (python train.py --out_dir={folder})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        if "unsupported global" in str(e).lower():  # a class or function to import: code
            die(f"checkpoint {path} holds objects other than tensors and plain data; it was "
                f"refused unopened, since unpickling them could run code. Use a checkpoint "
                f"written by train.py")
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
            f"delete it and train again, or point to another out_dir")
    if not isinstance(ckpt, dict) or not {"model", "config", "meta"} <= ckpt.keys():
        die(f"{path} is not a nanoloop checkpoint (it lacks model, config or meta); "
            f"point to a train.py out_dir")
    return ckpt


def model_config(run):
    """The LoopedGPTConfig of a run, from its stored config (every model field is an option)."""
    return LoopedGPTConfig(**{k: run[k] for k in MODEL_KEYS if k in run})


def model_from_checkpoint(ckpt, device):
    model = LoopedGPT(model_config(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        die(f"the checkpoint's weights do not fit this model.py ({str(e).splitlines()[0]}); "
            f"it comes from another version of nanoloop: train it again")
    return model.eval().to(device)


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
        cmd = "python prepare.py"
        if tok in ("gpt2", "word"):
            cmd += f" --tokenizer={tok}"
        if not dataset.startswith("shakespeare_"):
            cmd += f" --input=YOUR_FILES --name={dataset}"
        die(f"no training data in {path}/ (train.bin, meta.json); make it with: {cmd}")
    meta = json.loads((path / "meta.json").read_text())
    data = {}
    for split in ("train", "val"):
        data[split] = np.memmap(path / f"{split}.bin", dtype=meta.get("dtype", "uint16"), mode="r")
        if len(data[split]) <= block_size + 1:
            die(f"{path}/{split}.bin has {len(data[split])} tokens, too few for "
                f"--block_size={block_size}")
    return data, meta


def get_batch(d, batch_size, block_size, seed, device="cpu"):
    """Inputs and next-token targets at positions drawn from `seed` alone, so the data order
    survives a resume and is the same for every run with the same seed."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=g).tolist()
    xy = torch.from_numpy(np.stack([d[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = xy[:, :-1], xy[:, 1:]
    if device.startswith("cuda"):
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    return x, y


def eval_seed(i, split):
    """Evaluation uses the same batches every time (and in eval.py), so curves are not noise."""
    return 10**9 + 7919 * i + (split == "val")


# ---- training ------------------------------------------------------------------------------

def fp16_warning(hidden_norm, n_embd, limit=32.0):
    """The blind spot drives ||h_k|| up; float16 overflows past 65,504, so x^2 (in norms and
    attention scores) overflows once |x| passes 256. Warn when a loop's per-element RMS passes
    `limit`, well before that."""
    k = max(range(len(hidden_norm)), key=lambda i: hidden_norm[i])
    rms = hidden_norm[k] / math.sqrt(n_embd)
    if rms <= limit:
        return None
    return (f"warning: ||h_{k + 1}|| = {hidden_norm[k]:.4g} (per-element RMS {rms:.0f}) is "
            f"nearing float16's range (squares overflow past 256). Fixes: "
            f"--readout=scale_visible, --norm_penalty=0.01, --loop_norm=True, or "
            f"--dtype=bfloat16")


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def nonfinite_message(iter_num, loop_ce, hidden_norm, ckpt_path):
    """Which loop went bad first (a state that overflowed, else a CE), with its norm."""
    bad = next((k for k, n in enumerate(hidden_norm, 1) if not math.isfinite(n)), None)
    if bad is None:
        bad = next((k for k, c in enumerate(loop_ce, 1) if not math.isfinite(c)), len(loop_ce))
    return (f"non-finite loss at iter {iter_num} (loop {bad}, ||h_{bad}|| = "
            f"{hidden_norm[bad - 1]:.4g}); the last good checkpoint {ckpt_path} was kept")


def resume_options(cfg, explicit, ckpt):
    """Resuming restores the run's own settings; a changed model or data flag is an error."""
    for key, saved in ckpt["config"].items():
        if key not in OPTIONS:
            continue
        if key in RUN_KEYS and key in explicit and getattr(cfg, key) != saved:
            die(f"--{key}={getattr(cfg, key)!r} differs from the checkpoint's {key}={saved!r}; "
                f"drop the flag to resume, or use a new --out_dir to start a new run")
        if key not in explicit:  # flags given now (max_iters, say) win; the rest is the run's own
            setattr(cfg, key, saved)


def main(argv=None):
    cfg, explicit = parse("train.py", OPTIONS, argv, __doc__, together=together)
    options = vars(cfg).copy()  # as given ("auto" stays "auto"), for the log and resume
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        resume_options(cfg, explicit, ckpt)
        options = vars(cfg).copy()

    # DDP (torchrun sets RANK): NCCL on GPUs, gloo on CPU
    ddp = int(os.environ.get("RANK", "-1")) != -1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if cfg.device == "auto" and torch.cuda.is_available():
            cfg.device = f"cuda:{local_rank}"
    cfg.device = pick_device(cfg.device)
    keep_freed_memory()
    dev = cfg.device.split(":")[0]
    cfg.dtype = pick_dtype(cfg.device, cfg.dtype)
    cfg.compile = dev == "cuda" if cfg.compile == "auto" else cfg.compile == "True"
    if dev == "cuda":  # TF32 matmuls for float32 work, as nanoGPT does
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        from torch.distributed import init_process_group
        init_process_group(backend="nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            torch.cuda.set_device(cfg.device)
    master = rank == 0

    data, meta = load_data(cfg.data_dir, cfg.dataset, cfg.block_size)
    if ckpt and ckpt["config"]["vocab_size"] != meta["vocab_size"]:
        die(f"the checkpoint's vocab_size {ckpt['config']['vocab_size']} does not match "
            f"{Path(cfg.data_dir) / cfg.dataset}/meta.json's {meta['vocab_size']}: was the "
            f"dataset prepared again differently?")
    run_config = options | {"vocab_size": meta["vocab_size"], "world_size": world,
                            "resolved": {"device": cfg.device, "dtype": cfg.dtype,
                                         "compile": cfg.compile}}

    def batch(split, seed):
        return get_batch(data[split], cfg.batch_size, cfg.block_size, seed, cfg.device)

    # model and optimizer
    torch.manual_seed(cfg.seed + rank)
    if ckpt:
        model = model_from_checkpoint(ckpt, cfg.device).train()
    else:
        model = LoopedGPT(model_config(run_config)).to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), dev)
    scaler = torch.amp.GradScaler(dev, enabled=cfg.dtype == "float16")
    iter_num = 0
    if ckpt:
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
    autocast = nullcontext()
    if cfg.dtype != "float32":
        autocast = torch.autocast(dev, dtype=getattr(torch, cfg.dtype))

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
                ce = ce + stats["loop_ce"].float()
                norm = norm + stats["hidden_norm"].float()
            out[f"{split}_loop_ce"] = (ce / cfg.eval_iters).tolist()
        out["hidden_norm"] = (norm / cfg.eval_iters).tolist()  # the last split's: val
        model.train()
        return out

    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            if ckpt:
                trim_log(log_path, iter_num)
            else:
                open(log_path, "w").close()
        except OSError as e:
            die(f"cannot write to --out_dir={cfg.out_dir!r} ({e.strerror}); "
                f"choose a writable folder")
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, K={cfg.n_loops} loops, "
              f"readout={cfg.readout}, supervision={cfg.supervision}, "
              f"norm_penalty={cfg.norm_penalty}, loop_norm={cfg.loop_norm}; {cfg.device} "
              f"{cfg.dtype}{' compiled' if cfg.compile else ''}"
              + (f", resuming at iter {iter_num}" if ckpt else ""))
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", unit="it",
               disable=not master, dynamic_ncols=True)
    t_start = t_last = time.time()
    iter_last = iter_num
    elapsed0 = ckpt["elapsed"] if ckpt else 0.0
    warned_fp16 = False
    skipped = 0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate, checkpoint (finite models only), then log: a kill between the two is
        # repaired on resume
        if master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            ev = evaluate()
            seconds = max(1e-9, time.time() - t_last)
            tokens_per_sec = tokens_per_iter * (iter_num - iter_last) / seconds
            values = ev["train_loop_ce"] + ev["val_loop_ce"] + ev["hidden_norm"]
            if not all(map(math.isfinite, values)):
                die(nonfinite_message(iter_num, ev["val_loop_ce"], ev["hidden_norm"], ckpt_path))
            if not warned_fp16 and cfg.dtype == "float16":
                warning = fp16_warning(ev["hidden_norm"], cfg.n_embd)
                if warning:
                    tqdm.write(warning)
                    warned_fp16 = True
            elapsed = elapsed0 + time.time() - t_start
            atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                         "iter_num": iter_num, "config": run_config, "meta": meta,
                         "elapsed": elapsed}, ckpt_path)
            append_log(log_path, {"iter": iter_num, "lr": lr, **ev,
                                  "tokens_per_sec": tokens_per_sec, "elapsed": elapsed,
                                  "skipped_steps": skipped, "config": run_config})
            ces = " ".join(f"{c:.3f}" for c in ev["val_loop_ce"])
            norms = " ".join(f"{n:.3g}" for n in ev["hidden_norm"])
            tqdm.write(f"iter {iter_num}: val CE per loop {ces} | ||h_k|| {norms} | "
                       f"{tokens_per_sec:,.0f} tok/s")
            t_last, iter_last = time.time(), iter_num
        if iter_num >= cfg.max_iters:
            break

        # one optimizer step over gradient_accumulation_steps micro-batches; the step decodes
        # only the loops its loss trains (all_exits=False)
        for micro in range(cfg.gradient_accumulation_steps):
            X, Y = batch("train", (cfg.seed * 1_000_003 + iter_num) * 1009 + micro * 64 + rank)
            if ddp:  # all-reduce gradients only on the last micro-batch
                model.require_backward_grad_sync = micro == cfg.gradient_accumulation_steps - 1
            with autocast:
                _, loss, stats = model(X, Y, all_exits=False)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        if cfg.skip_nonfinite and not torch.isfinite(loss):  # a host sync, only when asked for
            skipped += 1
            tqdm.write(f"warning: non-finite loss at iter {iter_num}; step skipped "
                       f"({skipped} so far)")
        else:
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % cfg.log_interval == 0 and master:  # the only host sync of the step
            lossf = loss.item()
            norms = stats["hidden_norm"].float().tolist()
            if not math.isfinite(lossf) and not cfg.skip_nonfinite:
                loop_ce = stats["loop_ce"].float().tolist()
                if cfg.supervision == "terminal":  # untrained loops were not decoded
                    loop_ce = [0.0] * (len(loop_ce) - 1) + loop_ce[-1:]
                die(nonfinite_message(iter_num, loop_ce, norms, ckpt_path))
            bar.set_postfix(loss=f"{lossf:.4f}", h_K=f"{norms[-1]:.3g}", lr=f"{lr:.2e}")
        iter_num += 1
        bar.update(1)
    bar.close()
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
