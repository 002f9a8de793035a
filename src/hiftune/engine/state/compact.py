"""Compact fp32 masters: a paged-out master as the low bits its bf16 weight lacks (17 bits, not 32).

In bf16 mixed precision the model's weight is its fp32 master rounded to nearest (ties to even):
the weight's 16 bits are the master's high 16 bits (sign, exponent, 7 mantissa bits), plus a
carry of 0 or 1 where the dropped low 16 bits rounded up. So an inactive group need not keep its
master whole: its low 16 bits and that carry bit give the master back, exactly, from the weight
the model holds anyway. 2.125 bytes per parameter instead of 4.

Why a carry bit and not 16 bits alone: a bf16 value with an even bit pattern is the rounding of
2**16 + 1 fp32 values (both ties round to it), one more than 16 bits can name. The carry of each
parameter is packed 8 to a byte.

Exact for every fp32 value except NaN: +-0, subnormals, +-inf, the largest finite values (which
round to inf) and values whose rounding carries into the exponent all come back bit for bit.
bf16 rounding keeps no NaN payload or sign, so a NaN master comes back as a NaN of another bit
pattern (training has diverged by then).

No device synchronisation: the encoded sizes depend only on the number of elements, so
:class:`~.host.HostStore` keeps one buffer per group and copies stay asynchronous.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.tensor import DTensor

# Which int16 of an fp32's two holds its low bits.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)
_BITS = 8  # carries per byte


def applies(master: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``master`` can be stored as its low bits against ``weight``.

    It can if it is a plain fp32 tensor and ``weight`` the bf16 tensor of the same shape on the same
    device (a sharded ``DTensor`` master is kept whole).
    """
    return (
        not isinstance(master, DTensor)
        and not isinstance(weight, DTensor)
        and master.dtype == torch.float32
        and weight.dtype == torch.bfloat16
        and master.shape == weight.shape
        and master.device == weight.device
    )


def split_master(master: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low 16 bits of ``master`` and its packed carries against ``weight``.

    ``weight`` must be ``master`` rounded to bf16 (what :func:`join_master` relies on; see
    :func:`matches`).

    Returns:
        ``(low, carry)``: int16 of ``master``'s element count, and uint8 of a bit per element.
    """
    halves = master.detach().reshape(-1).view(torch.int16).view(-1, 2)
    low = halves[:, _LOW].clone()
    carry = weight.detach().reshape(-1).view(torch.int16) != halves[:, _HIGH]
    return low, _pack(carry)


def join_master(weight: torch.Tensor, low: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """The fp32 master that :func:`split_master` gave ``low`` and ``carry`` for, from ``weight``.

    ``weight`` may be in another floating dtype holding bf16 values (a weight already handed back
    in fp32 while the model is being restored): it is converted to bf16 first, exactly.
    """
    bf16 = weight.detach().to(torch.bfloat16).reshape(-1).view(torch.int16)
    n = bf16.numel()
    out = torch.empty((n, 2), dtype=torch.int16, device=bf16.device)
    # The high half is the weight's bits less the carry, modulo 2**16 as int16 arithmetic wraps.
    torch.sub(bf16, _unpack(carry)[:n].to(torch.int16), out=out[:, _HIGH])
    out[:, _LOW] = low
    return out.view(torch.float32).view(weight.shape)


def matches(master: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is ``master`` rounded to bf16, so that :func:`join_master` is exact.

    NaN counts as matching a NaN weight. One device synchronisation.
    """
    rounded = master.detach().to(torch.bfloat16)
    same = (rounded.view(torch.int16) == weight.detach().view(torch.int16)) | (
        rounded.isnan() & weight.detach().isnan()
    )
    return bool(same.all())


# Eight 0/1 bytes read as one int64 (byte j holds bit j: little-endian) times this constant carry
# bit j to bit 56 + j, with no two partial products on one bit below: the top byte is the eight
# bits packed. The product wraps past 2**63, which torch's int64 arithmetic does.
_GATHER = 0x0102040810204080
# One byte times this is the byte in each of eight; byte j masked with 1 << j is bit j.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - 2**64  # as int64


def _pack(carry: torch.Tensor) -> torch.Tensor:
    # bool [n] -> uint8 [ceil(n / 8)], element i in bit i % 8 of byte i // 8
    bits = carry.view(torch.uint8)
    if bits.numel() % _BITS:
        bits = torch.cat((bits, bits.new_zeros(_BITS - bits.numel() % _BITS)))
    if sys.byteorder != "little":
        shifts = torch.arange(_BITS, dtype=torch.uint8, device=bits.device)
        return (bits.view(-1, _BITS) << shifts).sum(1, dtype=torch.uint8)
    return (bits.view(torch.int64) * _GATHER).bitwise_right_shift_(56).to(torch.uint8)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    # _pack's inverse: uint8 0/1 [8 m]
    if sys.byteorder != "little":
        shifts = torch.arange(_BITS, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)
    spread = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)
    return spread.view(torch.uint8).clamp_(max=1)
