"""
The run folder and the data it trains on: what train.py writes and eval.py, sample.py and
plot_norms.py read.

  out_dir/ckpt.pt      model, optimizer, RNG states, iteration, the run's config and meta.json
                       (at an evaluation, with its log entry; or where a signal stopped the run)
  out_dir/log.jsonl    one JSON line per evaluation, appended
  out_dir/eval.json    eval.py's results
  data_dir/<dataset>/  train.bin, val.bin (token ids) and meta.json, from prepare.py

Every write is atomic (a kill or a full disk leaves the old file or the new one, never half of
one), and every failure a user can meet (no data, damaged files, a foreign checkpoint, a folder
that cannot be written, a second run in the same folder) ends in one line that says what to do.

Test hook: NANOLOOP_TEST_SAVE_DELAY=SECONDS makes every checkpoint write pause that long with its
temp file half written, so that a test can signal or kill a real train.py in the middle of one.
"""

import errno
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model import LoopedGPT, LoopedGPTConfig


def die(msg):
    """A failure found while working (missing data, bad checkpoint): one line, exit status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- the folder and atomic writes ------------------------------------------------------------

def writable_folder(folder, flag="--out_dir"):
    """Make sure `folder` exists and takes a new file, before anything in it is touched."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        die(f"{flag}={folder} is a file, not a folder; choose a folder")
    probe = os.path.join(folder, f".write_test.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to {flag}={folder} ({e.strerror}); choose a writable folder")


def writable_parent(path, flag):
    """An output file's folder must exist and take files (checked before the work, not after)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        die(f"{flag}={path}: the folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK):
        die(f"{flag}={path}: the folder {folder} is not writable; choose another")


_locks = {}  # folder -> its open lock file: a lock lasts as long as the process


def lock_folder(folder, what="train.py"):
    """One run per folder: an exclusive lock on folder/.lock, which the OS drops when the process
    ends, however it ends (a killed run never leaves it stuck). A process may take its own lock
    again (tests call train.main twice)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; run one process per folder
        return
    key = os.path.realpath(folder)
    if key in _locks:
        return
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        die(f"{folder} is in use by {holder}; wait for it to finish, or use another --out_dir")
    f.seek(0)
    f.truncate()
    f.write(f"{what} (pid {os.getpid()})")
    f.flush()
    _locks[key] = f


def _atomic_write(path, write, mode):
    """write(f) into a temp file beside `path`, fsync, rename over `path`. A kill or a full disk
    at any moment leaves the old file whole; the temp file (named by process id, so two writers
    never share one) is removed on failure."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _WriteErrors:
    """A file that remembers the OSError of a failed write: torch.save's zip writer reports a
    full disk as a RuntimeError about file positions, and the real cause would be lost."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def atomic_save(obj, path):
    def save(f):
        recorder = _WriteErrors(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error:
                raise recorder.error from None
            raise
        time.sleep(float(os.environ.get("NANOLOOP_TEST_SAVE_DELAY", 0)))  # the test hook
    _atomic_write(path, save, "wb")


def remove_stale_temps(path):
    """Remove the temp files a kill left beside `path` (a SIGKILL mid-write cannot clean up).
    Call it only while holding the folder's lock: then no other writer of `path` is alive."""
    for tmp in Path(path).parent.glob(f"{Path(path).name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), "w")


def disk_error(e, path, kept):
    """One line for a failed write: what failed, why, and what was kept."""
    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
    return f"could not write {path} ({why}); {kept}"


# ---- the checkpoint --------------------------------------------------------------------------

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


MODEL_KEYS = list(LoopedGPTConfig.__dataclass_fields__)


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


# ---- the log ---------------------------------------------------------------------------------

def append_log(path, entry):
    """One line per evaluation, appended whole and fsynced. If the write fails part-way (a full
    disk), the file is cut back to where it was: no torn line, nothing earlier lost."""
    line = (json.dumps(entry) + "\n").encode()
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def read_log(path):
    """The entries of a log.jsonl; lines that are not an entry (blank, hand-edited, a torn tail
    from a kill mid-write) are skipped, never a reason to drop the lines after them."""
    entries = []
    with open(path, "rb") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("iter"), int):
                entries.append(entry)
    return entries


def resume_log(path, ckpt):
    """On resume, the log gets what it lacks and loses nothing. An evaluation's checkpoint
    carries its own log entry (the checkpoint is written first): when a kill came between the
    two, that entry is appended now, with its real throughput. A stop's checkpoint carries none:
    the resumed run evaluates its iteration, when due, before its first step. A torn last line
    (a kill mid-write) is completed with a newline so the next entry starts on a line of its
    own."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    logged = {e["iter"] for e in read_log(path)} if os.path.isfile(path) else set()
    if ckpt["iter_num"] not in logged and "log_entry" in ckpt:
        append_log(path, ckpt["log_entry"])


def start_mode(out_dir):
    """--init_from=auto, so that a requeued job's unchanged command goes on by itself: 'resume'
    when out_dir holds a checkpoint; 'scratch' when it holds no run (no folder, no log, or a
    log without an entry: a run stopped before its first checkpoint, which lost nothing).
    Returns (mode, None), or (None, why) for a log with entries but no checkpoint."""
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        return "resume", None
    log = os.path.join(out_dir, "log.jsonl")
    entries = read_log(log) if os.path.isfile(log) else []
    if not entries:
        return "scratch", None
    evaluations = f"{len(entries)} evaluation" + "s" * (len(entries) != 1)
    return None, (f"--init_from=auto: {out_dir} holds a log of {evaluations} (the last at iter "
                  f"{entries[-1]['iter']}) but no ckpt.pt; put the checkpoint back to resume, or "
                  f"use another --out_dir (--init_from=scratch would replace the log)")


# ---- the data --------------------------------------------------------------------------------

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
        if Path(data_dir) != Path("data"):  # prepare.py writes under data/ unless told
            cmd += f" --data_dir={data_dir}"
        die(f"no data in {path}/ (train.bin, meta.json); make it with: {cmd}")
    redo = f"prepare it again (python prepare.py ... --name={dataset})"
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except (ValueError, OSError) as e:
        die(f"{path}/meta.json is damaged ({type(e).__name__}); {redo}")
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        die(f"{path}/meta.json lacks {', '.join(missing)}; {redo}")
    vocab_key = {"char": "chars", "word": "words"}.get(meta["tokenizer"])
    if vocab_key and len(meta.get(vocab_key) or ()) != meta["vocab_size"]:
        die(f"{path}/meta.json's {vocab_key} do not match its vocab_size; {redo}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    data = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        size = file.stat().st_size if file.is_file() else 0
        if size % itemsize or size // itemsize != meta[f"{split}_tokens"]:
            die(f"{file} holds {size} bytes, but meta.json says {meta[f'{split}_tokens']} tokens "
                f"of {itemsize} bytes: the files do not belong together (a cut or interrupted "
                f"prepare?); {redo}")
        if size // itemsize <= block_size + 1:
            die(f"{file} has {size // itemsize} tokens, too few for --block_size={block_size}")
        data[split] = np.memmap(file, dtype=meta["dtype"], mode="r")
    return data, meta


def get_batch(d, batch_size, block_size, seed, device="cpu"):
    """Inputs and next-token targets at positions drawn from `seed` alone, so the data order
    survives a resume and is the same for every run with the same seed. Both land on `device`."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=g).tolist()
    return windows_batch(d, ix, block_size, device)


def n_windows(n_tokens, block_size, stride):
    """How many windows of block_size + 1 tokens start at 0, stride, 2 x stride, ... and fit in
    n_tokens (the last start is n_tokens - block_size - 1 at most)."""
    return (n_tokens - block_size - 1) // stride + 1


@functools.lru_cache(maxsize=2)  # a batch reads one epoch's order, or two where it straddles
def epoch_order(count, seed, epoch):
    """The order in which epoch `epoch` visits window indices 0..count-1: a permutation drawn
    from (seed, epoch) alone. Read-only (it is cached)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    return torch.randperm(count, generator=g)


def epoch_starts(count, stride, seed, first, size):
    """The window starts of samples first .. first + size - 1 of the epoch stream: the epochs
    one after another, each a permutation of every window, so sample s is position
    s % count of epoch s // count. A pure function of its arguments: any process, before or
    after a resume, gets the same windows for the same samples."""
    starts = []
    for s in range(first, first + size):
        epoch, position = divmod(s, count)
        starts.append(int(epoch_order(count, seed, epoch)[position]) * stride)
    return starts


def windows_batch(d, starts, block_size, device="cpu"):
    """Inputs and next-token targets of the windows that begin at `starts`, on `device`."""
    xy = torch.from_numpy(np.stack([d[i:i + block_size + 1] for i in starts]).astype(np.int64))
    if str(device).startswith("cuda"):  # pinned memory: the copy overlaps the GPU's work
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def eval_seed(i, split):
    """Evaluation uses the same batches every time (and in eval.py), so curves are not noise."""
    return 10**9 + 7919 * i + (split == "val")
