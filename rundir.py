"""
The run folder and the data it trains on: what train.py writes and eval.py, sample.py and
plot_norms.py read.

  out_dir/ckpt.pt      model, optimizer, RNG states, iteration, the run's config and meta.json
  out_dir/log.jsonl    one JSON line per evaluation, appended
  out_dir/eval.json    eval.py's results
  data_dir/<dataset>/  train.bin, val.bin (token ids) and meta.json, from prepare.py

Every write is atomic (a kill leaves the old file or the new one, never half of one), and every
failure a user can meet (no data, a foreign checkpoint) ends in one line that says what to do.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from model import LoopedGPT, LoopedGPTConfig


def die(msg):
    """A failure found while working (missing data, bad checkpoint): one line, exit status 1."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---- atomic writes ---------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save to a temp file, fsync, rename: a kill at any moment leaves the old or new file.
    The temp name carries the process id, so two writers never share one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    survives a resume and is the same for every run with the same seed. Both land on `device`."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=g).tolist()
    xy = torch.from_numpy(np.stack([d[i:i + block_size + 1] for i in ix]).astype(np.int64))
    if str(device).startswith("cuda"):  # pinned memory: the copy overlaps the GPU's work
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def eval_seed(i, split):
    """Evaluation uses the same batches every time (and in eval.py), so curves are not noise."""
    return 10**9 + 7919 * i + (split == "val")
