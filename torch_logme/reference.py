"""NumPy reference implementation of LogME (You et al., ICML 2021; JMLR 2022).

This module is the independent oracle of the test suite and the baseline of
the benchmarks. It deliberately follows the structure of the published code
(github.com/thuml/LogME, file ``LogME.py``): one decomposition of the feature
matrix, then a Python loop over the target columns, each column running its
own scalar fixed-point iteration. Nothing here is vectorised over classes and
nothing imports torch or the rest of ``torch_logme``, so that the batched
PyTorch implementation is checked against code that shares none of its parts.

Mapping to the published ``LogME`` class:

* ``method="fixed_point"`` is ``LogME._fit_fixed_point``, the JMLR 2022
  algorithm and the published default: a truncated SVD (through the Gram
  matrix when N > D, a thin SVD of F otherwise), then per column the scalar
  iteration on ``t = alpha / beta`` with tolerance ``1e-3``.
* ``method="icml"`` is ``LogME._fit_icml``, the ICML 2021 algorithm: an SVD
  of the D x D Gram matrix, then per column an iteration that forms the
  posterior mean and the residual explicitly, with tolerance ``1e-2``.

Known defect of the published fixed-point code: its log-determinant sums
``log(alpha + beta * sigma_i)`` over the ``k = rank`` kept singular values
only. When N < D (or the features are rank deficient) the ``D - k`` zero
eigenvalues of ``F^T F`` are dropped although each contributes
``log(alpha)``. ``legacy_evidence=False`` (default) adds the missing
``(D - k) * log(alpha)``; ``legacy_evidence=True`` reproduces the published
numbers exactly. (The original repository's maintainers accepted this as a
bug in its issue #23.) With N > D the Gram-based SVD keeps every singular value
above 1e-10; round-off usually puts a "zero" one near 1e-8, so k = D even
for rank-deficient features and the two settings agree, but LAPACK may
return an exact 0 (all-zero columns, say), which is then dropped. The ICML
code sums over all D eigenvalues already, so the flag has no effect for
``method="icml"``.

When numba is installed the per-column work is JIT-compiled, as in the
published code, so benchmarks compare against it at its published speed.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

__all__ = [
    "LogME", "NUMBA_AVAILABLE", "METHODS",
    # the other transferability scores (appended below LogME)
    "leep", "nce", "h_score", "regularized_h_score", "transrate", "gbc", "ledoit_wolf", "coding_rate",
    "sfda", "ncti", "ncti_combine", "largest_eigenvalue",
    "nleep", "pca_coordinates", "kmeans_labels", "gaussian_mixture_posteriors",
    "etran", "etran_energy", "etran_lda", "etran_combine",
    "knn", "parc",
]

METHODS = ("fixed_point", "icml")

# Published stopping rules: at most 11 updates; relative change of
# t = alpha / beta at most 1e-3 (fixed point, "<=") or below 1e-2 (ICML, "<").
_MAX_ITER = 11
_TOL = {"fixed_point": 1e-3, "icml": 1e-2}
# Added to ||m||^2 and to the residual before dividing, as published.
_EPS = 1e-5
# Singular values of F at or below this are dropped by the Gram-based SVD.
_SVD_CUTOFF = 1e-10
_LOG_2PI = math.log(2.0 * math.pi)


def _truncated_svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``f`` [N, D] (N > D) through its Gram matrix.

    Returns ``u`` [N, k], ``s`` [k], ``vh`` [k, D] with the ``k`` singular
    values above ``_SVD_CUTOFF``. Decomposing the D x D Gram matrix costs
    O(N D^2 + D^3) instead of an SVD of the tall matrix itself.
    """
    g = np.ascontiguousarray(f.T) @ f
    _, s_g, vh = np.linalg.svd(g)
    s = np.sqrt(s_g)
    k = int(np.sum(s > _SVD_CUTOFF))
    vh_k = np.ascontiguousarray(vh[:k])
    s_k = np.ascontiguousarray(s[:k])
    # u_i = F v_i / s_i: the left singular vectors follow from the right ones.
    u = (f @ np.ascontiguousarray(vh_k.T)) / s_k
    return u, s_k, vh_k


def _fixed_point_column(
    sigma: np.ndarray,
    x2: np.ndarray,
    res_x2: float,
    n: int,
    d: int,
    legacy: bool,
    max_iter: int,
    tol: float,
) -> tuple[float, float, float, float]:
    """Scalar JMLR fixed point for one target column.

    ``sigma`` [k]: squared singular values of F; ``x2`` [k]: squared
    projections ``(u_i^T y)^2``; ``res_x2``: the part of ``||y||^2`` outside
    the column space of F. Returns ``(alpha, beta, t_old, evidence / N)``,
    where ``t_old`` is the ``alpha / beta`` that the last step started from:
    the published code reports the posterior mean at that ``t``.
    """
    alpha = 1.0
    beta = 1.0
    t = 1.0
    m2 = 0.0
    res2 = 0.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = np.sum(sigma / (sigma + t))
        m2 = np.sum(sigma * x2 / ((t + sigma) ** 2))
        res2 = np.sum(x2 / ((1.0 + sigma / t) ** 2)) + res_x2
        alpha = gamma / (m2 + _EPS)
        beta = (n - gamma) / (res2 + _EPS)
        t_new = alpha / beta
        if abs(t_new - t) / t <= tol:
            break
    k = sigma.shape[0]
    logdet = np.sum(np.log(alpha + beta * sigma))
    if not legacy:
        # The D - k zero eigenvalues of F^T F each add log(alpha + beta * 0).
        logdet += (d - k) * math.log(alpha)
    evidence = (
        0.5 * d * math.log(alpha)
        + 0.5 * n * math.log(beta)
        - 0.5 * logdet
        - 0.5 * beta * res2
        - 0.5 * alpha * m2
        - 0.5 * n * _LOG_2PI
    )
    return alpha, beta, t, evidence / n


def _icml_column(
    f: np.ndarray,
    ft: np.ndarray,
    y: np.ndarray,
    v: np.ndarray,
    s: np.ndarray,
    vh: np.ndarray,
    max_iter: int,
    tol: float,
) -> tuple[float, float, float, np.ndarray]:
    """ICML 2021 iteration for one target column.

    ``f`` [N, D] and its contiguous transpose ``ft`` [D, N]; ``y`` [N];
    ``v, s, vh``: SVD of ``F^T F`` (``s`` [D] are its eigenvalues). Returns
    ``(alpha, beta, evidence / N, m)`` with the posterior mean ``m`` [D].
    """
    n = f.shape[0]
    d = f.shape[1]
    alpha = 1.0
    beta = 1.0
    lam = 1.0
    alpha_de = 0.0
    beta_de = 0.0
    m = np.zeros(d)
    tmp = vh @ (ft @ y)
    for _ in range(max_iter):
        gamma = np.sum(s / (s + lam))
        m = v @ (tmp * beta / (alpha + beta * s))
        alpha_de = np.sum(m * m)
        alpha = gamma / (alpha_de + _EPS)
        # The residual is formed explicitly, as the published ICML code does.
        r = y - f @ m
        beta_de = np.sum(r * r)
        beta = (n - gamma) / (beta_de + _EPS)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < tol:
            break
        lam = new_lam
    evidence = (
        0.5 * d * math.log(alpha)
        + 0.5 * n * math.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * s))
        - 0.5 * beta * (beta_de + _EPS)
        - 0.5 * alpha * (alpha_de + _EPS)
        - 0.5 * n * _LOG_2PI
    )
    return alpha, beta, evidence / n, m


def _numba_usable() -> bool:
    try:
        import numba  # noqa: F401

        # numba's np.dot / np.linalg.svd call SciPy's BLAS and LAPACK.
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


NUMBA_AVAILABLE: bool = _numba_usable()

_PY_KERNELS = (_truncated_svd, _fixed_point_column, _icml_column)
_NB_KERNELS: Optional[tuple]  # None without numba
if NUMBA_AVAILABLE:
    import numba

    # Compiled lazily on first call; cache=False keeps no files next to the
    # package (it may be installed read-only).
    _NB_KERNELS = tuple(numba.njit(cache=False)(fn) for fn in _PY_KERNELS)
else:
    _NB_KERNELS = None


class LogME:
    """LogME score of features for a target, computed as the published code does.

    Drop-in equivalent of ``LogME`` in github.com/thuml/LogME (``LogME.py``):
    ``method="fixed_point"`` follows ``_fit_fixed_point`` (JMLR 2022, the
    published default), ``method="icml"`` follows ``_fit_icml`` (ICML 2021).
    ``legacy_evidence=True`` reproduces the published fixed-point evidence,
    which omits ``(D - k) / 2 * log(alpha)`` when F has rank ``k < D`` (always
    when N < D); the default adds it, giving the true log evidence. The flag
    does not change ``method="icml"``, whose published evidence is correct.

    The score is a mean log density per sample: it can be positive, negative
    or above 1; larger means the features suit the target better.

    Args:
        regression: targets are float values [N] or [N, C] instead of labels.
        method: ``"fixed_point"`` or ``"icml"``.
        legacy_evidence: reproduce the published fixed-point log-determinant.
        use_numba: ``None`` uses numba when installed; ``False`` forces pure
            Python; ``True`` requires numba.
        max_iter: maximum number of updates per column (published: 11).
        tol: relative tolerance on ``alpha / beta``; ``None`` takes the
            published one (1e-3 fixed point, 1e-2 ICML).

    Attributes after ``fit``: ``alphas``, ``betas``, ``evidences`` [C],
    ``ms`` [C, D], ``num_dim`` (C) and ``fitted``.
    """

    def __init__(
        self,
        regression: bool = False,
        method: str = "fixed_point",
        legacy_evidence: bool = False,
        *,
        use_numba: bool | None = None,
        max_iter: int = _MAX_ITER,
        tol: float | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if use_numba and not NUMBA_AVAILABLE:
            raise ImportError(
                "use_numba=True needs numba (and SciPy, which numba uses for "
                "linear algebra): pip install numba scipy"
            )
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.regression = bool(regression)
        self.method = method
        self.legacy_evidence = bool(legacy_evidence)
        self.use_numba = NUMBA_AVAILABLE if use_numba is None else bool(use_numba)
        self.max_iter = int(max_iter)
        self.tol = float(_TOL[method] if tol is None else tol)
        self.reset()

    def reset(self) -> None:
        """Forget the fitted parameters."""
        self.num_dim = 0
        self.alphas = np.zeros(0)
        self.betas = np.zeros(0)
        self.evidences = np.zeros(0)
        self.ms = np.zeros((0, 0))
        self.fitted = False

    def _kernels(self) -> tuple:
        if self.use_numba:
            assert _NB_KERNELS is not None  # __init__ refuses use_numba without numba
            return _NB_KERNELS
        return _PY_KERNELS

    def _targets(self, y: np.ndarray, n: int) -> np.ndarray:
        """Target matrix [N, C] in float64 (one-hot columns for labels)."""
        y = np.asarray(y)
        if self.regression:
            y = y.astype(np.float64)
            if y.ndim == 1:
                y = y.reshape(-1, 1)
            if y.ndim != 2:
                raise ValueError(f"regression targets must be [N] or [N, C], got shape {y.shape}")
        else:
            if y.ndim != 1:
                raise ValueError(f"class labels must be [N], got shape {y.shape}")
            if y.size and y.min() < 0:
                raise ValueError("class labels must be non-negative")
            # Classes are 0..max(y); a class missing below the max still gets
            # an (all-zero) column, as in the published code.
            num_classes = int(y.max()) + 1
            y = np.stack([(y == i).astype(np.float64) for i in range(num_classes)], axis=1)
        if y.shape[0] != n:
            raise ValueError(f"features have {n} rows but targets have {y.shape[0]}")
        return y

    def fit(self, f: np.ndarray, y: np.ndarray) -> float:
        """Fit on features ``f`` [N, D] and targets ``y``; return the LogME score.

        ``y`` is int labels [N] (classification) or floats [N] / [N, C]
        (regression). The score is the mean of the per-column evidences.
        """
        if self.fitted:
            # stacklevel=1, the published code's: the warning names this line.
            warnings.warn("re-fitting for new data. old parameters cleared.", stacklevel=1)
            self.reset()
        f = np.ascontiguousarray(np.asarray(f, dtype=np.float64))
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {f.shape}")
        y = self._targets(y, f.shape[0])
        self.num_dim = y.shape[1]
        if self.method == "fixed_point":
            self._fit_fixed_point(f, y)
        else:
            self._fit_icml(f, y)
        self.fitted = True
        return float(np.mean(self.evidences))

    def _fit_fixed_point(self, f: np.ndarray, y: np.ndarray) -> None:
        """JMLR 2022 algorithm: one SVD, then a scalar fixed point per column."""
        truncated_svd, fixed_point_column, _ = self._kernels()
        n, d = f.shape
        if n > d:
            u, s, vh = truncated_svd(f)
        else:
            u, s, vh = np.linalg.svd(f, full_matrices=False)
        u = np.ascontiguousarray(u)
        s = np.ascontiguousarray(s)
        vh = np.ascontiguousarray(vh)
        sigma = s ** 2
        alphas, betas, evidences, ms = [], [], [], []
        for i in range(self.num_dim):
            y_i = np.ascontiguousarray(y[:, i])
            x = u.T @ y_i
            x2 = x ** 2
            # ||y||^2 minus its part inside the column space of F.
            res_x2 = float(y_i @ y_i - x2.sum())
            alpha, beta, t, evidence = fixed_point_column(
                sigma, x2, res_x2, n, d, self.legacy_evidence, self.max_iter, self.tol
            )
            # The published code reports m at the t the last step started from.
            m = vh.T @ (s * x / (t + sigma))
            alphas.append(alpha)
            betas.append(beta)
            evidences.append(evidence)
            ms.append(m)
        self._store(alphas, betas, evidences, ms, d)

    def _fit_icml(self, f: np.ndarray, y: np.ndarray) -> None:
        """ICML 2021 algorithm: SVD of F^T F, then the explicit iteration per column."""
        _, _, icml_column = self._kernels()
        ft = np.ascontiguousarray(f.T)
        v, s, vh = np.linalg.svd(ft @ f)
        v = np.ascontiguousarray(v)
        s = np.ascontiguousarray(s)
        vh = np.ascontiguousarray(vh)
        alphas, betas, evidences, ms = [], [], [], []
        for i in range(self.num_dim):
            y_i = np.ascontiguousarray(y[:, i])
            alpha, beta, evidence, m = icml_column(f, ft, y_i, v, s, vh, self.max_iter, self.tol)
            alphas.append(alpha)
            betas.append(beta)
            evidences.append(evidence)
            ms.append(m)
        self._store(alphas, betas, evidences, ms, f.shape[1])

    def _store(self, alphas: list, betas: list, evidences: list, ms: list, d: int) -> None:
        self.alphas = np.array(alphas, dtype=np.float64)
        self.betas = np.array(betas, dtype=np.float64)
        self.evidences = np.array(evidences, dtype=np.float64)
        self.ms = np.array(ms, dtype=np.float64).reshape(len(ms), d)

    def predict(self, f: np.ndarray) -> np.ndarray:
        """Predict from features ``f`` [M, D] with the posterior means.

        Returns values [M, C] for regression, else class ids [M].
        """
        if not self.fitted:
            raise RuntimeError("LogME.predict called before fit")
        logits = np.asarray(f, dtype=np.float64) @ self.ms.T
        if self.regression:
            return logits
        return np.argmax(logits, axis=-1)


# ---------------------------------------------------------------------------
# Other transferability scores, written from their papers.
#
# Straightforward numpy: loops over classes and class pairs, the covariance
# matrices and inverses the papers write down. They are the oracle of the
# batched torch versions in ``torch_logme.scores`` and share none of their
# algebra (no sufficient-statistic shortcuts, no dual Gram matrices). The
# formula choices match those documented in ``torch_logme.scores``.
# ---------------------------------------------------------------------------

#: Relative cut-off of the pseudo-inverses of the H-scores (float64).
H_SCORE_RCOND = 1e-10
#: A column whose variance is at most this many eps times its mean square
#: about the subtracted mean is constant.
_CONSTANT_COLUMN_EPS = 64


def _labels(y: np.ndarray) -> np.ndarray:
    return np.asarray(y).reshape(-1).astype(np.int64)


def _centred(f: np.ndarray) -> np.ndarray:
    """f [N, D] minus its column means, in two passes.

    The first pass's mean of features far from 0 is off in its last digits
    (a multiple of the offset's eps); the second pass removes what it left.
    """
    z = f - f.mean(axis=0)
    return z - z.mean(axis=0)


def _pinv_psd(a: np.ndarray, rcond: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix: eigenvalues <= rcond * max count as 0."""
    lam, vec = np.linalg.eigh(a)
    keep = lam > rcond * max(lam.max(), 0.0)
    inv = np.zeros_like(lam)
    inv[keep] = 1.0 / lam[keep]
    return (vec * inv) @ vec.T


def leep(source_probs: np.ndarray, target_labels: np.ndarray) -> float:
    """LEEP (Nguyen et al., ICML 2020) of source probabilities [N, Cs] for target labels [N].

    Empirical joint P(y, z) = (1/N) sum_{i: y_i = y} theta_i(z), conditional
    P(y | z) = P(y, z) / P(z) (0 for a source class with no mass), score
    (1/N) sum_i log sum_z P(y_i | z) theta_i(z).
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    y = _labels(target_labels)
    n, cs = theta.shape
    joint = np.zeros((int(y.max()) + 1, cs))
    for c in range(joint.shape[0]):
        joint[c] = theta[y == c].sum(axis=0) / n
    marginal = joint.sum(axis=0)
    cond = np.zeros_like(joint)
    np.divide(joint, marginal, out=cond, where=marginal > 0)
    eep = (theta * cond[y]).sum(axis=1)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.log(eep)))


def nce(source_labels: np.ndarray, target_labels: np.ndarray) -> float:
    """NCE (Tran et al., ICCV 2019): -H(Y | Z) of the empirical joint of hard labels Z and Y."""
    z = _labels(source_labels)
    y = _labels(target_labels)
    n = z.shape[0]
    total = 0.0
    for a in np.unique(z):
        y_given_a = y[z == a]
        p_a = y_given_a.shape[0] / n
        for b in np.unique(y_given_a):
            p_ab = np.count_nonzero(y_given_a == b) / n
            total += p_ab * math.log(p_ab / p_a)
    return total


def _class_mean_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row of x [N, D] replaced by the mean of its class: E[x | y] per sample."""
    g = np.zeros_like(x)
    for c in np.unique(y):
        g[y == c] = x[y == c].mean(axis=0)
    return g


def h_score(features: np.ndarray, labels: np.ndarray, rcond: float = H_SCORE_RCOND) -> float:
    """H-score (Bao et al., ICIP 2019): tr(cov(f)^+ cov(E[f | y])).

    Columns are standardised first (constant ones dropped): the score is
    invariant to rescaling, and the pseudo-inverse's cut-off then applies to
    correlations. Covariances are normalised by N.
    """
    f = np.asarray(features, dtype=np.float64)
    y = _labels(labels)
    shifted = f - f.mean(axis=0)
    centred = shifted - shifted.mean(axis=0)
    var = (centred ** 2).mean(axis=0)
    # Constant: the variance is round-off of the mean square about the mean
    # subtracted (not of the raw mean square, which would also drop every
    # column whose spread is small next to its offset). The floor drops a
    # column whose variance is not even a normal number.
    mean_sq = (shifted ** 2).mean(axis=0)
    keep = var > _CONSTANT_COLUMN_EPS * np.finfo(np.float64).eps * mean_sq + np.finfo(np.float64).tiny
    scale = np.zeros_like(var)
    scale[keep] = 1.0 / np.sqrt(var[keep])
    z = centred * scale
    cov_f = np.cov(z, rowvar=False, bias=True).reshape(f.shape[1], f.shape[1])
    cov_g = np.cov(_class_mean_rows(z, y), rowvar=False, bias=True).reshape(f.shape[1], f.shape[1])
    return float(np.trace(_pinv_psd(cov_f, rcond) @ cov_g))


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) shrinkage estimate of the covariance of x [N, p].

    Returns (the estimate (1 - a) S + a mu I, the shrinkage a), with S the
    covariance normalised by N, mu = tr(S) / p, d^2 = ||S - mu I||^2,
    b-bar^2 = (1/N^2) sum_k ||x_k x_k^T - S||^2 (norms normalised by p),
    b^2 = min(b-bar^2, d^2), a = b^2 / d^2.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    xc = _centred(x)
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    target = mu * np.eye(p)
    d2 = np.sum((s - target) ** 2) / p
    # ||x_k x_k^T - S||^2 = ||x_k||^4 - 2 x_k^T S x_k + ||S||^2, sample by sample.
    norms_sq = np.einsum("ij,ij->i", xc, xc)
    quad = np.einsum("ij,jk,ik->i", xc, s, xc)
    b2_bar = np.sum(norms_sq ** 2 - 2.0 * quad + np.sum(s * s)) / p / n ** 2
    b2 = min(b2_bar, d2)
    shrinkage = b2 / d2 if d2 > 0 else 0.0
    return (1.0 - shrinkage) * s + shrinkage * target, float(shrinkage)


def regularized_h_score(features: np.ndarray, labels: np.ndarray, rcond: float = H_SCORE_RCOND) -> float:
    """Shrinkage H-score (Ibrahim et al., ECML PKDD 2022): tr(S_a^-1 (1 - a) cov(E[f | y])).

    S_a is the Ledoit-Wolf estimate of the feature covariance and a its
    shrinkage; covariances are normalised by N.
    """
    f = np.asarray(features, dtype=np.float64)
    y = _labels(labels)
    d = f.shape[1]
    cov_f, shrinkage = ledoit_wolf(f)
    centred = _centred(f)
    cov_g = np.cov(_class_mean_rows(centred, y), rowvar=False, bias=True).reshape(d, d)
    return float(np.trace(_pinv_psd(cov_f, rcond) @ ((1.0 - shrinkage) * cov_g)))


def coding_rate(z: np.ndarray, eps: float) -> float:
    """R(Z, eps) = 1/2 log det(I + Z^T Z / (n eps)) for Z [n, d]."""
    n, d = z.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))
    assert sign > 0
    return 0.5 * logdet


def transrate(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    """TransRate (Huang et al., ICML 2022): R(Z) - sum_c (n_c / N) R(Z_c), Z centred at its mean."""
    f = np.asarray(features, dtype=np.float64)
    y = _labels(labels)
    z = _centred(f)
    n = z.shape[0]
    score = coding_rate(z, eps)
    for c in np.unique(y):
        z_c = z[y == c]
        score -= z_c.shape[0] / n * coding_rate(z_c, eps)
    return float(score)


def gbc(features: np.ndarray, labels: np.ndarray, min_variance: float = 1e-4) -> float:
    """GBC (Pándy et al., CVPR 2022) with diagonal class covariances.

    -sum over ordered pairs i != j of present classes of exp(-D_B), D_B the
    Bhattacharyya distance of N(mu_i, diag v_i) and N(mu_j, diag v_j); v is
    the per-dimension variance (normalised by n_c) floored at min_variance.
    The features are centred first (the score is shift-invariant), so that
    class means far from 0 keep the digits of their differences; a class's
    variance is that of its rows less its first row, exactly 0 for a
    column that is constant within the class (np.var of equal values can
    leave the round-off of their mean, which a tiny floor would not hide).
    """
    f = _centred(np.asarray(features, dtype=np.float64))
    y = _labels(labels)
    stats = []
    for c in np.unique(y):
        rows = f[y == c]
        stats.append((rows.mean(axis=0), np.maximum((rows - rows[0]).var(axis=0), min_variance)))
    total = 0.0
    for i, (mu_i, v_i) in enumerate(stats):
        for j, (mu_j, v_j) in enumerate(stats):
            if i == j:
                continue
            v = 0.5 * (v_i + v_j)
            distance = np.sum((mu_i - mu_j) ** 2 / v) / 8.0 + 0.5 * (
                np.sum(np.log(v)) - 0.5 * np.sum(np.log(v_i)) - 0.5 * np.sum(np.log(v_j))
            )
            total += math.exp(-distance)
    return -total


# ---------------------------------------------------------------------------
# SFDA (Shao et al., ECCV 2022): self-challenging Fisher discriminant analysis.
#
# Written from the paper, with the published code's constants: the
# discriminant is fitted by the generalised eigenproblem of the Fisher
# projection (all D directions kept, as published), not by the solve of the
# torch version; loops over classes.
# ---------------------------------------------------------------------------

SFDA_SHRINKAGE_RATE = 5.0
SFDA_MIN_SHRINKAGE = 1e-10
SFDA_POWER_ITERATIONS = 3


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..K-1 over the classes that occur (in order)."""
    return np.unique(_labels(labels), return_inverse=True)[1].reshape(-1)


def _shrunk_towards_trace(s: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - shrinkage) s + shrinkage (tr s / d) I."""
    d = s.shape[0]
    return (1.0 - shrinkage) * s + shrinkage * np.trace(s) / d * np.eye(d)


def largest_eigenvalue(a: np.ndarray, iterations: Optional[int]) -> float:
    """lambda_max of a symmetric PSD matrix: ``iterations`` rounds of the published power iteration
    (from a 1, two products a round), or exact (None, or a start that vanishes to round-off)."""
    v = a.sum(axis=1)
    # a 1 = 0 up to the round-off of its sums: the iteration has no start.
    if iterations is not None and np.linalg.norm(v) > a.shape[0] * np.finfo(np.float64).eps * np.linalg.norm(
            np.abs(a).sum(axis=1)):
        with np.errstate(invalid="ignore", divide="ignore"):
            for _ in range(iterations):
                u = a @ v
                u = u / np.linalg.norm(u)
                v = a @ u
                v = v / np.linalg.norm(v)
            value = float(v @ a @ u)
        if math.isfinite(value):
            return value
    return float(np.linalg.eigvalsh(a)[-1])


def _fisher_log_probs(x: np.ndarray, y: np.ndarray, shrinkage: Optional[float],
                      iterations: Optional[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """(log p(c | x_i) [N, K], class means [K, D], the shrinkage) of the regularised Fisher classifier.

    S_w = sum_c (n_c / N) cov_c and S_t = cov(x) (normalised by n_c and N),
    both shrunk towards (trace / D) I; the Fisher directions V solve S_b v =
    lam S_w v with V^T S_w V = I; in the Fisher space the classes are
    Gaussians with identity covariance and priors n_c / N.
    """
    n, d = x.shape
    classes = np.arange(y.max() + 1)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    priors = np.array([np.mean(y == c) for c in classes])
    within = np.zeros((d, d))
    for c in classes:
        rows = x[y == c] - means[c]
        within += priors[c] * rows.T @ rows / rows.shape[0]
    if shrinkage is None:
        lam = largest_eigenvalue(within, iterations)
        shrinkage = max(math.exp(-SFDA_SHRINKAGE_RATE * lam), SFDA_MIN_SHRINKAGE)
    centred = x - x.mean(axis=0)
    total = centred.T @ centred / n
    sw = _shrunk_towards_trace(within, shrinkage)
    sb = _shrunk_towards_trace(total, shrinkage) - sw
    factor = np.linalg.cholesky(sw)
    inv = np.linalg.inv(factor)
    _, u = np.linalg.eigh(inv @ sb @ inv.T)
    fisher = inv.T @ u[:, ::-1]
    xf, mf = x @ fisher, means @ fisher
    logits = xf @ mf.T - 0.5 * np.sum(mf * mf, axis=1) + np.log(priors)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), means, shrinkage


def sfda(features: np.ndarray, labels: np.ndarray, shrinkage: Optional[float] = None,
         power_iterations: Optional[int] = SFDA_POWER_ITERATIONS, log_likelihood: bool = True) -> float:
    """SFDA (Shao et al., ECCV 2022).

    Fit the regularised Fisher classifier; mix each sample towards the
    average of the other classes' means, x_i <- w_i x_i + (1 - w_i) m_{y_i},
    with w_i its own class's probability softened by a second softmax; fit
    again with the same shrinkage; return the average log-likelihood of the
    labels under the second fit (``log_likelihood=False``: the average
    probability, as the published code returns). Only the classes that
    occur count. The features are centred first (the score is
    shift-invariant), so that an offset costs no digits.
    """
    x = _centred(np.asarray(features, dtype=np.float64))
    y = _compact_labels(labels)
    k = int(y.max()) + 1
    if k < 2:
        raise ValueError("SFDA needs at least two classes")
    log_p, means, shrinkage = _fisher_log_probs(x, y, shrinkage, power_iterations)
    soft = np.exp(np.exp(log_p))
    soft /= soft.sum(axis=1, keepdims=True)
    mixed = x.copy()
    for c in range(k):
        rows = y == c
        others = (means.sum(axis=0) - means[c]) / (k - 1)
        w = soft[rows, c][:, None]
        mixed[rows] = w * x[rows] + (1.0 - w) * others
    log_p, _, _ = _fisher_log_probs(mixed, y, shrinkage, power_iterations)
    own = log_p[np.arange(len(y)), y]
    return float(np.mean(own) if log_likelihood else np.mean(np.exp(own)))


# ---------------------------------------------------------------------------
# NCTI (Wang et al., ICCV 2023): distance from neural collapse.
#
# PCA by an SVD of the centred features; the LDA with scikit-learn's
# semantics, the SVD solver on the data matrix itself (the torch version
# works on covariances); nuclear norms of the actual matrices.
# ---------------------------------------------------------------------------

NCTI_TERMS = ("seli", "ncc", "vc")
NCTI_COMPONENTS = 64
NCTI_VARIANCE_COMPONENTS = 32
NCTI_MIN_SHRINKAGE = 1e-10
LDA_TOL = 1e-4
#: Singular values of the centred features at or below this many times max(N, D) eps times the
#: largest (numpy's matrix_rank rule) are round-off of an exact 0: their components are 0.
_PCA_ROUNDOFF = 1


def _pca_scores(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, k], variances [k] normalised by N - 1) of the leading k principal components."""
    x = _centred(f)
    n, d = x.shape
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    s = s[:k].copy()
    s[s <= _PCA_ROUNDOFF * max(n, d) * np.finfo(np.float64).eps * s[0]] = 0.0
    return u[:, :k] * s, s * s / (n - 1)


def _lda(z: np.ndarray, y: np.ndarray, shrinkage: Optional[float],
         unbiased: bool) -> tuple[np.ndarray, np.ndarray]:
    """(projection of the centred z [N, min(K-1, k)], log-probabilities [N, K]) of an LDA on z [N, k].

    ``shrinkage`` None: the SVD solver (within-class whitening after scaling
    each column by its within-class standard deviation, then the principal
    directions of the whitened class offsets; directions at or below the
    tolerance dropped). Otherwise the eigen solver with both covariances
    shrunk towards (trace / k) I.
    """
    n, k = z.shape
    classes = np.arange(y.max() + 1)
    nc = len(classes)
    means = np.stack([z[y == c].mean(axis=0) for c in classes])
    priors = np.array([np.mean(y == c) for c in classes])
    centre = priors @ means
    m = min(nc - 1, k)
    if shrinkage is None:
        within_rows = z - means[y]
        std = within_rows.std(axis=0)
        std[std == 0] = 1.0
        scaled = within_rows / std / math.sqrt(n - nc if unbiased else n)
        _, s, vt = np.linalg.svd(scaled, full_matrices=False)
        keep = s > LDA_TOL
        whiten = (vt[keep] / std).T / s[keep]
        offsets = np.sqrt(n * priors)[:, None] * ((means - centre) @ whiten)
        _, sb, vbt = np.linalg.svd(offsets, full_matrices=False)
        scalings = whiten @ vbt[: int(np.sum(sb > LDA_TOL * sb[0]))].T
        projected_means = (means - centre) @ scalings
        logits = (z - centre) @ scalings @ projected_means.T - 0.5 * np.sum(projected_means ** 2, axis=1)
        projection = (z - centre) @ scalings[:, :m]
    else:
        within = np.zeros((k, k))
        for c in classes:
            rows = z[y == c] - means[c]
            within += priors[c] * rows.T @ rows / rows.shape[0]
        centred = z - z.mean(axis=0)
        sw = _shrunk_towards_trace(within, shrinkage)
        sb = _shrunk_towards_trace(centred.T @ centred / n, shrinkage) - sw
        inv = np.linalg.inv(np.linalg.cholesky(sw))
        _, u = np.linalg.eigh(inv @ sb @ inv.T)
        projection = z @ (inv.T @ u[:, ::-1])[:, :m]
        coef = np.linalg.solve(sw, means.T)
        logits = z @ coef - 0.5 * np.sum(means * coef.T, axis=1)
    logits = logits + np.log(priors)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return projection - projection.mean(axis=0), log_p


def ncti(features: np.ndarray, labels: np.ndarray, n_components: int = NCTI_COMPONENTS,
         variance_components: int = NCTI_VARIANCE_COMPONENTS, unbiased_within: bool = False) -> np.ndarray:
    """NCTI's per-model terms (Wang et al., ICCV 2023), [seli, ncc, vc].

    PCA to k = min(n_components, N, D) components; an LDA on them, shrunk by
    t = exp(-(sum of the first ``variance_components`` PCA variances)) when
    t > 1e-10, else unshrunk (the SVD solver, its within-class covariance
    normalised by N, or by N - C with ``unbiased_within``); then
    seli = ||centred LDA projection||_*, ncc = mean_i p(y_i | x_i) and
    vc = log sum_c ||P_c||_* over the classes' probability rows P_c.
    """
    f = np.asarray(features, dtype=np.float64)
    y = _compact_labels(labels)
    n, d = f.shape
    if y.max() < 1 or n <= y.max() + 1:
        raise ValueError("NCTI needs at least two classes and more samples than classes")
    z, variances = _pca_scores(f, min(n_components, n, d))
    t = max(math.exp(-float(np.sum(variances[:variance_components]))), NCTI_MIN_SHRINKAGE)
    projection, log_p = _lda(z, y, None if t == NCTI_MIN_SHRINKAGE else t, unbiased_within)
    p = np.exp(log_p)
    seli = np.linalg.norm(projection, "nuc") if projection.shape[1] else 0.0
    ncc = np.mean(p[np.arange(n), y])
    vc = math.log(sum(np.linalg.norm(p[y == c], "nuc") for c in range(int(y.max()) + 1)))
    return np.array([seli, ncc, vc])


def ncti_combine(terms: np.ndarray) -> np.ndarray:
    """NCTI scores [M] of M models' terms [M, 3]: each term min-max normalised over the models,
    then ncc + seli - vc; a term on which all models tie counts 0."""
    t = np.asarray(terms, dtype=np.float64)
    span = t.max(axis=0) - t.min(axis=0)
    scaled = np.zeros_like(t)
    live = span > 0
    scaled[:, live] = (t[:, live] - t.min(axis=0)[live]) / span[live]
    return scaled[:, 1] + scaled[:, 0] - scaled[:, 2]
# NLEEP (Li et al., CVPR 2021) and ETran (Gholami et al., ICCV 2023).
#
# NLEEP: PCA, a Gaussian mixture fitted by EM (a loop over components, as
# scikit-learn's GaussianMixture writes it), then LEEP of its posteriors.
# Its seeded initialisation is the k-means that ``torch_logme.nleep``
# documents, drawing the same numpy random numbers, so that the two agree to
# round-off. ETran: the energy term and the LDA term of one model, and their
# published combination across models.
# ---------------------------------------------------------------------------


def pca_coordinates(features: np.ndarray, variance: float = 0.8) -> np.ndarray:
    """The centred features [N, D] on the fewest principal directions whose variance share exceeds ``variance``.

    Each direction is signed so that its largest entry is positive.
    """
    z = _centred(np.asarray(features, dtype=np.float64))
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = min(int(np.searchsorted(share, variance, side="right")) + 1, s.shape[0])
    v = vt[:k]
    v = v * np.sign(v[np.arange(k), np.abs(v).argmax(axis=1)])[:, None]
    return z @ v.T


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 300,
                  tol: float = 1e-4) -> np.ndarray:
    """Greedy k-means++ seeding, then Lloyd iterations (see ``torch_logme.nleep.kmeans_labels``).

    The rows are taken sorted lexicographically (column 0 first), so that the
    labels do not depend on their order.
    """
    order = np.lexsort(x.T[::-1])
    x = x[order]
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(rng.integers(n))
    draws = rng.random((max(k - 1, 0), trials))

    def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)

    chosen = [first]
    closest = sq_dist(x, x[[first]])[:, 0]
    for c in range(1, k):
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws[c - 1] * closest.sum()), n - 1)
        dist = np.minimum(sq_dist(x[candidates], x), closest[None, :])
        best = int(np.argmin(dist.sum(axis=1)))
        closest = dist[best]
        chosen.append(int(candidates[best]))
    centres = x[chosen]
    threshold = tol * np.mean(np.var(x, axis=0))
    labels = sq_dist(x, centres).argmin(axis=1)
    for _ in range(max_iter):
        moved = centres.copy()
        for j in range(k):
            if np.any(labels == j):
                moved[j] = x[labels == j].mean(axis=0)
        shift = np.sum((moved - centres) ** 2)
        centres = moved
        relabelled = sq_dist(x, centres).argmin(axis=1)
        done = np.array_equal(relabelled, labels) or shift <= threshold
        labels = relabelled
        if done:
            break
    out = np.empty_like(labels)
    out[order] = labels
    return out


def _mixture_parameters(x: np.ndarray, resp: np.ndarray, reg_covar: float):
    """(nk, means, covariances) of responsibilities resp [N, K]: one component at a time."""
    n, d = x.shape
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk[:, None]
    cov = np.empty((resp.shape[1], d, d))
    for j in range(resp.shape[1]):
        diff = x - means[j]
        cov[j] = (resp[:, j, None] * diff).T @ diff / nk[j] + reg_covar * np.eye(d)
    return nk, means, cov


def _mixture_log_resp(x: np.ndarray, weights: np.ndarray, means: np.ndarray, cov: np.ndarray):
    """(mean log-likelihood, log responsibilities [N, K]) of a Gaussian mixture."""
    n, d = x.shape
    log_p = np.empty((n, weights.shape[0]))
    for j in range(weights.shape[0]):
        chol = np.linalg.cholesky(cov[j])
        z = np.linalg.solve(chol, (x - means[j]).T)
        log_p[:, j] = (np.log(weights[j]) - 0.5 * d * math.log(2 * math.pi) - np.log(np.diag(chol)).sum()
                       - 0.5 * (z ** 2).sum(axis=0))
    top = log_p.max(axis=1, keepdims=True)
    norm = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
    return norm.mean(), log_p - norm[:, None]


def gaussian_mixture_posteriors(x: np.ndarray, resp: np.ndarray, reg_covar: float = 1e-6, tol: float = 1e-3,
                                max_iter: int = 100) -> np.ndarray:
    """Posteriors [N, K] of a full-covariance Gaussian mixture fitted by EM from responsibilities resp [N, K].

    Initial weights nk / N; EM until the mean log-likelihood changes by less
    than ``tol`` or ``max_iter`` iterations; posteriors of the last M step.
    """
    nk, means, cov = _mixture_parameters(x, resp, reg_covar)
    weights = nk / x.shape[0]
    bound = -np.inf
    for _ in range(max_iter):
        previous = bound
        bound, log_resp = _mixture_log_resp(x, weights, means, cov)
        nk, means, cov = _mixture_parameters(x, np.exp(log_resp), reg_covar)
        weights = nk / nk.sum()
        if abs(bound - previous) < tol:
            break
    return np.exp(_mixture_log_resp(x, weights, means, cov)[1])


def nleep(features: np.ndarray, labels: np.ndarray, components_per_class: int = 5, variance: float = 0.8,
          reg_covar: float = 1e-6, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
          init_labels: Optional[np.ndarray] = None, legacy_leep: bool = False) -> float:
    """NLEEP: LEEP (or, ``legacy_leep``, the mean expected prediction) of the mixture posteriors.

    The mixture has ``components_per_class`` x (classes present) components,
    fitted to ``pca_coordinates`` from one-hot responsibilities of
    ``init_labels`` (default: ``kmeans_labels`` seeded with ``seed``).
    """
    y = _labels(labels)
    x = pca_coordinates(features, variance)
    k = components_per_class * np.unique(y).shape[0]
    if init_labels is None:
        init_labels = kmeans_labels(x, k, np.random.default_rng(seed))
    resp = np.zeros((x.shape[0], k))
    resp[np.arange(x.shape[0]), init_labels] = 1.0
    post = gaussian_mixture_posteriors(x, resp, reg_covar, tol, max_iter)
    if not legacy_leep:
        return leep(post, y)
    joint = np.zeros((int(y.max()) + 1, k))
    for c in np.unique(y):
        joint[c] = post[y == c].sum(axis=0) / y.shape[0]
    cond = joint / joint.sum(axis=0)
    return float(np.mean((post * cond[y]).sum(axis=1)))


def etran_energy(features: np.ndarray, percent: float = 0.5) -> float:
    """Mean of the lowest int(10 percent) N // 1000 (at least 1) row energies logsumexp_j f_ij."""
    f = np.asarray(features, dtype=np.float64)
    top = f.max(axis=1, keepdims=True)
    energy = top[:, 0] + np.log(np.exp(f - top).sum(axis=1))
    count = max(1, int(percent * 10) * f.shape[0] // 1000)
    return float(np.sort(energy)[:count].mean())


def etran_lda(features: np.ndarray, labels: np.ndarray, legacy: bool = False) -> float:
    """Mean probability of each sample's own class under SFDA's regularised Fisher classifier, fitted once.

    ``legacy``: the published code's form, whose orthonormal eigenvectors
    make its coefficients the class means (the identity in place of S^-1).
    Only the classes that occur count.
    """
    x = _centred(np.asarray(features, dtype=np.float64))
    y = _compact_labels(labels)
    if not legacy:
        log_p, _, _ = _fisher_log_probs(x, y, None, SFDA_POWER_ITERATIONS)
        return float(np.mean(np.exp(log_p[np.arange(y.shape[0]), y])))
    classes = np.arange(y.max() + 1)
    logits = np.empty((x.shape[0], classes.shape[0]))
    for c in classes:
        mu = x[y == c].mean(axis=0)
        logits[:, c] = x @ mu - 0.5 * mu @ mu + math.log(np.mean(y == c))
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return float(np.mean(prob[np.arange(y.shape[0]), y]))


def etran(features: np.ndarray, labels: np.ndarray, energy_percent: float = 0.5,
          legacy_lda: bool = False) -> np.ndarray:
    """ETran's terms of one model: [energy, lda]."""
    return np.array([etran_energy(features, energy_percent), etran_lda(features, labels, legacy_lda)])


def etran_combine(terms: np.ndarray, weights: tuple = (0.15, 0.85)) -> np.ndarray:
    """Scores [M] of M models: each term of terms [M, 2] min-max normalised across models, then weighted."""
    terms = np.asarray(terms, dtype=np.float64)
    out = np.zeros(terms.shape[0])
    for j, w in enumerate(weights):
        col = terms[:, j]
        spread = col.max() - col.min()
        if spread > 0:
            out += w * (col - col.min()) / spread
    return out
# Scores of the samples' pairwise geometry: kNN accuracy and PARC.
#
# Full N x N matrices and plain loops over samples; no blocks, no merged
# top-k candidates, no closed-form ranks.
# ---------------------------------------------------------------------------


def knn(features: np.ndarray, labels: np.ndarray, k: int = 3, metric: str = "euclidean",
        binary_f1: bool = False) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (as transformer-ranker's kNN estimator).

    Each sample's k nearest other samples (euclidean distance, or 1 - cosine
    similarity with a zero row at similarity 0) vote with their labels; the
    most frequent label wins, the lowest on a tie. Equal distances go to the
    lower sample index. The score is the fraction of samples whose vote is
    their label; ``binary_f1`` with exactly two classes gives the F1 score of
    the larger class id instead.
    """
    f = np.asarray(features, dtype=np.float64)
    y = _labels(labels)
    n = f.shape[0]
    if metric == "cosine":
        norms = np.linalg.norm(f, axis=1)
        unit = f / np.where(norms > 0, norms, 1.0)[:, None]
    predictions = np.empty(n, dtype=np.int64)
    for i in range(n):
        if metric == "cosine":
            distance = 1.0 - unit @ unit[i]
        else:
            distance = np.sqrt(((f - f[i]) ** 2).sum(axis=1))
        distance[i] = np.inf
        nearest = np.argsort(distance, kind="stable")[:k]
        predictions[i] = np.argmax(np.bincount(y[nearest]))  # argmax: the first (lowest) of the most frequent
    classes = np.unique(y)
    if binary_f1 and len(classes) == 2:
        positive = classes[1]
        tp = np.sum((predictions == positive) & (y == positive))
        fp = np.sum((predictions == positive) & (y != positive))
        fn = np.sum((predictions != positive) & (y == positive))
        return float(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(predictions == y))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` [M], tied values at the average of their positions."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ordered = values[order]
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and ordered[stop] == ordered[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + 1 + stop)
        start = stop
    return ranks


def parc(features: np.ndarray, labels: np.ndarray, n_dims: Optional[int] = 32) -> float:
    """PARC (Bolya et al., NeurIPS 2021): 100 x the Spearman correlation of two dissimilarity matrices.

    The features are reduced to their min(n_dims, N, D) leading principal
    components (an SVD of the centred features; each component's largest
    |loading| positive, as scikit-learn signs them; components at round-off,
    max(N, D) eps of the largest singular value, are zero), each
    standardised to unit variance (normalised by N). The dissimilarity of
    two samples is 1 - the Pearson correlation of their rows (0 for a
    constant row), and of their labels 1 - the correlation of their one-hot
    rows: exactly 0 within a class and C / (C - 1) across (computing it with
    np.corrcoef leaves round-off on some pairs of one class, which would
    split their tie). Spearman correlation over the pairs i < j, with tied
    values at their average rank.
    """
    raw = np.asarray(features, dtype=np.float64)
    f = _centred(raw)
    y = _labels(labels)
    n, d = f.shape
    if n_dims is None:
        # A column is constant when its variance is round-off of its mean square about the first mean.
        z = f
        var = z.var(axis=0)
        mean_sq = ((raw - raw.mean(axis=0)) ** 2).mean(axis=0)
        keep = var > _CONSTANT_COLUMN_EPS * np.finfo(np.float64).eps * mean_sq + np.finfo(np.float64).tiny
    else:
        k = min(n_dims, n, d)
        _, s, vt = np.linalg.svd(f, full_matrices=False)
        signs = np.where(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)] < 0, -1.0, 1.0)
        # The projections f v rather than u s: equal samples get exactly equal rows, so ties stay ties.
        z = f @ (vt[:k].T * signs[:k])
        keep = s[:k] > max(n, d) * np.finfo(np.float64).eps * s[0]
    z = z - z.mean(axis=0)
    std = z.std(axis=0)
    keep = keep & (std > 0)
    z = np.where(keep, z / np.where(keep, std, 1.0), 0.0)
    rows = z - z.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1)
    flat = norms <= z.shape[1] * np.finfo(np.float64).eps * np.abs(z).max(axis=1)
    rows = np.where(flat[:, None], 0.0, rows / np.where(flat, 1.0, norms)[:, None])
    upper = np.triu_indices(n, 1)
    feature_dissimilarity = 1.0 - np.clip(rows @ rows.T, -1.0, 1.0)
    classes = len(np.unique(y))
    label_dissimilarity = np.where(y[:, None] == y[None, :], 0.0, classes / (classes - 1.0))
    a = _average_ranks(feature_dissimilarity[upper])
    b = _average_ranks(label_dissimilarity[upper])
    return float(100.0 * np.corrcoef(a, b)[0, 1])
