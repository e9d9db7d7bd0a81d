"""Linear baselines: the HEST-Benchmark ridge probe and ridge with a cross-validated alpha.

Both are small estimators on arrays (``fit(X, Y, groups=None)``, ``predict(X)``) that share
:class:`BaseBaseline`'s input checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold, LeaveOneGroupOut
from sklearn.preprocessing import StandardScaler

from ._metrics import _constant_columns, _pearson_columns

#: Default alpha grid of :class:`RidgeCV` (log-spaced, two per decade from 0.1 to 1e5).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 5, 13))


def _check_X(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_spots, n_features]; got shape {X.shape}.")
    if X.shape[0] == 0:
        raise ValueError(f"{name} has no rows.")
    if not np.all(np.isfinite(X)):
        bad = int((~np.isfinite(X).all(axis=1)).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} rows; drop or impute those spots first.")
    return X


def _check_Y(Y, n: int) -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D array [n_spots, n_genes]; got shape {Y.shape}.")
    if Y.shape[0] != n:
        raise ValueError(f"X has {n} rows but Y has {Y.shape[0]}; they must match.")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y contains NaN or infinite values.")
    return Y


def _check_groups(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one entry per spot ({n}); got shape {g.shape}.")
    return g


class BaseBaseline(BaseEstimator):
    """Shared interface of the baselines: ``fit(X, Y, groups=None)`` then ``predict(X)`` on arrays.

    ``X`` is ``[n_spots, n_features]`` (histology features; log total counts for :class:`DepthOracle`), ``Y`` is
    ``[n_spots, n_genes]`` on the target's log scale, ``groups`` optionally labels each training spot's section.
    Subclasses implement ``_fit`` and ``_predict``; parameters follow scikit-learn conventions, so
    :func:`sklearn.base.clone` and ``get_params`` work.
    """

    def fit(self, X, Y, groups=None):
        """Fit the baseline.

        Parameters
        ----------
        X
            Features, ``[n_spots, n_features]`` (finite).
        Y
            Targets, ``[n_spots, n_genes]`` (finite, log scale).
        groups
            Optional section label per spot; used by estimators that cross-validate.

        Returns
        -------
        The fitted estimator.
        """
        X = _check_X(X)
        Y = _check_Y(Y, X.shape[0])
        g = _check_groups(groups, X.shape[0])
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = Y.shape[1]
        self._fit(X, Y, g)
        return self

    def predict(self, X) -> np.ndarray:
        """Predict expression.

        Parameters
        ----------
        X
            Features, ``[n_spots, n_features]`` with the width seen in :meth:`fit`.

        Returns
        -------
        float64 array ``[n_spots, n_genes]``.
        """
        if not hasattr(self, "n_genes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(X, Y) first.")
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features but {type(self).__name__} was fitted on {self.n_features_in_}."
            )
        return self._predict(X)

    def _fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class _RidgePath:
    """Ridge solutions for many alphas from one eigendecomposition of the centred training block.

    Uses the ``p × p`` Gram matrix ``XᵀX`` when ``n ≥ p`` and the ``n × n`` kernel ``XXᵀ`` otherwise (both faster
    than a thin SVD and equivalent for ``alpha > 0``). ``Xc``/``Yc`` must be centred.
    """

    def __init__(self, Xc: np.ndarray, Yc: np.ndarray):
        self.Xc = Xc
        self.primal = Xc.shape[0] >= Xc.shape[1]
        K = Xc.T @ Xc if self.primal else Xc @ Xc.T
        w, Q = np.linalg.eigh(K)
        self.w = np.maximum(w, 0.0)
        self.Q = Q
        self.B = Q.T @ (Xc.T @ Yc) if self.primal else Q.T @ Yc  # [r, G]

    def project(self, Xq_c: np.ndarray) -> np.ndarray:
        """Return the query block in the eigenbasis, ``[n_query, r]``."""
        return Xq_c @ self.Q if self.primal else (Xq_c @ self.Xc.T) @ self.Q

    def predict(self, A: np.ndarray, alpha: float) -> np.ndarray:
        """Return centred predictions for a projected query block ``A``."""
        return A @ (self.B / (self.w + alpha)[:, None])

    def coef(self, alpha: float) -> np.ndarray:
        """Return the coefficients ``[n_features, n_genes]``."""
        inner = self.B / (self.w + alpha)[:, None]
        return self.Q @ inner if self.primal else self.Xc.T @ (self.Q @ inner)


def _fold_path(
    X: np.ndarray, Y: np.ndarray, tr: np.ndarray, va: np.ndarray
) -> tuple[_RidgePath, np.ndarray, np.ndarray]:
    """One CV fold: the ridge path on training rows ``tr``, held-out rows ``va`` projected onto it, and ``Y``'s mean.

    Features are standardised with a scaler fitted on ``tr`` only (no held-out statistics leak in) and centred; the
    prediction of ``va`` at penalty ``alpha`` is ``path.predict(A, alpha) + y_mean``.
    """
    sc = StandardScaler().fit(X[tr])
    Xtr = sc.transform(X[tr])
    x_mean, y_mean = Xtr.mean(axis=0), Y[tr].mean(axis=0)
    path = _RidgePath(Xtr - x_mean, Y[tr] - y_mean)
    return path, path.project(sc.transform(X[va]) - x_mean), y_mean


def _ridge_svd(Xc: np.ndarray, Yc: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge coefficients ``[n_features, n_genes]`` for centred ``Xc``, ``Yc`` via one thin SVD."""
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    d = s / (s**2 + alpha)
    return Vt.T @ (d[:, None] * (U.T @ Yc))


class RidgeProbe(BaseBaseline):
    """The HEST-Benchmark linear probe: StandardScaler → PCA(256) → Ridge with a fixed small alpha.

    Mirrors ``hest.bench`` (``benchmark.py`` + ``trainer.train_test_reg``): features are standardised and
    reduced with ``PCA(n_components=256)``, then a ridge regression with ``alpha = 100 / (d · G)`` is fitted,
    where ``d = X_train.shape[1]`` *after* the PCA (HEST computes alpha inside ``train_test_reg``, which receives
    the PCA output) and ``G`` is the number of genes. With d = 256 and G = 50 that is alpha ≈ 0.008, which barely
    regularises; :class:`RidgeCV` is the tuned alternative.

    Two deliberate differences from HEST, neither of which changes per-gene Pearson r: the number of components is
    capped at ``min(n_samples, n_features)`` (scikit-learn's limit; alpha then uses the capped width), and an
    intercept is fitted (HEST uses ``fit_intercept=False`` with ``solver="lsqr"``; on PCA scores, which are
    centred on the training spots, the coefficients are the same, but without the intercept the predictions lack
    the training mean and MSE/MAE would be meaningless). The solve is exact (SVD) rather than iterative.

    Parameters
    ----------
    n_components
        PCA width before the cap (HEST's ``latent_dim``, 256); ``None`` skips the PCA (HEST's ``dimreduce=None``),
        and alpha then uses the raw feature width.
    alpha
        Ridge penalty; ``None`` (default) uses HEST's ``100 / (d · G)``.
    random_state
        Seed of the PCA's randomised solver.
    """

    def __init__(self, n_components: int | None = 256, alpha: float | None = None, random_state: int | None = 0):
        self.n_components = n_components
        self.alpha = alpha
        self.random_state = random_state

    def _fit(self, X, Y, groups):
        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(X)
        if self.n_components is None:
            self.pca_ = None
        else:
            nc = int(min(self.n_components, X.shape[0], X.shape[1]))
            self.pca_ = PCA(n_components=nc, random_state=self.random_state).fit(Z)
            Z = self.pca_.transform(Z)
        self.n_components_ = Z.shape[1]
        self.alpha_ = float(self.alpha) if self.alpha is not None else 100.0 / (Z.shape[1] * Y.shape[1])
        self.z_mean_ = Z.mean(axis=0)
        self.intercept_ = Y.mean(axis=0)
        self.coef_ = _ridge_svd(Z - self.z_mean_, Y - self.intercept_, self.alpha_)

    def _transform(self, X):
        Z = self.scaler_.transform(X)
        return self.pca_.transform(Z) if self.pca_ is not None else Z

    def _predict(self, X):
        return (self._transform(X) - self.z_mean_) @ self.coef_ + self.intercept_


def _mean_pearson(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-gene Pearson r, genes constant in either array ignored (NaN if none vary)."""
    r = _pearson_columns(truth, pred)
    r = r[~(_constant_columns(truth) | _constant_columns(pred))]
    return float(r.mean()) if r.size else float("nan")


class RidgeCV(BaseBaseline):
    """StandardScaler → Ridge, with alpha chosen by leave-one-section-out cross-validation.

    The alpha that maximises the mean per-gene Pearson r on the held-out training sections is picked from a log
    grid (``scoring="pearson"``, the metric the benchmark reports; ``"mse"`` minimises squared error instead).
    Folds leave one level of ``groups`` out; with no groups or a single level it falls back to shuffled K-fold.
    Each fold costs one eigendecomposition of its training block (the Gram or the kernel matrix, whichever is
    smaller; equivalent to one thin SVD but faster), after which every alpha is a cheap rescaling. The scaler is
    refitted inside each fold so that no held-out statistics leak in. The final model is refitted on all spots.

    Parameters
    ----------
    alphas
        Grid of penalties (default ``1e-1 … 1e5``, two per decade). The penalty applies to standardised features.
    n_splits
        Number of K-fold splits used when ``groups`` has fewer than two levels.
    scoring
        ``"pearson"`` (default) or ``"mse"``.
    random_state
        Seed of the K-fold shuffling.

    Attributes
    ----------
    alpha_
        The chosen penalty.
    cv_scores_
        Array ``[n_alphas, n_folds]`` of fold scores (mean per-gene Pearson r, or MSE).
    cv_strategy_
        ``"leave-one-group-out"`` or ``"kfold"``.
    """

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        n_splits: int = 5,
        scoring: str = "pearson",
        random_state: int | None = 0,
    ):
        self.alphas = alphas
        self.n_splits = n_splits
        self.scoring = scoring
        self.random_state = random_state

    def _folds(self, n: int, groups):
        if groups is not None and np.unique(groups).size >= 2:
            self.cv_strategy_ = "leave-one-group-out"
            return list(LeaveOneGroupOut().split(np.zeros(n), groups=groups))
        k = int(min(self.n_splits, n))
        if k < 2:
            raise ValueError(f"RidgeCV needs at least 2 training spots for cross-validation; got {n}.")
        self.cv_strategy_ = "kfold"
        return list(KFold(n_splits=k, shuffle=True, random_state=self.random_state).split(np.zeros(n)))

    def _fit(self, X, Y, groups):
        if self.scoring not in ("pearson", "mse"):
            raise ValueError(f"scoring must be 'pearson' or 'mse'; got {self.scoring!r}.")
        alphas = np.asarray(self.alphas, dtype=np.float64).reshape(-1)
        if alphas.size == 0 or np.any(alphas <= 0) or not np.all(np.isfinite(alphas)):
            raise ValueError("alphas must be a non-empty sequence of positive numbers.")
        folds = self._folds(X.shape[0], groups)
        scores = np.full((alphas.size, len(folds)), np.nan)
        for j, (tr, va) in enumerate(folds):
            path, A, y_mean = _fold_path(X, Y, tr, va)
            for i, a in enumerate(alphas):
                pred = path.predict(A, a) + y_mean
                if self.scoring == "pearson":
                    scores[i, j] = _mean_pearson(Y[va], pred)
                else:
                    scores[i, j] = np.mean((pred - Y[va]) ** 2)
        self.cv_scores_ = scores
        self.alphas_ = alphas
        ok = np.isfinite(scores)
        with np.errstate(invalid="ignore"):
            mean_scores = np.where(ok, scores, 0.0).sum(axis=1) / ok.sum(axis=1)
        if not np.isfinite(mean_scores).any():
            # nothing to choose from (e.g. every gene constant in every fold): regularise the most
            self.alpha_ = float(alphas.max())
        elif self.scoring == "pearson":
            self.alpha_ = float(alphas[np.nanargmax(mean_scores)])
        else:
            self.alpha_ = float(alphas[np.nanargmin(mean_scores)])
        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(X)
        self.z_mean_ = Z.mean(axis=0)
        self.intercept_ = Y.mean(axis=0)
        self.coef_ = _RidgePath(Z - self.z_mean_, Y - self.intercept_).coef(self.alpha_)

    def _predict(self, X):
        return (self.scaler_.transform(X) - self.z_mean_) @ self.coef_ + self.intercept_

    def linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """The fitted model as one affine map on raw features: ``predict(X) == X @ weight + bias``.

        Returns
        -------
        ``weight [n_features, n_genes]`` and ``bias [n_genes]``.
        """
        if not hasattr(self, "coef_"):
            raise RuntimeError("RidgeCV is not fitted; call fit(X, Y) first.")
        weight = self.coef_ / self.scaler_.scale_[:, None]
        bias = self.intercept_ - (self.scaler_.mean_ / self.scaler_.scale_ + self.z_mean_) @ self.coef_
        return weight, bias

    def out_of_fold_predict(self, X, Y, groups=None) -> np.ndarray:
        """Predictions of every spot by a model fitted at the chosen alpha on the other folds (the CV's folds).

        What the fitted model gets wrong on spots (sections, with ``groups``) it has not seen: the residuals for
        calibrating predictive intervals. Call after :meth:`fit` with the same ``X``, ``Y`` and ``groups``.
        """
        if not hasattr(self, "alpha_"):
            raise RuntimeError("RidgeCV is not fitted; call fit(X, Y) first.")
        X = _check_X(X)
        Y = _check_Y(Y, X.shape[0])
        g = _check_groups(groups, X.shape[0])
        out = np.empty(Y.shape, dtype=np.float64)
        for tr, va in self._folds(X.shape[0], g):
            path, A, y_mean = _fold_path(X, Y, tr, va)
            out[va] = path.predict(A, self.alpha_) + y_mean
        return out
