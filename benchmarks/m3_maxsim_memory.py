"""Peak memory of M3's training MaxSim (forward + backward), before and after
issue #34's fault 9, at jobs/m3_msmarco.yaml's shapes scaled down.

Before: the whole ``(Bq, Np, Lq, Lp)`` similarity tensor in fp32, plus a
second one from ``masked_fill`` (kept below as ``maxsim_before``, verbatim).
After: :func:`raysys.representations.multivector.maxsim`, passages in blocks.

    .venv/bin/python benchmarks/m3_maxsim_memory.py            # 1/4 of the batch
    .venv/bin/python benchmarks/m3_maxsim_memory.py --scale 8  # smaller

Method: each variant runs in a fresh process (glibc's mmap threshold fixed at
1 MiB, so a freed tensor leaves the RSS). It builds the inputs, runs a
tiny warm-up of the same code (library start-up is not counted), resets the
process's peak RSS to its current RSS (Linux: ``5`` into
``/proc/self/clear_refs``), runs one forward and backward, and reads the peak
(``VmHWM``); the peak minus the RSS before is the figure. With ``--device
cuda`` it reads ``torch.cuda.max_memory_allocated`` instead. Writes
benchmarks/results/m3_maxsim_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported by the tests as benchmarks.m3_maxsim_memory
    from ._results import ROOT, write_results
else:  # run as a script
    from _results import ROOT, write_results

RECIPE = ROOT / "jobs" / "m3_msmarco.yaml"
# glibc: every allocation of 1 MiB or more is its own mapping, returned on
# free, so RSS follows the live tensors (not what the heap kept of freed ones).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
HIDDEN = 1024  # xlm-roberta-large; the recipe's multivector_dim 0 means the hidden size
MIB = 2**20


def maxsim_before(q, p):  # noqa: ANN001, ANN201
    """MaxSim as it was before the fix (raysys/representations/multivector.py)."""
    import torch

    qv, pv = q.vectors.float(), p.vectors.float()
    sim = torch.einsum("bid,pjd->bpij", qv, pv)  # (Bq, Np, Lq, Lp)
    sim = sim.masked_fill(~p.mask.bool()[None, :, None, :], torch.finfo(sim.dtype).min)
    best = sim.max(dim=-1).values  # (Bq, Np, Lq)
    qm = q.mask.to(best.dtype)
    best = best * qm[:, None, :]
    return best.sum(-1) / qm.sum(-1).clamp(min=1)[:, None]


def recipe_shapes() -> dict[str, int]:
    """Bq, Np, Lq, Lp and dim of one rank's MaxSim under jobs/m3_msmarco.yaml
    (queries gathered across all workers)."""
    import yaml

    cfg = yaml.safe_load(RECIPE.read_text())
    t = cfg["train"]
    bq = int(t["per_device_queries"]) * int(t["scaling"]["num_workers"])
    dim = int(t["m3"].get("multivector_dim") or HIDDEN)
    return {
        "Bq": bq,
        "Np": bq * int(t["group_size"]),
        "Lq": int(cfg["contract"]["query_max_len"]),
        "Lp": int(cfg["contract"]["passage_max_len"]),
        "dim": dim,
    }


def _inputs(s: dict[str, int], device: str, seed: int = 0) -> tuple:
    """Normalised token vectors (requiring grad) with random padding."""
    import torch
    import torch.nn.functional as F

    from raysys.representations.multivector import TokenVectors

    g = torch.Generator().manual_seed(seed)
    bq, n_p, lq, lp, d = s["Bq"], s["Np"], s["Lq"], s["Lp"], s["dim"]
    q = F.normalize(torch.randn(bq, lq, d, generator=g), dim=-1).to(device).requires_grad_()
    p = F.normalize(torch.randn(n_p, lp, d, generator=g), dim=-1).to(device).requires_grad_()
    qm = torch.arange(lq)[None] < torch.randint(1, lq + 1, (bq,), generator=g)[:, None]
    pm = torch.arange(lp)[None] < torch.randint(1, lp + 1, (n_p,), generator=g)[:, None]
    w = torch.randn(bq, n_p, generator=g).to(device)
    qt = TokenVectors(q, qm.to(torch.int8).to(device))
    pt = TokenVectors(p, pm.to(torch.int8).to(device))
    return qt, pt, w


def _variant(name: str, block: int):  # noqa: ANN202
    from raysys.representations.multivector import maxsim

    if name == "before":
        return maxsim_before
    return lambda q, p: maxsim(q, p, block=block)


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``);
    returns the current RSS in bytes."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status("VmRSS")


def one(name: str, s: dict[str, int], block: int, device: str) -> dict:
    """One variant's peak (this process), forward + backward."""
    import torch

    fn = _variant(name, block)
    tiny = {**s, "Bq": 2, "Np": 4}
    qt, pt, w = _inputs(tiny, device)
    (fn(qt, pt) * w).sum().backward()  # warm-up: thread pools, kernels
    qt, pt, w = _inputs(s, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    t0 = time.perf_counter()
    scores = fn(qt, pt)
    loss = (scores * w).sum()
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status("VmHWM") - base
    return {
        "variant": name,
        "peak_mib": round(peak / MIB, 1),
        "seconds": round(time.perf_counter() - t0, 2),
        "loss": float(loss),
        "q_grad_norm": float(qt.vectors.grad.norm()),
        "p_grad_norm": float(pt.vectors.grad.norm()),
    }


def analytic(s: dict[str, int], block: int) -> dict:
    """Bytes of the fp32 similarity tensors each version holds at once."""
    per_passage = s["Bq"] * s["Lq"] * s["Lp"]
    full = per_passage * s["Np"] * 4
    per = max(1, block // per_passage)
    chunk = min(per, s["Np"]) * per_passage * 4
    return {
        "similarity_tensor_gb": round(full / 1e9, 2),
        "before_forward_gb": round(2 * full / 1e9, 2),
        "before_backward_gb": round(2 * full / 1e9, 2),
        "after_passages_per_block": min(per, s["Np"]),
        "after_block_gb": round(chunk / 1e9, 3),
        "after_forward_gb": round(chunk / 1e9, 3),
        "after_backward_gb": round(chunk / 1e9, 3),
        "note": (
            "before: einsum output + masked_fill copy in forward; in backward the max's "
            "scattered gradient + masked_fill's gradient (and any copy einsum's bmm makes). "
            "after: one block of passages at a time (masked in place), in forward and in "
            "backward (a block's scattered gradient, masked in place). Not counted: inputs, "
            "their gradients, the (Bq, Lq, Np) maxima and their int64 argmax indices."
        ),
    }


def main() -> None:
    from raysys.representations.multivector import MAXSIM_BLOCK

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=4, help="divide Bq (and so Np) by this")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "m3_maxsim_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(one(job["variant"], job["shapes"], job["block"], args.device)))
        return
    recipe = recipe_shapes()
    bq = max(1, recipe["Bq"] // args.scale)
    shapes = {**recipe, "Bq": bq, "Np": bq * (recipe["Np"] // recipe["Bq"])}
    # The block shrinks with Bq x Np, so the scaled run cuts passages into as
    # many blocks as the recipe does; the default block is measured too.
    scaled_block = max(1, MAXSIM_BLOCK // args.scale**2)
    variants = [
        ("before", MAXSIM_BLOCK),
        ("after", scaled_block),
        ("after_default_block", MAXSIM_BLOCK),
    ]
    runs = []
    for _ in range(args.repeats):
        for name, block in variants:
            job = {"variant": name, "shapes": shapes, "block": block}
            out = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--one", json.dumps(job)],
                capture_output=True,
                text=True,
                check=True,
                env=CHILD_ENV,
            )
            runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "block": block})
            print(json.dumps(runs[-1]), flush=True)

    def peak(name: str) -> float:
        return min(r["peak_mib"] for r in runs if r["variant"] == name)

    full_mib = shapes["Bq"] * shapes["Np"] * shapes["Lq"] * shapes["Lp"] * 4 / MIB
    grads_mib = (shapes["Bq"] * shapes["Lq"] + shapes["Np"] * shapes["Lp"]) * shapes["dim"] * 4
    res = {
        "what": "peak memory of M3 MaxSim forward + backward (issue #34, fault 9)",
        "method": (
            "fresh process per variant and repeat (MALLOC_MMAP_THRESHOLD_=1 MiB, so freed "
            "tensors leave RSS); inputs built and a tiny warm-up run first, "
            "then the peak RSS is reset to the current RSS (Linux /proc/self/clear_refs = 5) "
            "and peak = VmHWM after one forward+backward minus VmRSS before it; peak_mib "
            "below is the minimum over repeats. Includes the inputs' gradients "
            "(input_gradients_mib)."
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated minus memory_allocated before the pass"
        ),
        "device": args.device,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "recipe_shapes": recipe,
        "measured_shapes": shapes,
        "scale": f"Bq / {args.scale}, Np / {args.scale}; Lq, Lp and dim as the recipe",
        "similarity_tensor_mib": round(full_mib, 1),
        "input_gradients_mib": round(grads_mib / MIB, 1),
        "peak_mib": {
            "before": peak("before"),
            "after": peak("after"),
            "after_default_block": peak("after_default_block"),
        },
        "peak_over_similarity_tensor": {
            k: round(peak(k) / full_mib, 2) for k in ("before", "after", "after_default_block")
        },
        "blocks": {
            "after": analytic(shapes, scaled_block)["after_passages_per_block"],
            "after_default_block": analytic(shapes, MAXSIM_BLOCK)["after_passages_per_block"],
            "note": "passages per block; 'after' uses MAXSIM_BLOCK / scale^2 (as many blocks "
            "as at the recipe's shapes), 'after_default_block' MAXSIM_BLOCK itself",
        },
        "analytic_at_recipe_shapes": analytic(recipe, MAXSIM_BLOCK),
        "runs": runs,
    }
    path = write_results(args.out, res, "benchmarks/m3_maxsim_memory.py")
    print(json.dumps({k: res[k] for k in ("peak_mib", "analytic_at_recipe_shapes")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
