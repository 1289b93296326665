"""Example kernels written against the NKI API (0.3.0 forms, with 0.2.0 idioms where marked). They
run unchanged on the real SDK or the emulator; the emulator tests and speed benchmark use them."""

from __future__ import annotations

from nkimoe.nki import nki, nisa, nl


@nki.jit
def matmul_kernel(lhs_t, rhs):
    """out[M, N] = lhs_t[K, M].T @ rhs[K, N], K tiled by 128 with PSUM accumulation, N by 512."""
    k, m = lhs_t.shape
    _, n = rhs.shape
    out = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.shared_hbm)
    for j in nl.affine_range(n // 512):
        acc = nl.ndarray((m, 512), dtype=nl.float32, buffer=nl.psum)
        for i in nl.affine_range(k // 128):
            a = nl.ndarray((128, m), dtype=lhs_t.dtype, buffer=nl.sbuf)
            b = nl.ndarray((128, 512), dtype=rhs.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=a, src=lhs_t[i * 128:(i + 1) * 128, :])
            nisa.dma_copy(dst=b, src=rhs[i * 128:(i + 1) * 128, j * 512:(j + 1) * 512])
            nisa.nc_matmul(dst=acc, stationary=a, moving=b, accumulate=(i > 0))
        res = nl.ndarray((m, 512), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=acc)
        nisa.dma_copy(dst=out[:, j * 512:(j + 1) * 512], src=res)
    return out


@nki.jit
def softmax_kernel(x):
    """Row softmax with max subtraction; rows on partitions, ragged last tile by slicing."""
    rows, cols = x.shape
    out = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.shared_hbm)
    for t in nl.affine_range((rows + 127) // 128):
        p = min(128, rows - t * 128)
        tile = nl.ndarray((128, cols), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tile[0:p, :], src=x[t * 128:t * 128 + p, :])
        neg_max = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=neg_max[0:p], op=nl.maximum, data=tile[0:p], axis=1, negate=True)
        total = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=tile[0:p], op=nl.exp, data=tile[0:p], bias=neg_max[0:p], reduce_op=nl.add,
                        reduce_res=total[0:p], reduce_cmd=nisa.reduce_cmd.reset_reduce)
        inv = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(dst=inv[0:p], data=total[0:p])
        res = nl.ndarray((128, cols), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=res[0:p], data=tile[0:p], op0=nl.multiply, operand0=inv[0:p])
        nisa.dma_copy(dst=out[t * 128:t * 128 + p, :], src=res[0:p])
    return out


@nki.jit
def rmsnorm_kernel(x, weight):
    """RMSNorm in the contest's Beta 2 style: string buffer names and nl.hbm output (NKI 0.2.0),
    weight broadcast to every partition through a stride-0 access pattern."""
    rows, hidden = x.shape
    out = nl.ndarray((rows, hidden), dtype=x.dtype, buffer="hbm")
    w = nl.ndarray((128, hidden), dtype=weight.dtype, buffer="sbuf")
    nisa.dma_copy(dst=w, src=weight.reshape((1, hidden)).ap([[0, 128], [1, hidden]]))
    for t in nl.affine_range((rows + 127) // 128):
        p = min(128, rows - t * 128)
        tile = nl.ndarray((128, hidden), dtype=x.dtype, buffer="sbuf")
        nisa.dma_copy(dst=tile[0:p], src=x[t * 128:t * 128 + p, :])
        sq = nl.ndarray((128, hidden), dtype=nl.float32, buffer="sbuf")
        nisa.tensor_tensor(dst=sq[0:p], data1=tile[0:p], data2=tile[0:p], op=nl.multiply)
        ss = nl.ndarray((128, 1), dtype=nl.float32, buffer="sbuf")
        nisa.tensor_reduce(dst=ss[0:p], op=nl.add, data=sq[0:p], axis=1)
        nisa.tensor_scalar(dst=ss[0:p], data=ss[0:p], op0=nl.multiply, operand0=1.0 / hidden, op1=nl.add, operand1=1e-6)
        nisa.activation(dst=ss[0:p], op=nl.rsqrt, data=ss[0:p])
        normed = nl.ndarray((128, hidden), dtype=x.dtype, buffer="sbuf")
        nisa.tensor_scalar(dst=normed[0:p], data=tile[0:p], op0=nl.multiply, operand0=ss[0:p])
        nisa.tensor_tensor(dst=normed[0:p], data1=normed[0:p], data2=w[0:p], op=nl.multiply)
        nisa.dma_copy(dst=out[t * 128:t * 128 + p, :], src=normed[0:p])
    return out


@nki.jit
def transpose_kernel(x):
    """[P, F] -> [F, P] on TensorE (nc_transpose) for P, F <= 128."""
    p, f = x.shape
    out = nl.ndarray((f, p), dtype=x.dtype, buffer=nl.shared_hbm)
    a = nl.ndarray((p, f), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=a, src=x)
    t_psum = nl.ndarray((f, p), dtype=x.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=t_psum, data=a)
    t_sb = nl.ndarray((f, p), dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t_sb, src=t_psum)
    nisa.dma_copy(dst=out, src=t_sb)
    return out


@nki.jit
def dma_transpose_kernel(x):
    """[P, F] -> [F, P] with the DMA engine (2-byte dtypes)."""
    p, f = x.shape
    out = nl.ndarray((f, p), dtype=x.dtype, buffer=nl.shared_hbm)
    t_sb = nl.ndarray((f, p), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_transpose(dst=t_sb, src=x)
    nisa.dma_copy(dst=out, src=t_sb)
    return out


@nki.jit
def top8_kernel(scores):
    """Per row: the 8 largest values (descending) and their indices, via max8 + nc_find_index8."""
    rows, cols = scores.shape
    vals_out = nl.ndarray((rows, 8), dtype=nl.float32, buffer=nl.shared_hbm)
    idx_out = nl.ndarray((rows, 8), dtype=nl.uint32, buffer=nl.shared_hbm)
    s = nl.ndarray((rows, cols), dtype=scores.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=s, src=scores)
    top = nl.ndarray((rows, 8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top, src=s)
    idx = nl.ndarray((rows, 8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=idx, data=s, vals=top)
    nisa.dma_copy(dst=vals_out, src=top)
    nisa.dma_copy(dst=idx_out, src=idx)
    return vals_out, idx_out


@nki.jit
def mx_matmul_kernel(lhs_t, rhs):
    """Trn3 MXFP8: quantize both operands on VectorE, one nc_matmul_mx over K = 4 x 128.

    lhs_t [128, 4*M] and rhs [128, 4*N] are in the interleaved MX layout: element [p, 4*j + q]
    is contraction index (p, q) of column j, so out[i, j] = sum over p, q of lhs_t[p, 4i+q] * rhs[p, 4j+q].
    """
    k, m4 = lhs_t.shape
    _, n4 = rhs.shape
    m, n = m4 // 4, n4 // 4
    out = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.shared_hbm)
    a = nl.ndarray((k, m4), dtype=lhs_t.dtype, buffer=nl.sbuf)
    b = nl.ndarray((k, n4), dtype=rhs.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=a, src=lhs_t)
    nisa.dma_copy(dst=b, src=rhs)
    aq = nl.ndarray((k, m), dtype=nl.float8_e4m3fn_x4, buffer=nl.sbuf)
    bq = nl.ndarray((k, n), dtype=nl.float8_e4m3fn_x4, buffer=nl.sbuf)
    a_scale = nl.ndarray((k, m), dtype=nl.uint8, buffer=nl.sbuf)
    b_scale = nl.ndarray((k, n), dtype=nl.uint8, buffer=nl.sbuf)
    nisa.quantize_mx(dst=aq, src=a, dst_scale=a_scale)
    nisa.quantize_mx(dst=bq, src=b, dst_scale=b_scale)
    acc = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul_mx(dst=acc, stationary=aq, moving=bq, stationary_scale=a_scale, moving_scale=b_scale)
    res = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=res, src=acc)
    nisa.dma_copy(dst=out, src=res)
    return out


@nki.jit
def gemv_kernel(x, w):
    """y[1, N] = x[1, K] @ w[K, N] for one token: weight tiles [128, 128] are the stationary
    operand (the large-free-size operand, as the architecture guide advises for matvec) and the
    token column x[K, 1] streams as moving; K accumulates in PSUM."""
    _, k = x.shape
    _, n = w.shape
    out = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    xt = nl.ndarray((128, k // 128), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xt, src=x.reshape((k // 128, 128)).permute((1, 0)))
    wt = nl.ndarray((128, k // 128, n), dtype=w.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=wt, src=w.reshape((k // 128, 128, n)).permute((1, 0, 2)))
    for j in nl.affine_range((n + 127) // 128):
        cols = min(128, n - j * 128)
        acc = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.psum)
        for i in nl.affine_range(k // 128):
            nisa.nc_matmul(dst=acc[0:cols], stationary=wt[:, i, j * 128:j * 128 + cols], moving=xt[:, i:i + 1],
                           accumulate=(i > 0))
        res = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res[0:cols], src=acc[0:cols])
        nisa.dma_copy(dst=out[j * 128:j * 128 + cols, :], src=res[0:cols])
    return out
