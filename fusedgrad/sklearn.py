"""A scikit-learn estimator on the fused trainer: :class:`MLPRegressor`.

``fusedgrad.sklearn.MLPRegressor`` takes ``sklearn.neural_network.MLPRegressor``'s parameters with
their meanings, initialises as it does, and trains with :class:`fusedgrad.Trainer` (every epoch's
mini-batches in C++). Install the extra with ``pip install fusedgrad[sklearn]``.

How sklearn's stochastic solvers map onto ``torch.optim`` (derived from
sklearn/neural_network/_multilayer_perceptron.py and _stochastic_optimizers.py, and checked
against sklearn in float64 by tests/test_sklearn.py):

* Gradient. sklearn's gradient for a batch of n_b rows and O outputs is
  ``(P - Y)ᵀ-backprop / n_b + alpha·W / n_b`` — the gradient of ``sum((P-Y)²) / (2·n_b)``, not
  divided by O (its *reported* loss is ``0.5·mean`` over all n_b·O elements). The fused
  ``reduction='mean'`` gradient is that of ``sum((P-Y)²) / (n_b·O)``, so
  ``g_sklearn = c·(g_mean + wd·W)`` with ``c = O/2`` and ``wd = 2·alpha / (O·n_b)``: the L2
  term is a weight decay on the weights only (biases get none, as in sklearn) that depends on the
  step's rows: the trainer takes it per step (``csrc/trainer/train_step.h``: ``SklearnTerms``), so
  the last, shorter batch of an epoch gets its own within the same call.
* SGD: ``lr_torch = c·lr``. sklearn's ``v = μ·v − lr·g; p += v`` (Nesterov: ``p += μ·v − lr·g``)
  is torch's ``buf = μ·buf + g; p −= lr·buf`` (nesterov=True: ``p −= lr·(g + μ·buf)``) with
  ``v = −lr·buf`` while lr is constant; when sklearn's lr changes (invscaling, adaptive: between
  epochs) the momentum buffers are multiplied by ``lr_old / lr_new``, which keeps ``v = −lr·buf``
  — so every schedule is the same update as sklearn's.
* Adam: the scale c cancels except in eps, and sklearn adds eps to ``sqrt(v)`` before the bias
  correction while torch adds it after: sklearn's step equals torch's with
  ``eps_torch = eps / (c·sqrt(1 − β₂ᵗ))``, which changes with the step t; the trainer computes it
  at every step (``SklearnTerms.eps_hat``), so the update is sklearn's.
* Loss: sklearn's epoch loss adds ``0.5·alpha·‖W‖²`` for every batch, with W as it was before the
  batch's update; the trainer records ``‖W‖²`` before each step for it.

A run of epochs up to the first one at which the stopping rule could act is one block: its steps
run in as few trainer calls as the limit per call allows (``_MAX_STEPS_PER_CALL``), and the rule
then reads each epoch's loss in order — the same epochs, shuffles and updates as epoch by epoch.
"""
from __future__ import annotations

import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch

try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fusedgrad.sklearn needs scikit-learn: pip install 'fusedgrad[sklearn]'") from exc

from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .module import FusedMLP
from .trainer import Trainer

__all__ = ["MLPRegressor"]

#: sklearn's hidden activation names → fusedgrad.ACTIVATIONS.
_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Steps per trainer call at most (a long epoch is a few calls: Ctrl-C is seen between them).
_MAX_STEPS_PER_CALL = 2048
# Epochs run as one block at most before the stopping rule reads their losses (see _fit), and the rows
# of a block's row orders at most (the order buffer: 8 bytes a row).
_MAX_BLOCK_EPOCHS = 256
_MAX_BLOCK_ROWS = 1 << 22


def _dtype_name(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"fusedgrad.sklearn.MLPRegressor: dtype must be np.float32 or np.float64, got {dtype!r}")
    return name


class MLPRegressor(RegressorMixin, BaseEstimator):
    """``sklearn.neural_network.MLPRegressor`` trained by fusedgrad's fused C++ trainer.

    The parameters, their defaults and meanings are sklearn's (see
    ``sklearn.neural_network.MLPRegressor``), plus ``dtype``. Fitted attributes: ``coefs_``
    (``(fan_in, fan_out)`` arrays: ``linear{l}.weight.T``), ``intercepts_``, ``loss_``,
    ``loss_curve_``, ``best_loss_``, ``validation_scores_``, ``best_validation_score_``,
    ``n_iter_``, ``t_``, ``n_features_in_``, ``feature_names_in_`` (for named columns),
    ``n_layers_``, ``n_outputs_``, ``out_activation_`` (``'identity'``). :meth:`to_torch` returns
    the trained network as a :class:`fusedgrad.FusedMLP`.

    With the same ``random_state`` it draws the same initial weights, the same shuffles and the
    same early-stopping split as sklearn, and each step is sklearn's update, SGD and Adam alike (see
    the module docstring); in float64 the coefficients and ``loss_curve_`` after a few epochs equal
    sklearn's to the tolerances tests/test_sklearn.py states (1e-12 relative).

    Differences from sklearn's MLPRegressor:

    * ``dtype`` (default ``np.float32``): the network is trained and evaluated in this dtype
      whatever the input's dtype (sklearn computes in the input's float32/float64; predictions
      are returned in the input's float dtype, as sklearn's). Pass ``dtype=np.float64`` for
      sklearn's float64 results.
    * ``solver='lbfgs'`` runs sklearn's optimizer — scipy's L-BFGS-B, ``maxiter=max_iter``,
      ``maxfun=max_fun``, ``gtol=tol`` — on sklearn's objective, its loss and gradient from one fused
      pass per evaluation in ``dtype`` (scipy's vectors are float64); ``verbose`` prints nothing for it,
      and ``partial_fit`` is not available with it (as sklearn documents; sklearn 1.9's MLPRegressor
      keeps the method and runs L-BFGS).
    * ``loss='poisson'`` raises ValueError (squared error only).
    * ``hidden_layer_sizes=()`` (no hidden layer) raises ValueError: FusedMLP has at least one.
    * no ``sample_weight`` in ``fit`` / ``partial_fit``; sparse ``X`` is refused (sklearn's
      dense-data TypeError) rather than accepted.
    * the estimator's private state (the FusedMLP and torch optimizer kept for ``partial_fit``)
      is torch's; ``coefs_`` / ``intercepts_`` stay the source of truth — edits to them are
      trained on by the next ``fit(warm_start=True)`` / ``partial_fit`` as in sklearn.
    """

    _parameter_constraints: dict = {
        **_SkMLPRegressor._parameter_constraints,
        "dtype": "no_validation",  # checked by _dtype_name
    }

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=np.float32):
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype

    # ------------------------------------------------------------------ public API
    def fit(self, X, y):
        """Fit the model to ``X`` (n_samples, n_features) and ``y`` (n_samples,) or (n_samples, n_outputs).

        Runs up to ``max_iter`` epochs (stopping as sklearn does); a new fit restarts the optimizer
        (with ``warm_start=True`` from the current ``coefs_`` / ``intercepts_``). Returns self.
        """
        return self._fit(X, y, incremental=False)

    def _check_solver(self):
        if self.solver not in ("sgd", "adam"):
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. {self.solver} is not "
                                 "stochastic.")
        return True

    @available_if(_check_solver)
    def partial_fit(self, X, y):
        """One epoch over ``X``, ``y``, continuing the weights and the optimizer state. Returns self."""
        return self._fit(X, y, incremental=True)

    def predict(self, X):
        """Predictions ``(n_samples,)`` for a 1-D training target, else ``(n_samples, n_outputs)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        pred = self._forward(X).astype(X.dtype, copy=False)  # the input's float dtype, as sklearn's
        return pred.ravel() if pred.shape[1] == 1 else pred

    def to_torch(self) -> FusedMLP:
        """A new :class:`fusedgrad.FusedMLP` holding the fitted ``coefs_`` / ``intercepts_`` (in ``dtype``)."""
        check_is_fitted(self)
        net = self._new_net(self.coefs_[0].shape[0], self.n_outputs_, _DTYPES[_dtype_name(self.dtype)])
        self._load_coefs(net)
        return net

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # y of shape (n, O) is fitted as O outputs
        return tags

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_trainer", None)  # rebuilt on demand from the pickled net and optimizer
        return state

    # ------------------------------------------------------------------ fitting
    def _fit(self, X, y, incremental):
        self._validate_params()
        fn = "fusedgrad.sklearn.MLPRegressor"
        if self.loss != "squared_error":
            raise ValueError(f"{fn}: only loss='squared_error' is available, got loss={self.loss!r}")
        hidden = self.hidden_layer_sizes
        hidden = list(hidden) if hasattr(hidden, "__iter__") else [hidden]
        if not hidden:
            raise ValueError(f"{fn}: hidden_layer_sizes must name at least one hidden layer (FusedMLP has one or "
                             "more), got ()")
        if any(int(h) <= 0 for h in hidden):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {hidden}.")
        hidden = [int(h) for h in hidden]
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        dtype_name = _dtype_name(self.dtype)
        tdtype = _DTYPES[dtype_name]

        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.dtype(dtype_name),
                             reset=first_pass)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        y = np.asarray(y, dtype=dtype_name)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        n_samples, n_features = X.shape
        layer_units = [n_features] + hidden + [y.shape[1]]
        if not first_pass:
            shapes = [c.shape for c in self.coefs_]
            if shapes != list(zip(layer_units[:-1], layer_units[1:])):
                raise ValueError(f"{fn}: the fitted coefs_ have shapes {shapes}, which do not match "
                                 f"hidden_layer_sizes={tuple(hidden)} and the data's {n_features} features and "
                                 f"{y.shape[1]} outputs; fit without warm_start")
        self.n_outputs_ = y.shape[1]
        self._random_state = rs = check_random_state(self.random_state)
        if first_pass:
            self._initialize(layer_units, rs, dtype_name)

        net = getattr(self, "_net", None)
        if net is None or not self._net_matches(net, layer_units, tdtype):
            net = self._net = self._new_net(n_features, self.n_outputs_, tdtype)
            self._opt = self._trainer = None
        self._load_coefs(net)
        if self.solver == "lbfgs":
            try:
                self._fit_lbfgs(net, _as_tensor(X, tdtype), _as_tensor(y, tdtype))
            finally:
                self._store_coefs(net)
            if not all(np.isfinite(w).all() for w in (*self.coefs_, *self.intercepts_)):
                raise ValueError("Solver produced non-finite parameter weights. The input data may contain large "
                                 "values and need to be preprocessed.")
            return self
        if not incremental or getattr(self, "_opt", None) is None:
            self._new_optimizer(net)

        if self.early_stopping:
            X_train, X_val, y_train, y_val = train_test_split(X, y, random_state=rs,
                                                              test_size=self.validation_fraction)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                                 "your dataset.")
            if y_val.shape[1] == 1:
                y_val = y_val.ravel()
        else:
            X_train, y_train, X_val, y_val = X, y, None, None
        n = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n))

        xt, yt = _as_tensor(X_train, tdtype), _as_tensor(y_train, tdtype)
        run = _EpochRunner(self, xt, yt, batch_size, incremental)
        sample_idx = np.arange(n)
        try:
            self.n_iter_ = 0
            while self.n_iter_ < self.max_iter:
                # The next epochs run as one block when the stopping rule can stop (or change the learning
                # rate) at the block's last epoch at the earliest; the rule then reads each epoch's loss
                # after the block, in order — the same epochs, shuffles and updates as epoch by epoch.
                k = run.block_epochs(self)
                if self.shuffle:
                    for j in range(k):
                        # sklearn.utils.shuffle(sample_idx, random_state=rs), as sklearn draws it
                        perm = np.arange(n)
                        rs.shuffle(perm)
                        sample_idx = sample_idx[perm]
                        run.order_np[j * n:(j + 1) * n] = sample_idx
                l2 = []  # each completed epoch's L2 part of the loss
                try:
                    self._block(run, k, l2)
                finally:
                    stop = self._epochs_end(run, l2, X_val, y_val, incremental)
                if stop or incremental:
                    break
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        finally:
            self._store_coefs(net)  # coefs_ / intercepts_ are what was trained, even after Ctrl-C

        if self.early_stopping:
            self.coefs_, self.intercepts_ = self._best_coefs, self._best_intercepts
        if not all(np.isfinite(w).all() for w in (*self.coefs_, *self.intercepts_)):
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             "and need to be preprocessed.")
        return self

    def _initialize(self, layer_units, rs, dtype_name):
        """sklearn's _initialize: Glorot-uniform weights and biases drawn from ``rs`` in its order."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(layer_units)
        self.out_activation_ = "identity"
        self.coefs_, self.intercepts_ = [], []
        factor = 2.0 if self.activation == "logistic" else 6.0
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            self.coefs_.append(rs.uniform(-bound, bound, (fan_in, fan_out)).astype(dtype_name, copy=False))
            self.intercepts_.append(rs.uniform(-bound, bound, fan_out).astype(dtype_name, copy=False))
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        if self.solver == "lbfgs":  # as sklearn: no loss curve, validation scores or best loss for L-BFGS
            return
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _fit_lbfgs(self, net, x, y):
        """sklearn's ``_fit_lbfgs``: scipy's L-BFGS-B over the packed coefficients and intercepts (sklearn's
        order), with ``maxiter=max_iter``, ``maxfun=max_fun``, ``gtol=tol`` — the same optimizer sklearn
        runs — on sklearn's objective, its value and gradient from one fused pass of the engine:

            loss = ½ mean((p − y)²) + α / (2n) Σ ||W||²,   ∂/∂W = (O/2) ∂mean/∂W + α W / n,   ∂/∂b = (O/2) ∂mean/∂b

        (sklearn's gradient of the data term is (p − y)/n per output, O/2 times that of the mean over
        n·O elements). The network computes in ``dtype``; scipy's vectors are float64."""
        from scipy.optimize import minimize

        from .deep import mlp_loss_and_grads

        weights, biases = net._weights_biases()
        n, c, alpha = x.shape[0], self.n_outputs_ / 2.0, float(self.alpha)
        act = _ACTIVATIONS[self.activation]

        def unpack(theta):
            with torch.no_grad():
                off = 0
                for w in weights:  # coefs_[l] is (fan_in, fan_out) = W_lᵀ, raveled
                    k = w.numel()
                    w.copy_(torch.from_numpy(theta[off:off + k]).view(w.shape[1], w.shape[0]).T)
                    off += k
                for b in biases:
                    b.copy_(torch.from_numpy(theta[off:off + b.numel()]))
                    off += b.numel()

        def loss_grad(theta):
            unpack(theta)
            loss, dws, dbs, _, _ = mlp_loss_and_grads(x, weights, biases, y, reduction="mean", activation=act)
            w64 = [w.detach().double() for w in weights]
            l2 = sum(float((w * w).sum()) for w in w64)
            value = 0.5 * float(loss) + 0.5 * alpha * l2 / n
            grad = [(c * g.double() + (alpha / n) * w).T.reshape(-1) for g, w in zip(dws, w64)]
            grad += [c * g.double() for g in dbs]
            return value, torch.cat(grad).numpy()

        theta0 = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in (*self.coefs_, *self.intercepts_)])
        res = minimize(loss_grad, theta0, method="L-BFGS-B", jac=True,
                       options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol})
        unpack(res.x)
        self.n_iter_ = min(int(res.nit), int(self.max_iter))
        if res.status != 0:
            warnings.warn(f"lbfgs failed to converge after {self.n_iter_} iteration(s) (status={res.status}): "
                          f"{res.message}. Increase the number of iterations (max_iter) or scale the data.",
                          ConvergenceWarning)
        self.loss_ = float(res.fun)

    def _new_net(self, n_features, n_outputs, tdtype):
        """A FusedMLP of the fitted shapes; its weights are overwritten from coefs_ (_load_coefs). Its own
        initialisation draws from torch's global generator, which is restored: the estimator's randomness
        is its random_state's only. (Built on the CPU: on "meta" and then to_empty(), as skip_init does,
        costs ~450 µs here against ~90 µs, a tenth of a small fit.)"""
        hidden = [c.shape[1] for c in self.coefs_[:-1]]
        with torch.random.fork_rng(devices=[]):
            return FusedMLP(n_features, hidden[0] if len(hidden) == 1 else hidden, n_outputs, dtype=tdtype,
                            activation=_ACTIVATIONS[self.activation])

    def _net_matches(self, net, layer_units, tdtype):
        layers = net._layers()
        return (net.activation == _ACTIVATIONS[self.activation] and len(layers) == len(layer_units) - 1
                and all(l.weight.shape == (o, i) and l.weight.dtype == tdtype
                        for l, i, o in zip(layers, layer_units[:-1], layer_units[1:])))

    def _load_coefs(self, net):
        with torch.no_grad():
            for layer, coef, intercept in zip(net._layers(), self.coefs_, self.intercepts_):
                layer.weight.copy_(torch.as_tensor(np.asarray(coef)).T)
                layer.bias.copy_(torch.as_tensor(np.asarray(intercept)))

    def _store_coefs(self, net):
        layers = net._layers()
        self.coefs_ = [l.weight.detach().T.numpy().copy() for l in layers]
        self.intercepts_ = [l.bias.detach().numpy().copy() for l in layers]

    def _new_optimizer(self, net):
        """A fresh torch optimizer with sklearn's settings: weights and biases in separate groups."""
        weights, biases = net._weights_biases()
        groups = [{"params": weights}, {"params": biases}]
        self._c = self.n_outputs_ / 2.0  # g_sklearn = c · g_mean (module docstring)
        self._lr = float(self.learning_rate_init)  # sklearn's current learning rate
        if self.solver == "sgd":
            momentum = float(self.momentum)
            self._opt = torch.optim.SGD(groups, lr=self._c * self._lr, momentum=momentum,
                                        nesterov=bool(self.nesterovs_momentum) and momentum > 0)
        else:
            self._opt = torch.optim.Adam(groups, lr=self._lr, betas=(self.beta_1, self.beta_2), eps=self.epsilon)
        self._adam_t = 0  # sklearn's AdamOptimizer.t
        self._trainer = Trainer(net, self._opt, reduction="mean")

    def _get_trainer(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            trainer = self._trainer = Trainer(self._net, self._opt, reduction="mean")
        return trainer

    def _block(self, run, k, l2):
        """The ``k`` epochs of ``run``'s block: their steps in as few trainer calls as ``_MAX_STEPS_PER_CALL``
        allows, with sklearn's step terms (module docstring), their losses into ``run.losses``; appends
        each completed epoch's L2 part of sklearn's loss (times n) to ``l2``, even when interrupted."""
        trainer, fn = self._get_trainer(), "fusedgrad.sklearn.MLPRegressor.fit"
        steps, n, bs, total = run.steps, run.n, run.batch_size, k * run.steps
        eps_hat = self._adam_eps_hat()
        decay_per_row = 2.0 * run.alpha / self.n_outputs_
        done0 = int(run.done)
        try:
            step = 0
            while step < total:
                take = min(total - step, _MAX_STEPS_PER_CALL)
                order = None
                first = step
                if run.order_np.size:  # only the epochs the call touches: the kernel checks the order it gets
                    e0, e1 = step // steps, (step + take - 1) // steps
                    order = run.order_tensor[e0 * n:(e1 + 1) * n]
                    first = step - e0 * steps
                terms = (decay_per_row, eps_hat, run.weight_sq[step:step + take])
                trainer._run(fn, run.x, run.y, take, first, bs, order, run.losses[step:step + take], run.done,
                             terms)
                step += take
        finally:
            taken = int(run.done) - done0  # steps completed, also when a call was interrupted
            self._adam_t += taken
            epochs = taken // steps
            sq = run.weight_sq.numpy()[:epochs * steps].reshape(epochs, steps).sum(axis=1)
            l2.extend((0.5 * run.alpha * sq).tolist())

    def _adam_eps_hat(self):
        """sklearn's Adam eps in the trainer's terms (eps added before the bias correction, gradients
        scaled by c: module docstring); -1 for SGD, which has none."""
        return float(self.epsilon) / self._c if self.solver == "adam" else -1.0

    def _epochs_end(self, run, l2, X_val, y_val, incremental):
        """sklearn's end of each epoch of a block, in order, for the ``len(l2)`` completed ones: loss_,
        loss_curve_, n_iter_, t_, the stopping rule and the learning-rate schedule. True: stop."""
        if not l2:
            return False
        k = len(l2)
        # the data part: 0.5 · (each step's mean squared error) · its rows, added step by step in float64
        data = np.cumsum(run.losses.numpy()[:k * run.steps].reshape(k, run.steps).astype(np.float64) * run.weights,
                         axis=1)[:, -1]
        for j in range(k):
            self.loss_ = float((0.5 * data[j] + l2[j]) / run.n)
            self.n_iter_ += 1
            self.t_ += run.n
            self.loss_curve_.append(self.loss_)
            if self.verbose:
                print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
            self._update_no_improvement_count(X_val, y_val)
            self._iteration_ends()
            if self._no_improvement_count > self.n_iter_no_change:
                if self.early_stopping:
                    msg = ("Validation score did not improve more than tol=%f for %d consecutive epochs."
                           % (self.tol, self.n_iter_no_change))
                else:
                    msg = ("Training loss did not improve more than tol=%f for %d consecutive epochs."
                           % (self.tol, self.n_iter_no_change))
                if self._trigger_stopping(msg):
                    if j != k - 1:  # block_epochs rules this out
                        raise AssertionError("fusedgrad.sklearn: internal: the stopping rule stopped inside a block")
                    return True
                self._no_improvement_count = 0
            if not incremental and self.n_iter_ == self.max_iter:
                warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization "
                              "hasn't converged yet." % self.max_iter, ConvergenceWarning)
        return False

    def _update_no_improvement_count(self, X_val, y_val):
        if self.early_stopping:
            pred = self._net_predict(self._net, X_val)
            pred = pred.ravel() if pred.shape[1] == 1 else pred
            score = np.nan if not np.isfinite(pred).all() else r2_score(y_val, pred)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % self.validation_scores_[-1])
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._store_coefs(self._net)
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [i.copy() for i in self.intercepts_]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _set_sgd_lr(self, lr):
        """sklearn's lr becomes ``lr``: torch's lr follows, and the momentum buffers are rescaled so that
        sklearn's velocity −lr·buf carries over unchanged."""
        old = self._lr
        self._lr = lr
        for g in self._opt.param_groups:
            g["lr"] = self._c * lr
            for p in g["params"]:
                buf = self._opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None and lr > 0:
                    buf.mul_(old / lr)

    def _iteration_ends(self):
        if self.solver == "sgd" and self.learning_rate == "invscaling":
            self._set_sgd_lr(float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t)

    def _trigger_stopping(self, msg):
        if self.solver != "sgd" or self.learning_rate != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if self._lr <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self._set_sgd_lr(self._lr / 5.0)
        if self.verbose:
            print(msg + " Setting learning rate to %f" % self._lr)
        return False

    # ------------------------------------------------------------------ prediction
    def _forward(self, X):
        tdtype = _DTYPES[_dtype_name(self.dtype)]
        net = getattr(self, "_net", None)
        if net is None or not self._net_matches(net, [self.coefs_[0].shape[0], *(c.shape[1] for c in self.coefs_)],
                                                tdtype):
            net = self._net = self._new_net(self.coefs_[0].shape[0], self.coefs_[-1].shape[1], tdtype)
            self._opt = self._trainer = None
        self._load_coefs(net)  # coefs_ are the source of truth (they may have been edited or restored)
        return self._net_predict(net, X)

    @staticmethod
    def _net_predict(net, X):
        with torch.no_grad():
            return net(_as_tensor(X, net.linear1.weight.dtype)).numpy()


class _EpochRunner:
    """A fit's epochs: the step layout (full batches, then the remainder) and the buffers of a block of
    epochs (the rows' order, a loss and a ‖W‖² per step), made once per fit and reused by every block."""

    def __init__(self, est, x, y, batch_size, incremental):
        self.x, self.y, self.n, self.batch_size = x, y, x.shape[0], batch_size
        full, rest = divmod(self.n, batch_size)
        self.steps = full + (1 if rest else 0)  # steps of an epoch; each step's rows below
        self.weights = np.array([batch_size] * full + ([rest] if rest else []), dtype=np.float64)
        self.max_block = 1 if (incremental or est.early_stopping or (est.solver == "sgd"
                                                                     and est.learning_rate == "invscaling")) \
            else max(1, min(_MAX_BLOCK_EPOCHS, _MAX_BLOCK_ROWS // self.n))
        self.max_block = max(1, min(self.max_block, est.max_iter))
        self.losses = torch.zeros(self.max_block * self.steps, dtype=x.dtype)
        self.weight_sq = torch.zeros(self.max_block * self.steps, dtype=torch.float64)  # ‖W‖² before each step
        self.order_np = np.empty(self.max_block * self.n if est.shuffle else 0, dtype=np.int64)
        self.order_tensor = torch.from_numpy(self.order_np)
        self.done = torch.zeros(1, dtype=torch.int64)
        self.alpha = float(est.alpha)

    def block_epochs(self, est):
        """How many epochs the next block runs: up to the first at which the stopping rule can act."""
        return max(1, min(self.max_block, est.max_iter - est.n_iter_,
                          est.n_iter_no_change + 1 - est._no_improvement_count))


def _as_tensor(a, dtype):
    """A C-contiguous, writable tensor of ``a`` (shares memory where numpy already has that layout)."""
    a = np.asarray(a)
    if not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, order="C", copy=True)
    return torch.from_numpy(a).to(dtype)
