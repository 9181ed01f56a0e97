"""Channel selection and least-squares compensation of a wide (flattened) block.

An output projection `W` (d x n) reads n channels `Z` (tokens x n): the heads' outputs for
`attn_out`, the gated neurons for `mlp_out`. We keep a subset S of channels (whole KV groups for
attention, single neurons for the MLP) and refit `W_S` by ridge regression on a target `T`
(tokens x d) in float64:

    W_S^T = argmin ||T - Z_S B||^2 + lam ||B - B_0||^2 = (C_SS + lam I)^{-1} (R_S + lam B_0),
    C = Z^T Z, R = Z^T T.

B_0 is the prior the ridge pulls towards: zero (plain ridge), or the kept channels' own unrefit
weights, so that directions the calibration text leaves undetermined keep the original weights
instead of whatever fits that text (what transfers to other text). Only the Gram statistics C
and R are needed, so they are accumulated chunk by chunk. Criteria:

- `magnitude`: keep the units whose contribution has the most energy, sum_j C_jj ||W_:j||^2
  (activation-weighted weight magnitude).
- `activation`: keep the units whose activations have the most energy, sum_j C_jj (Minitron's
  activation importance: a head's output norm, a neuron's activation norm; no weights involved).
- `nystrom`: pivoted Cholesky of the contribution correlation D C D (D = diag ||W_:j||): the next
  unit is the one with the largest variance left unexplained by the units already kept, i.e. the
  columns that best span the correlation (a Nystrom approximation).
- `ols`: greedy forward least squares on the target itself: the next unit is the one that most
  reduces the ridge residual ||T - Z_S B||^2 given the units already kept. It knows the target,
  so it also picks channels that repair the flattening error.
"""

from __future__ import annotations

import torch

from depthkit.errors import require

CRITERIA = ("magnitude", "nystrom", "ols", "activation")


class GramAccumulator:
    """Running C = Z^T Z and R = Z^T T in float64 (chunks multiplied in float32 for speed)."""

    def __init__(self) -> None:
        self.C: torch.Tensor | None = None
        self.R: torch.Tensor | None = None
        self.target_energy = 0.0

    def add(self, z: torch.Tensor, t: torch.Tensor, chunk: int = 1024) -> None:
        """Accumulate a batch; C is updated `chunk` columns at a time, so the float32 products stay
        small next to C itself (a wide MLP of a 2B model has 11k channels: C alone is 1 GB)."""
        z, t = z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])
        if self.C is None:
            self.C = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
            self.R = torch.zeros(z.shape[1], t.shape[1], dtype=torch.float64)
        for start in range(0, z.shape[0], chunk):
            zc, tc = z[start : start + chunk].float(), t[start : start + chunk].float()
            for col in range(0, zc.shape[1], chunk):
                self.C[:, col : col + chunk] += zc.T @ zc[:, col : col + chunk]
            self.R += zc.T @ tc
            self.target_energy += float(tc.double().pow(2).sum())

    def solve_and_free(self, keep: torch.Tensor, lam: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """`ridge_solve` on the kept channels, dropping the full Gram matrix before the solve, so
        the peak is C or the kept block and its factorisation, not both."""
        C_ss, R_s = self.C[keep[:, None], keep], self.R[keep]
        self.C = self.R = None
        return _solve_kept(C_ss, R_s, lam, prior)


def ridge_lambda(C: torch.Tensor, ridge: float) -> float:
    """Absolute ridge strength: `ridge` times the mean channel energy (scale-free option)."""
    return ridge * float(C.diagonal().mean().clamp_min(1e-12))


def ridge_solve(
    C: torch.Tensor, R: torch.Tensor, keep: torch.Tensor, lam: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """The refit weight (d x |S|) of the kept channels, float64; `prior` (d x |S|): what the ridge
    pulls towards (default zero)."""
    return _solve_kept(C[keep[:, None], keep], R[keep], lam, prior)


def _solve_kept(C_ss: torch.Tensor, R_s: torch.Tensor, lam: float, prior: torch.Tensor | None) -> torch.Tensor:
    C_ss.diagonal().add_(lam)  # C_ss is a fresh copy: safe to edit in place
    if prior is not None:
        R_s = R_s + lam * prior.T.to(R_s.dtype)
    return torch.linalg.solve(C_ss, R_s).T


def residual_energy(C: torch.Tensor, R: torch.Tensor, keep: torch.Tensor, lam: float, target_energy: float) -> float:
    """||T - Z_S B||^2 of the ridge solution B (plus its ridge penalty), from Gram statistics."""
    B = ridge_solve(C, R, keep, lam).T
    return target_energy - float((B * R[keep]).sum())


def _column_pivots(
    C: torch.Tensor, keep: int, R: torch.Tensor | None, lam: float, block: int = 32
) -> torch.Tensor:
    """Greedy pivoted Cholesky on C + lam I: `keep` single-column pivots, in order.

    With R (= Z^T T) the pivot maximises the residual-fit gain ||R_res[j]||^2 / d_j (forward
    least squares); without it, the residual variance d_j (Nystrom). For speed the greedy runs in
    rounds: each round ranks all columns once, then picks `block` pivots one by one, exactly, among
    the 4 x `block` best ranked (a pool), so the costly updates are matrix products per round.
    When the pool holds every column this is plain greedy selection.
    """
    n = C.shape[0]
    factor = torch.zeros(n, keep, dtype=C.dtype)
    diag = C.diagonal() + lam
    residual = R.clone() if R is not None else None
    chosen = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    while len(order) < keep:
        k, b = len(order), min(block, keep - len(order))
        gain = residual.pow(2).sum(1) / diag.clamp_min(1e-30) if residual is not None else diag.clone()
        gain[chosen] = -torch.inf
        pool = gain.topk(min(4 * b, int((~chosen).sum()))).indices
        # Residual correlation columns of the pool given the pivots so far (n x pool).
        cols = C[:, pool] - factor[:, :k] @ factor[pool, :k].T
        cols[pool, torch.arange(len(pool))] += lam
        fit = None if residual is None else residual[pool] @ residual[pool].T
        picked = _pool_greedy(cols[pool].clone(), fit, b)
        # Factor columns of the picked pivots: K[:, S] G^-T with G G^T = K[S, S] (exact Cholesky).
        chol = _stable_cholesky(cols[pool[picked]][:, picked])
        block_factor = torch.linalg.solve_triangular(chol, cols[:, picked].T, upper=False).T
        factor[:, k : k + b] = block_factor
        diag = diag - block_factor.pow(2).sum(1)
        if residual is not None:
            # Coefficients of the new pivots: G^-1 R_res[S], so R_res -= L_S (G^-1 R_res[S]).
            residual -= block_factor @ torch.linalg.solve_triangular(chol, residual[pool[picked]], upper=False)
        chosen[pool[picked]] = True
        order += pool[picked].tolist()
    return torch.tensor(order)


def _stable_cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a positive semi-definite block; where rounding has left it just short of
    definite (more pivots than the calibration activations have rank), a growing diagonal jitter."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    jitter = 1e-10 * float(matrix.diagonal().abs().mean().clamp_min(1e-30))
    while int(info) != 0:
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * torch.eye(len(matrix), dtype=matrix.dtype))
        jitter *= 10
    return factor


def _pool_greedy(K: torch.Tensor, M: torch.Tensor | None, count: int) -> torch.Tensor:
    """`count` greedy pivots within a pool, on m x m matrices only (small: no threading overhead).

    K is the pool's residual correlation; M = R R^T the Gram of its residual fit rows, whose
    diagonal gives the gains ||R_res[i]||^2 and which follows the rank-1 updates of R exactly.
    """
    taken = torch.zeros(K.shape[0], dtype=torch.bool)
    picked = []
    for _ in range(count):
        d = K.diagonal().clamp_min(1e-30)
        gain = M.diagonal() / d if M is not None else d.clone()
        gain[taken] = -torch.inf
        s = int(gain.argmax())
        column = K[:, s] / d[s].sqrt()
        if M is not None:  # R <- R - column u^T with u = R[s] / sqrt(d_s)
            cross, norm_u = M[:, s] / d[s].sqrt(), M[s, s] / d[s]  # R u and u.u
            M -= torch.outer(column, cross) + torch.outer(cross, column) - norm_u * torch.outer(column, column)
        K -= torch.outer(column, column)
        taken[s] = True
        picked.append(s)
    return torch.tensor(picked)


def _unit_pivots(
    C: torch.Tensor, units: list[torch.Tensor], keep: int, R: torch.Tensor | None, lam: float
) -> list[int]:
    """Greedy block-pivoted selection of whole units (KV groups): explicit Schur complements.

    Same gains as `_column_pivots` for units of several columns: residual trace (Nystrom) or
    residual-fit gain tr(R_g^T (K_gg + lam)^{-1} R_g) (forward least squares). Few units only.
    """
    chosen: list[int] = []
    K, R_res = C, R
    for _ in range(keep):
        if chosen:
            cols = torch.cat([units[u] for u in chosen])
            inverse = torch.linalg.inv(C[cols][:, cols] + lam * torch.eye(len(cols), dtype=C.dtype))
            K = C - C[:, cols] @ inverse @ C[cols]
            R_res = None if R is None else R - C[:, cols] @ inverse @ R[cols]
        gains = {}
        for u, idx in enumerate(units):
            if u in chosen:
                continue
            K_gg = K[idx][:, idx]
            if R_res is None:
                gains[u] = float(K_gg.diagonal().sum())
            else:
                eye = lam * torch.eye(len(idx), dtype=C.dtype)
                gains[u] = float((R_res[idx] * torch.linalg.solve(K_gg + eye, R_res[idx])).sum())
        chosen.append(max(gains, key=gains.get))
    return chosen


def select_units(
    C: torch.Tensor,
    R: torch.Tensor,
    weight: torch.Tensor,
    units: list[torch.Tensor],
    keep: int,
    criterion: str,
    lam: float,
) -> list[int]:
    """Indices (sorted) of the `keep` units to keep; `weight` is the unpruned output projection."""
    require(criterion in CRITERIA, f"criterion must be one of {', '.join(CRITERIA)}, got '{criterion}'")
    norms = weight.double().pow(2).sum(0)  # ||W_:j||^2 per input channel
    if criterion in ("magnitude", "activation"):
        energy = C.diagonal() * norms if criterion == "magnitude" else C.diagonal()
        scores = torch.stack([energy[idx].sum() for idx in units])
        return sorted(scores.topk(keep).indices.tolist())
    scale = norms.sqrt()
    # Nystrom spans the contribution correlation D C D; OLS fits the target T directly.
    K = C * scale[:, None] * scale[None, :] if criterion == "nystrom" else C
    target = R if criterion == "ols" else None
    lam_k = lam if criterion == "ols" else ridge_lambda(K, 1e-6)
    if all(len(idx) == 1 for idx in units):
        columns = torch.cat(units)
        if not torch.equal(columns, torch.arange(K.shape[0])):  # every channel in order: no 1 GB copies
            K, target = K[columns[:, None], columns], None if target is None else target[columns]
        pivots = _column_pivots(K, keep, target, lam_k)
        return sorted(columns[pivots].tolist())
    return sorted(_unit_pivots(K, units, keep, target, lam_k))
