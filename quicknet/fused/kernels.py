"""The fused GPU engine's Triton kernels: QuickNet's folded graph in two kernels and one matmul.

The eager torch engine runs ~31 kernels an image, each writing its activations to memory and
reading them back (the first GPU run: ~100k img/s on an H200, 14% of the matmul ceiling). Here:

- `stem_kernel`: uint8 NHWC pixels → normalize (the folded `scale`/`shift`, applied at load, zero
  padding in normalized space as the graph pads) → 3x3 conv as a [pixels, 27→32] x [32, C] matmul
  → bias → per-channel PReLU → fp16 NHWC. One pass over the input.
- `separable_kernel`: one separable block. Each program computes the depthwise 3x3 of a
  [BLOCK_M pixels, BLOCK_K channels] tile in registers (9 shifted loads, fp32 sums) and feeds it
  straight to the pointwise 1x1 as the matmul's A operand; the folded BN bias and the fixed-slope
  PReLU are the epilogue, then with `RESIDUAL` (quicknet-res) the block's input added back. The
  depthwise output never touches memory. With `POOL` the block's rows are ordered by 2x2 window so
  the following max-pool is a reduction in the epilogue (the pooled tensor is what is written);
  with `MEAN` (the last block) the global average pool is, and the block writes [N, C] fp32 for
  the classifier.

What it costs: the depthwise is recomputed once per BLOCK_N column tile (COUT / BLOCK_N times; its
9 MACs a channel against the pointwise's COUT, so a few percent of the FLOPs, on CUDA cores), and
its 9 loads mostly hit L1/L2 (neighbouring programs read the same rows; the grid's fast axis is the
column tile, so an input tile is read from HBM once). Activations are NHWC fp16 throughout.

The kernels run unchanged in Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU), which
is how the tests check their arithmetic against the folded PyTorch model, and compile for sm_90 on
a machine without a GPU (Triton's own ptxas), which is how the tests check they build for Hopper.
"""

from __future__ import annotations

import triton
import triton.language as tl

STEM_K = 32  # 3x3 taps x 3 channels = 27, padded to the matmul's minimum K


@triton.jit
def _prelu(acc, bias_ptr, slope_ptr, offs_n, nmask):
    bias = tl.load(bias_ptr + offs_n, mask=nmask, other=0.0)
    slope = tl.load(slope_ptr + offs_n, mask=nmask, other=0.0)
    y = acc + bias[None, :]
    return tl.where(y > 0, y, y * slope[None, :])


@triton.jit(do_not_specialize=["n_images"])
def stem_kernel(
    x_ptr,  # uint8 [N, H, W, 3]
    w_ptr,  # fp16 [STEM_K, COUT], row k = tap * 3 + channel
    scale_ptr,  # fp32 [3]
    shift_ptr,  # fp32 [3]
    bias_ptr,  # fp32 [COUT]
    slope_ptr,  # fp32 [COUT]
    out_ptr,  # fp16 [N, H, W, COUT]
    n_images,
    COUT: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_m < n_images * H * W
    nmask = offs_n < COUT
    n = offs_m // (H * W)
    h = (offs_m // W) % H
    w = offs_m % W
    offs_k = tl.arange(0, K)
    tap = offs_k // 3
    ch = offs_k % 3
    hh = h[:, None] + (tap // 3 - 1)[None, :]
    ww = w[:, None] + (tap % 3 - 1)[None, :]
    valid = rmask[:, None] & (offs_k < 27)[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    pixels = tl.load(x_ptr + ((n[:, None] * H + hh) * W + ww) * 3 + ch[None, :], mask=valid, other=0)
    scale = tl.load(scale_ptr + ch)
    shift = tl.load(shift_ptr + ch)
    a = tl.where(valid, pixels.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    wt = tl.load(w_ptr + offs_k[:, None] * COUT + offs_n[None, :], mask=nmask[None, :], other=0.0)
    acc = tl.dot(a.to(tl.float16), wt)
    y = _prelu(acc, bias_ptr, slope_ptr, offs_n, nmask)
    tl.store(out_ptr + offs_m[:, None] * COUT + offs_n[None, :], y.to(tl.float16), mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["n_images"])
def separable_kernel(
    x_ptr,  # fp16 [N, H, W, CIN]
    dw_ptr,  # fp32 [9, CIN], tap-major
    pw_ptr,  # fp16 [CIN, COUT]
    bias_ptr,  # fp32 [COUT] (pointwise bias, depthwise bias folded in)
    slope_ptr,  # fp32 [COUT]
    out_ptr,  # fp16 [N, H, W, COUT]; [N, H/2, W/2, COUT] with POOL; fp32 [N, COUT] with MEAN
    n_images,
    CIN: tl.constexpr,
    COUT: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    POOL: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_m < n_images * H * W
    nmask = offs_n < COUT
    if POOL:  # row r is pixel (r % 4) of 2x2 window r // 4, windows in NHWC order
        window = offs_m // 4
        q = offs_m % 4
        n = window // ((H // 2) * (W // 2))
        h = 2 * ((window // (W // 2)) % (H // 2)) + q // 2
        w = 2 * (window % (W // 2)) + q % 2
    else:
        n = offs_m // (H * W)
        h = (offs_m // W) % H
        w = offs_m % W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < CIN
        a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for t in tl.static_range(9):
            hh = h + (t // 3 - 1)
            ww = w + (t % 3 - 1)
            valid = rmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            src = ((n * H + hh) * W + ww) * CIN
            xv = tl.load(x_ptr + src[:, None] + offs_k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            wv = tl.load(dw_ptr + t * CIN + offs_k, mask=kmask, other=0.0)
            a += xv.to(tl.float32) * wv[None, :]
        wt = tl.load(pw_ptr + offs_k[:, None] * COUT + offs_n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float16), wt, acc)
    y = _prelu(acc, bias_ptr, slope_ptr, offs_n, nmask)
    if RESIDUAL:  # quicknet-res's `x + block(x)` (CIN == COUT): the centre tap's pixel, mostly in cache
        src = ((n * H + h) * W + w) * CIN
        shortcut = tl.load(x_ptr + src[:, None] + offs_n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        y += shortcut.to(tl.float32)
    if POOL:
        pooled = tl.max(tl.reshape(y, [BLOCK_M // 4, 4, BLOCK_N]), axis=1)
        rows = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
        mask = (rows < n_images * (H // 2) * (W // 2))[:, None] & nmask[None, :]
        tl.store(out_ptr + rows[:, None] * COUT + offs_n[None, :], pooled.to(tl.float16), mask=mask)
    elif MEAN:  # BLOCK_M is a multiple of H * W: a tile holds whole images
        means = tl.sum(tl.reshape(y, [BLOCK_M // (H * W), H * W, BLOCK_N]), axis=1) * (1.0 / (H * W))
        images = pid_m * (BLOCK_M // (H * W)) + tl.arange(0, BLOCK_M // (H * W))
        mask = (images < n_images)[:, None] & nmask[None, :]
        tl.store(out_ptr + images[:, None] * COUT + offs_n[None, :], means, mask=mask)
    else:
        mask = rmask[:, None] & nmask[None, :]
        tl.store(out_ptr + offs_m[:, None] * COUT + offs_n[None, :], y.to(tl.float16), mask=mask)
