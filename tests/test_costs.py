"""Cost budgets (docs/design.md): one forward + backward of M = 3 modalities, counted by tests/costs.py, held
to written budgets, so that a host-overhead or memory regression fails here instead of on the next GPU.

- Triton launches, exactly: every objective at N <= 64 one (kernels/small.py); otherwise 1 forward, 1 per pair
  and row panel of the backward, 1 input gradient (GRAM: 2 forward, 1 per row panel).
- Other tensor ops, and of them those that compute (kernels on a GPU): at most the counts measured when the
  budget was written plus about 10%.
- The small-batch step (docs/design.md): PairwiseNCE with a learnable temperature at N = 64, D = 512 on the
  Triton path, at most 20 kernels in all (launches and computing ops, the module's and autograd's included);
  PairwiseSigmoid and GramNCE at most 1.2x InfoNCE's.
- Host reads of tensor values (a device sync on a GPU): none on the Triton backend, with numbers or with
  tensors for the temperature and the bias; the torch backend, the CPU path, reads a parameter tensor's
  values once (free on a CPU: it picks the exact variant and checks them).
- Peak bytes alive beyond the inputs and the gradients: a formula per backend in the sizes.
The "large" Triton case caps the backward's workspace at 32 rows (launch.PANEL_BYTES) so that the
interpreter runs the several-panel loop of a large N at N = 128 (4 panels per pair).
"""

from __future__ import annotations

import pytest
import torch
from costs import measure
from helpers import device_for, triton_runs

from fastpair import GramNCE, PairwiseNCE, PairwiseSigmoid, gram_nce, pairwise_nce, pairwise_sigmoid
from fastpair._torch_backend import default_block

M, D = 3, 32
P = M * (M - 1) // 2

# (objective, backend, N, parameters) -> the most aten ops one forward + backward may take, and the most of
# them that compute (not views, allocations or no-op casts: on a GPU, each a kernel); measured 2026-12-07
# (torch 2.13 CPU, Triton 3.9 interpreter) plus about 10%
OPS = {
    ("nce", "torch", 64, "numbers"): (265, 175), ("nce", "torch", 64, "tensors"): (300, 200),
    ("nce", "torch", 2048, "numbers"): (570, 305), ("nce", "torch", 2048, "tensors"): (680, 380),
    # N <= 64: one program (kernels/small.py); the ops left allocate its outputs and scale its gradients
    ("nce", "triton", 64, "numbers"): (14, 3), ("nce", "triton", 64, "tensors"): (19, 4),
    ("nce", "triton", 128, "numbers"): (195, 52), ("nce", "triton", 128, "tensors"): (250, 80),
    ("sigmoid", "torch", 64, "numbers"): (260, 168), ("sigmoid", "torch", 64, "tensors"): (315, 204),
    ("sigmoid", "torch", 2048, "numbers"): (540, 317), ("sigmoid", "torch", 2048, "tensors"): (678, 411),
    ("sigmoid", "triton", 64, "numbers"): (14, 3), ("sigmoid", "triton", 64, "tensors"): (24, 5),
    ("sigmoid", "triton", 128, "numbers"): (195, 52), ("sigmoid", "triton", 128, "tensors"): (266, 79),
    # GRAM: per row block k tiles, the volumes and their gradient's elementwise passes
    ("gram", "torch", 64, "numbers"): (440, 250), ("gram", "torch", 64, "tensors"): (455, 257),
    ("gram", "torch", 2048, "numbers"): (1600, 860), ("gram", "torch", 2048, "tensors"): (1640, 890),
    # GRAM's Triton path: one program at N <= 64; above, the per-column matrices, the epilogue and the
    # backward's GEMMs are PyTorch ops
    ("gram", "triton", 64, "numbers"): (14, 3), ("gram", "triton", 64, "tensors"): (19, 4),
    ("gram", "triton", 128, "numbers"): (340, 192), ("gram", "triton", 128, "tensors"): (350, 196),
}
LOSSES = {"nce": pairwise_nce, "sigmoid": pairwise_sigmoid, "gram": gram_nce}
MODULES = {"nce": PairwiseNCE, "sigmoid": PairwiseSigmoid, "gram": GramNCE}
SMALL = ("nce", "sigmoid", "gram")  # the objectives with a one-program path at N <= 64 (kernels/small.py)
PANEL_ROWS = {64: None, 128: 32}  # the Triton backward's rows per panel (None: one panel per pair)


def _step(objective, backend, n, parameters):
    """A forward + backward closure on fresh inputs, and the inputs."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(n)
    zs = [torch.randn(n, D, generator=g).to(device).requires_grad_() for _ in range(M)]
    tensors = parameters == "tensors"
    kw = {"temperature": torch.tensor(0.07, device=device, requires_grad=True) if tensors else 0.07}
    if objective == "sigmoid":
        kw["bias"] = torch.tensor(-10.0, device=device, requires_grad=True) if tensors else -10.0
    fn = LOSSES[objective]

    def step():
        for z in zs:
            z.grad = None
        loss = fn(*zs, backend=backend, **kw)
        loss.backward()
        return loss

    return step, zs, kw


def _panel_height(n, elem):
    """Rows per backward panel, as the launcher picks them (a multiple of every candidate tile height)."""
    from fastpair.kernels import launch

    return launch._panel_shape(n, n, elem, None, None)[0]


def _gram_panel(n):
    from fastpair.kernels import gram_ops

    return min(n, gram_ops.panel_rows(n, M - 1))


def _extra_budget(backend, n, elem, objective="nce"):
    """Bytes a call may hold beyond its inputs and gradients, at most at once.
    torch: the normalized inputs, the fp32 gradient being accumulated and the normalization backward's
    temporaries (3 x M N D fp32), two logit blocks of rows x N, and O(N) statistics. GRAM: blocks of half as
    many rows, k + 4 of them in its backward (the k tiles, the volumes, W, a product, the mask of det G > 0).
    Triton: the stacked inputs (M N D, input dtype), the fp32 gradient accumulator (M N D), one row panel of
    W (rows x N, input dtype), and O(N) statistics (28 to 36 fp32 vectors of N measured; 48 allowed); since the
    gradients are computed in the forward (fastpair/op.py), the op's gradients and their scaled copies coexist for
    a moment: one more M N D in the input dtype. N <= 64 (one program): that copy, G for every pair
    (P x 64 x 64 fp32 at most) and O(N) vectors; GRAM's k tiles, the k x k mix coefficients, and its stage of
    the k similarity tiles and U ((k + 1) x 64 x 64 fp32)."""
    if objective == "gram" and backend == "triton" and n <= 64:
        return M * n * D * elem + (2 * (M - 1) + 1) * 64 * 64 * 4 + (M - 1) ** 2 * 64 * 4 + 48 * n * 4
    if objective in SMALL and backend == "triton" and n <= 64:
        return M * n * D * elem + P * 64 * 64 * 4 + 48 * n * 4
    if objective == "gram" and backend == "torch":
        return 3 * M * n * D * 4 + (M - 1 + 4) * min(max(16, default_block(n) // 2), n) * n * 4 + 64 * n * 4
    if objective == "gram":  # the unit vectors and their stack (input dtype), their fp32 copies and gradients,
        # the K panels of rows x N (fp32) and the column partial sums, O(N) vectors
        return 2 * M * n * D * elem + 2 * M * n * D * 4 + (M - 1) * _gram_panel(n) * n * 4 + 48 * n * 4
    if backend == "torch":
        return 3 * M * n * D * 4 + 2 * min(default_block(n), n) * n * 4 + 64 * n * 4
    return 2 * M * n * D * elem + M * n * D * 4 + _panel_height(n, elem) * n * elem + 48 * n * 4


CASES = [(objective, backend, n, parameters)
         for objective in ("nce", "sigmoid")
         for backend, sizes in (("torch", (64, 2048)), ("triton", (64, 128)))
         for n in sizes for parameters in ("numbers", "tensors")]
CASES += [("gram", "torch", n, parameters) for n in (64, 2048) for parameters in ("numbers", "tensors")]
CASES += [("gram", "triton", n, parameters) for n in (64, 128) for parameters in ("numbers", "tensors")]


@pytest.mark.parametrize("objective,backend,n,parameters", CASES)
def test_costs_within_budget(objective, backend, n, parameters, monkeypatch):
    if backend == "triton":
        if not triton_runs():
            pytest.skip("Triton is not available here")
        from fastpair.kernels import launch, small

        if PANEL_ROWS[n]:
            monkeypatch.setattr(launch, "PANEL_BYTES", PANEL_ROWS[n] * n * 4)
    step, zs, kw = _step(objective, backend, n, parameters)
    step()  # the first call compiles and fills caches: one-time costs
    costs, _ = measure(step)
    if backend == "torch":
        launches = 0
    elif objective in SMALL and n <= small.MAX_N:  # loss, statistics and gradients in one program
        launches = 1
    elif objective == "gram":  # both forward directions, one gradient launch per row panel
        launches = 2 + -(-n // _gram_panel(n))
    else:
        launches = 1 + P * -(-n // _panel_height(n, zs[0].element_size())) + 1
    assert costs.launches == launches, costs
    ops, kernels = OPS[objective, backend, n, parameters]
    assert costs.ops <= ops and costs.kernels <= kernels, costs
    tensors = sum(isinstance(v, torch.Tensor) for v in kw.values())
    reads = tensors if backend == "torch" else 0  # GRAM's kernels read the temperature on the device too
    assert len(costs.reads) == reads, costs.reads
    grads = {z.grad.untyped_storage().data_ptr(): z.grad.untyped_storage().nbytes() for z in zs}
    extra = costs.peak_bytes - sum(grads.values())
    assert extra <= _extra_budget(backend, n, zs[0].element_size(), objective), (extra, costs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_step_reads_no_device_value_on_triton(backend):
    """PairwiseNCE's learnable temperature, the common training case: no host read on the Triton backend;
    the torch backend reads it once (its CPU path)."""
    if backend == "triton" and not triton_runs():
        pytest.skip("Triton is not available here")
    device = device_for(backend)
    module = PairwiseNCE(M, backend=backend).to(device)
    zs = [torch.randn(64, D, device=device, requires_grad=True) for _ in range(M)]

    def step():
        module(*zs).backward()

    step()
    costs, _ = measure(step)
    assert len(costs.reads) == (1 if backend == "torch" else 0), costs.reads
    assert module.log_temperature.grad is not None


def _module_step_costs(objective, n=64, d=512):
    """The costs of one forward + backward of the objective's module (learnable parameters) on the Triton path."""
    module = MODULES[objective](M, backend="triton").to(device_for("triton"))
    zs = [torch.randn(n, d, device=device_for("triton"), requires_grad=True) for _ in range(M)]

    def step():
        module(*zs).backward()

    step()
    return measure(step)[0]


def test_small_batch_step_kernel_budget(triton_only):
    """The step bench/host.py times: every kernel a GPU would launch, the temperature's exp and clamp and the
    gradients' scaling included, at most 20 (the plain PyTorch step: about 125)."""
    costs = _module_step_costs("nce")
    assert costs.launches == 1 and costs.launches + costs.kernels <= 20 and not costs.reads, costs


def test_small_batch_sigmoid_step_within_1_2x_of_infonce(triton_only):
    """The sigmoid objective's small-batch step (a learnable bias besides the temperature) costs at most 1.2x
    InfoNCE's kernels."""
    nce, sigmoid = _module_step_costs("nce"), _module_step_costs("sigmoid")
    assert sigmoid.launches == 1 and not sigmoid.reads, sigmoid
    assert sigmoid.launches + sigmoid.kernels <= 1.2 * (nce.launches + nce.kernels), (sigmoid, nce)


def test_small_batch_gram_step_within_1_2x_of_infonce(triton_only):
    """GRAM's small-batch step (one program: kernels/gram_small.py) costs at most 1.2x InfoNCE's kernels."""
    nce, gram = _module_step_costs("nce"), _module_step_costs("gram")
    assert gram.launches == 1 and not gram.reads, gram
    assert gram.launches + gram.kernels <= 1.2 * (nce.launches + nce.kernels), (gram, nce)


# The counter itself: each kind of cost it claims to see, seen.

def test_counter_sees_every_kind_of_host_read():
    x, y = torch.tensor([2.5]), torch.tensor([2.5])
    costs, _ = measure(lambda: (x.item(), x.tolist(), bool(x > 0), float(x), int(x), x.numpy(), torch.equal(x, y)))
    assert len(costs.reads) == 7, costs.reads


@pytest.mark.gpu
def test_counter_counts_a_copy_to_the_host_once():
    """On a GPU the copy is the sync; reading the CPU copy afterwards is free."""
    x = torch.ones(3, device="cuda")
    for fn in (lambda: x.cpu().tolist(), lambda: x.to("cpu", torch.float64).numpy(), lambda: x.sum().item(),
               lambda: bool(x[0] > 0)):
        costs, _ = measure(fn)
        assert len(costs.reads) == 1, costs.reads


def test_counter_tracks_peak_and_live_bytes():
    def fn():
        a = torch.empty(2**18)  # 1 MiB, dropped before the next
        del a
        return torch.empty(2**17)  # 0.5 MiB, returned

    costs, _ = measure(fn)
    assert (costs.peak_bytes, costs.live_bytes) == (2**20, 2**19)
    assert (costs.ops, costs.kernels) == (2, 0)  # allocations compute nothing


def test_counter_tells_computing_ops_from_views_and_allocations():
    x = torch.ones(4, 4)
    views = (lambda: x.t(), lambda: x[0], lambda: x.reshape(16), lambda: x.float(), lambda: torch.empty(3))
    computing = (lambda: x.double(), lambda: x + 1, lambda: x.t().contiguous(), lambda: torch.zeros(3))
    for fn in views:
        assert measure(fn)[0].kernels == 0
    for fn in computing:
        assert measure(fn)[0].kernels == 1


@torch.library.custom_op("fastpair_costs_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    scratch = torch.empty(2**18)  # 1 MiB of workspace inside the op
    scratch.fill_(float(x.sum()))  # a host read inside the op
    return x * scratch[0]


@_reads_inside.register_fake
def _(x):
    return torch.empty_like(x)


def test_counter_sees_inside_custom_ops():
    costs, _ = measure(lambda: _reads_inside(torch.ones(4)))
    assert costs.custom_ops == ["fastpair_costs_test::reads_inside"]
    assert len(costs.reads) == 1 and costs.peak_bytes >= 2**20, costs
    assert costs.kernels >= 4  # ones, sum, fill_, mul computed; empty allocated; seen from inside


def test_counter_counts_triton_launches_alone(triton_only):
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    x = torch.zeros(8, device=device_for("triton"))

    def fn():
        for _ in range(3):
            add_one[(1,)](x, 8, BLOCK=8)

    costs, _ = measure(fn)
    assert costs.launches == 3 and costs.ops == 0 and not costs.reads, costs
    assert torch.equal(x.cpu(), torch.full((8,), 3.0))
