"""The op contracts of Qwen3-MoE: names, arguments, shape signatures, MAC counts and torch references.

Every variant of an op takes exactly the arguments of its contract's reference and returns what
the reference returns. Shapes drop the batch axis (the contest runs batch 1): ``T`` tokens.

Dimensions used in shape signatures:
    T tokens, H hidden, Hq query heads, Hkv KV heads, D head_dim, E experts, K top-k (router and
    experts) or contraction (linear), N output features, I expert intermediate size,
    S prefill sequence length, L KV-cache length.

The references follow HF transformers' Qwen3-MoE modules operation by operation (dtype casts
included), so that a variant that matches its reference matches the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor

DTYPES: Mapping[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class OpError(ValueError):
    """An unknown op, or dims that do not fit an op's contract."""


# --- references -------------------------------------------------------------------------------


def rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis, computed in fp32, scaled by ``weight`` in the input dtype.

    Dimensions: x [T, H], weight [H]. Returns [T, H] in x.dtype.
    """
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Residual add then RMSNorm. Returns ``(x + residual, rmsnorm(x + residual))``.

    Dimensions: x, residual [T, H]; weight [H].
    """
    summed = x + residual
    return summed, rmsnorm(summed, weight, eps)


def qk_norm(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k over head_dim (Qwen3 QK-norm).

    Dimensions: q [T, Hq, D], k [T, Hkv, D], q_weight and k_weight [D].
    """
    return rmsnorm(q, q_weight, eps), rmsnorm(k, k_weight, eps)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding, rotate-half convention, full head_dim rotated.

    Dimensions: q [T, Hq, D], k [T, Hkv, D], cos and sin [T, D] in q.dtype (as HF casts them).
    """
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables [T, D] for integer ``positions``, as HF's default rotary embedding builds them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def router(logits: Tensor, top_k: int = 8, norm_topk_prob: bool = True) -> tuple[Tensor, Tensor]:
    """Softmax in fp32, top-k, renormalise over the top-k; weights cast back to logits.dtype.

    Dimensions: logits [T, E]. Returns weights [T, K] (logits.dtype) and expert ids [T, K] (int64),
    ids in descending order of probability.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def _grouped_linear(rows: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``rows`` grouped by expert (``counts[e]`` consecutive rows for expert e), each group times
    ``w[e].T``. Dimensions: rows [R, K], w [E, N, K], counts [E]. Returns [R, N].

    One ``grouped_mm`` where torch has it and the row strides are 16-byte aligned (as the model's
    are); otherwise a matmul per non-empty group, which computes the same rows.
    """
    width = rows.element_size()
    if hasattr(torch.nn.functional, "grouped_mm") and rows.shape[1] * width % 16 == 0 and w.shape[1] * width % 16 == 0:
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch.nn.functional.grouped_mm(rows, w.transpose(1, 2), offs=offsets)
    return torch.cat([torch.nn.functional.linear(group, w[e])
                      for e, group in enumerate(rows.split(counts.tolist())) if len(group)])


def expert_mlp(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """SwiGLU experts for the selected ids, scaled by the routing weights and summed per token.

    Dimensions: x [T, H], weights [T, K], ids [T, K], w_gate_up [E, 2I, H] (gate rows first, then
    up rows, as HF stores ``gate_up_proj``), w_down [E, H, I]. Returns [T, H] in x.dtype.
    The arithmetic of HF's default (``grouped_mm``) experts: each (token, slot) result is rounded
    to x.dtype, scaled by its routing weight (rounded again), and a token's K results are summed
    in fp32 and rounded once. Only the selected experts' weights are read.
    """
    tokens, top_k = ids.shape
    inter = w_down.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_down.shape[0])
    gate_up = _grouped_linear(x[order // top_k], w_gate_up, counts)
    act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    scaled = _grouped_linear(act, w_down, counts) * weights.reshape(-1)[order, None]
    per_slot = torch.empty_like(scaled)
    per_slot[order] = scaled
    return per_slot.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    return t.repeat_interleave(groups, dim=0) if groups > 1 else t


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal GQA attention over a prompt, eager-style (fp32 softmax cast back to q.dtype).

    Dimensions: q [S, Hq, D], k and v [S, Hkv, D]; query head h reads KV head h // (Hq / Hkv).
    Returns [S, Hq, D].
    """
    seq, heads = q.shape[0], q.shape[1]
    groups = heads // k.shape[1]
    qh, kh, vh = q.transpose(0, 1), _expand_kv(k.transpose(0, 1), groups), _expand_kv(v.transpose(0, 1), groups)
    scores = (qh @ kh.transpose(1, 2)) * scale
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ vh).transpose(0, 1)


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int | Tensor, scale: float) -> Tensor:
    """One query token over the first ``length`` positions of the KV cache (GQA).

    ``length`` is an int or a one-element integer tensor (a traced graph passes the run-time
    position as a tensor; NKI variants read it on the device).

    Dimensions: q [1, Hq, D]; k_cache [Hkv, D, Lmax] (keys stored transposed, one contiguous
    [D, Lmax] block per KV head, so a decode kernel reads K^T tiles with the contraction on
    partitions directly); v_cache [Hkv, Lmax, D]. Returns [1, Hq, D].
    """
    groups = q.shape[1] // k_cache.shape[0]
    length = int(length)
    kh = _expand_kv(k_cache[:, :, :length].transpose(1, 2), groups)
    vh = _expand_kv(v_cache[:, :length], groups)
    scores = (q.transpose(0, 1) @ kh.transpose(1, 2)) * scale
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ vh).transpose(0, 1)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` without bias, as ``nn.Linear`` computes it. Dimensions: x [T, K], w [N, K]. Returns [T, N]."""
    return torch.nn.functional.linear(x, w)


# --- composite references: compositions of the references above ----------------------------------


def moe_block_of(add_rmsnorm: Callable[..., Any], linear: Callable[..., Any], router: Callable[..., Any],
                 expert_mlp: Callable[..., Any]) -> Callable[..., tuple[Tensor, Tensor]]:
    """The ``moe_block`` composite built from implementations of its parts (in the order of its
    contract's ``parts``): the references give the reference, bound variants give the chain."""

    def moe_block(x: Tensor, residual: Tensor, norm_weight: Tensor, w_gate: Tensor, w_gate_up: Tensor,
                  w_down: Tensor, top_k: int = 8, norm_topk_prob: bool = True,
                  eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """add_rmsnorm -> router gate (linear) -> router -> expert_mlp.
        x, residual [T, H]; norm_weight [H]; w_gate [E, H]; w_gate_up [E, 2I, H]; w_down [E, H, I].
        Returns (summed [T, H], out [T, H]): the residual sum and the experts' output."""
        summed, normed = add_rmsnorm(x, residual, norm_weight, eps)
        weights, ids = router(linear(normed, w_gate), top_k, norm_topk_prob)
        return summed, expert_mlp(normed, weights, ids, w_gate_up, w_down)

    return moe_block


def attention_block_of(add_rmsnorm: Callable[..., Any], qkv_proj: Callable[..., Any], qk_norm: Callable[..., Any],
                       rope: Callable[..., Any], attention_decode: Callable[..., Any],
                       o_proj: Callable[..., Any]) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The ``attention_block`` composite built from implementations of its parts (see :func:`moe_block_of`)."""

    def attention_block(x: Tensor, residual: Tensor, norm_weight: Tensor, w_qkv: Tensor, q_norm_weight: Tensor,
                        k_norm_weight: Tensor, cos: Tensor, sin: Tensor, k_cache_t: Tensor, v_cache: Tensor,
                        length: int | Tensor, w_o: Tensor, scale: float,
                        eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Decode (T = 1): add_rmsnorm -> fused q|k|v linear -> qk_norm -> rope -> attention over the
        cache plus the new position -> o_proj.
        x, residual [1, H]; norm_weight [H]; w_qkv [(Hq + 2 Hkv) D, H] (q rows, then k, then v);
        q_norm_weight, k_norm_weight [D]; cos, sin [1, D]; k_cache_t [Hkv, D, C] and v_cache [Hkv, C, D]
        hold positions [0, length) (C > length); w_o [H, Hq D].
        Returns (summed [1, H], out [1, H], k [1, Hkv, D], v [1, Hkv, D]): the residual sum, the o_proj
        output, and the new position's key (after QK-norm and RoPE) and value, which the caller writes
        into the caches at position ``length`` afterwards (the block does not mutate its inputs)."""
        hkv, d = k_cache_t.shape[0], k_cache_t.shape[1]
        hq = w_o.shape[1] // d
        summed, normed = add_rmsnorm(x, residual, norm_weight, eps)
        qkv = qkv_proj(normed, w_qkv)
        q = qkv[:, :hq * d].reshape(1, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].reshape(1, hkv, d)
        v = qkv[:, (hq + hkv) * d:].reshape(1, hkv, d)
        q, k = rope(*qk_norm(q, k, q_norm_weight, k_norm_weight, eps), cos, sin)
        at = int(length)
        k_all, v_all = k_cache_t.clone(), v_cache.clone()
        k_all[:, :, at] = k[0]
        v_all[:, at] = v[0]
        attn = attention_decode(q, k_all, v_all, at + 1, scale)
        return summed, o_proj(attn.reshape(1, hq * d), w_o), k, v

    return attention_block


moe_block = moe_block_of(add_rmsnorm, linear, router, expert_mlp)
attention_block = attention_block_of(add_rmsnorm, linear, qk_norm, rope, attention_decode, linear)


# --- contracts --------------------------------------------------------------------------------

InputMaker = Callable[[Mapping[str, int], torch.dtype, torch.Generator], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True)
class Problem:
    """One op at one shape and dtype: what a variant is chosen for and what the cache is keyed by."""

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: str = "bfloat16"

    @classmethod
    def of(cls, op: str, dtype: str = "bfloat16", **dims: int) -> Problem:
        contract = get_op(op)
        contract.check_dims(dims)
        if dtype not in DTYPES:
            raise OpError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return cls(op, tuple((name, int(dims[name])) for name in contract.dims), dtype)

    @property
    def dim(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def signature(self) -> str:
        """The shape signature used as a cache key, e.g. ``T=1,H=2048``."""
        return ",".join(f"{k}={v}" for k, v in self.dims)

    @property
    def macs(self) -> int:
        return get_op(self.op).macs(self.dim)

    @property
    def parts(self) -> dict[str, Problem]:
        """A composite's chain as problems keyed by part site name (empty for a plain op)."""
        return {part.site: part.problem(self) for part in get_op(self.op).parts}

    def __str__(self) -> str:
        return f"{self.op}[{self.signature}] {self.dtype}"


@dataclass(frozen=True)
class Part:
    """One op of a composite's chain: the model's call-site name for it (``add_norm``, ``experts``),
    its op, and its dims as a function of the composite's dims."""

    site: str
    op: str
    dims: Callable[[Mapping[str, int]], dict[str, int]]

    def problem(self, composite: Problem) -> Problem:
        return Problem.of(self.op, composite.dtype, **self.dims(composite.dim))


@dataclass(frozen=True)
class OpContract:
    """One op: its argument layout, dims, MAC count, reference and random-input maker."""

    name: str
    summary: str
    dims: tuple[str, ...]
    args: tuple[str, ...]  #: "name: [shape] dtype" lines, in call order
    reference: Callable[..., Any]
    macs: Callable[[Mapping[str, int]], int]
    make_inputs: InputMaker
    extra_checks: Callable[[Mapping[str, int]], str | None] = field(default=lambda d: None)
    #: A composite's chain, in call order (empty for a plain op); ``compose`` builds the composite
    #: from one implementation per part, in that order (the references compose to ``reference``).
    parts: tuple[Part, ...] = ()
    compose: Callable[..., Callable[..., Any]] | None = None

    @property
    def is_composite(self) -> bool:
        return bool(self.parts)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.split(":")[0].strip() for a in self.args)

    def check_dims(self, dims: Mapping[str, int]) -> None:
        missing = [d for d in self.dims if d not in dims]
        extra = [d for d in dims if d not in self.dims]
        if missing or extra:
            raise OpError(
                f"op {self.name!r} takes dims {', '.join(self.dims)}; "
                f"missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        bad = [f"{d}={dims[d]}" for d in self.dims if int(dims[d]) < 1]
        if bad:
            raise OpError(f"op {self.name!r}: dims must be positive, got {', '.join(bad)}")
        problem = self.extra_checks(dims)
        if problem:
            raise OpError(f"op {self.name!r}: {problem}")


def _randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, std: float = 1.0, mean: float = 0.0) -> Tensor:
    return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)


def _norm_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn((d["T"], d["H"]), dt, g), _randn((d["H"],), dt, g, 0.1, 1.0)), {"eps": 1e-6}


def _add_norm_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x = _randn((d["T"], d["H"]), dt, g)
    return (x, _randn((d["T"], d["H"]), dt, g), _randn((d["H"],), dt, g, 0.1, 1.0)), {"eps": 1e-6}


def _qk_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    q = _randn((d["T"], d["Hq"], d["D"]), dt, g)
    k = _randn((d["T"], d["Hkv"], d["D"]), dt, g)
    return (q, k, _randn((d["D"],), dt, g, 0.1, 1.0), _randn((d["D"],), dt, g, 0.1, 1.0)), {"eps": 1e-6}


def _rope_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    q = _randn((d["T"], d["Hq"], d["D"]), dt, g)
    k = _randn((d["T"], d["Hkv"], d["D"]), dt, g)
    start = int(torch.randint(0, 4096, (1,), generator=g))
    cos, sin = rope_cos_sin(torch.arange(start, start + d["T"]), d["D"], 1_000_000.0, dt)
    return (q, k, cos, sin), {}


def untied_logits(tokens: int, experts: int, dtype: torch.dtype, gen: torch.Generator, margin: float = 0.02) -> Tensor:
    """Router logits whose values in each row differ pairwise by at least ``margin`` after rounding
    to ``dtype``, so that the top-k is unambiguous (a random permutation of a spread ladder)."""
    ladder = torch.linspace(-4.0, 4.0, experts)
    rows = torch.stack([ladder[torch.randperm(experts, generator=gen)] for _ in range(tokens)])
    logits = rows.to(dtype)
    sorted_vals = logits.to(torch.float32).sort(dim=-1).values
    if experts > 1 and float((sorted_vals[:, 1:] - sorted_vals[:, :-1]).min()) < margin:
        raise OpError(f"cannot build router logits with margin {margin} for E={experts} in {dtype}")
    return logits


def _router_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (untied_logits(d["T"], d["E"], dt, g),), {"top_k": d["K"], "norm_topk_prob": True}


def _expert_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    t, h, i, e, k = d["T"], d["H"], d["I"], d["E"], d["K"]
    x = _randn((t, h), dt, g)
    logits = untied_logits(t, e, torch.float32, g)
    weights, ids = router(logits, k)
    return (x, weights.to(dt), ids, _expert_bank(e, (2 * i, h), dt, g), _expert_bank(e, (h, i), dt, g)), {}


def _expert_bank(experts: int, shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """``experts`` distinct random matrices of ``shape`` (std 1/sqrt(fan-in)): one random matrix,
    rolled by a different random offset per expert, so that every expert's weights differ (a kernel
    that reads the wrong expert fails) without drawing E full matrices of normals."""
    base = _randn(shape, dtype, gen, 1.0 / math.sqrt(shape[1])).reshape(-1)
    n = base.numel()
    bank = torch.empty(experts, n, dtype=dtype)
    for e, s in enumerate(torch.randperm(n, generator=gen)[:experts].tolist()):
        bank[e, : n - s] = base[s:]
        bank[e, n - s:] = base[:s]
    return bank.reshape(experts, *shape)


def _prefill_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    s, hq, hkv, dd = d["S"], d["Hq"], d["Hkv"], d["D"]
    return (
        _randn((s, hq, dd), dt, g),
        _randn((s, hkv, dd), dt, g),
        _randn((s, hkv, dd), dt, g),
    ), {"scale": dd**-0.5}


def _decode_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    length, hq, hkv, dd = d["L"], d["Hq"], d["Hkv"], d["D"]
    return (
        _randn((1, hq, dd), dt, g),
        _randn((hkv, dd, length), dt, g),
        _randn((hkv, length, dd), dt, g),
    ), {"length": length, "scale": dd**-0.5}


def _linear_inputs(d: Mapping[str, int], dt: torch.dtype, g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_randn((d["T"], d["K"]), dt, g), _randn((d["N"], d["K"]), dt, g, 1.0 / math.sqrt(d["K"]))), {}


def _separating_gate(normed: Tensor, experts: int, dtype: torch.dtype, gen: torch.Generator,
                     margin: float = 0.02) -> Tensor:
    """A router gate ``w [E, H]`` whose logits ``normed @ w.T`` are a permuted ladder over -4..4 per
    token (plus a random part orthogonal to the tokens, so the weights look random), checked to
    differ pairwise by ``margin`` after rounding: top-k is unambiguous through the whole block."""
    n = normed.to(torch.float64)
    ladder = torch.linspace(-4.0, 4.0, experts, dtype=torch.float64)
    target = torch.stack([ladder[torch.randperm(experts, generator=gen)] for _ in range(n.shape[0])])
    inverse = torch.linalg.pinv(n)  # [H, T]
    noise = torch.randn(experts, n.shape[1], generator=gen, dtype=torch.float64) / math.sqrt(n.shape[1])
    w = (target.T @ inverse.T + noise - noise @ inverse @ n).to(dtype)
    logits = linear(normed, w).to(torch.float32).sort(dim=-1).values
    if experts > 1 and float((logits[:, 1:] - logits[:, :-1]).min()) < margin:
        raise OpError(f"cannot build a router gate with logit margin {margin} for E={experts} in {dtype}")
    return w


def _moe_block_inputs(d: Mapping[str, int], dt: torch.dtype,
                      g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    t, h, i, e = d["T"], d["H"], d["I"], d["E"]
    (x, residual, norm_weight), kwargs = _add_norm_inputs(d, dt, g)
    _, normed = add_rmsnorm(x, residual, norm_weight, kwargs["eps"])
    w_gate = _separating_gate(normed, e, dt, g)
    return ((x, residual, norm_weight, w_gate, _expert_bank(e, (2 * i, h), dt, g), _expert_bank(e, (h, i), dt, g)),
            {"top_k": d["K"], "norm_topk_prob": True, **kwargs})


def _attention_block_inputs(d: Mapping[str, int], dt: torch.dtype,
                            g: torch.Generator) -> tuple[tuple[Any, ...], dict[str, Any]]:
    h, hq, hkv, dd, length = d["H"], d["Hq"], d["Hkv"], d["D"], d["L"] - 1
    cos, sin = rope_cos_sin(torch.tensor([length]), dd, 1_000_000.0, dt)
    return (
        _randn((1, h), dt, g), _randn((1, h), dt, g), _randn((h,), dt, g, 0.1, 1.0),
        _randn(((hq + 2 * hkv) * dd, h), dt, g, 1.0 / math.sqrt(h)),
        _randn((dd,), dt, g, 0.1, 1.0), _randn((dd,), dt, g, 0.1, 1.0), cos, sin,
        _randn((hkv, dd, d["L"]), dt, g), _randn((hkv, d["L"], dd), dt, g), length,
        _randn((h, hq * dd), dt, g, 1.0 / math.sqrt(hq * dd)), dd**-0.5,
    ), {"eps": 1e-6}


def _gqa_check(d: Mapping[str, int]) -> str | None:
    if d["Hq"] % d["Hkv"]:
        return f"Hq={d['Hq']} must be a multiple of Hkv={d['Hkv']}"
    if d["D"] % 2:
        return f"D={d['D']} must be even"
    return None


def _topk_check(d: Mapping[str, int]) -> str | None:
    return f"K={d['K']} must not exceed E={d['E']}" if d["K"] > d["E"] else None


OPS: dict[str, OpContract] = {
    c.name: c
    for c in (
        OpContract(
            "rmsnorm", "RMSNorm over hidden", ("T", "H"),
            ("x: [T, H] bf16|fp32", "weight: [H] x.dtype", "eps: float = 1e-6"),
            rmsnorm, lambda d: 0, _norm_inputs,
        ),
        OpContract(
            "add_rmsnorm", "residual add then RMSNorm; returns (residual, normed)", ("T", "H"),
            ("x: [T, H]", "residual: [T, H]", "weight: [H]", "eps: float = 1e-6"),
            add_rmsnorm, lambda d: 0, _add_norm_inputs,
        ),
        OpContract(
            "qk_norm", "per-head RMSNorm of q and k", ("T", "Hq", "Hkv", "D"),
            ("q: [T, Hq, D]", "k: [T, Hkv, D]", "q_weight: [D]", "k_weight: [D]", "eps: float = 1e-6"),
            qk_norm, lambda d: 0, _qk_inputs, _gqa_check,
        ),
        OpContract(
            "rope", "rotary embedding of q and k (rotate-half)", ("T", "Hq", "Hkv", "D"),
            ("q: [T, Hq, D]", "k: [T, Hkv, D]", "cos: [T, D] q.dtype", "sin: [T, D] q.dtype"),
            rope, lambda d: 0, _rope_inputs, _gqa_check,
        ),
        OpContract(
            "router", "softmax (fp32) -> top-k -> renormalise; returns (weights, ids)", ("T", "E", "K"),
            ("logits: [T, E]", "top_k: int = 8", "norm_topk_prob: bool = True"),
            router, lambda d: 0, _router_inputs, _topk_check,
        ),
        OpContract(
            "expert_mlp", "SwiGLU experts for the selected ids, weighted and summed", ("T", "H", "I", "E", "K"),
            ("x: [T, H]", "weights: [T, K] x.dtype", "ids: [T, K] int64", "w_gate_up: [E, 2I, H]", "w_down: [E, H, I]"),
            expert_mlp, lambda d: d["T"] * d["K"] * 3 * d["H"] * d["I"], _expert_inputs, _topk_check,
        ),
        OpContract(
            "attention_prefill", "causal GQA attention over the prompt", ("S", "Hq", "Hkv", "D"),
            ("q: [S, Hq, D]", "k: [S, Hkv, D]", "v: [S, Hkv, D]", "scale: float"),
            attention_prefill, lambda d: 2 * d["S"] * d["S"] * d["Hq"] * d["D"], _prefill_inputs, _gqa_check,
        ),
        OpContract(
            "attention_decode", "one query token over the KV cache (GQA)", ("L", "Hq", "Hkv", "D"),
            ("q: [1, Hq, D]", "k_cache: [Hkv, D, Lmax]", "v_cache: [Hkv, Lmax, D]", "length: int | [1, 1] int32", "scale: float"),
            attention_decode, lambda d: 2 * d["L"] * d["Hq"] * d["D"], _decode_inputs, _gqa_check,
        ),
        OpContract(
            "linear", "x @ W^T (q/k/v/o projections, router gate, lm_head)", ("T", "K", "N"),
            ("x: [T, K]", "w: [N, K]"),
            linear, lambda d: d["T"] * d["K"] * d["N"], _linear_inputs,
        ),
    )
}


def _composite(name: str, summary: str, dims: tuple[str, ...], args: tuple[str, ...], parts: tuple[Part, ...],
               compose: Callable[..., Callable[..., Any]], make_inputs: InputMaker,
               extra_checks: Callable[[Mapping[str, int]], str | None]) -> OpContract:
    """A composite contract: its reference composes the parts' references, its MACs are theirs."""
    reference = compose(*(OPS[part.op].reference for part in parts))
    return OpContract(name, summary, dims, args, reference,
                      lambda d: sum(OPS[part.op].macs(part.dims(d)) for part in parts),
                      make_inputs, extra_checks, parts, compose)


_HEADS = ("Hq", "Hkv", "D")


def _heads(d: Mapping[str, int]) -> dict[str, int]:
    return {k: d[k] for k in _HEADS}


def _attention_block_check(d: Mapping[str, int]) -> str | None:
    return _gqa_check(d) or (f"L={d['L']} must be at least 1 (the new position)" if d["L"] < 1 else None)


OPS = {
    **OPS,
    "moe_block": _composite(
        "moe_block", "composite: add_rmsnorm -> router gate -> router -> expert_mlp; returns (summed, out)",
        ("T", "H", "E", "K", "I"),
        ("x: [T, H]", "residual: [T, H]", "norm_weight: [H]", "w_gate: [E, H]", "w_gate_up: [E, 2I, H]",
         "w_down: [E, H, I]", "top_k: int = 8", "norm_topk_prob: bool = True", "eps: float = 1e-6"),
        (Part("add_norm", "add_rmsnorm", lambda d: {"T": d["T"], "H": d["H"]}),
         Part("router_gate", "linear", lambda d: {"T": d["T"], "K": d["H"], "N": d["E"]}),
         Part("router", "router", lambda d: {"T": d["T"], "E": d["E"], "K": d["K"]}),
         Part("experts", "expert_mlp", lambda d: {k: d[k] for k in ("T", "H", "I", "E", "K")})),
        moe_block_of, _moe_block_inputs, _topk_check,
    ),
    "attention_block": _composite(
        "attention_block", "composite, decode: add_rmsnorm -> q|k|v linear -> qk_norm -> rope -> attention "
        "-> o_proj; returns (summed, out, k, v)",
        ("H", "Hq", "Hkv", "D", "L"),
        ("x: [1, H]", "residual: [1, H]", "norm_weight: [H]", "w_qkv: [(Hq + 2 Hkv) D, H]", "q_norm_weight: [D]",
         "k_norm_weight: [D]", "cos: [1, D]", "sin: [1, D]", "k_cache_t: [Hkv, D, C > L - 1]",
         "v_cache: [Hkv, C, D]", "length: int = L - 1", "w_o: [H, Hq D]", "scale: float", "eps: float = 1e-6"),
        (Part("add_norm", "add_rmsnorm", lambda d: {"T": 1, "H": d["H"]}),
         Part("qkv_proj", "linear", lambda d: {"T": 1, "K": d["H"], "N": (d["Hq"] + 2 * d["Hkv"]) * d["D"]}),
         Part("qk_norm", "qk_norm", lambda d: {"T": 1, **_heads(d)}),
         Part("rope", "rope", lambda d: {"T": 1, **_heads(d)}),
         Part("attention", "attention_decode", lambda d: {"L": d["L"], **_heads(d)}),
         Part("o_proj", "linear", lambda d: {"T": 1, "K": d["Hq"] * d["D"], "N": d["H"]})),
        attention_block_of, _attention_block_inputs, _attention_block_check,
    ),
}

OP_NAMES: tuple[str, ...] = tuple(OPS)
#: The composite ops: each names the consecutive ops it replaces.
COMPOSITES: tuple[str, ...] = tuple(name for name, c in OPS.items() if c.is_composite)


def get_op(name: str) -> OpContract:
    """The contract called ``name``; an unknown name raises naming the valid ones."""
    try:
        return OPS[name]
    except KeyError:
        raise OpError(f"unknown op {name!r}; valid ops: {', '.join(OP_NAMES)}") from None


def compare(actual: Any, expected: Any, atol: float, rtol: float) -> tuple[bool, str]:
    """Compare an op's outputs: integer tensors exactly, float tensors within ``atol + rtol*|expected|``.

    Returns ``(ok, detail)`` where detail names the worst element of the first failing output.
    """
    acts = actual if isinstance(actual, tuple) else (actual,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    if len(acts) != len(exps):
        return False, f"expected {len(exps)} outputs, got {len(acts)}"
    worst = 0.0
    for index, (a, e) in enumerate(zip(acts, exps)):
        a = torch.as_tensor(a)
        if tuple(a.shape) != tuple(e.shape):
            return False, f"output {index}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
        if not e.is_floating_point():
            mismatched = int((a.to(torch.int64) != e.to(torch.int64)).sum())
            if mismatched:
                return False, f"output {index}: {mismatched} of {e.numel()} integer values differ"
            continue
        af, ef = a.to(torch.float32), e.to(torch.float32)
        if not torch.isfinite(af).all():
            return False, f"output {index}: non-finite values"
        err = (af - ef).abs()
        excess = err - (atol + rtol * ef.abs())
        where = int(excess.argmax())
        if float(excess.flatten()[where]) > 0:
            return False, (
                f"output {index}: |diff| {float(err.flatten()[where]):.3g} at flat index {where} "
                f"(expected {float(ef.flatten()[where]):.4g}, got {float(af.flatten()[where]):.4g}) "
                f"exceeds atol={atol} + rtol={rtol}*|expected|"
            )
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return True, f"max |diff| {worst:.3g}"
