"""Per-layer cost of clipping with materialised per-sample gradients vs book-keeping.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bookkeeping_layers.py --batch 384

Why: the quick denoiser's DP step spends most of its extra time on per-sample gradients of
3x3 convolutions at 4x4 latent positions (docs/benchmarks.md section 1). Book-keeping
clipping (Bu et al., 2023) never writes them: each sample's gradient norm comes from two
Gram matrices of its positions (inputs and output gradients), and the clipped sum is ONE
weight-gradient convolution with the output gradients scaled by the clip factors. This
times, per layer shape of the quick denoiser, three ways to get a layer's per-sample norms
and clipped weighted sum (checked equal to each other first): "materialised" (unfold, a
batched product per sample, norms, one weighted sum: the path fedldm takes today),
"bk-matmul" (Gram norms, the weighted sum as one matrix product of the unfolded inputs) and
"bk-conv" (Gram norms, the weighted sum as one weight-gradient convolution). Random tensors,
one layer at a time, so a lower bound on what a whole step could gain: it is not built into
`dp_train`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (out, in, positions per side) of the quick denoiser's 3x3 convolutions.
SHAPES = ((32, 32, 4), (32, 48, 4), (32, 64, 4), (32, 16, 4), (16, 16, 8), (16, 48, 8))


def _ways(x: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], tuple]]:
    n, cin, side = x.shape[0], x.shape[1], x.shape[2]
    cout, positions = g.shape[1], side * side
    flat_g = g.reshape(n, cout, positions)

    def factors(norm_sq: torch.Tensor) -> torch.Tensor:
        return (1.0 / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)

    def gram_norms(cols: torch.Tensor) -> torch.Tensor:
        inputs = torch.bmm(cols.transpose(1, 2), cols)        # [B, L, L]
        grads = torch.bmm(flat_g.transpose(1, 2), flat_g)     # [B, L, L]
        return (inputs * grads).sum((1, 2))

    def materialised() -> tuple:
        cols = F.unfold(x, 3, padding=1)                      # [B, cin*9, L]
        per_sample = torch.bmm(flat_g, cols.transpose(1, 2))  # [B, cout, cin*9]
        norm_sq = per_sample.reshape(n, -1).pow(2).sum(1)
        return (factors(norm_sq) @ per_sample.reshape(n, -1)).view(cout, -1), norm_sq

    def bk_matmul() -> tuple:
        cols = F.unfold(x, 3, padding=1)
        norm_sq = gram_norms(cols)
        scaled = (flat_g * factors(norm_sq)[:, None, None]).permute(1, 0, 2)
        return (scaled.reshape(cout, n * positions)
                @ cols.permute(0, 2, 1).reshape(n * positions, cin * 9)), norm_sq

    def bk_conv() -> tuple:
        norm_sq = gram_norms(F.unfold(x, 3, padding=1))
        w = torch.nn.grad.conv2d_weight(x, (cout, cin, 3, 3),
                                        g * factors(norm_sq)[:, None, None, None], padding=1)
        return w.reshape(cout, -1), norm_sq

    return {"materialised": materialised, "bk-matmul": bk_matmul, "bk-conv": bk_conv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=384)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"batch {args.batch}, 1 thread, median of {args.reps} interleaved calls, ms")
    print("| layer (out <- in, positions) | materialised | bk-matmul | bk-conv |")
    print("|---|---|---|---|")
    for cout, cin, side in SHAPES:
        x = torch.randn(args.batch, cin, side, side, generator=gen)
        g = torch.randn(args.batch, cout, side, side, generator=gen)
        ways = _ways(x, g)
        ref_w, ref_n = ways["materialised"]()
        for name, way in ways.items():  # the same numbers first, then the time
            w, n = way()
            if not (torch.allclose(w, ref_w, rtol=1e-3, atol=1e-3)
                    and torch.allclose(n, ref_n, rtol=1e-3)):
                raise AssertionError(f"{name} disagrees with the materialised path")
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, way in ways.items():
                t = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - t)
        med = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
        print(f"| 3x3, {cout} <- {cin}, {side}x{side} | {med['materialised']} | "
              f"{med['bk-matmul']} | {med['bk-conv']} |")
        print(json.dumps({"layer": [cout, cin, side], "ms": med}))


if __name__ == "__main__":
    main()
