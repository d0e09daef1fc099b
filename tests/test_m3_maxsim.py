"""M3's training MaxSim in blocks of passages (#34, fault 9): the same scores
and gradients as the whole-tensor version, and no (Bq, Np, Lq, Lp) tensor."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raysys.representations.multivector import TokenVectors, maxsim


def naive_maxsim(q: TokenVectors, p: TokenVectors) -> torch.Tensor:
    """MaxSim as it was before the fix: the whole similarity tensor."""
    qv, pv = q.vectors.float(), p.vectors.float()
    sim = torch.einsum("bid,pjd->bpij", qv, pv)  # (Bq, Np, Lq, Lp)
    sim = sim.masked_fill(~p.mask.bool()[None, :, None, :], torch.finfo(sim.dtype).min)
    best = sim.max(dim=-1).values
    qm = q.mask.to(best.dtype)
    best = best * qm[:, None, :]
    return best.sum(-1) / qm.sum(-1).clamp(min=1)[:, None]


def _inputs(bq: int, n_p: int, lq: int, lp: int, d: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    qv = F.normalize(torch.randn(bq, lq, d, generator=g), dim=-1)
    pv = F.normalize(torch.randn(n_p, lp, d, generator=g), dim=-1)
    qm = (torch.arange(lq)[None] < torch.randint(1, lq + 1, (bq,), generator=g)[:, None]).to(
        torch.int8
    )
    pm = (torch.arange(lp)[None] < torch.randint(1, lp + 1, (n_p,), generator=g)[:, None]).to(
        torch.int8
    )
    qm[0, -1] = pm[0, -1] = 0  # padding for sure
    return qv, pv, qm, pm, torch.randn(bq, n_p, generator=g)


def _run(fn, qv, pv, qm, pm, w) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    q, p = qv.clone().requires_grad_(), pv.clone().requires_grad_()
    s = fn(TokenVectors(q, qm), TokenVectors(p, pm))
    (s * w).sum().backward()
    return s.detach(), q.grad, p.grad


@pytest.mark.parametrize("per", [1, 3, 1000])  # passages per block: 1, uneven, all
def test_blocked_maxsim_equals_the_naive_one(per: int) -> None:
    bq, n_p, lq, lp, d = 4, 10, 6, 9, 16
    x = _inputs(bq, n_p, lq, lp, d)
    want = _run(naive_maxsim, *x)
    got = _run(lambda q, p: maxsim(q, p, block=per * bq * lq * lp), *x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # A passage with no counted token: the same (lowest) scores and no gradient.
    qv, pv, qm, pm, w = x
    pm = pm.clone()
    pm[2] = 0
    s_new = maxsim(TokenVectors(qv, qm), TokenVectors(pv, pm), block=per * bq * lq * lp)
    s_old = naive_maxsim(TokenVectors(qv, qm), TokenVectors(pv, pm))
    assert torch.equal(s_new[:, 2], s_old[:, 2])
    keep = torch.arange(n_p) != 2
    got = _run(
        lambda q, p: maxsim(q, p, block=per * bq * lq * lp)[:, keep], qv, pv, qm, pm, w[:, keep]
    )
    want = _run(lambda q, p: naive_maxsim(q, p)[:, keep], qv, pv, qm, pm, w[:, keep])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not got[2][2].any()


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_maxsim_never_builds_the_whole_similarity_tensor() -> None:
    """Forward and backward: no op returns (Bq, Np, Lq, Lp) similarities, or
    any tensor larger than a block or than the inputs."""
    bq, n_p, lq, lp, d = 4, 12, 6, 9, 8
    qv, pv, qm, pm, w = _inputs(bq, n_p, lq, lp, d)
    q, p = qv.clone().requires_grad_(), pv.clone().requires_grad_()
    block = 3 * bq * lq * lp  # 3 passages at a time
    # (Before the fix maxsim took no block: run it as it was, to see the tensor.)
    kw = {"block": block} if "block" in inspect.signature(maxsim).parameters else {}
    with _Shapes() as rec:
        (maxsim(TokenVectors(q, qm), TokenVectors(p, pm), **kw) * w).sum().backward()
    assert rec.shapes and p.grad is not None and q.grad is not None
    full = bq * n_p * lq * lp
    biggest = max(rec.shapes, key=lambda s: torch.Size(s).numel())
    assert (bq, n_p, lq, lp) not in rec.shapes
    assert torch.Size(biggest).numel() <= max(block, pv.numel(), qv.numel()) < full, biggest
