"""The op layer: every (objective, backend) pair is one op of one shape, reached through one table.

An op is forward-only. It takes the validated Call, the embeddings and what needs a gradient, and returns
the loss, its two detached statistics and, when asked, the gradients of the loss itself:

    op(call, zs, needs) -> Result(loss, stats, grads)

The loss is the last op of a training step, so its gradients can be computed with its forward (as Liger's
fused linear cross-entropy does): the kernels that made the statistics still hold every operand, and the
backward has only to scale the gradients by the incoming dL/dloss, one multiply for all of them. The
statistics (per-pair losses, accuracy) are detached, so the loss is the only output a gradient reaches.

Two ways in, one body (`_body`: the device guard and the op):
- eager calls take a torch.autograd.Function, the cheapest dispatch (tens of microseconds less host time
  per step than a torch.library op);
- under torch.compile the same body is the registered op ``fastpair::loss`` with a fake kernel, so a
  step that calls any objective on any backend compiles as one graph; its backward is the same multiply,
  which the compiler traces.
A double backward raises: the saved gradients are constants to autograd. They live as long as the graph (a
second backward with retain_graph reuses them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .call import Call, PerPair

# (objective, backend) -> "module:function", imported on first use: the CPU path never imports Triton
TABLE = {
    ("nce", "torch"): "fastpair._torch_backend:nce_op",
    ("nce", "triton"): "fastpair.kernels.infonce:nce_op",
    ("sigmoid", "torch"): "fastpair._torch_sigmoid:sigmoid_op",
    ("sigmoid", "triton"): "fastpair.kernels.sigmoid:sigmoid_op",
    ("gram", "torch"): "fastpair._torch_gram:gram_op",
    ("gram", "triton"): "fastpair.kernels.gram:gram_op",
}
_LOADED: dict[str, Callable] = {}

# Bump when the op's signature or its gradient changes: torch.compile's on-disk caches key a compiled step on
# its forward graph and could replay a backward recorded against the old op.
OP_VERSION = 7


@dataclass(frozen=True)
class Needs:
    """What the caller's graph needs a gradient for."""

    z: bool
    temperature: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.z or self.temperature or self.bias


@dataclass(frozen=True)
class Result:
    loss: torch.Tensor  # 0-d
    stats: tuple[torch.Tensor, torch.Tensor]  # detached: per-pair (or per-direction) losses and accuracy
    grads: tuple[torch.Tensor, ...] = ()  # dL/dz_m (M of them, the inputs' dtype) if needs.z, then dL/dt, dL/db


def resolve(call: Call) -> Callable:
    name = TABLE[(call.objective, call.backend)]
    if name not in _LOADED:
        module, function = name.split(":")
        _LOADED[name] = getattr(importlib.import_module(module), function)
    return _LOADED[name]


def run(call: Call, zs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stat a, stat b) of a validated call, differentiable in the embeddings and parameter tensors."""
    params = [p.tensor if p is not None else None for p in (call.temperature, call.bias)]
    enabled = torch.is_grad_enabled()
    needs = Needs(enabled and any(z.requires_grad for z in zs),
                  enabled and params[0] is not None and params[0].requires_grad,
                  enabled and params[1] is not None and params[1].requires_grad)
    if torch.compiler.is_compiling():
        return _compiled_run(call, zs, params, needs)
    return _Loss.apply(call, needs, *params, *zs)


def _body(call: Call, zs, needs: Needs) -> Result:
    """The op on the inputs' device (Triton launches on the current device otherwise), parameters detached."""
    call = dataclasses.replace(call, temperature=_detached(call.temperature), bias=_detached(call.bias))
    device = zs[0].device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return resolve(call)(call, list(zs), needs)


def _detached(parameter: PerPair | None) -> PerPair | None:
    if parameter is None or parameter.tensor is None:
        return parameter
    return dataclasses.replace(parameter, tensor=parameter.tensor.detach())


def _scale(grads, g: torch.Tensor) -> list[torch.Tensor]:
    """g * every gradient: one foreach multiply per dtype (one kernel each on a GPU)."""
    out: list = [None] * len(grads)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(k)
    for members in by_dtype.values():
        for k, scaled in zip(members, torch._foreach_mul([grads[k] for k in members], g)):
            out[k] = scaled
    return out


def _spread(needs: Needs, scaled: list, num_z: int) -> tuple[list, list]:
    """The scaled gradients as (embedding grads, [dt, db]) with None where none is needed."""
    scaled = list(scaled)
    dz = [scaled.pop(0) for _ in range(num_z)] if needs.z else [None] * num_z
    dt = scaled.pop(0) if needs.temperature else None
    db = scaled.pop(0) if needs.bias else None
    return dz, [dt, db]


class _Loss(torch.autograd.Function):
    """Eager dispatch: the op in the forward, its gradients scaled in the backward."""

    @staticmethod
    def forward(ctx, call: Call, needs: Needs, temperature, bias, *zs):
        result = _body(call, zs, needs)
        ctx.grads, ctx.needs, ctx.num_z = result.grads, needs, len(zs)
        ctx.mark_non_differentiable(*result.stats)
        ctx.set_materialize_grads(False)  # no zero tensors made for the statistics' (absent) gradients
        return result.loss, *result.stats

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients would pass for constants
            raise RuntimeError("fastpair's losses can be differentiated once, not twice: their gradients are "
                               "computed with the forward, so backward(create_graph=True) (a gradient penalty, "
                               "a Hessian product) would silently miss their dependence on the inputs")
        if grad_loss is None:  # no gradient reached the loss: none for any input
            return (None,) * (4 + ctx.num_z)
        dz, (dt, db) = _spread(ctx.needs, _scale(ctx.grads, grad_loss), ctx.num_z)
        return None, None, dt, db, *dz


# --- torch.compile: the same body as a registered op -------------------------------------------------------

def _flat(call: Call) -> dict:
    """The Call's values that are not tensors, as a custom op's plain arguments."""
    from . import distributed

    sizes, rank, group = distributed.op_arguments(call.shard)
    bias = call.bias
    return dict(
        objective=call.objective, backend=call.backend, pairs=[i for pair in call.pairs for i in pair],
        t_values=list(call.temperature.values or ()), t_shape=list(call.temperature.shape),
        b_values=[] if bias is None else list(bias.values or ()), b_shape=[-1] if bias is None else list(bias.shape),
        weights=list(call.weights), label_smoothing=call.label_smoothing, normalize=call.normalize,
        return_stats=call.return_stats, block_size=-1 if call.block_size is None else call.block_size,
        sizes=sizes, rank=rank, group=group)


def _rebuilt(flat: dict, params, mask, ids) -> Call:
    from . import distributed

    def per_pair(name, values, tensor, shape):
        return PerPair(name, tuple(values) if tensor is None else None, tensor, tuple(shape))

    pairs = flat["pairs"]
    bias = None if flat["b_shape"] == [-1] else per_pair("bias", flat["b_values"], params[1], flat["b_shape"])
    return Call(pairs=tuple(zip(pairs[0::2], pairs[1::2])),
                temperature=per_pair("temperature", flat["t_values"], params[0], flat["t_shape"]),
                weights=tuple(flat["weights"]), mask=mask, ids=ids, label_smoothing=flat["label_smoothing"],
                normalize=flat["normalize"], return_stats=flat["return_stats"], backend=flat["backend"],
                block_size=None if flat["block_size"] < 0 else flat["block_size"], objective=flat["objective"],
                bias=bias, shard=distributed.shard_from_op_arguments(flat["sizes"], flat["rank"], flat["group"]))


@torch.library.custom_op(f"fastpair::loss_v{OP_VERSION}", mutates_args=())
def _loss_op(zs: list[torch.Tensor], temperature: torch.Tensor | None, bias: torch.Tensor | None,
             mask: torch.Tensor | None, ids: torch.Tensor | None, needs: list[bool], objective: str, backend: str,
             pairs: list[int],
             t_values: list[float], t_shape: list[int], b_values: list[float], b_shape: list[int],
             weights: list[float], label_smoothing: float, normalize: bool, return_stats: bool, block_size: int,
             sizes: list[int], rank: int, group: str) -> list[torch.Tensor]:
    """[loss, stat a, stat b, *gradients]: the op of `_body` behind torch.library (see _compiled_run)."""
    flat = dict(objective=objective, backend=backend, pairs=pairs, t_values=t_values, t_shape=t_shape,
                b_values=b_values, b_shape=b_shape, weights=weights, label_smoothing=label_smoothing,
                normalize=normalize, return_stats=return_stats, block_size=block_size, sizes=sizes, rank=rank,
                group=group)
    result = _body(_rebuilt(flat, (temperature, bias), mask, ids), zs, Needs(*needs))
    return _unaliased([result.loss, *result.stats, *result.grads], [*zs, temperature, bias, mask, ids])


def _unaliased(outputs: list[torch.Tensor], inputs) -> list[torch.Tensor]:
    """A custom op's outputs may alias neither its inputs nor each other (views of one stacked gradient, a
    statistic that is a view of another): the ones that do are copied apart."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    out = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(t)
    return out


@_loss_op.register_fake
def _(zs, temperature, bias, mask, ids, needs, objective, backend, pairs, t_values, t_shape, b_values, b_shape, *_rest):
    z = zs[0]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    rows = 2 if objective == "gram" else len(pairs) // 2
    out = [z.new_empty((), dtype=dtype), z.new_empty((rows,), dtype=torch.float32),
           z.new_empty((rows,) if objective == "gram" else (rows, 2), dtype=torch.float32)]
    if needs[0]:
        out += [torch.empty_like(t) for t in zs]
    out += [torch.empty_like(p) for p, need in zip((temperature, bias), needs[1:]) if need]
    return out


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])
    ctx.needs, ctx.num_z = Needs(*inputs[5]), len(inputs[0])
    # torch.library matches the gradients' structure to the inputs' pytree, where an empty list stays a list
    ctx.rest = tuple([] if isinstance(value, list) and not value else None for value in inputs[3:])


def _compiled_backward(ctx, grad_outputs):
    dz, dp = _spread(ctx.needs, _scale(ctx.saved_tensors, grad_outputs[0]), ctx.num_z)
    return (dz, *dp) + ctx.rest


_loss_op.register_autograd(_compiled_backward, setup_context=_setup)


def _compiled_run(call: Call, zs, params, needs: Needs):
    out = _loss_op(list(zs), *params, call.mask, call.ids, [needs.z, needs.temperature, needs.bias], **_flat(call))
    return out[0], out[1], out[2]


# --- ops from a differentiable loss function ----------------------------------------------------------------

def through_autograd(loss_fn: Callable) -> Callable:
    """An op from a loss function (zs, call) -> (loss, a, b) that autograd differentiates: the gradients
    taken at once, inside the op (the backends that compute no gradient in their forward)."""

    def op(call: Call, zs, needs: Needs) -> Result:
        if not needs.any:
            loss, a, b = loss_fn(zs, call)
            return Result(loss.detach(), (a, b))
        with _autograd_inside(), torch.enable_grad():
            leaves = [z.detach().requires_grad_() for z in zs] if needs.z else list(zs)
            call, params = _parameter_leaves(call, needs)
            loss, a, b = loss_fn(leaves, call)
            wrt = (leaves if needs.z else []) + params
            grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        return Result(loss.detach(), (a, b), tuple(grads))

    return op


def _autograd_inside():
    """Autograd back on for a loss function run inside an op: torch.library runs a custom op's body with
    autograd's dispatch keys excluded (as every op's body below its autograd kernel), so a graph built there
    would have no gradient. Eagerly (inside _Loss.forward) nothing is excluded and this changes nothing."""
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not excluded.has(keys.AutogradOther):
        return contextlib.nullcontext()
    kept = excluded.remove(keys.AutogradFunctionality).remove(keys.AutogradOther).remove(keys.AutogradNestedTensor)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), kept)


def _parameter_leaves(call: Call, needs: Needs) -> tuple[Call, list[torch.Tensor]]:
    """The call with fresh leaves for the parameter tensors that need a gradient, and those leaves."""
    leaves, changes = [], {}
    for name, need in (("temperature", needs.temperature), ("bias", needs.bias)):
        parameter = getattr(call, name)
        if need:
            leaf = parameter.tensor.detach().requires_grad_()
            leaves.append(leaf)
            changes[name] = dataclasses.replace(parameter, tensor=leaf)
    return dataclasses.replace(call, **changes), leaves
