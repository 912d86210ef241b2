"""
Train a looped LM with a readout after every loop, and log what happens to ||h_k||.

  python prepare.py && python train.py config/cpu.py        # a CPU: the blind spot in ~3 min
  python train.py config/cpu.py --readout=scale_visible     # fix 1: the loss sees the scale
  python train.py                                           # the paper's 44M model, on a GPU
  torchrun --nproc_per_node=8 train.py config/paper_44m.py  # DDP; the same global batch
  python train.py --init_from=resume --out_dir=out          # continue a killed run
  python train.py config/paper_44m.py --init_from=auto      # a job: resume out_dir's run if any
  python train.py config/paper_44m.py --dataset=wikitext103_word  # the paper's recipe: 4 epochs

The defaults are the paper's 44M model and optimizer on Shakespeare characters; config/ holds
the CPU demo and the paper's presets. Every eval_interval one JSON line goes to out_dir/log.jsonl
(its keys are in the README) and out_dir/ckpt.pt is replaced atomically. SIGTERM, SIGUSR1
(SLURM's --signal) and Ctrl-C end the current step (under torchrun, the next: every process
stops after the same one), checkpoint it and exit with 128 + the signal's number (143, 138,
130); a second Ctrl-C stops at once.
`python train.py --help` lists every option.
"""

import contextlib
import math
import os
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from configurator import DEVICE, NONEMPTY, at_least, between, check, config_options
from configurator import device_or_exit, one_of, parse
from device import autocast, ddp_device, keep_freed_memory, pick_dtype, rng_state
from device import set_rng_state
from model import LoopedGPT, LoopedGPTConfig, config_error, knob_applies
from rundir import MODEL_KEYS, append_log, atomic_save, die, disk_error, epoch_starts, eval_seed
from rundir import get_batch, load_checkpoint, load_data, lock_folder, model_config
from rundir import model_from_checkpoint, n_windows, remove_stale_temps, resume_log, start_mode
from rundir import windows_batch, writable_folder

POSITIVE = check("a number > 0", lambda v: v > 0, [0.0, -1.0])
FOLDER_NAME = check("a folder name (no '/')", lambda v: v != "" and "/" not in v, ["", "a/b"])
OPTIONS = {
    # I/O
    "out_dir": ("out", "folder for ckpt.pt and log.jsonl", NONEMPTY),
    "eval_interval": (500, "evaluate, log and checkpoint every this many iterations",
                      at_least(1)),
    "eval_iters": (50, "batches per split in each evaluation", at_least(1)),
    "log_interval": (10, "refresh the progress bar every this many iterations", at_least(1)),
    "init_from": ("scratch", "scratch, resume (continue out_dir/ckpt.pt and its log), or auto: "
                             "resume when out_dir holds a checkpoint, else scratch (for a job "
                             "that is requeued or restarted with the same command)",
                  one_of("scratch", "resume", "auto")),
    "overwrite": (False, "scratch into an out_dir that holds a run replaces that run (without "
                         "this, the run is kept and train.py stops)", None),
    # data
    "dataset": ("shakespeare_char", "folder under data_dir made by prepare.py", FOLDER_NAME),
    "data_dir": ("data", "where prepare.py wrote the datasets", NONEMPTY),
    "batch_size": (64, "sequences per micro-batch (torchrun shares them out: see "
                       "gradient_accumulation_steps)", at_least(1)),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step; the global batch, "
                                       "batch_size x this, is the same on any number of "
                                       "processes", at_least(1)),
    "sampling": ("windows", "the training windows: windows (drawn at random from the seed, "
                            "with replacement) or epochs (every window at --stride once per "
                            "epoch, each epoch in its own order from the seed, as the paper's "
                            "code; the epochs run on as one stream, so a global batch may "
                            "straddle two, where the paper's DataLoader ends each epoch with a "
                            "smaller batch)", one_of("windows", "epochs")),
    "stride": (128, "tokens between the starts of neighbouring windows (of block_size + 1 "
                    "tokens) in an epoch: the windows --sampling=epochs visits and --epochs "
                    "counts", at_least(1)),
    "epochs": (0.0, "train this many epochs: sets max_iters to the steps that many passes over "
                    "the windows at --stride take at the global batch, rounded up (0: use "
                    "--max_iters; a --max_iters flag overrides a preset's epochs)",
               at_least(0.0)),
    # the model: every field of LoopedGPTConfig but the vocabulary, which the data sets
    **config_options(LoopedGPTConfig, skip=("vocab_size",)),
    # optimizer: AdamW
    "learning_rate": (3e-4, "peak learning rate", POSITIVE),
    "max_iters": (20000, "optimizer steps in total (0: evaluate the initial model only)",
                  at_least(0)),
    "weight_decay": (0.01, "AdamW weight decay", at_least(0.0)),
    "weight_decay_on": ("all", "the parameters AdamW decays: all (the paper's code) or matrices "
                               "(nanoGPT's: not norm gains or biases)", one_of("all", "matrices")),
    "beta1": (0.9, "AdamW beta1", between(0.0, 1.0, open_hi=True)),
    "beta2": (0.999, "AdamW beta2 (paper: 0.999, PyTorch's default)",
              between(0.0, 1.0, open_hi=True)),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 disables", at_least(0.0)),
    "lr_schedule": ("constant", "constant (paper, after warmup) or cosine (to min_lr at the end)",
                    one_of("constant", "cosine")),
    "warmup_iters": (0, "linear warmup steps", at_least(0)),
    "min_lr": (3e-5, "final learning rate of the cosine schedule (<= learning_rate)",
               at_least(0.0)),
    # system
    "device": ("auto", "auto: cuda, then mps, then cpu; under torchrun any cuda device means "
                       "cuda:LOCAL_RANK", DEVICE),
    "dtype": ("auto", "auto: bfloat16 on GPUs with native bf16, float16 (with a grad scaler) "
                      "on older GPUs, float32 on CPU and MPS",
              one_of("auto", "float32", "bfloat16", "float16")),
    "compile": ("auto", "torch.compile the model (auto: on CUDA only)",
                one_of("auto", "True", "False")),
    "seed": (42, "seed for weights, data order and dropout (paper: 42)", at_least(0)),
    "skip_nonfinite": (False, "skip steps whose gradient is NaN/inf instead of stopping", None),
}
RUN_KEYS = MODEL_KEYS + ["dataset"]  # what a resumed run may not change
# what a resumed run of --sampling=epochs may not change: the epoch stream and its batches
ORDER_KEYS = ("sampling", "stride", "seed", "batch_size", "gradient_accumulation_steps")
IO_KEYS = ("out_dir", "data_dir", "init_from", "overwrite", "log_interval")  # not experiment


def flag_names(argv):
    """The options given as flags (not by a preset) in train.py's arguments."""
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def together(cfg, explicit, flags=()):
    # --epochs and --max_iters both set the length: one of them, or a flag over a preset's
    if cfg.epochs > 0 and "max_iters" in explicit and ("epochs" in flags) == ("max_iters" in flags):
        return (f"--epochs={cfg.epochs:g} and --max_iters={cfg.max_iters} both set the length of "
                f"the run; give one of them (--epochs=0 trains --max_iters steps; a --max_iters "
                f"flag overrides a preset's epochs)")
    if cfg.init_from == "auto" and cfg.overwrite:
        return ("--init_from=auto resumes the run out_dir holds, --overwrite=True replaces it; "
                "give one (to replace a run: --init_from=scratch --overwrite=True)")
    if cfg.lr_schedule == "cosine" and cfg.min_lr > cfg.learning_rate:
        return (f"--min_lr={cfg.min_lr!r} is above --learning_rate={cfg.learning_rate!r}; "
                f"the cosine schedule decays from learning_rate down to min_lr")
    # the model knobs together (a knob of another readout, a supervision's weights), as
    # LoopedGPTConfig checks them; the vocabulary comes from the data later
    return config_error(vars(cfg) | {"vocab_size": 1}, "--")


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, batch, eval_iters, dtype):
    """Mean CE at each loop on fixed batches of each split, and ||h_k|| on the val batches.
    Tensors on the model's device; the caller reads them (one sync)."""
    model.eval()
    device = str(model.lm_head.weight.device)
    out = {}
    for split in ("train", "val"):
        ce, norm = 0, 0
        for i in range(eval_iters):
            with autocast(device, dtype):
                _, _, stats = model(*batch(split, eval_seed(i, split)))
            ce = ce + stats["loop_ce"].float()
            norm = norm + stats["hidden_norm"].float()
        out[f"{split}_loop_ce"] = ce / eval_iters
    out["hidden_norm"] = norm / eval_iters  # the last split's: val
    model.train()
    return out


def micro_batches(batch_size, accumulation, world, rank):
    """This process's share of one optimizer step: (index of a micro-batch in the step, its rows
    this process trains on) pairs. The global batch, batch_size x accumulation sequences, is the
    same on any number of processes: the micro-batches are shared out (as nanoGPT does) or, when
    there are fewer of them than processes, each micro-batch is. Every process draws the same
    micro-batches as one process would, so DDP computes the same gradient. Returns
    (pairs, None) or (None, why)."""
    if accumulation % world == 0:
        return [(m * world + rank, slice(None)) for m in range(accumulation // world)], None
    if batch_size % world == 0:
        rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        return [(m, rows) for m in range(accumulation)], None
    return None, (f"the global batch --batch_size={batch_size} x --gradient_accumulation_steps="
                  f"{accumulation} cannot be shared by {world} processes; make one of the two "
                  f"a multiple of {world}")


def train_seed(seed, iter_num, micro):
    """The data seed of micro-batch `micro` of a step: every batch of a run is distinct and
    independent of how often it was resumed or how many processes share it."""
    return (seed * 1_000_003 + iter_num) * 1009 + micro * 64


def first_sample(iter_num, micro, batch_size, accumulation):
    """--sampling=epochs: the index, in the stream of epochs, of the first window of
    micro-batch `micro` of a step. Step after step, micro-batch after micro-batch, the global
    batches take the stream in order, whatever the number of processes or resumes."""
    return (iter_num * accumulation + micro) * batch_size


def epoch_steps(epochs, count, global_batch):
    """The optimizer steps that `epochs` passes over `count` windows take, rounded up (the last
    step may take a few windows of the next epoch)."""
    return -(-math.ceil(epochs * count) // global_batch)


def grad_norm(params):
    """The global gradient norm (after DDP's all-reduce it is the same on every process)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


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


def nonfinite_message(iter_num, loop_ce, hidden_norm, trained, ckpt_path):
    """Which loop went bad first (a state that overflowed, else a trained exit's CE)."""
    bad = next((k for k, n in enumerate(hidden_norm, 1) if not math.isfinite(n)), None)
    if bad is None:
        bad = next((k for k in trained if not math.isfinite(loop_ce[k - 1])), len(loop_ce))
    return (f"non-finite loss at iter {iter_num} (loop {bad}, ||h_{bad}|| = "
            f"{hidden_norm[bad - 1]:.4g}); the last good checkpoint {ckpt_path} was kept")


def resume_options(cfg, explicit, ckpt):
    """Resuming restores the run's own settings; a changed model or data flag is an error, and
    so is a change to the epoch stream of --sampling=epochs (it would repeat or skip windows)."""
    epochs = ckpt["config"].get("sampling") == "epochs"
    for key, saved in ckpt["config"].items():
        if key not in OPTIONS:
            continue
        fixed = key in RUN_KEYS or (epochs and key in ORDER_KEYS)
        if fixed and key in explicit and getattr(cfg, key) != saved:
            why = "" if key in RUN_KEYS else " (the epochs' order and batches depend on it)"
            die(f"--{key}={getattr(cfg, key)!r} differs from the checkpoint's {key}={saved!r}"
                f"{why}; drop the flag to resume, or use a new --out_dir to start a new run")
        if key not in explicit:  # flags given now (max_iters, say) win; the rest is the run's own
            setattr(cfg, key, saved)


def data_line(cfg, train_tokens, count):
    """The training data a run goes through: its windows and what --epochs came to."""
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    windows = (f"{count:,} windows of {cfg.block_size + 1} tokens at stride {cfg.stride} "
               f"({count / global_batch:,.1f} steps of {global_batch} an epoch)")
    if cfg.sampling == "epochs":
        line = f"data: {windows}, each epoch in its own order"
    else:
        line = f"data: random windows of {cfg.block_size + 1} of {train_tokens:,} tokens"
    if cfg.epochs > 0:
        line += f"; --epochs={cfg.epochs:g} is {cfg.max_iters:,} step" + "s" * (cfg.max_iters != 1)
        if cfg.sampling != "epochs":
            line += f" (an epoch: {windows})"
    return line


def banner(model, cfg, ddp_world, resumed_at, data=None):
    """What this run is: every model knob, every other setting not at its default, and the
    data line."""
    n = model.get_num_params() / 1e6
    where = f"{cfg.device} {cfg.dtype}{' compiled' if cfg.compile else ''}"
    if ddp_world > 1:
        where += f", {ddp_world} processes"
    knobs = " ".join(f"{k}={getattr(cfg, k)}" for k in MODEL_KEYS
                     if k in OPTIONS and knob_applies(k, vars(cfg)))
    changed = " ".join(f"{k}={getattr(cfg, k)}" for k, spec in OPTIONS.items()
                       if k not in MODEL_KEYS + list(IO_KEYS) + ["device", "dtype", "compile"]
                       and getattr(cfg, k) != spec[0])
    lines = [f"{n:.2f}M parameters on {where}" + (f", resuming at iter {resumed_at}"
                                                   if resumed_at else ""),
             f"model: {knobs}"]
    if changed:
        lines.append(f"set: {changed}")
    if data:
        lines.append(data)
    if 0 < cfg.max_iters <= cfg.warmup_iters:
        lines.append(f"warmup: --max_iters={cfg.max_iters} <= --warmup_iters={cfg.warmup_iters}, "
                     f"so the run never leaves its warmup: the learning rate ends at "
                     f"{get_lr(cfg.max_iters - 1, cfg):.3g}, short of --learning_rate="
                     f"{cfg.learning_rate:g}")
    return "\n".join(lines)


# ---- stopping on a signal ----------------------------------------------------------------------

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # a scheduler, SLURM's --signal, Ctrl-C


class Stop:
    """A request to stop. The signal handler only records the signal; the training loop ends
    its step, checkpoints it and exits with 128 + the signal's number. Repeats change nothing (a
    scheduler signals every process, and torchrun forwards the signal once more), except a
    second Ctrl-C in a single process outside a checkpoint write: it stops at once, as Ctrl-C
    did before.

    Under torchrun a signal may reach the processes in different steps, or reach one only. They
    all-reduce their signals (MAX) every step and act on the previous step's result, so all stop
    after the same step and one checkpoint is written. Reading the result a step late costs a
    GPU no host sync: it waits on a copy to pinned memory that the GPU made a step ago, where
    reading this step's result would stall the host on the GPU every step."""

    def __init__(self, device, ddp):
        self.ddp = ddp
        self.signum = 0  # the first signal, 0 while there is none
        self.writing = False
        self.previous = {}
        if ddp:
            cuda = str(device).startswith("cuda")
            self.vote = torch.zeros(1, dtype=torch.int32, device=device)
            self.result = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)
            self.copied = torch.cuda.Event() if cuda else None
            self.voted = False

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets the main thread alone set handlers
        for name in STOP_SIGNALS:
            if hasattr(signal, name):  # Windows has no SIGUSR1
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self.handle)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def ignore(self):
        """A stopped process ignores the signals while it exits: Python's shutdown puts their
        default (death) back, and torchrun's own SIGTERM, late, would change the exit status."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)

    def handle(self, signum, frame):
        again = self.signum != 0
        self.signum = self.signum or signum
        if again and signum == signal.SIGINT and not self.ddp and not self.writing:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def shield(self):
        """A checkpoint write: no signal interrupts it (a second Ctrl-C waits for its end)."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def agreed(self):
        """The signal on which every process stops after this step, or 0; every process asks
        once a step."""
        if not self.ddp:
            return self.signum
        import torch.distributed as dist
        last = 0
        if self.voted:
            if self.copied is not None:
                self.copied.synchronize()
            last = int(self.result.item())
        self.vote.fill_(self.signum)
        dist.all_reduce(self.vote, op=dist.ReduceOp.MAX)
        self.result.copy_(self.vote, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.voted = True
        return last


def init_group(backend):
    """The process group, with keys of its own in torchrun's store for each restart of the
    group: torchrun keeps one store across restarts, where a restarted process can read the
    address of a process that is gone and fail to connect (pytorch/pytorch#135712)."""
    import torch.distributed as dist
    store, rank, world = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"restart{restart}", store),
                            rank=rank, world_size=world)


def lost_peer(e):
    """A collective that failed because another process of the group ended: gloo names the
    closed connection, NCCL raises DistBackendError."""
    import torch.distributed as dist
    return isinstance(e, dist.DistBackendError) or "by peer" in str(e)


def all_rng_states(device, ddp, world):
    """Every process's RNG states, so that a resume continues each one. Under torchrun a
    collective: every process calls it at the same iteration."""
    if not ddp:
        return [rng_state(device)]
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, rng_state(device))
    return states


def main(argv=None):
    flags = flag_names(sys.argv[1:] if argv is None else argv)
    cfg, explicit = parse("train.py", OPTIONS, argv, __doc__,
                          together=lambda c, e: together(c, e, flags))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = None
    mode = cfg.init_from
    if mode == "auto":  # a requeued job's command: go on with the run out_dir holds, or start
        mode, why = start_mode(cfg.out_dir)
        if why:
            die(why)
    if mode == "resume":
        ckpt = load_checkpoint(ckpt_path)
        resume_options(cfg, explicit, ckpt)
    elif os.path.isfile(ckpt_path) and not cfg.overwrite:
        die(f"{cfg.out_dir} already holds a run; continue it with --init_from=resume, choose "
            f"another --out_dir, or replace it with --overwrite=True")
    if "max_iters" in flags and "epochs" not in flags:  # over a preset's or the run's epochs
        cfg.epochs = 0.0
    options = vars(cfg).copy()  # as given ("auto" stays "auto"), for the log and resume

    # ---- where it runs: one process, or one per GPU under torchrun (which sets RANK) ----
    ddp = "RANK" in os.environ
    rank, world, local_rank = 0, 1, 0
    cfg.device = device_or_exit(cfg.device)
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        cfg.device, why = ddp_device(cfg.device, local_rank)
        if why:
            die(why)
    master = rank == 0
    my_micro_batches, why = micro_batches(cfg.batch_size, cfg.gradient_accumulation_steps,
                                          world, rank)
    if why:
        die(why)
    dev = cfg.device.split(":")[0]
    cfg.dtype = pick_dtype(cfg.device, cfg.dtype)
    cfg.compile = dev == "cuda" if cfg.compile == "auto" else cfg.compile == "True"
    keep_freed_memory()
    if dev == "cuda":
        torch.cuda.set_device(cfg.device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for float32 matmuls, as nanoGPT
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        init_group("nccl" if dev == "cuda" else "gloo")

    # ---- data ----
    data, meta = load_data(cfg.data_dir, cfg.dataset, cfg.block_size)
    if ckpt and ckpt["config"]["vocab_size"] != meta["vocab_size"]:
        die(f"the checkpoint's vocab_size {ckpt['config']['vocab_size']} does not match "
            f"{os.path.join(cfg.data_dir, cfg.dataset)}/meta.json's {meta['vocab_size']}: was "
            f"the dataset prepared again differently?")
    count = n_windows(len(data["train"]), cfg.block_size, cfg.stride)
    if cfg.epochs > 0:  # the log and checkpoint hold the steps the run takes
        cfg.max_iters = options["max_iters"] = epoch_steps(
            cfg.epochs, count, cfg.batch_size * cfg.gradient_accumulation_steps)
    run_config = options | {"vocab_size": meta["vocab_size"], "world_size": world,
                            "resolved": {"device": cfg.device, "dtype": cfg.dtype,
                                         "compile": cfg.compile,
                                         "data_dir": os.path.abspath(cfg.data_dir)}}

    def batch(split, seed):
        return get_batch(data[split], cfg.batch_size, cfg.block_size, seed, cfg.device)

    def train_batch(iter_num, micro):
        """Micro-batch `micro` of step iter_num: a function of (seed, step, micro) alone."""
        if cfg.sampling == "windows":
            return batch("train", train_seed(cfg.seed, iter_num, micro))
        first = first_sample(iter_num, micro, cfg.batch_size, cfg.gradient_accumulation_steps)
        starts = epoch_starts(count, cfg.stride, cfg.seed, first, cfg.batch_size)
        return windows_batch(data["train"], starts, cfg.block_size, cfg.device)

    # ---- model and optimizer ----
    torch.manual_seed(cfg.seed + rank)
    if ckpt:
        model = model_from_checkpoint(ckpt, cfg.device).train()
    else:
        model = LoopedGPT(model_config(run_config)).to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), dev, cfg.weight_decay_on)
    scaler = torch.amp.GradScaler(dev, enabled=cfg.dtype == "float16")
    iter_num = 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt["iter_num"]
        rngs = ckpt["rng"]
        if isinstance(rngs, list) and len(rngs) == world:  # one state per process
            set_rng_state(rngs[rank], cfg.device)
        elif isinstance(rngs, list):
            tqdm.write(f"warning: the run had {len(rngs)} processes, now {world}: dropout "
                       f"masks after the resume differ from an uninterrupted run")
            set_rng_state(rngs[rank % len(rngs)], cfg.device)
        else:  # a checkpoint from before per-process RNG states: the CPU's only
            torch.set_rng_state(rngs)
    raw_model = model
    if cfg.compile:  # compile the module, then wrap it in DDP, as PyTorch's docs advise
        model.compile()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if dev == "cuda" else None)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    trained = raw_model.config.trained_loops()

    if master:  # the folder is checked and locked before anything in it is touched
        writable_folder(cfg.out_dir)
        lock_folder(cfg.out_dir)
        remove_stale_temps(ckpt_path)  # a SIGKILL mid-write left it; the lock says it is stale
        try:
            if ckpt:
                resume_log(log_path, ckpt)
            else:
                open(log_path, "w").close()
        except OSError as e:
            die(disk_error(e, log_path, "nothing else was changed"))
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size
    t_start = t_last = time.time()
    iter_last = iter_num
    if ckpt and "since_eval" in ckpt:  # a stop between evaluations: the next throughput counts
        iter_last = ckpt["since_eval"][0]  # the steps before the stop, not the time away
        t_last -= ckpt["since_eval"][1]
    elapsed0 = ckpt["elapsed"] if ckpt else 0.0
    warned_fp16 = False
    skipped = ckpt.get("skipped_steps", 0) if ckpt else 0
    stop = Stop(cfg.device, ddp)

    def save(rngs, elapsed, since, entry=None):
        """Checkpoint iteration iter_num atomically, with all a resume needs to go on exactly:
        an evaluation's checkpoint carries its log entry, a stop's none. `since`: the iteration
        and seconds ago the throughput was last measured."""
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rngs, "iter_num": iter_num,
                 "config": run_config, "meta": meta, "elapsed": elapsed,
                 "skipped_steps": skipped, "since_eval": since}
        if entry is not None:
            state["log_entry"] = entry
        with stop.shield():
            atomic_save(state, ckpt_path)

    # ---- the training loop ----
    saved_at = ckpt["iter_num"] if ckpt else None  # the last checkpoint
    # the iteration whose evaluation the log holds already: a stop's checkpoint was not
    # evaluated, so its iteration is evaluated now, when due
    logged_at = ckpt["iter_num"] if ckpt and "log_entry" in ckpt else None
    stop_signal = 0  # the signal every process agreed, after the last step, to stop on
    stop.install()
    bar = None
    try:
        if master:
            print(banner(raw_model, cfg, world, iter_num if ckpt else 0,
                         data_line(cfg, len(data["train"]), count)), flush=True)
            if dev == "cpu" and raw_model.get_num_params() > 10e6:
                print("note: a model this size trains slowly on a CPU; the CPU demo is "
                      "python train.py config/cpu.py")
        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", unit="it",
                   disable=not master, dynamic_ncols=True)
        while True:
            # a signal: checkpoint this iteration, before its evaluation (a grace period is
            # short), and exit; every process is here at the same iteration
            if stop_signal:
                rngs = all_rng_states(cfg.device, ddp, world)
                bar.close()
                if master:  # one checkpoint, by one process
                    try:
                        save(rngs, elapsed0 + time.time() - t_start,
                             [iter_last, time.time() - t_last])
                    except OSError as e:
                        die(disk_error(e, ckpt_path, f"the checkpoint of iter {saved_at} and "
                                                     f"the log are kept; free space, then "
                                                     f"resume"))
                    launch = "torchrun ... train.py" if ddp else "python train.py"
                    print(f"stopped by {signal.Signals(stop_signal).name}: the checkpoint of "
                          f"iter {iter_num} is written; resume with: {launch} --init_from=resume "
                          f"--out_dir={cfg.out_dir} (or run the same command with "
                          f"--init_from=auto)", file=sys.stderr)
                if ddp:  # the others wait for the write: torchrun ends the group when one ends
                    import torch.distributed as dist
                    dist.barrier()
                    dist.destroy_process_group()
                stop.ignore()
                sys.exit(128 + stop_signal)

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # every eval_interval: evaluate, checkpoint (finite models only), then log. A kill
            # between the two is repaired on resume. Not at the iteration a resume starts
            # from when the log holds it already.
            due = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
            due = due and iter_num != logged_at
            if due:
                rngs = all_rng_states(cfg.device, ddp, world)
            if master and due:
                ev = {k: v.tolist() for k, v in evaluate(raw_model, batch, cfg.eval_iters,
                                                          cfg.dtype).items()}
                seconds = max(1e-9, time.time() - t_last)
                tokens_per_sec = tokens_per_iter * (iter_num - iter_last) / seconds
                values = ev["train_loop_ce"] + ev["val_loop_ce"] + ev["hidden_norm"]
                if not all(map(math.isfinite, values)):
                    die(nonfinite_message(iter_num, ev["val_loop_ce"], ev["hidden_norm"],
                                          range(1, len(ev["val_loop_ce"]) + 1), ckpt_path))
                if not warned_fp16 and cfg.dtype == "float16":
                    warning = fp16_warning(ev["hidden_norm"], cfg.n_embd)
                    if warning:
                        tqdm.write(warning)
                        warned_fp16 = True
                elapsed = elapsed0 + time.time() - t_start
                entry = {"iter": iter_num, "lr": lr, **ev, "tokens_per_sec": tokens_per_sec,
                         "elapsed": elapsed, "skipped_steps": skipped, "config": run_config}
                try:  # the checkpoint carries its log entry: a kill between the two loses none
                    save(rngs, elapsed, [iter_num, 0.0], entry)
                    saved_at = iter_num
                    append_log(log_path, entry)
                except OSError as e:
                    path = log_path if saved_at == iter_num else ckpt_path
                    die(disk_error(e, path, f"the checkpoint of iter {saved_at} and the log "
                                            f"before it are kept; free space, then resume"))
                ces = " ".join(f"{c:.3f}" for c in ev["val_loop_ce"])
                norms = " ".join(f"{n:.3g}" for n in ev["hidden_norm"])
                tqdm.write(f"iter {iter_num}: val CE per loop {ces} | ||h_k|| {norms} | "
                           f"{tokens_per_sec:,.0f} tok/s")
                t_last, iter_last = time.time(), iter_num
            if iter_num >= cfg.max_iters:
                break

            # one optimizer step over this process's micro-batches; in training mode the model
            # decodes only the exits its loss trains
            for i, (micro, rows) in enumerate(my_micro_batches):
                X, Y = train_batch(iter_num, micro)
                if ddp:  # all-reduce the gradients on the last micro-batch only
                    model.require_backward_grad_sync = i == len(my_micro_batches) - 1
                with autocast(cfg.device, cfg.dtype):
                    _, loss, stats = model(X[rows], Y[rows], return_logits=False)
                scaler.scale(loss / len(my_micro_batches)).backward()
            scaler.unscale_(optimizer)  # a no-op without float16's scaler
            if cfg.skip_nonfinite:
                # decided on the all-reduced gradient, which every process shares: all skip or
                # none does (a rank's own loss would let the processes drift apart)
                norm = grad_norm(params)
                step_ok = bool(torch.isfinite(norm))  # a host sync, only when asked for
            else:
                step_ok = True
            if step_ok:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                skipped += 1
                scaler.update()
                if master:
                    tqdm.write(f"warning: non-finite gradient at iter {iter_num}; step skipped "
                               f"({skipped} so far)")
            optimizer.zero_grad(set_to_none=True)
            if iter_num % cfg.log_interval == 0 and master:  # the only host sync of the step
                lossf = loss.item()
                norms = stats["hidden_norm"].float().tolist()
                if not math.isfinite(lossf) and not cfg.skip_nonfinite:
                    die(nonfinite_message(iter_num, stats["loop_ce"].float().tolist(), norms,
                                          trained, ckpt_path))
                bar.set_postfix(loss=f"{lossf:.4f}", h_K=f"{norms[-1]:.3g}", lr=f"{lr:.2e}")
            iter_num += 1
            bar.update(1)
            stop_signal = stop.agreed()
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, say where to pick up
        if bar is not None:
            bar.close()
        if master:
            kept = (f"the checkpoint of iter {saved_at} is kept; resume with: python train.py "
                    f"--init_from=resume --out_dir={cfg.out_dir}" if saved_at is not None
                    else "no checkpoint was written yet")
            print(f"\ninterrupted at iter {iter_num}: {kept}", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:  # under torchrun: a collective whose peer is gone (gloo's error)
        if not (ddp and lost_peer(e)):
            raise
        die(f"a collective failed at iter {iter_num} ({type(e).__name__}): another process of "
            f"the group has ended or hangs; torchrun --max-restarts=N restarts the group, and "
            f"--init_from=auto resumes it from the last checkpoint")
    finally:  # a stopped process ignores the signals to its end (Stop.ignore)
        if not stop_signal:
            stop.restore()
    bar.close()
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
