"""Named parameters and gradients living in two flat float32 buffers.

Every module declares its parameters on a shared `ParamStore` while it is built; `allocate()` then
lays all of them out, each 64-byte aligned, in one flat parameter buffer and one flat gradient
buffer of the same layout (llm.c's `malloc_and_point_parameters`). Each `Param` holds C-contiguous
views `data` and `grad` into those buffers, so an optimizer can update everything with one loop over
the flat buffers and `zero_grad` is one fill. Tied weights are one `Param` used by several modules.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Init = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]

_ALIGN = (
    16  # floats: 64 bytes, one cache line, so each parameter starts on a SIMD-friendly boundary
)


def zeros_init(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


def ones_init(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape, np.float32)


def xavier_uniform_init(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Glorot uniform on a (fan_out, fan_in) matrix, as torch's nn.Transformer initialises."""
    fan_out, fan_in = shape
    bound = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))
    w = rng.random(shape, dtype=np.float32)
    w *= 2 * bound
    w -= bound
    return w


def embedding_init(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, C^-1/2): after the x sqrt(C) scaling the embeddings have unit variance."""
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(shape[1] ** -0.5)
    return w


def _aligned_empty(n: int) -> np.ndarray:
    """A zeroed 1-D float32 array of n elements whose data starts on a 64-byte boundary."""
    raw = np.zeros(n + _ALIGN, np.float32)
    shift = (-raw.ctypes.data // 4) % _ALIGN
    return raw[shift : shift + n]


class Param:
    """One named parameter: `data` and `grad` are views into the store's flat buffers."""

    __slots__ = ("name", "shape", "init", "offset", "data", "grad")

    def __init__(self, name: str, shape: tuple[int, ...], init: Init) -> None:
        self.name = name
        self.shape = shape
        self.init = init
        self.offset = -1
        self.data: np.ndarray = np.empty(0, np.float32)
        self.grad: np.ndarray = np.empty(0, np.float32)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class ParamStore:
    """The table of every parameter of a model, in declaration order."""

    def __init__(self) -> None:
        self.params: dict[str, Param] = {}
        self.flat_data: np.ndarray | None = None
        self.flat_grad: np.ndarray | None = None

    def add(self, name: str, shape: tuple[int, ...], init: Init) -> Param:
        if self.flat_data is not None:
            raise RuntimeError("parameters cannot be added after allocate()")
        if name in self.params:
            raise ValueError(f"duplicate parameter name {name!r}")
        p = Param(name, tuple(int(s) for s in shape), init)
        self.params[name] = p
        return p

    def allocate(self, rng: np.random.Generator | None) -> None:
        """Lays out and initialises every parameter (in declaration order, so a seed reproduces);
        rng None leaves them zero (a model about to receive a checkpoint)."""
        total = 0
        for p in self.params.values():
            p.offset = total
            total += -(-p.size // _ALIGN) * _ALIGN
        self.flat_data = _aligned_empty(total)
        self.flat_grad = _aligned_empty(total)
        for p in self.params.values():
            p.data = self.flat_data[p.offset : p.offset + p.size].reshape(p.shape)
            p.grad = self.flat_grad[p.offset : p.offset + p.size].reshape(p.shape)
            if rng is not None:
                p.data[...] = p.init(rng, p.shape)

    def zero_grad(self) -> None:
        self.flat_grad.fill(0.0)
