"""
A stand-in accelerator, for proving device correctness on a machine without a GPU.

Inside `standin("cuda")` or `standin("mps")` the device to use is torch's `meta` device: its
tensors have a shape and a dtype but no values, so a model "on the GPU" runs its forward and
backward on any machine, in no time. On top of meta, the stand-in refuses what the real device
refuses:
  - any op that mixes a device tensor with a CPU tensor (other than a 0-d scalar, or an index
    into a device tensor), as CUDA and MPS do; meta alone lets some through (embedding, matmul)
  - CPU-only ops (torch.histogram) on a device tensor
  - float64 on mps (Apple's GPUs have none)
Values cannot be read (.item(), .tolist() and bool(t) raise), so the tests drive the tensor paths
of each script: batching, a training step, evaluation and every diagnostic, generation.

(FakeTensorMode can label tensors 'cuda' or 'mps', but a CPU-only build of torch aborts the
process on the first op that needs the device's guard, such as an embedding: meta is the
stand-in that runs.)
"""

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

DEVICE = "meta"  # what the code under test is given as its device
CPU_ONLY = {torch.histogram, torch.histogramdd, torch.Tensor.histogram, torch.Tensor.numpy}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
# moving or re-labelling a tensor may cross devices; computing may not
TRANSFERS = {"to", "cpu", "cuda", "copy_", "set_", "__get__", "__set__", "type",
             "_has_compatible_shallow_copy_type"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class _Rules(TorchFunctionMode):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        checked = (args, kwargs)
        if func in INDEXING:  # a CPU index into a device tensor is allowed, as on CUDA
            checked = (args[0], args[2:])
        tensors = list(_tensors(checked))
        on_device = [t for t in tensors if t.device.type == DEVICE]
        if on_device and getattr(func, "__name__", "") not in TRANSFERS:
            mixed = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if mixed:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found "
                                   f"at least two devices, {self.kind} and cpu! ({func.__name__})")
            if func in CPU_ONLY:
                raise NotImplementedError(f"{func.__name__} runs on the CPU only; its input is "
                                          f"on {self.kind}")
        out = func(*args, **kwargs)
        if self.kind == "mps":
            for t in _tensors(out):
                if t.device.type == DEVICE and t.dtype == torch.float64:
                    raise TypeError(f"Cannot convert a MPS Tensor to float64 dtype as the MPS "
                                    f"framework doesn't support float64 ({func.__name__})")
        return out


@contextmanager
def standin(kind):
    """Run the block with `kind`'s ('cuda' or 'mps') rules; pass DEVICE as the device."""
    assert kind in ("cuda", "mps"), kind
    with _Rules(kind):
        yield DEVICE
