"""GRAM's volumes (Cicchetti et al., ICLR 2025): the per-column part that every backend shares.

For an anchor row x_a,i and the other modalities' unit vectors of column j, X_j = (x_o1,j; ...; x_ok,j)
(k x D), the Gram matrix of the k + 1 vectors is

    G_ij = [[1, s_ij^T], [s_ij, C_j]],   s_ij = X_j x_a,i (the k similarity tiles),   C_j = X_j X_j^T,

and by the Schur complement det G_ij = det C_j - s_ij^T adj(C_j) s_ij (adj: the adjugate, det C C^-1 where C
is invertible, and a polynomial in C everywhere). So a column needs det C_j and adj(C_j), O(N k^2) for the
batch, computed here once; a tile of rows needs only its k similarity tiles and these N-vectors.

The backward's column part: with U'_ij = dL/dS_ij [det G_ij > 0] / (2 t V_ij),

    dL/dC_j = -d/dC_j [a_j det C_j - tr(adj(C_j) M_j)],    a_j = sum_i U'_ij,   M_j = sum_i U'_ij s_ij s_ij^T,

(both sums over the rows, k(k+1)/2 + 1 numbers per column), and dL/dX_j = (dL/dC_j + dL/dC_j^T) X_j.
``column_grad`` takes that derivative with autograd on the (N, k, k) tensor: O(N k^3), never N x N.
"""

from __future__ import annotations

import itertools

import torch

EPS_V = 1e-8  # V = sqrt(max(det G, 0) + EPS_V): dV/d det G = 1 / (2 V) stays finite at V = 0


def pairs_of(k: int) -> list[tuple[int, int]]:
    """The (l, m), l <= m, of a symmetric k x k matrix's independent entries, in the order M_j is stored."""
    return [(l, m) for l in range(k) for m in range(l, k)]


def gram(xo: list[torch.Tensor]) -> torch.Tensor:
    """(N, k, k): C_j = X_j X_j^T, the Gram matrix of the k other modalities' unit vectors of each sample."""
    x = torch.stack(xo, dim=1)  # (N, k, D)
    return x @ x.transpose(1, 2)


def det_adj(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(det C, adj C) of (N, k, k) matrices: closed forms for k <= 3, cofactors of minors beyond (both are
    polynomials in C, so both are defined and differentiable for singular C, e.g. two equal modalities)."""
    k = c.shape[-1]
    if k == 1:
        return c[:, 0, 0], torch.ones_like(c)
    if k == 2:
        a, b, d = c[:, 0, 0], c[:, 0, 1], c[:, 1, 1]
        b2 = c[:, 1, 0]
        adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-b2, a], -1)], -2)
        return a * d - b * b2, adj
    cof = torch.empty_like(c)
    keep = [list(itertools.chain(range(i), range(i + 1, k))) for i in range(k)]
    for i in range(k):
        for j in range(k):
            minor = c[:, keep[i]][:, :, keep[j]]
            cof[:, i, j] = (-1) ** (i + j) * (_det_small(minor) if k == 3 else torch.linalg.det(minor))
    adj = cof.transpose(1, 2)
    det = (c[:, 0, :] * cof[:, 0, :]).sum(dim=1)  # Laplace expansion along the first row
    return det, adj


def _det_small(m: torch.Tensor) -> torch.Tensor:
    """det of (N, 2, 2), written out (torch.linalg.det would factorize)."""
    return m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]


def quadratic(adj: torch.Tensor, s: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = s^T adj(C_j) s per entry of a tile: sum over l <= m of (2 - [l == m]) adj_lm,j s_l s_m, with the
    k similarity tiles s (B, N) and adj (N, k, k) (symmetric: the Gram matrix is)."""
    out.zero_()
    for l, m in pairs_of(len(s)):
        coef = adj[:, l, m] if l == m else 2.0 * adj[:, l, m]
        out.addcmul_(s[l] * coef[None, :], s[m])
    return out


def column_grad(c: torch.Tensor, a: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """(N, k, k) dL/dC_j from a_j (N,) and the moments M_j stored as (N, k(k+1)/2) in ``pairs_of`` order:
    -d/dC [a det C - tr(adj(C) M)] with M symmetric, differentiated by autograd on C (small matrices)."""
    k = c.shape[-1]
    full = torch.zeros_like(c)
    for idx, (l, m) in enumerate(pairs_of(k)):
        full[:, l, m] = moments[:, idx]
        full[:, m, l] = moments[:, idx]
    with torch.enable_grad():
        leaf = c.detach().requires_grad_(True)
        det, adj = det_adj(leaf)
        f = (a * det).sum() - (adj * full.transpose(1, 2)).sum()
        (grad,) = torch.autograd.grad(f, leaf)
    return -grad


__all__ = ["EPS_V", "gram", "det_adj", "quadratic", "column_grad", "pairs_of"]
