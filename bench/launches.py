"""The Triton launches fastpair's host code makes, captured on a machine without a GPU (for bench/compile.py).

`capture(case)` runs one forward and backward of the public function on small CPU tensors with the kernels (the
three tiled pairwise ones, GRAM's two, and the one-program kernels of every objective) replaced by recorders: a
launch is recorded (kernel, argument types and alignments, constexprs) and its outputs zero-filled instead of
computed. The host logic is the real one: the
launchers pick the dtypes, flags (HAS_MASK, BOUNDED, STATS, NEEDS_DT, ...), the input precision and, for the
untuned kernels (the input gradient, GRAM's), the tiles, exactly as they do on a GPU. What a capture cannot see,
the autotuner's choice, is enumerated in `configs`: the candidates the autotuner's pruning leaves for an
architecture at every N bucket (1 .. 2^20). N is never specialized (do_not_specialize), so a capture at a small N
stands for every N; D is, through the D bucket (BLOCK_K) and the input gradient's row length, so cases name their
D.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from unittest import mock

import fastpair.kernels
import torch
from fastpair.kernels import gram_jit, gram_ops, gram_small, infonce_small, jit, launch, sigmoid_small, small, tuning
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

import fastpair

CAPTURE_N = 64  # rows of a capture: small, since N does not change a compilation (see the module docstring)
N_BUCKETS = tuple(2**i for i in range(21))  # the autotuner's N keys from N = 1 to 2^20
TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
OUTPUTS = {  # what a recorder zero-fills, so that the host code after a launch reads defined values
    "fwd_kernel": ("lse_ptr", "diag_ptr", "arg_ptr", "colsum_ptr"),
    "grad_panel_kernel": ("w_ptr", "sgs_ptr", "sgb_ptr"),
    "input_grad_kernel": ("out_ptr",),
    "gram_fwd_kernel": ("lse_ptr", "tgt_ptr", "best_ptr", "arg_ptr"),
    "gram_grad_kernel": ("g_ptr", "part_ptr", "wv_ptr"),
    "nce_small_kernel": ("loss_ptr", "pair_loss_ptr", "acc_ptr", "dz_ptr", "dt_ptr"),
    "sigmoid_small_kernel": ("loss_ptr", "pair_loss_ptr", "acc_ptr", "dz_ptr", "dt_ptr", "db_ptr"),
    "gram_small_kernel": ("loss_ptr", "pair_loss_ptr", "acc_ptr", "dz_ptr", "dt_ptr"),
}
SMALL_KERNELS = {"nce_small_kernel": infonce_small, "sigmoid_small_kernel": sigmoid_small,
                 "gram_small_kernel": gram_small}  # name -> its module
KERNELS = {name: getattr(jit, name, None) or getattr(gram_jit, name, None) or getattr(SMALL_KERNELS.get(name), name)
           for name in OUTPUTS}  # by name


@dataclass(frozen=True)
class Case:
    """One call of the public API, as the options that can change what the kernels compile to."""

    objective: str = "nce"  # "nce" (pairwise_nce), "sigmoid" (pairwise_sigmoid) or "gram" (gram_nce)
    dtype: str = "bfloat16"  # "bfloat16", "float16" or "float32"
    fp32: str = "none"  # torch.backends.cuda.matmul.fp32_precision for float32 inputs: "none", "tf32", "ieee"
    d: int = 512
    temperature: str = "number"  # "number" (1/t <= 60), "large" (1/t > 60), "tensor", "learned" (requires grad)
    normalize: bool = True
    mask: bool = False
    stats: bool = False
    deterministic: bool = False
    ids: bool = False
    m: int = 3  # modalities (GRAM: its kernels specialize on k = M - 1)
    n: int = 0  # rows: 0 for the tiled kernels (captured at CAPTURE_N, never specialized); N <= small.MAX_N for the
    # one-program kernels (kernels/small.py), which specialize on BLOCK_N = max(16, next power of 2)

    @property
    def label(self) -> str:
        precision = f"fp32/{self.fp32}" if self.dtype == "float32" else self.dtype
        flags = [f for f in ("mask", "stats", "deterministic", "ids") if getattr(self, f)]
        flags += [] if self.normalize else ["unnormalized"]
        flags += [] if self.m == 3 else [f"M={self.m}"]
        flags += [f"small N={self.n}"] if self.n else []
        return " ".join([self.objective, precision, f"D={self.d}", f"t={self.temperature}", *flags])


GRID = dict(objective=("nce", "sigmoid"), dtype=("bfloat16", "float16", "float32"), fp32=("none", "tf32", "ieee"),
            temperature=("number", "large", "tensor", "learned"), normalize=(True, False), mask=(False, True),
            stats=(False, True), deterministic=(False, True), ids=(False, True))
# Every D from 64 up compiles the tiled kernels alike (BLOCK_K = 64, rows padded to 16 elements): the grid runs
# at D = 512, and these the plain and the learned-temperature calls at other D, 100 being no multiple of 16.
OTHER_D = (64, 100, 1024)


def grid() -> list[Case]:
    """Every combination of GRID that is a distinct call (fp32_precision only matters for float32 inputs),
    then the other D."""
    cases = []
    for values in itertools.product(*GRID.values()):
        case = Case(**dict(zip(GRID, values)))
        if case.dtype != "float32" and case.fp32 != "none":
            continue
        cases.append(case)
    for d, objective, dtype, t in itertools.product(OTHER_D, GRID["objective"], GRID["dtype"], ("number", "learned")):
        cases.append(Case(objective=objective, dtype=dtype, d=d, temperature=t))
    return cases + gram_grid() + small_grid()


def small_grid() -> list[Case]:
    """The one-program kernels' calls (N <= 64): every objective (GRAM at every k), BLOCK_N and input precision,
    each plain (numbers) and with the most work (a learned temperature and bias, a mask, ids)."""
    precisions = [("bfloat16", "none"), ("float16", "none"), ("float32", "none"), ("float32", "tf32"),
                  ("float32", "ieee")]
    calls = [(objective, 3) for objective in GRID["objective"]] + [("gram", m) for m in (2, 3, 4)]
    return [Case(objective=objective, m=m, dtype=dtype, fp32=fp32, n=n, **flags)
            for objective, m in calls for n in (16, 32, small.MAX_N) for dtype, fp32 in precisions
            for flags in (dict(), dict(temperature="learned", mask=True, ids=True))]


def gram_grid() -> list[Case]:
    """gram_nce's calls: its kernels specialize on k (M = 2, 3, 4), the precision, the mask, the targets and
    the statistics (the temperature is read on the device: a number and a tensor launch alike)."""
    cases = []
    for m, dtype, fp32, mask, stats, ids in itertools.product((2, 3, 4), GRID["dtype"], GRID["fp32"], (False, True),
                                                              (False, True), (False, True)):
        if dtype != "float32" and fp32 != "none":
            continue
        cases.append(Case(objective="gram", dtype=dtype, fp32=fp32, mask=mask, stats=stats, ids=ids, m=m))
    cases += [Case(objective="gram", dtype=dtype, d=d, temperature="learned")
              for d in OTHER_D for dtype in GRID["dtype"]]
    return cases


@dataclass(frozen=True)
class Variant:
    """One compilation of a kernel up to its tile configuration: what Triton's JIT would key it on."""

    kernel: str  # the @triton.jit function's name in fastpair.kernels.jit
    signature: tuple  # ((argument, type), ...): "*bf16", "i32", "constexpr", ...
    constexprs: tuple  # ((name, value), ...), the tiles excluded for autotuned kernels
    attrs: tuple  # ((argument index, ((attribute, value), ...)), ...): pointer and integer alignment
    tuned: bool  # launched through the autotuner (the tiles come from `configs`)
    elem_bytes: int  # the stacked inputs' element size (tuning.keep's shared-memory arithmetic)
    d_bucket: int

    @property
    def flags(self) -> dict:
        return dict(self.constexprs)

    @property
    def label(self) -> str:
        """The kernel, the input dtype, the flags that are set and the input precision, e.g.
        "fwd bf16 ieee BOUNDED ATOMIC_COLS"."""
        flags = self.flags
        on = [k for k, v in flags.items() if v is True]
        dtype = self.dtype
        precision = flags.get("INPUT_PRECISION", "")
        aligned = dict(self.attrs).get(self.stride_path)
        unaligned = "" if aligned else " D%16!=0"
        name = self.kernel.removesuffix("_kernel")
        ints = [f"{k}={flags[k]}" for k in ("K", "DIRECTION") if k in flags]  # GRAM's k and sweep direction
        return " ".join(x for x in (name, dtype, precision, *ints, *on) if x) + unaligned

    @property
    def dtype(self) -> str:
        """The inputs' dtype: the first argument's (z, dx or x_a, or the first of a tuple of modalities)."""
        first = self.signature[0][1]
        return (first[0] if isinstance(first, tuple) else first).lstrip("*")

    @property
    def stride_path(self) -> tuple:
        """The argument path of the inputs' row stride (the first modality's, for a tuple)."""
        if self.kernel in SMALL_KERNELS:
            return (self.arg_index("stride_zn"), 0)
        return (self.arg_index("stride_n" if self.tuned else "stride"),)

    def arg_index(self, name: str) -> int:
        return [a for a, _ in self.signature].index(name)


class _Recorder:
    """Stands in for a jit kernel or an autotuner: `rec[grid](*args, **kwargs)` records, runs nothing."""

    def __init__(self, fn, tuned: bool, sink: list):
        self.fn, self.tuned, self.sink = fn, tuned, sink

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        names = self.fn.arg_names
        if not args:  # a keyword launch (the one-program kernels): its arguments in the kernel's order
            args = tuple(kwargs.pop(name) for name in names if name in kwargs)
        for name, value in zip(names, args):
            if name in OUTPUTS[self.fn.__name__] and isinstance(value, torch.Tensor):
                value.zero_()
        self.sink.append(_variant(self.fn, self.tuned, args, kwargs))


_TARGET = GPUTarget("cuda", 90, 32)  # argument specialization is the same on every CUDA target


def _variant(fn, tuned: bool, args, kwargs) -> Variant:
    """The JIT's own specialization of these arguments (types, alignment attributes, constexprs)."""
    backend = make_backend(_TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    placeholder = {k: 16 for k in TILES} if tuned else {}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound, specialization, _ = binder(*args, **kwargs, **placeholder, debug=False)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs, **placeholder), bound, specialization, {})
    names = fn.arg_names
    # a constexpr inside a tuple argument (a modality's unit stride) is named "argument.index"
    named = {".".join([names[path[0]], *map(str, path[1:])]): value for path, value in constexprs.items()}
    if tuned:
        named = {k: v for k, v in named.items() if k not in TILES}
    else:
        named.update(options)
    z = args[0][0] if isinstance(args[0], tuple) else args[0]  # the inputs (a tuple of them: one per modality)
    d_bucket = tuning.buckets(1, args[names.index("D")])[1]
    return Variant(fn.__name__, tuple(signature.items()), tuple(sorted(named.items())),
                   tuple(sorted((path, tuple(map(tuple, a))) for path, a in attrs.items())), tuned,
                   z.element_size(), d_bucket)


@contextlib.contextmanager
def _recording(sink: list, one_program: bool):
    """The launchers' kernels replaced by recorders; CPU tensors accepted by backend="triton". one_program:
    N <= small.MAX_N takes the one-program kernels, as it does on a GPU; otherwise the tiled kernels at every N."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(fastpair.kernels, "interpreter", lambda: True))
        if not one_program:
            stack.enter_context(mock.patch.object(small, "MAX_N", 0))
        for name, module in SMALL_KERNELS.items():
            stack.enter_context(mock.patch.object(module, name, _Recorder(KERNELS[name], False, sink)))
        stack.enter_context(mock.patch.object(tuning, "fwd_tuned", _Recorder(jit.fwd_kernel, True, sink)))
        stack.enter_context(mock.patch.object(tuning, "panel_tuned", _Recorder(jit.grad_panel_kernel, True, sink)))
        stack.enter_context(mock.patch.object(launch, "input_grad_kernel",
                                              _Recorder(jit.input_grad_kernel, False, sink)))
        for name in ("gram_fwd_kernel", "gram_grad_kernel"):
            stack.enter_context(mock.patch.object(gram_ops, name, _Recorder(KERNELS[name], False, sink)))
        yield


@contextlib.contextmanager
def _fp32_precision(value: str):
    """torch.backends.cuda.matmul.fp32_precision set for the call ("none": torch's default)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = value
    try:
        yield
    finally:
        matmul.fp32_precision = before


@contextlib.contextmanager
def _deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _temperature(case: Case):
    t = 0.005 if case.temperature == "large" else 0.07
    if case.temperature in ("tensor", "learned"):
        return torch.tensor(t, requires_grad=case.temperature == "learned")
    return t


def capture(case: Case) -> list[Variant]:
    """The kernels one forward + backward of `case` launches, in launch order."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    n = case.n or CAPTURE_N
    zs = [torch.randn(n, case.d, generator=gen).to(dtype).requires_grad_() for _ in range(case.m)]
    kwargs = dict(temperature=_temperature(case), normalize=case.normalize, return_stats=case.stats,
                  backend="triton")
    if case.mask:
        kwargs["mask"] = torch.rand(case.m, n, generator=gen) > 0.2
    if case.ids:
        kwargs["ids"] = torch.arange(n) // 2
    if case.objective == "sigmoid":
        learned = case.temperature == "learned"
        kwargs["bias"] = torch.tensor(-10.0, requires_grad=True) if learned else -10.0
        loss_fn = fastpair.pairwise_sigmoid
    elif case.objective == "gram":
        loss_fn = fastpair.gram_nce
    else:
        loss_fn = fastpair.pairwise_nce
    sink: list[Variant] = []
    with _recording(sink, one_program=bool(case.n)), _fp32_precision(case.fp32), _deterministic(case.deterministic):
        out = loss_fn(*zs, **kwargs)
        loss = out[0] if case.stats else out
        loss.backward()
    return sink


def configs(variant: Variant, capability: int, shared_memory: int) -> list[dict]:
    """The tile configurations an autotuned launch can run with on a GPU of this compute capability (80, 90,
    100) and shared memory per block: the union over N buckets of what the autotuner's pruning leaves
    (tuning.offered_for, then tuning.keep; for an untuned kernel, its own tiles), as {BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages, maxnreg}."""
    if not variant.tuned:
        return [{}]
    kernel = "fwd" if variant.kernel == "fwd_kernel" else "panel"
    candidates = tuning.offered_for(kernel, capability // 10, variant.elem_bytes, variant.flags)
    seen: dict[tuple, dict] = {}
    for n_bucket in N_BUCKETS:
        for c in tuning.keep(candidates, n_bucket, variant.d_bucket, variant.elem_bytes, shared_memory):
            entry = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if c.maxnreg is not None:
                entry["maxnreg"] = c.maxnreg
            seen.setdefault(tuple(sorted(entry.items())), entry)
    return list(seen.values())


def launchable(variant: Variant, capability: int) -> bool:
    """Whether the host code launches this variant on a GPU of this compute capability: the one-program kernels
    take fewer rows before Hopper (small.max_block)."""
    if variant.kernel in SMALL_KERNELS:
        return variant.flags["BLOCK_N"] <= small.max_block(capability)
    return True


def variants(cases) -> dict[Variant, list[Case]]:
    """The distinct compilations the cases launch, each with the cases that launch it."""
    found: dict[Variant, list[Case]] = {}
    for case in cases:
        for v in capture(case):
            found.setdefault(v, []).append(case)
    return found

