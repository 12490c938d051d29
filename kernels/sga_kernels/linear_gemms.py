"""The three GEMMs of one chunk of the fused linear losses (the chunk loop of ``linear``), each on the library a
:class:`GemmRoute` names:

    Z    = a (H_c W^T + b)    into the caller's [R, V] workspace                 (:func:`logits_into`)
    dH_c = G W                                                                  (:func:`hidden_grad`)
    dW  += G^T H_c             into the float32 (or same-dtype) accumulator      (:func:`accumulate_weight_grad`)

Two libraries run float32 CPU GEMMs, and which is faster depends on the CPU (docs/kernel-notes.md, "v4" and
"v6"): ``torch.mm`` calls MKL's sgemm, oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, X W^T: the kernel
inductor calls for CPU linear layers) is the other. On an AMD EPYC (Zen 5) oneDNN ran 1.6-2x faster on every chunk
GEMM; on an Intel Xeon with AMX the two were within 6%; on an AMD EPYC (Zen 3) oneDNN won the Z GEMM and lost dH
and dW. So the route is measured per machine (``cpu_routes``) and passed in here. oneDNN returns a fresh product,
so products go through it in vocabulary blocks of about ``GemmRoute.block_bytes`` (cache resident) that are copied
(Z) or added (dW) into the caller's buffers: no [R, V] or [V, D] temporary and no first-touch page faults per
chunk. It is used for GEMMs of at least ``ONEDNN_MIN_FLOPS`` when the op exists and matches ``torch.mm`` on a
probe (once per process). Everything else (other dtypes: bfloat16 / float16 CPU mm is oneDNN already; CUDA:
cuBLAS; small GEMMs) calls torch.mm with out=.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .bounds import near_equal_bounds

# Bytes of one block product of the float32 accumulation of low-precision products: it stays in L3 until it is
# added (the mixed-dtype add first casts it to a float32 temporary twice its size). Measured at V = 64128,
# D = 2048 bf16, R = 256, 1 thread: 2-8 MiB products within 10%, 16 MiB 1.4-1.9x and 32 MiB 2x slower; the
# largest good size, since every block is two parallel regions (see ONEDNN_BLOCK_BYTES).
PRODUCT_BLOCK_BYTES = 8 << 20
# Bytes of one oneDNN float32 block product: measured at V = 128256, D = 512, R = 128, 1 thread: 4-16 MiB within
# 5% (4 MiB: 5.50 s CPU time for forward+backward, 16 MiB: 5.85 s, docs/kernel-notes.md "v5"). The smallest of those:
# each product is a fresh allocation (oneDNN has no out=), and with 16 MiB ones the call's peak resident memory
# varied from 7% to 12% of the float32 logits between identical runs (heap fragmentation and oneDNN's per-shape
# scratch), against 6.6-8.2% with 4 MiB ones.
ONEDNN_BLOCK_BYTES = 4 << 20
# Below this many flops (2 M N K) a GEMM runs on torch.mm: the blocks' per-call overhead is not worth it.
ONEDNN_MIN_FLOPS = 1 << 26
LIBRARIES = ("mm", "onednn")
GEMMS = ("logits", "hidden_grad", "weight_grad")


@dataclass(frozen=True)
class GemmRoute:
    """The library of each chunk GEMM of a float32 CPU call: "mm" (``torch.mm`` / ``addmm_``: MKL's sgemm in torch's
    x86 builds, the float32 accumulator updated in place by the GEMM) or "onednn" (oneDNN's matmul in vocabulary
    blocks of at most block_bytes, each product copied into the workspace or added into the accumulator).

    logits: Z = H_c W^T; hidden_grad: dH_c = G W; weight_grad: the accumulator's update dW += G^T H_c.
    Other dtypes and devices ignore it (they always call torch.mm).
    """

    logits: str = "mm"
    hidden_grad: str = "mm"
    weight_grad: str = "mm"
    block_bytes: int = ONEDNN_BLOCK_BYTES

    def __post_init__(self):
        for gemm in GEMMS:
            if getattr(self, gemm) not in LIBRARIES:
                raise ValueError(f"GemmRoute.{gemm} must be one of {LIBRARIES}, got {getattr(self, gemm)!r}")
        if not isinstance(self.block_bytes, int) or self.block_bytes < 1:
            raise ValueError(f"GemmRoute.block_bytes must be a positive int, got {self.block_bytes!r}")


MM_ROUTE = GemmRoute()
ONEDNN_ROUTE = GemmRoute("onednn", "onednn", "onednn")

_ONEDNN_WORKS: Optional[bool] = None


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T (+ bias) on oneDNN, a fresh float32 tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_works() -> bool:
    """Whether oneDNN's float32 linear exists here and agrees with torch.mm (probed once per process)."""
    global _ONEDNN_WORKS
    if _ONEDNN_WORKS is None:
        works = False
        if torch.backends.mkldnn.is_available():
            try:
                x = torch.arange(6.0).reshape(2, 3)
                weight = torch.arange(12.0).reshape(4, 3) / 7
                works = bool(torch.allclose(onednn_linear(x, weight), x @ weight.t()))
            except (AttributeError, RuntimeError, TypeError, NotImplementedError):
                works = False
        _ONEDNN_WORKS = works
    return _ONEDNN_WORKS


def use_onednn(library: str, a: torch.Tensor, rows: int, columns: int, inner: int) -> bool:
    """Whether a [rows, inner] x [inner, columns] product of float32 CPU tensors like a goes through oneDNN: the
    route's library for it is "onednn", the product is large enough and oneDNN works here."""
    return (
        library == "onednn"
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and 2 * rows * columns * inner >= ONEDNN_MIN_FLOPS
        and onednn_works()
    )


def _block(row_bytes: int, block_bytes: int) -> int:
    """Rows (or columns) of one block product of row_bytes each."""
    return max(1, block_bytes // row_bytes)


def even_blocks(total: int, most: int) -> list[tuple[int, int]]:
    """(start, stop) of ceil(total / most) blocks of near-equal size covering range(total).

    Equal sizes matter on the CPU: every block product is a fresh allocation, freed before the next one, and
    glibc hands a freed chunk back to a request of the same size; blocks of two sizes (a short last block)
    leave the heap fragmented, which showed as 2-10% of the logits of extra resident memory, varying from
    run to run (docs/kernel-notes.md, fused linear "v5")."""
    return near_equal_bounds(total, -(-total // most))


def logits_into(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    route: GemmRoute = MM_ROUTE,
) -> None:
    """out[R, V] = scale * (hidden[R, D] @ weight[V, D]^T + bias), written into out (contiguous)."""
    num_rows, vocab_size = out.shape
    if use_onednn(route.logits, out, num_rows, vocab_size, hidden.shape[1]):
        step = _block(num_rows * out.element_size(), route.block_bytes)  # vocabulary columns per block
        for start, stop in even_blocks(vocab_size, step):
            product = onednn_linear(hidden, weight[start:stop], None if bias is None else bias[start:stop])
            if scale != 1.0:
                torch.mul(product, scale, out=out[:, start:stop])  # Z = a (H_c W^T + b), one block
            else:
                out[:, start:stop].copy_(product)
            del product  # freed before the next block is allocated: one block product alive at a time
        return
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)  # Z = H_c W^T
        if scale != 1.0:
            out.mul_(scale)  # Z = a H_c W^T
    else:
        torch.addmm(bias, hidden, weight.t(), beta=scale, alpha=scale, out=out)  # Z = a (H_c W^T + b)


def hidden_grad(grad: torch.Tensor, weight: torch.Tensor, route: GemmRoute = MM_ROUTE) -> torch.Tensor:
    """dH_c = G[R, V] @ W[V, D], a fresh [R, D] tensor in the compute dtype."""
    if use_onednn(route.hidden_grad, grad, grad.shape[0], weight.shape[1], grad.shape[1]):
        return onednn_linear(grad, weight.t())
    return torch.mm(grad, weight)


_ADDMM_OUT_DTYPE: dict[torch.device, bool] = {}


def _addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates bf16 products into a float32
    acc on this device (CUDA with a recent torch; not the CPU). Tried once per device on a tiny case."""
    if device not in _ADDMM_OUT_DTYPE:
        works = False
        if device.type == "cuda":
            try:
                a = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
                acc = torch.ones(2, 2, dtype=torch.float32, device=device)
                torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
                works = bool((acc == 4.0).all())  # 1 + 3: the product was added, not stored
            except (RuntimeError, TypeError, NotImplementedError):
                works = False
        _ADDMM_OUT_DTYPE[device] = works
    return _ADDMM_OUT_DTYPE[device]


def accumulate_weight_grad(
    dw: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor, route: GemmRoute = MM_ROUTE
) -> None:
    """dW[V, D] += G[R, V]^T @ H_c[R, D] into the accumulator dw.

    - same dtype as the GEMMs, torch.mm: one ``addmm_`` straight into dw (for a low-precision dw that is one
      rounding per chunk);
    - a wider dw: one GEMM with dw's output dtype where the device has it (CUDA), else the rounded products of
      vocabulary blocks (at most PRODUCT_BLOCK_BYTES and at most a chunk buffer's elements), each added into dw
      (the CPU: its torch has no float32-output bf16 GEMM);
    - float32 on oneDNN (the route's weight_grad): the float32 products of blocks of at most the route's
      block_bytes, each added into dw.
    """
    vocab_size, hidden_size = dw.shape
    onednn = use_onednn(route.weight_grad, grad, vocab_size, hidden_size, grad.shape[0])
    if dw.dtype == grad.dtype and not onednn:
        dw.addmm_(grad.t(), hidden)
        return
    if dw.dtype != grad.dtype and _addmm_out_dtype_works(dw.device):
        torch.addmm(dw, grad.t(), hidden, out_dtype=dw.dtype, out=dw)
        return
    hidden_t = hidden.t().contiguous() if onednn else None  # oneDNN's "weight" operand H_c^T [D, R], small
    # vocabulary rows per block: a product of at most the route's block_bytes (oneDNN) or PRODUCT_BLOCK_BYTES, and
    # of at most the chunk's R V elements
    block_bytes = route.block_bytes if onednn else PRODUCT_BLOCK_BYTES
    step = min(_block(hidden_size * grad.element_size(), block_bytes), max(1, grad.numel() // hidden_size))
    for start, stop in even_blocks(vocab_size, step):
        block_grad = grad[:, start:stop].t()
        product = onednn_linear(block_grad, hidden_t) if onednn else torch.mm(block_grad, hidden)
        dw[start:stop].add_(product)
        del product  # one block product alive at a time
