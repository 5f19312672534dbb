"""Adam and AdamW over a model's named parameters, with global-norm gradient clipping.

The optimizer holds references to the model's parameter arrays (``model.parameters()``) and
updates them in place with the fused native kernel ``ops.adam_step``; first and second moments
``m`` and ``v`` are float32 arrays of the same shapes. ``step(grads)`` takes the gradients
(``model.gradients()``), which must have the same names and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import ops
from ..checks import check_float, check_int

__all__ = ["Adam", "AdamW", "decay_matrices_only"]

LearningRate = float | Callable[[int], float]


def decay_matrices_only(name: str, param: np.ndarray) -> bool:
    """Default weight-decay filter: decay weight matrices and embeddings (ndim >= 2), not biases
    or layer-norm gains."""
    return param.ndim >= 2


def _check_array(what: str, arr: object) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.float32:
        raise TypeError(f"{what}: expected float32, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what}: must be C-contiguous")
    return arr


class Adam:
    """Adam (Kingma & Ba) as the paper trains: beta1 0.9, beta2 0.98, eps 1e-9 by default.

    params: name -> float32 C-contiguous array, updated in place (hold the model's own arrays).
    lr: a number or a schedule ``lr(step)`` of the 1-based update step (see ``schedule``).
    weight_decay: L2 added to the gradient (``decoupled=False``, classic Adam) or AdamW's decoupled
    decay (``decoupled=True``), applied only where ``decay_filter(name, param)`` is true (default:
    matrices; biases and layer-norm parameters are not decayed).
    max_grad_norm: when given, gradients are scaled in place so their global L2 norm is at most
    this before the update.
    track_grad_norm: compute the global gradient norm every update even without clipping (it is
    returned, logged, and a non-finite one stops training); False saves one read of the gradients.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        *,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        max_grad_norm: float | None = None,
        decay_filter: Callable[[str, np.ndarray], bool] = decay_matrices_only,
        track_grad_norm: bool = True,
    ):
        if not isinstance(params, Mapping) or len(params) == 0:
            raise ValueError("params: expected a non-empty mapping of name to float32 array")
        self.params = {name: _check_array(f"params[{name!r}]", p) for name, p in params.items()}
        if not callable(lr):
            check_float("lr", lr, 0.0)
        self.lr = lr
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair, got {betas!r}")
        self.beta1 = check_float("betas[0]", betas[0], 0.0, 1.0)
        self.beta2 = check_float("betas[1]", betas[1], 0.0, 1.0)
        self.eps = check_float("eps", eps, 0.0)
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0)
        self.decoupled = bool(decoupled)
        if max_grad_norm is not None:
            max_grad_norm = check_float("max_grad_norm", max_grad_norm, positive=True)
        self.max_grad_norm = max_grad_norm
        self.track_grad_norm = bool(track_grad_norm)
        self.decays = {name: bool(decay_filter(name, p)) for name, p in self.params.items()}
        self.m = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.v = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of the 1-based update ``step``."""
        lr = self.lr(step) if callable(self.lr) else self.lr
        return check_float(f"lr({step})", lr, 0.0)

    def _check_grads(self, grads: Mapping[str, np.ndarray]) -> None:
        if not isinstance(grads, Mapping):
            raise TypeError(
                f"grads: expected a mapping of name to array, got {type(grads).__name__}"
            )
        if grads.keys() != self.params.keys():
            missing = sorted(self.params.keys() - grads.keys())
            extra = sorted(grads.keys() - self.params.keys())
            raise ValueError(
                f"grads: names differ from the parameters (missing {missing}, unexpected {extra})"
            )
        for name, g in grads.items():
            _check_array(f"grads[{name!r}]", g)
            if g.shape != self.params[name].shape:
                raise ValueError(
                    f"grads[{name!r}]: shape {g.shape}, parameter shape {self.params[name].shape}"
                )

    def step(self, grads: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One update. Clips ``grads`` in place when ``max_grad_norm`` is set.

        Returns {"lr": the rate used, "grad_norm": global gradient norm before clipping, or None
        without clipping and with ``track_grad_norm=False``}. Raises FloatingPointError (leaving
        parameters and moments untouched) when that norm is not finite.
        """
        self._check_grads(grads)
        garrays = list(grads.values())
        norm = None
        if self.max_grad_norm is not None:  # one pass: the norm, then scaling only when needed
            norm = ops.clip_grad_norm(garrays, self.max_grad_norm)
        elif self.track_grad_norm:
            norm = ops.global_norm(garrays)
        if norm is not None and not math.isfinite(norm):
            raise FloatingPointError(
                f"non-finite gradient norm ({norm}) at update {self.step_count + 1}; "
                "parameters left unchanged"
            )
        t = self.step_count + 1
        lr = self.lr_at(t)
        for name, p in self.params.items():
            ops.adam_step(
                p,
                grads[name],
                self.m[name],
                self.v[name],
                lr=lr,
                beta1=self.beta1,
                beta2=self.beta2,
                eps=self.eps,
                weight_decay=self.weight_decay if self.decays[name] else 0.0,
                step=t,
                decoupled=self.decoupled,
            )
        self.step_count = t
        return {"lr": lr, "grad_norm": None if norm is None else float(norm)}

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """{"step": int, "m": {name: array}, "v": {name: array}, "hyper": {...}}. The arrays are the
        live state (not copies): save them before the next ``step``."""
        hyper = {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "decoupled": self.decoupled,
            "max_grad_norm": self.max_grad_norm,
        }
        return {"step": self.step_count, "m": self.m, "v": self.v, "hyper": hyper}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` output (copies the arrays). Names and shapes must match the
        parameters; the hyper-parameters are kept from the constructor."""
        try:
            step, m, v = state["step"], state["m"], state["v"]
        except (KeyError, TypeError):
            raise ValueError("state: expected a dict with 'step', 'm' and 'v'") from None
        step = check_int("state['step']", step, 0)
        for label, moments in (("m", m), ("v", v)):
            if not isinstance(moments, Mapping) or moments.keys() != self.params.keys():
                have = set(moments) if isinstance(moments, Mapping) else set()
                missing, extra = (
                    sorted(self.params.keys() - have),
                    sorted(have - self.params.keys()),
                )
                raise ValueError(
                    f"state[{label!r}]: names differ from the parameters "
                    f"(missing {missing}, unexpected {extra})"
                )
            for name, arr in moments.items():
                arr = np.asarray(arr)
                if arr.shape != self.params[name].shape:
                    raise ValueError(
                        f"state[{label!r}][{name!r}]: shape {arr.shape}, "
                        f"expected {self.params[name].shape}"
                    )
        for name in self.params:
            self.m[name][...] = m[name]
            self.v[name][...] = v[name]
        self.step_count = int(step)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter); weight_decay defaults to 0.01."""

    def __init__(
        self, params: Mapping[str, np.ndarray], *, weight_decay: float = 0.01, **kwargs: Any
    ):
        if "decoupled" in kwargs:
            raise TypeError("AdamW: decoupled is always True (use Adam for coupled L2)")
        super().__init__(params, weight_decay=weight_decay, decoupled=True, **kwargs)
