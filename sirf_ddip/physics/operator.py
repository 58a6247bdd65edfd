"""Linear operators on torch tensors: a small base class, element-wise factors and composition.

The style follows parallelproj's ``LinearOperator`` (``parallelproj/operators.py``: ``in_shape``/``out_shape``,
``__call__`` = forward, ``adjoint``, ``norm`` by power iteration, ``adjointness_test``, composition), written
for sirf_ddip's conventions: images are ``(nz, ny, nx)`` tensors, sinograms ``(n_sino, n_views, n_tang)``.

- :class:`LinearOperator` — the base: subclasses give ``in_shape``, ``out_shape``,
  :meth:`~LinearOperator.forward` and :meth:`~LinearOperator.adjoint`; the base adds ``__call__``, :meth:`~LinearOperator.norm`,
  :meth:`~LinearOperator.adjointness_test` and ``@`` (composition).
- :class:`MultiplicativeFactors` — ``y ↦ m ⊙ y`` (detection efficiency × attenuation on a sinogram); self-adjoint.
- :class:`ComposedOperator` — ``A_1 A_2 … A_n`` (applied right to left), e.g. ``M @ A`` for ``m ⊙ A x``.

The geometric projector :class:`sirf_ddip.physics.projector.Projector` is a :class:`LinearOperator`; its
``forward``/``adjoint`` also take a view subset, and :meth:`LinearOperator.forward` of a plain operator is
the full (all-views) map.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import GeometryMismatchError

__all__ = ["LinearOperator", "MultiplicativeFactors", "ComposedOperator"]


class LinearOperator:
    """Base of the linear operators ``A: R^{in_shape} → R^{out_shape}``.

    Subclasses define the properties ``in_shape`` and ``out_shape`` and the methods :meth:`forward` and
    :meth:`adjoint`; they should set ``device`` and ``dtype`` (the defaults are CPU / float32).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    # ------------------------------------------------------------------ to implement
    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of the operator's input (e.g. the image ``(nz, ny, nx)``)."""
        raise NotImplementedError(f"{type(self).__name__} must define in_shape")

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the operator's output (e.g. the sinogram ``(n_sino, n_views, n_tang)``)."""
        raise NotImplementedError(f"{type(self).__name__} must define out_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ y``."""
        raise NotImplementedError(f"{type(self).__name__} must define adjoint")

    # ------------------------------------------------------------------ shared
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (same as :meth:`forward`)."""
        return self.forward(x)

    def __matmul__(self, other: "LinearOperator") -> "ComposedOperator":
        """``self @ other`` is the composition ``x ↦ self(other(x))``."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return ComposedOperator(self, other)

    def _random(self, shape: Sequence[int], g: torch.Generator) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=g, dtype=torch.float64).to(device=self.device, dtype=self.dtype)

    def adjointness_test(self, num_trials: int = 3, seed: int = 0) -> float:
        """Worst relative gap ``|<A x, y> − <x, Aᵀ y>| / |<A x, y>|`` over random non-negative ``x``, ``y``.

        Inner products are accumulated in float64; a correct adjoint gives a value at rounding level of
        ``dtype`` (about 1e-6 in float32, 1e-14 in float64).
        """
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        worst = 0.0
        for _ in range(max(1, int(num_trials))):
            x = self._random(self.in_shape, g)
            y = self._random(self.out_shape, g)
            lhs = float(torch.sum(self.forward(x).double() * y.double()))
            rhs = float(torch.sum(x.double() * self.adjoint(y).double()))
            worst = max(worst, abs(lhs - rhs) / max(abs(lhs), 1e-300))
        return worst

    def norm(self, num_iter: int = 30, seed: int = 0) -> float:
        """Operator 2-norm ``||A||`` (largest singular value) by power iteration on ``Aᵀ A``.

        The estimate increases monotonically towards ``||A||`` from below; ``num_iter`` iterations from a
        random non-negative start (which has a non-zero component on the top singular vector of a
        non-negative operator).
        """
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        x = self._random(self.in_shape, g)
        x = x / torch.linalg.vector_norm(x)
        lam = 0.0
        for _ in range(max(1, int(num_iter))):
            z = self.adjoint(self.forward(x))
            lam = float(torch.linalg.vector_norm(z.double()))
            if lam == 0.0:
                return 0.0
            x = z / lam
        return math.sqrt(lam)


class MultiplicativeFactors(LinearOperator):
    """Element-wise multiplication ``y ↦ m ⊙ y`` (e.g. PET multiplicative factors on a sinogram).

    Parameters
    ----------
    factors : torch.Tensor
        ``m``; its shape is both ``in_shape`` and ``out_shape`` unless ``shape`` is given. Real, so the operator
        is self-adjoint and its norm is ``max |m|``.
    shape : tuple, optional
        Shape of the data the factors act on, when ``m`` broadcasts to it (a TOF-independent norm of shape
        ``(n_sino, n_views, n_tang)`` on TOF data ``(n_tof, n_sino, n_views, n_tang)``: never copied per TOF bin).
    """

    def __init__(self, factors: torch.Tensor, shape: tuple | None = None):
        if not isinstance(factors, torch.Tensor):
            factors = torch.as_tensor(factors)
        self.factors = factors
        self.device = factors.device
        self.dtype = factors.dtype
        self._shape = tuple(factors.shape) if shape is None else tuple(int(v) for v in shape)
        if torch.broadcast_shapes(tuple(factors.shape), self._shape) != self._shape:
            raise GeometryMismatchError(f"MultiplicativeFactors: factors of shape {tuple(factors.shape)} do not "
                                        f"broadcast to data of shape {self._shape}")

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._shape

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.in_shape:
            raise GeometryMismatchError(f"MultiplicativeFactors: {what} shape {tuple(t.shape)} != factors shape "
                                        f"{self.in_shape}")
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._check(x, "input") * self.factors

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._check(y, "input") * self.factors

    def __repr__(self) -> str:
        return f"MultiplicativeFactors(shape={self.in_shape})"


class ComposedOperator(LinearOperator):
    """``A_1 A_2 … A_n``: ``forward`` applies ``A_n`` first, ``adjoint`` applies ``A_1ᵀ`` first.

    Raises
    ------
    GeometryMismatchError
        If the output shape of one operator is not the input shape of the one applied after it.
    """

    def __init__(self, *operators: LinearOperator):
        if not operators:
            raise ValueError("ComposedOperator needs at least one operator")
        ops: list[LinearOperator] = []
        for op in operators:  # flatten nested compositions
            ops.extend(op.operators if isinstance(op, ComposedOperator) else [op])
        for left, right in zip(ops[:-1], ops[1:]):
            if tuple(right.out_shape) != tuple(left.in_shape):
                raise GeometryMismatchError(f"cannot compose {type(left).__name__} (input {tuple(left.in_shape)}) "
                                            f"after {type(right).__name__} (output {tuple(right.out_shape)})")
        self.operators = ops
        self.device = ops[-1].device
        self.dtype = ops[-1].dtype

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.operators[-1].in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.operators[0].out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.operators):
            x = op.forward(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for op in self.operators:
            y = op.adjoint(y)
        return y

    def __repr__(self) -> str:
        return " @ ".join(repr(op) for op in self.operators)
