"""Memory-bounded exact nearest-neighbour search and greedy k-center coreset selection.

Both run on whatever device their inputs live on (CUDA when present, else the CPU) in float32
chunks: no distance matrix larger than ``chunk`` elements exists at any time, whatever the
number of queries, bank rows or candidates. Squared distances use ‖a‖² + ‖b‖² − 2a·b (one
matrix product per block) clamped at 0 against cancellation.
"""

from __future__ import annotations

import torch

# Elements of one distance block: 2^24 float32 = 64 MiB.
DEFAULT_CHUNK = 1 << 24


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of elements, got {chunk}")


def block_sizes(queries: int, rows: int, chunk: int) -> tuple[int, int]:
    """(query rows, bank rows) of one block, with their product at most ``max(chunk, 1)``."""
    _check_chunk(chunk)
    bank_rows = min(rows, max(1, chunk // max(1, min(queries, 4096))))
    query_rows = min(queries, max(1, chunk // bank_rows))
    return max(1, query_rows), max(1, bank_rows)


def squared_distances(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Q, M) squared euclidean distances of float32 rows, clamped at 0."""
    q_norm = q.pow(2).sum(1, keepdim=True)
    b_norm = b.pow(2).sum(1)
    return torch.addmm(q_norm + b_norm, q, b.T, alpha=-2.0).clamp_(min=0.0)


def knn(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest bank rows of every query: (distances, indices), both (Q, k), nearest
    first. The bank may live on the CPU (or in float16) while the queries sit on the GPU: blocks
    are moved and cast on the fly, so only one block is ever resident beside the queries."""
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"knn needs (Q, D) queries and an (M, D) bank; got {tuple(queries.shape)} and "
            f"{tuple(bank.shape)}"
        )
    n_q, n_b = queries.shape[0], bank.shape[0]
    if not 1 <= k <= n_b:
        raise ValueError(f"k must be in 1..{n_b} (the bank size), got {k}")
    device = queries.device
    q_rows, b_rows = block_sizes(n_q, n_b, chunk)
    out_d = torch.empty(n_q, k, device=device)
    out_i = torch.empty(n_q, k, dtype=torch.long, device=device)
    for qs in range(0, n_q, q_rows):
        q = queries[qs : qs + q_rows].to(torch.float32)
        best_d = torch.full((q.shape[0], k), float("inf"), device=device)
        best_i = torch.full((q.shape[0], k), -1, dtype=torch.long, device=device)
        for bs in range(0, n_b, b_rows):
            b = bank[bs : bs + b_rows].to(device=device, dtype=torch.float32)
            best_d, best_i = _merge(best_d, best_i, squared_distances(q, b), bs)
        out_d[qs : qs + q.shape[0]] = best_d.sqrt_()
        out_i[qs : qs + q.shape[0]] = best_i
    return out_d, out_i


def _merge(
    best_d: torch.Tensor, best_i: torch.Tensor, d: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one (Q, B) block of squared distances (bank rows from ``offset``) into the running
    k best. The block is reduced to its own k best first, so no copy of it is ever made; for
    k = 1 ties keep the earliest bank row, as ``np.argmin`` does."""
    k = best_d.shape[1]
    if k == 1:
        block_d, block_i = d.min(1, keepdim=True)
        better = block_d < best_d
        return torch.where(better, block_d, best_d), torch.where(better, block_i + offset, best_i)
    block_d, block_i = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=True)
    cand_d, pos = torch.cat([best_d, block_d], 1).topk(k, dim=1, largest=False, sorted=True)
    return cand_d, torch.cat([best_i, block_i + offset], 1).gather(1, pos)


def greedy_coreset(
    features: torch.Tensor, n: int, start: int = 0, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center (PatchCore's coreset): start at row
    ``start``, then repeatedly add the row farthest from everything chosen so far.

    Cost: n iterations, each one pass over all N rows (N·d multiply-adds, memory-bound), so
    O(n·N·d); ``features`` should be the randomly projected ones. The min-distance update runs
    in row blocks of ``chunk`` rows (its temporaries are vectors: one block is ``chunk`` floats,
    so 5 M rows take one block and ~6 kernel launches per iteration); the loop never
    synchronises with the device.
    """
    n_rows = features.shape[0]
    if not 1 <= n <= n_rows:
        raise ValueError(f"coreset size must be in 1..{n_rows}, got {n}")
    if not 0 <= start < n_rows:
        raise ValueError(f"start row {start} outside 0..{n_rows - 1}")
    _check_chunk(chunk)
    device = features.device
    step = max(1, chunk // max(1, features.shape[1]))  # squares: a rows×d temporary
    norms = torch.cat([features[s : s + step].pow(2).sum(1) for s in range(0, n_rows, step)])
    rows = chunk
    min_d = torch.full((n_rows,), float("inf"), device=device)
    chosen = torch.empty(n, dtype=torch.long, device=device)
    # ``current`` stays a device tensor: indexing with a 0-d tensor (features[current]) would
    # call .item() (a device synchronisation per iteration); index_select does not.
    current = torch.full((1,), start, dtype=torch.long, device=device)
    for i in range(n):
        chosen[i : i + 1] = current
        center = features.index_select(0, current)[0]
        c_norm = center.pow(2).sum()
        for s in range(0, n_rows, rows):
            d = torch.addmv(norms[s : s + rows], features[s : s + rows], center, alpha=-2.0)
            d.add_(c_norm).clamp_(min=0.0)
            torch.minimum(min_d[s : s + rows], d, out=min_d[s : s + rows])
        current = min_d.argmax().view(1)
    return chosen


def random_projection(dim: int, out_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """(dim, out_dim) Gaussian Johnson–Lindenstrauss projection (entries N(0, 1/out_dim)),
    seeded, so distances are preserved in expectation for the approximate coreset."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(dim, out_dim, generator=gen) / out_dim**0.5).to(device)
