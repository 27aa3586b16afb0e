"""What one call costs, counted without a GPU: Triton kernel launches, the other tensor ops, host reads of
tensor values, and the peak bytes of tensors made during the call (docs/design.md, "Cost budgets").

`measure(fn)` runs fn() once under three hooks and returns a `Costs`:
- a TorchDispatchMode sees every aten op, inside torch.library custom ops too (it re-enters their Python
  implementation under itself: a mode is otherwise blind below the op it intercepts). It counts the ops
  and, of them, those that compute (not views, allocations or no-op casts: each a kernel on a GPU), the
  host reads that reach the dispatcher (`_local_scalar_dense`, behind .item(), bool(), int() and
  float(); `equal`; a copy from a device to the CPU), and tracks the storage of every tensor the call
  creates: bytes alive now, and the peak.
- a TorchFunctionMode sees the reads that never reach the dispatcher (.tolist(), .numpy()).
- a launch hook counts Triton launches: the interpreter's kernel entry on CPU, Triton's launch hook on a
  GPU. What the interpreter does inside a launch (copies to numpy and back) is not counted: it has no
  counterpart on a GPU.

A read of a tensor's values on the host is a device sync when the tensor lives on a GPU; on a CPU it is
free, but it is the same line of code, so the budgets count every read and say which ones are allowed.
Tensors alive before the call (inputs, parameters, cached constant tables) are not counted; a storage
counts from the op that made it until Python drops its last reference.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
import weakref
from dataclasses import dataclass, field

import torch
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result is a host value read from a tensor. Inside a custom op the mode sees composite ops
# (item, is_nonzero) before they decompose; outside, their decomposition (_local_scalar_dense).
READ_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
READ_METHODS = {"tolist", "numpy"}  # reads that do not reach the dispatcher
LIFTS = {"aten::lift_fresh", "aten::lift", "aten::lift_fresh_copy"}  # torch.tensor(...) made outside dispatch
ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided", "aten::new_empty_strided"}


@dataclass
class Costs:
    launches: int = 0  # Triton kernel launches
    ops: int = 0  # aten ops, custom ops' insides included, the custom ops themselves and launches excluded
    kernels: int = 0  # of those, the ops that compute: not views, allocations or no-op casts (on a GPU, kernels)
    reads: list[str] = field(default_factory=list)  # each host read of tensor values: where it happened
    peak_bytes: int = 0  # most bytes alive at once in storages made during the call
    live_bytes: int = 0  # bytes still alive when the call returned (gradients, outputs, caches)
    custom_ops: list[str] = field(default_factory=list)  # the custom ops entered, in order

    def __str__(self) -> str:
        return (f"{self.launches} launches, {self.ops} ops ({self.kernels} computing), {len(self.reads)} host reads, "
                f"peak {self.peak_bytes} B, {self.live_bytes} B alive after")


def _site() -> str:
    """The innermost frame of fastpair's own code: where a read happened."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/fastpair/" in frame.filename or "/kernels/" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} " \
                   f"{frame.name}: {frame.line}"
    return "outside fastpair"


def _tensors(tree):
    for value in tree:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())


class _Counter:
    def __init__(self):
        self.costs = Costs()
        self.tracked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.host_copies: weakref.WeakSet = weakref.WeakSet()  # storages a device-to-host copy made
        self.paused = 0  # > 0 inside a Triton launch
        self.dispatch = _Dispatch(self)
        self.function = _Function(self)

    def read(self, tensor: torch.Tensor | None = None) -> None:
        """One host read, unless it reads a host copy already counted (x.cpu().tolist() is one sync)."""
        if self.paused or (tensor is not None and tensor.untyped_storage() in self.host_copies):
            return
        self.costs.reads.append(_site())

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.tracked or storage.nbytes() == 0:
            return
        size = storage.nbytes()
        self.tracked[storage] = size
        self.costs.live_bytes += size
        self.costs.peak_bytes = max(self.costs.peak_bytes, self.costs.live_bytes)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.costs.live_bytes -= size


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        name = func._schema.name
        if name in OPDEFS:  # a torch.library custom op: run its Python body under the hooks, so its insides count
            counter.costs.custom_ops.append(name)
            with counter.function, self:
                out = OPDEFS[name]._init_fn(*args, **kwargs)
            for t in _tensors([out]):
                counter.track(t)
            return out
        if counter.paused:
            return func(*args, **kwargs)
        counter.costs.ops += 1
        tensors_in = list(_tensors([args, kwargs]))
        if name in READ_OPS:
            counter.read(tensors_in[0])
        inputs = set() if name in LIFTS else {id(t.untyped_storage()) for t in tensors_in}
        out = func(*args, **kwargs)
        if _to_host(tensors_in, out):
            counter.read()
            counter.host_copies.update(t.untyped_storage() for t in _tensors([out]))
        fresh = [t for t in _tensors([out]) if id(t.untyped_storage()) not in inputs]
        for t in fresh:  # a view or an in-place result is not a new tensor
            counter.track(t)
        # a view-like op (x.to(its own dtype), reshape of a contiguous x) computes only when it copies
        computes = bool(fresh) if func.is_view else name not in ALLOCATIONS | READ_OPS
        counter.costs.kernels += computes
        return out


def _to_host(inputs, out) -> bool:
    """An op that takes a GPU tensor and gives a CPU one: a copy to the host, which waits for the GPU."""
    outs = list(_tensors([out]))
    return (any(t.device.type != "cpu" for t in inputs) and bool(outs)
            and all(t.device.type == "cpu" for t in outs))


class _Function(TorchFunctionMode):
    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READ_METHODS:
            self.counter.read(args[0])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _launch_hook(counter: _Counter):
    """Count Triton launches: the interpreter's entry point on CPU; Triton's launch hook on a GPU."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing can launch
        yield
        return
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if kwargs.get("warmup"):
            return original(self, *args, **kwargs)
        counter.costs.launches += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    def on_launch(_metadata):
        counter.costs.launches += 1

    interpreter.InterpretedFunction.run = run
    with _gpu_launch_hook(triton, on_launch):
        try:
            yield
        finally:
            interpreter.InterpretedFunction.run = original


@contextlib.contextmanager
def _gpu_launch_hook(triton, hook):
    """Triton's own launch hook: a chain of hooks since Triton 3.4, one class attribute before."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            yield
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        return
    from triton.compiler import CompiledKernel

    previous, CompiledKernel.launch_enter_hook = CompiledKernel.launch_enter_hook, hook
    try:
        yield
    finally:
        CompiledKernel.launch_enter_hook = previous


def measure(fn) -> tuple[Costs, object]:
    """(the costs of fn(), its result). Run fn once before measuring when its first call compiles,
    autotunes or fills caches: those are one-time costs, not the call's."""
    counter = _Counter()
    with _launch_hook(counter), counter.function, counter.dispatch:
        result = fn()
    gc.collect()  # autograd keeps reference cycles (a custom op's context): what they hold is garbage now
    return counter.costs, result
