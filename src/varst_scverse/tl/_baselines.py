"""Baselines the field compares against, on arrays and on AnnData.

Every baseline has the same small interface (``fit(X, Y, groups=None)``, ``predict(X)``; see
:class:`~varst_scverse.tl.BaseBaseline`); :func:`baseline_predict` runs one of them from a training AnnData to a
query AnnData.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.preprocessing import StandardScaler

from .._constants import ADATA_KEYS
from .._targets import TARGET_KINDS, expression_target
from ._ridge import BaseBaseline, RidgeCV, RidgeProbe, _check_X


class MeanPredictor(BaseBaseline):
    """Predict every spot as the training mean of each gene.

    Its predictions are constant over spots, so per-gene Pearson r is undefined: :func:`~varst_scverse.tl.evaluate`
    counts all its genes as constant. It is the reference for MSE/MAE.
    """

    def _fit(self, X, Y, groups):
        self.mean_ = Y.mean(axis=0)

    def _predict(self, X):
        return np.broadcast_to(self.mean_, (X.shape[0], self.mean_.shape[0])).copy()


class KNNRetrieval(BaseBaseline):
    """BLEEP-style retrieval: the mean expression of the ``k`` most similar training spots.

    Features are standardised on the training spots, then query and training spots are compared by cosine
    similarity; the prediction is the unweighted mean of the ``k`` nearest training spots' expression (BLEEP's
    "average" mode, with the raw features standing in for BLEEP's learned image embedding).

    Parameters
    ----------
    k
        Number of neighbours (capped at the number of training spots).
    standardize
        Standardise features before the cosine similarity.
    chunk_size
        Query spots processed at once (bounds memory to ``chunk_size × n_train`` similarities).
    """

    def __init__(self, k: int = 50, standardize: bool = True, chunk_size: int = 1024):
        self.k = k
        self.standardize = standardize
        self.chunk_size = chunk_size

    def _embed(self, X):
        Z = self.scaler_.transform(X) if self.scaler_ is not None else X
        norm = np.linalg.norm(Z, axis=1, keepdims=True)
        return Z / np.maximum(norm, 1e-12)

    def _fit(self, X, Y, groups):
        if int(self.k) < 1:
            raise ValueError(f"k must be a positive integer; got {self.k}.")
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        self.train_embedding_ = self._embed(X)
        self.train_Y_ = Y
        self.k_ = int(min(self.k, X.shape[0]))

    def kneighbors(self, X) -> np.ndarray:
        """Return the indices of the ``k`` most cosine-similar training spots for each query spot.

        Parameters
        ----------
        X
            Query features ``[n_spots, n_features]``.

        Returns
        -------
        int array ``[n_spots, k]`` (unordered within a row).
        """
        if not hasattr(self, "train_embedding_"):
            raise RuntimeError("KNNRetrieval is not fitted; call fit(X, Y) first.")
        Zq = self._embed(_check_X(X))
        out = np.empty((Zq.shape[0], self.k_), dtype=np.int64)
        step = max(int(self.chunk_size), 1)
        for s in range(0, Zq.shape[0], step):
            sim = Zq[s : s + step] @ self.train_embedding_.T
            if self.k_ < sim.shape[1]:
                out[s : s + step] = np.argpartition(-sim, self.k_ - 1, axis=1)[:, : self.k_]
            else:
                out[s : s + step] = np.arange(sim.shape[1])[None, :]
        return out

    def _predict(self, X):
        idx = self.kneighbors(X)
        n, k = idx.shape
        W = sparse.csr_matrix(
            (np.full(n * k, 1.0 / k), idx.ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, self.train_Y_.shape[0]),
        )
        return np.asarray(W @ self.train_Y_)


class DepthOracle(BaseBaseline):
    """Yardstick, not a method: each gene predicted linearly from the spot's own log total counts.

    Fits ``y_g = a_g + b_g · x`` per gene by least squares on the training spots, where ``x`` is the spot's
    ``log1p(total counts)``; at prediction time ``x`` comes from the *query* spots' own counts, which a real
    histology-only method never sees. The score it reaches shows how much of a benchmark score sequencing depth
    alone explains.

    ``fit`` and ``predict`` take ``X = log1p(total counts)``, shape ``[n_spots]`` or ``[n_spots, 1]``.
    """

    def _fit(self, X, Y, groups):
        if X.shape[1] != 1:
            raise ValueError(f"DepthOracle takes one feature, the log total counts; got {X.shape[1]} columns.")
        x = X[:, 0]
        xc = x - x.mean()
        var = float(xc @ xc)
        self.slope_ = (xc @ (Y - Y.mean(axis=0))) / var if var > 0 else np.zeros(Y.shape[1])
        self.intercept_ = Y.mean(axis=0) - self.slope_ * x.mean()

    def _predict(self, X):
        return X[:, :1] * self.slope_[None, :] + self.intercept_[None, :]


class MLPBaseline(BaseBaseline):
    """A small multilayer perceptron from features to expression, trained with early stopping (torch, CPU).

    Features and targets are standardised on the training spots; the network (``Linear → GELU → Dropout`` per
    hidden layer, then ``Linear``) is trained with Adam on MSE. A random ``val_fraction`` of the training spots is
    held out for early stopping (patience ``patience`` epochs), and the best weights are restored. Training is
    seeded and does not touch the global torch / numpy random state.

    Parameters
    ----------
    hidden_dims
        Widths of the hidden layers.
    dropout
        Dropout after each hidden layer.
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay.
    batch_size
        Mini-batch size.
    max_epochs
        Upper bound on epochs.
    patience
        Epochs without validation improvement before stopping.
    val_fraction
        Fraction of training spots used for early stopping (none if fewer than 10 spots would remain).
    random_state
        Seed for the split, the initialisation and the batch order.
    device
        Torch device (``"cpu"`` by default).
    num_threads
        Torch CPU threads while fitting and predicting (restored afterwards). The default, 1, is as fast as more
        threads for a network this small and avoids the heavy slow-down of oversubscribed cores; ``None`` keeps
        torch's setting.
    """

    def __init__(
        self,
        hidden_dims: Sequence[int] = (256,),
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        max_epochs: int = 200,
        patience: int = 10,
        val_fraction: float = 0.1,
        random_state: int | None = 0,
        device: str = "cpu",
        num_threads: int | None = 1,
    ):
        self.hidden_dims = hidden_dims
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.device = device
        self.num_threads = num_threads

    @contextmanager
    def _threads(self):
        import torch

        if self.num_threads is None or str(self.device) != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(int(self.num_threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _build(self, n_in: int, n_out: int):
        import torch.nn as nn

        layers: list = []
        d = n_in
        for h in self.hidden_dims:
            layers += [nn.Linear(d, int(h)), nn.GELU(), nn.Dropout(float(self.dropout))]
            d = int(h)
        layers.append(nn.Linear(d, n_out))
        return nn.Sequential(*layers)

    def _fit(self, X, Y, groups):
        with self._threads():
            self._fit_torch(X, Y)

    def _fit_torch(self, X, Y):
        import torch

        rng = np.random.default_rng(self.random_state)
        self.x_scaler_ = StandardScaler().fit(X)
        self.y_mean_ = Y.mean(axis=0)
        sd = Y.std(axis=0)
        self.y_scale_ = np.where(sd > 0, sd, 1.0)
        Xs = self.x_scaler_.transform(X).astype(np.float32)
        Ys = ((Y - self.y_mean_) / self.y_scale_).astype(np.float32)
        n = X.shape[0]
        n_val = int(round(float(self.val_fraction) * n))
        perm = rng.permutation(n)
        if n_val < 1 or n - n_val < 10:
            tr, va = perm, None
        else:
            tr, va = perm[n_val:], perm[:n_val]
        dev = torch.device(self.device)
        seed = int(rng.integers(2**31 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self._build(X.shape[1], Y.shape[1]).to(dev)
            opt = torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            Xt = torch.from_numpy(Xs).to(dev)
            Yt = torch.from_numpy(Ys).to(dev)
            best, best_state, bad, history = np.inf, None, 0, []
            bs = max(int(self.batch_size), 1)
            for _ in range(int(self.max_epochs)):
                net.train()
                order = tr[rng.permutation(tr.size)]
                for s in range(0, order.size, bs):
                    b = torch.from_numpy(order[s : s + bs]).to(dev)
                    loss = torch.nn.functional.mse_loss(net(Xt[b]), Yt[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if va is None:
                    history.append(float(loss))
                    continue
                net.eval()
                with torch.no_grad():
                    vb = torch.from_numpy(va).to(dev)
                    val = float(torch.nn.functional.mse_loss(net(Xt[vb]), Yt[vb]))
                history.append(val)
                if val < best - 1e-6:
                    best, bad = val, 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= int(self.patience):
                        break
            if best_state is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        self.n_epochs_ = len(history)
        self.history_ = history

    def _predict(self, X):
        import torch

        Xs = torch.from_numpy(self.x_scaler_.transform(X).astype(np.float32)).to(torch.device(self.device))
        with torch.no_grad(), self._threads():
            out = torch.cat([self.net_(Xs[s : s + 4096]) for s in range(0, Xs.shape[0], 4096)]).cpu().numpy()
        return out.astype(np.float64) * self.y_scale_ + self.y_mean_


#: Baselines by name, as used by :func:`baseline_predict` and the benchmark.
BASELINES: dict[str, type[BaseBaseline]] = {
    "mean": MeanPredictor,
    "ridge": RidgeProbe,
    "ridge_cv": RidgeCV,
    "mlp": MLPBaseline,
    "knn": KNNRetrieval,
    "depth_oracle": DepthOracle,
}


def _layer(adata, layer: str | None, which: str):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"{which}.layers has no {layer!r} (available: {list(adata.layers.keys())}); pass layer=None to use .X."
        )
    return adata.layers[layer]


def _total_counts(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1)


def _histology(adata, key: str, which: str) -> np.ndarray:
    if key not in adata.obsm:
        raise KeyError(f"{which}.obsm has no {key!r} (available: {list(adata.obsm.keys())}).")
    H = np.asarray(adata.obsm[key], dtype=np.float64)
    if H.ndim != 2:
        raise ValueError(f"{which}.obsm[{key!r}] must be 2-D [n_obs, n_features]; got shape {H.shape}.")
    return H


def baseline_predict(
    method: str,
    train,
    query,
    histology_key: str = ADATA_KEYS.HISTOLOGY,
    layer: str | None = ADATA_KEYS.COUNTS_LAYER,
    genes: Sequence[str] | None = None,
    target: str = "log1p",
    batch_key: str | None = ADATA_KEYS.SECTION,
    seed: int = 0,
    **kwargs,
) -> np.ndarray:
    """Fit a baseline on a training AnnData and predict expression for a query AnnData.

    Training targets are ``expression_target(counts, kind=target)`` of the selected genes, with library sizes
    taken over *all* genes of ``layer``. Training spots whose histology features are not all finite are left out;
    query spots must all have finite features. For ``"depth_oracle"`` the feature is ``log1p(total counts)``
    instead of histology, and the query's *own* counts are used (so the query must carry ``layer``).

    Parameters
    ----------
    method
        A key of :data:`BASELINES`: ``"mean"``, ``"ridge"``, ``"ridge_cv"``, ``"mlp"``, ``"knn"``,
        ``"depth_oracle"``.
    train
        AnnData with counts in ``layer`` and features in ``obsm[histology_key]``.
    query
        AnnData with features in ``obsm[histology_key]`` (counts only needed for ``"depth_oracle"``).
    histology_key
        ``obsm`` key of the per-spot features.
    layer
        Layer holding raw counts (``None`` for ``.X``).
    genes
        Genes to predict, in output order; default all of ``train.var_names``.
    target
        ``"log1p"`` or ``"cp10k"`` (see :func:`varst_scverse._targets.expression_target`).
    batch_key
        ``obs`` column with the section of each training spot, passed as ``groups`` (``"ridge_cv"`` leaves one
        section out per fold). Missing column or ``None``: no groups (K-fold for ``"ridge_cv"``).
    seed
        Passed as ``random_state`` to baselines that have one (unless given in ``kwargs``).
    **kwargs
        Constructor arguments of the baseline class.

    Returns
    -------
    float32 array ``[query.n_obs, len(genes)]`` on the target scale.

    Raises
    ------
    KeyError
        Missing ``obsm`` / ``layers`` keys.
    ValueError
        Unknown method or target, genes absent from ``train``, non-finite query features, feature widths that
        differ between train and query, or no training spot with finite features.
    """
    if method not in BASELINES:
        raise ValueError(f"Unknown baseline {method!r}; choose one of {sorted(BASELINES)}.")
    if target not in TARGET_KINDS:
        raise ValueError(f"Unknown target {target!r}; use one of {TARGET_KINDS}.")
    cls = BASELINES[method]

    if genes is None:
        genes = list(train.var_names)
    genes = pd.Index(np.asarray(genes).astype(str))
    if genes.size == 0:
        raise ValueError("genes is empty.")
    if genes.has_duplicates:
        raise ValueError(f"genes has duplicates: {list(genes[genes.duplicated()][:5])}.")
    col = train.var_names.get_indexer(genes)
    if np.any(col < 0):
        missing = list(genes[col < 0])
        raise ValueError(f"{len(missing)} genes are not in train.var_names, e.g. {missing[:5]}.")

    counts = _layer(train, layer, "train")
    depth = method == "depth_oracle"

    keep = np.ones(train.n_obs, dtype=bool)
    if not depth or histology_key in train.obsm:
        H_train = _histology(train, histology_key, "train")
        keep = np.isfinite(H_train).all(axis=1)
        if not keep.any():
            raise ValueError(f"No training spot has finite features in train.obsm[{histology_key!r}].")
        if not keep.all():
            warnings.warn(
                f"Leaving out {int((~keep).sum())} of {train.n_obs} training spots with non-finite "
                f"train.obsm[{histology_key!r}].",
                UserWarning,
                stacklevel=2,
            )
    if sparse.issparse(counts):
        counts = sparse.csr_matrix(counts)
    counts = counts[np.flatnonzero(keep)]
    total = _total_counts(counts)
    Y = expression_target(counts[:, col], kind=target, total_counts=total)

    if depth:
        X_train = np.log1p(total)[:, None]
        X_query = np.log1p(_total_counts(_layer(query, layer, "query")))[:, None]
    else:
        X_train = H_train[keep]
        X_query = _histology(query, histology_key, "query")
        if X_query.shape[1] != X_train.shape[1]:
            raise ValueError(
                f"query.obsm[{histology_key!r}] has {X_query.shape[1]} features but train has {X_train.shape[1]}."
            )
        bad = ~np.isfinite(X_query).all(axis=1)
        if bad.any():
            raise ValueError(
                f"query.obsm[{histology_key!r}] has non-finite values in {int(bad.sum())} spots; baselines cannot "
                "predict them. Subset the query to spots with finite features."
            )

    groups = None
    if batch_key is not None and batch_key in train.obs:
        groups = np.asarray(train.obs[batch_key].astype(str))[keep]
    elif batch_key is not None and method == "ridge_cv":
        warnings.warn(
            f"train.obs has no {batch_key!r}; ridge_cv falls back to K-fold over spots.", UserWarning, stacklevel=2
        )

    params = dict(kwargs)
    if "random_state" in cls().get_params() and "random_state" not in params:
        params["random_state"] = seed
    est = cls(**params).fit(X_train, Y, groups=groups)
    return est.predict(X_query).astype(np.float32)
