import triton, triton.language as tl

@triton.jit
def _sub(q, k, v, m_i, l_i, acc, qk_scale):
    qk = tl.dot(q, k)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc

@triton.jit
def dense_ws(Qp, Kp, Vp, Op, H, S, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             WS: tl.constexpr, DEVDESC: tl.constexpr, IDX=None, SPARSE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_M // 2
    row0 = pid_bh * S  # flattened [B*H*S, D]
    if DEVDESC:
        Q = tl.make_tensor_descriptor(Qp, [S * H * 1, HEAD_DIM], [HEAD_DIM, 1], [HALF, HEAD_DIM])
        K = tl.make_tensor_descriptor(Kp, [S * H * 1, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
        V = tl.make_tensor_descriptor(Vp, [S * H * 1, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
        O = tl.make_tensor_descriptor(Op, [S * H * 1, HEAD_DIM], [HEAD_DIM, 1], [HALF, HEAD_DIM])
    else:
        Q = Qp; K = Kp; V = Vp; O = Op
    start = row0 + pid_m * BLOCK_M
    q0 = Q.load([start, 0])
    q1 = Q.load([start + HALF, 0])
    m0 = tl.zeros([HALF], dtype=tl.float32) - 1.0e30
    m1 = tl.zeros([HALF], dtype=tl.float32) - 1.0e30
    l0 = tl.zeros([HALF], dtype=tl.float32)
    l1 = tl.zeros([HALF], dtype=tl.float32)
    a0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    a1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    n_iter = S // BLOCK_N
    if SPARSE:
        n_iter = tl.load(IDX + pid_m * 1024 + 1023)
    for t in tl.range(0, n_iter, warp_specialize=WS):
        if SPARSE:
            kb = tl.load(IDX + pid_m * 1024 + t)
        else:
            kb = t
        k = K.load([row0 + kb * BLOCK_N, 0]).T
        v = V.load([row0 + kb * BLOCK_N, 0])
        m0, l0, a0 = _sub(q0, k, v, m0, l0, a0, qk_scale)
        m1, l1, a1 = _sub(q1, k, v, m1, l1, a1, qk_scale)
    O.store([start, 0], (a0 / l0[:, None]).to(O.dtype))
    O.store([start + HALF, 0], (a1 / l1[:, None]).to(O.dtype))


@triton.jit
def _sub8(q, k, v, m_i, l_i, acc, qk_scale):
    qk = tl.dot(q, k)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(tl.float8e4nv), v, acc)
    return m_new, l_i, acc


@triton.jit
def dense_ws_fp8(Q, K, VT, Op, H, S, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WS: tl.constexpr, IDX=None, SPARSE: tl.constexpr = False):
    """Q, K: [B*H*S, D] fp8 descriptors (blocks HALF x D, BLOCK_N x D); VT: [B*H*D, S] fp8 (block D x BLOCK_N)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_M // 2
    row0 = pid_bh * S
    start = row0 + pid_m * BLOCK_M
    q0 = Q.load([start, 0])
    q1 = Q.load([start + HALF, 0])
    m0 = tl.zeros([HALF], dtype=tl.float32) - 1.0e30
    m1 = tl.zeros([HALF], dtype=tl.float32) - 1.0e30
    l0 = tl.zeros([HALF], dtype=tl.float32)
    l1 = tl.zeros([HALF], dtype=tl.float32)
    a0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    a1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    n_iter = S // BLOCK_N
    if SPARSE:
        n_iter = tl.load(IDX + pid_m * 1024 + 1023)
    for t in tl.range(0, n_iter, warp_specialize=WS):
        if SPARSE:
            kb = tl.load(IDX + pid_m * 1024 + t)
        else:
            kb = t
        k = K.load([row0 + kb * BLOCK_N, 0]).T
        v = VT.load([pid_bh * HEAD_DIM, kb * BLOCK_N]).T
        m0, l0, a0 = _sub8(q0, k, v, m0, l0, a0, qk_scale)
        m1, l1, a1 = _sub8(q1, k, v, m1, l1, a1, qk_scale)
    Op.store([start, 0], (a0 / l0[:, None]).to(Op.dtype))
    Op.store([start + HALF, 0], (a1 / l1[:, None]).to(Op.dtype))
