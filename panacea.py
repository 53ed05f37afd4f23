"""
The preference side of Panacea: preference vectors, aggregation functions and Pareto metrics.

    parse_pref("0.2,0.8", objectives)      user text -> lambda in the simplex (normalised)
    sample_prefs(n, m)                     training lambdas: a mix of simplex vertices and Dirichlet(1)
    aggregate(J, lambda, method)           g_lambda(J): LS, Tchebycheff or smooth Tchebycheff (maximised)
    aggregation_weights(J, lambda, ...)    dg/dJ_i, the weight each objective's gradient receives
    pref_grid(m, divisions)                evaluation grid: m = 2 -> 11 points, m >= 3 -> simplex lattice
    fixed_prefs(method, m)                 the fixed lambda of each model a baseline trains (Panacea: None)
    pareto_front, hypervolume, inner_product, sparsity, spacing   (maximisation everywhere)
"""
import bisect
import math

import numpy as np
import torch


def parse_pref(text, objectives):
    """Parse "0.2,0.8" into a float32 preference over `objectives`. Non-negative finite values that
    do not sum to 1 are normalised; anything else is a ValueError naming the objectives."""
    names = ",".join(objectives)
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--pref takes {len(objectives)} comma-separated numbers, one per objective ({names}); "
                         f"got {text!r}") from None
    if len(vals) != len(objectives):
        raise ValueError(f"--pref needs {len(objectives)} values, one per objective ({names}); got {len(vals)}")
    if not all(math.isfinite(v) for v in vals) or any(v < 0 for v in vals):
        raise ValueError(f"--pref values must be finite and non-negative (order: {names}); got {text!r}")
    if sum(vals) <= 0:
        raise ValueError(f"--pref values must not all be zero (order: {names})")
    p = torch.tensor(vals, dtype=torch.float32)
    return p / p.sum()


def sample_prefs(n, m, vertex_prob=0.3, generator=None, group=1):
    """(n, m) preferences: with probability vertex_prob a uniformly chosen vertex (one objective
    only, as the paper favours the extremes), else Dirichlet(1) = normalised Exp(1) draws; one draw
    for each group of `group` consecutive rows (n a multiple of group)."""
    if group > 1:
        return sample_prefs(n // group, m, vertex_prob, generator).repeat_interleave(group, 0)
    u = torch.rand(n, generator=generator)
    vertices = torch.eye(m)[torch.randint(m, (n,), generator=generator)]
    dirichlet = -torch.log(torch.rand(n, m, generator=generator).clamp_min(1e-12))
    p = torch.where((u < vertex_prob)[:, None], vertices, dirichlet)
    return p / p.sum(-1, keepdim=True)  # renormalise in float32


def aggregate(J, pref, method="ls", ideal=None, mu=0.0):
    """g_lambda(J) to be maximised, over the last dim: J, pref (..., m) -> (...).
    ls:   g = sum_i lambda_i J_i                                        (linear scalarisation)
    tche: g = min_i lambda_i (J_i - z_i), z = ideal point (>= every attainable J)  (Tchebycheff)
          with mu > 0 the smooth variant g = -mu logsumexp_i(-lambda_i (J_i - z_i) / mu)"""
    if method == "ls":
        return (pref * J).sum(-1)
    if method == "tche":
        d = pref * (J - (0.0 if ideal is None else ideal))
        return -mu * torch.logsumexp(-d / mu, dim=-1) if mu > 0 else d.min(-1).values
    raise ValueError(f"unknown aggregation {method!r}; use ls or tche")


def aggregation_weights(J, pref, method="ls", ideal=None, mu=0.0):
    """dg/dJ_i: the policy gradient of g_lambda is sum_i (dg/dJ_i) grad J_i, so the advantage of
    objective i is weighted by it. ls -> lambda; tche -> lambda_i on the active objective only."""
    with torch.enable_grad():
        J = J.detach().float().requires_grad_(True)
        (w,) = torch.autograd.grad(aggregate(J, pref, method, ideal, mu).sum(), J)
    return w


def pref_grid(m, divisions=None):
    """All lambda with entries in {0, 1/d, ..., 1} summing to 1 (d = divisions), lambda_1 ascending.
    The evaluation's default d: 10 for m = 2 (the paper's 11-point grid), 4 for m >= 3 (15 points at m = 3)."""
    divisions = divisions or (10 if m == 2 else 4)
    pts = [c for c in np.ndindex(*(divisions + 1,) * (m - 1)) if sum(c) <= divisions]
    grid = [[c / divisions for c in pt] + [(divisions - sum(pt)) / divisions] for pt in pts]
    return sorted(grid)


def fixed_prefs(method, m, dps_points=5):
    """The fixed lambda of each model a method trains: Panacea one conditioned model (None), Rewarded
    Soups one per objective (one-hot), DPS one per point of a grid (m >= 3: the smallest simplex
    lattice with at least dps_points points)."""
    if method == "panacea":
        return [None]
    if method == "rs":
        return torch.eye(m).tolist()
    if m == 2:
        return pref_grid(2, dps_points - 1)
    return pref_grid(m, next(d for d in range(1, 100) if len(pref_grid(m, d)) >= dps_points))


# ----------------------------------------------------------------------------------------------
# Pareto metrics (points: (N, m) array of mean scores, larger is better)

def pareto_front(points):
    """The distinct points that no other point dominates (>= everywhere, > somewhere), (K, m),
    in descending lexicographic order. Sweep in that order: a point can only be dominated by an
    earlier one. m = 2: dominated iff an earlier point is at least as high on objective 2 (a running
    max); m = 3: the earlier kept points' (objective 2, objective 3) staircase answers "is one of them
    >= on both?" by bisection, O(N log N); m >= 4: a comparison with every kept point."""
    P = np.unique(np.asarray(points, dtype=float), axis=0)[::-1]
    if len(P) == 0 or P.shape[1] == 1:
        return P[:1]
    if P.shape[1] == 2:
        higher_before = np.concatenate([[-np.inf], np.maximum.accumulate(P[:-1, 1])])
        return P[P[:, 1] > higher_before]
    keep = np.zeros(len(P), dtype=bool)
    if P.shape[1] == 3:
        ys, zs = [], []  # staircase of kept points (y, z); an earlier point has x' >= x
        for i, (_, y, z) in enumerate(P):
            keep[i] = _staircase_insert(ys, zs, y, z) is not None
        return P[keep]
    for i, p in enumerate(P):
        K = P[keep]
        keep[i] = not np.any(np.all(K >= p, axis=1))
    return P[keep]


def hypervolume(points, ref):
    """Exact volume dominated by `points` and bounded below by `ref` (maximisation). Points that do
    not strictly dominate ref contribute nothing. m = 2: a staircase of rectangles. m = 3: sweep
    objective 3 downwards, adding the area of the (objective 1, objective 2) staircase of the points
    seen so far times the height of each slab, O(N log N). m >= 4: slicing recursively (O(N^m))."""
    P = np.asarray(points, dtype=float).reshape(-1, len(ref)) - np.asarray(ref, dtype=float)
    P = pareto_front(P[np.all(P > 0, axis=1)])
    if len(P) == 0:
        return 0.0
    if P.shape[1] == 2:  # objective 1 descending, objective 2 ascending
        return float(np.sum(P[:, 0] * np.diff(P[:, 1], prepend=0.0)))
    if P.shape[1] > 3:
        return _hv(P)
    P = P[np.argsort(-P[:, 2], kind="stable")]
    xs, ys, area, vol = [], [], 0.0, 0.0  # the slab's staircase: xs ascending, ys descending
    for i, (x, y, z) in enumerate(P):
        covered = _staircase_insert(xs, ys, x, y)
        if covered is not None:  # the area of the union of boxes [0, x_k] x [0, y_k], updated locally
            lo, old_xs, old_ys, right = covered
            prev = xs[lo - 1] if lo > 0 else 0.0
            old = sum((a - b) * c for a, b, c in zip(old_xs, [prev] + old_xs[:-1], old_ys))
            if right is not None:  # the next point's step now starts at x instead of at the last covered one
                old += (right[0] - (old_xs[-1] if old_xs else prev)) * right[1]
            area += (x - prev) * y + ((right[0] - x) * right[1] if right is not None else 0.0) - old
        vol += area * (z - (P[i + 1, 2] if i + 1 < len(P) else 0.0))
    return float(vol)


def _staircase_insert(us, vs, u, v):
    """A 2-D staircase of mutually non-dominated points, us ascending and vs descending (lists,
    changed in place). Insert (u, v) unless a point has u' >= u and v' >= v (then None); drop the
    points (u, v) now covers. Returns (index of u, covered us, covered vs, the next point or None)."""
    j = bisect.bisect_left(us, u)
    if j < len(us) and vs[j] >= v:
        return None
    hi = bisect.bisect_right(us, u)
    lo = hi
    while lo > 0 and vs[lo - 1] <= v:
        lo -= 1
    covered = (lo, us[lo:hi], vs[lo:hi], (us[hi], vs[hi]) if hi < len(us) else None)
    us[lo:hi], vs[lo:hi] = [u], [v]
    return covered


def _hv(P):
    if len(P) == 0:
        return 0.0
    if P.shape[1] == 1:
        return float(P.max())
    P = P[np.argsort(-P[:, -1])]
    vol = 0.0
    for j in range(len(P)):
        below = P[j + 1, -1] if j + 1 < len(P) else 0.0
        if P[j, -1] > below:
            vol += (P[j, -1] - below) * _hv(P[: j + 1, :-1])
    return vol


def inner_product(points, prefs):
    """Mean over the grid of <lambda, xi(lambda)>."""
    return float(np.mean(np.sum(np.asarray(points) * np.asarray(prefs), axis=1)))


def sparsity(points):
    """sum_i sum_j (P~_i(j) - P~_i(j+1))^2 / (m (N - 1)), P~_i = objective i's values sorted."""
    P = np.sort(np.asarray(points, dtype=float), axis=0)
    N, m = P.shape
    return float(np.sum(np.diff(P, axis=0) ** 2) / (m * (N - 1))) if N > 1 else 0.0


def spacing(points):
    """Schott's spacing: the standard deviation (N - 1 denominator) of each point's L1 distance
    to its nearest neighbour. 0 = evenly spread."""
    P = np.asarray(points, dtype=float)
    if len(P) < 2:
        return 0.0
    D = np.abs(P[:, None, :] - P[None, :, :]).sum(-1)
    np.fill_diagonal(D, np.inf)
    return float(np.std(D.min(1), ddof=1))


def front_metrics(points, prefs, ref):
    return {"hypervolume": hypervolume(points, ref), "inner_product": inner_product(points, prefs),
            "sparsity": sparsity(points), "spacing": spacing(points)}
