"""Orthonormal Hadamard-type rotations of any size n = m * p (p a power of two).

The rotation is R = kron(F, H_p / sqrt(p)): H_p a Sylvester Hadamard matrix
(applied by a fast Walsh-Hadamard transform inside the `apex4.hadamard` op) and
F a small orthonormal m x m factor chosen here. F is a normalised Hadamard
matrix when one of order m is known from Paley's constructions (12, 20, 24, 36,
44, 60, 72, 108, ...: covers 576 = 36 * 16, 1536 = 12 * 128, 28672 = 28 * 1024),
else an orthonormal DCT-II matrix of the odd part (e.g. 11008 = 43 * 256), which
spreads outliers nearly as evenly. Sizes follow LLM hidden/intermediate dims.
"""
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley(m: int):
    """A Hadamard matrix of order m from Paley I (q = m - 1 prime, q = 3 mod 4)
    or Paley II (q = m/2 - 1 prime, q = 1 mod 4); None if neither applies."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = _jacobsthal(q)
        core = s + torch.eye(q, dtype=torch.float64)
        top = torch.cat([torch.ones(1, 1, dtype=torch.float64), torch.ones(1, q, dtype=torch.float64)], 1)
        bottom = torch.cat([-torch.ones(q, 1, dtype=torch.float64), core], 1)
        return torch.cat([top, bottom], 0)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        s = _jacobsthal(q)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = s
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    return None


def _dct(m: int) -> torch.Tensor:
    i = torch.arange(m, dtype=torch.float64)
    basis = torch.cos(torch.pi * (i[None, :] + 0.5) * i[:, None] / m) * (2.0 / m) ** 0.5
    basis[0] /= 2 ** 0.5
    return basis.T.contiguous()


# The factor is applied densely (m^2 work per block of the fast transform), so
# larger Paley orders are not worth it: their odd part gets a DCT instead.
MAX_PALEY_ORDER = 256


@lru_cache(maxsize=None)
def _factor(n: int) -> torch.Tensor:
    """float64 factor F for size n."""
    p = n & -n  # largest power of two dividing n
    odd = n // p
    if odd == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    # The smallest Paley order m = odd * 2^j (a multiple of 4) that divides n.
    m = odd
    while n % m == 0 and m <= MAX_PALEY_ORDER:
        h = _paley(m) if m % 4 == 0 else None
        if h is not None:
            return h / m ** 0.5
        m *= 2
    return _dct(odd)


def rotation_factor(n: int, device=None) -> torch.Tensor:
    """The m x m float32 factor F of the size-n rotation kron(F, H_{n/m}/sqrt(n/m))."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"rotation size must be a positive int, got {n!r}")
    return _factor(n).to(device=device, dtype=torch.float32)


def rotation_matrix(n: int) -> torch.Tensor:
    """The dense n x n rotation in float64 (for tests and small references)."""
    f = _factor(n)
    p = n // f.shape[0]
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.kron(f, h / p ** 0.5)
