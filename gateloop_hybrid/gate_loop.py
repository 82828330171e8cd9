"""GateLoop mixers: data-controlled linear recurrences computed by ``gate_loop_scan``.

Dimension letters used in the shape comments:
    b batch, n time (the new tokens), h heads, d and e head dimensions (d = e),
    D model dimension, I inner dimension (h * d).
"""

from __future__ import annotations

from typing import Optional

from einops.layers.torch import Rearrange
from torch import Tensor, nn

from . import routing
from .checks import check_options
from .mixer import gate_loop_mixer, simple_gate_loop_mixer
from .norms import RMSNorm, check_features, check_sizes


def _check_backend(scan_backend: str) -> str:
    return routing.check_backend(scan_backend)


class GateLoopedAttention(nn.Module):
    """GateLoop as an attention replacement (Katsch 2023), constructor-compatible with the seed.

    For each head, ``h_t = a_t h_{t-1} + k_t v_t^T`` with a complex scalar gate
    ``a_t = sigmoid(|z_t|) exp(i arg z_t)`` computed from the input, and ``y_t = q_t Re(h_t)``.
    The state stays complex through the scan; only the output takes the real part. The mixing is
    ``gate_loop_mixer`` (mixer.py): fused GPU kernels with one feature per head, else torch ops
    around ``gate_loop_scan``.

    Args:
        dim: model dimension D.
        heads: number of heads h; default ``dim_inner`` (one feature per head).
        dim_inner: inner dimension I; default ``dim``.
        checkpoint_gate_looped_attn: recompute the scan in backward instead of storing the
            (b, n, h, d, e) states (the fused kernels recompute them in their backward kernel;
            the composition uses ``torch.utils.checkpoint``, non-reentrant).
        add_swish_gating: multiply the output by SiLU(W x) before the output projection.
        sub_ln: LayerNorm over the inner dimension before the gating.
        frac_gradient_state_transition: fraction of the gradient that reaches the gate
            projection (the rest is detached), to make the state transition learn slower.
        scan_backend: backend name for ``gate_loop_scan`` ("auto", "jax", "torch", "loop",
            "heinsen", ...).

    Forward cache: the complex state, shape (b, h, d, e); see :meth:`forward`.
    """

    def __init__(
        self,
        dim: int,
        heads: Optional[int] = None,
        dim_inner: Optional[int] = None,
        checkpoint_gate_looped_attn: bool = True,
        add_swish_gating: bool = True,
        sub_ln: bool = False,
        frac_gradient_state_transition: float = 0.9,
        scan_backend: str = "auto",
    ):
        super().__init__()
        check_sizes("GateLoopedAttention", dim=dim, heads=heads, dim_inner=dim_inner)
        check_options("GateLoopedAttention", checkpoint_gate_looped_attn=checkpoint_gate_looped_attn,
                      add_swish_gating=add_swish_gating, sub_ln=sub_ln,
                      frac_gradient_state_transition=frac_gradient_state_transition)
        dim_inner = dim if dim_inner is None else dim_inner
        heads = dim_inner if heads is None else heads
        self.dim = dim
        if dim_inner % heads:
            raise ValueError(
                f"dim_inner ({dim_inner}) must be divisible by the number of heads ({heads})"
            )
        self.heads = heads
        self.frac_gradient_state_transition = frac_gradient_state_transition
        self.checkpoint_gate_looped_attn = checkpoint_gate_looped_attn
        self.scan_backend = _check_backend(scan_backend)

        # module structure (and so state-dict keys) follows the seed
        self.to_qkv = nn.Linear(dim, dim_inner * 3, bias=False)
        self.to_a = nn.Sequential(
            nn.Linear(dim, heads * 2),
            Rearrange("b n (h c) -> b n h 1 1 c", h=heads, c=2),
        )
        self.maybe_sub_ln = nn.LayerNorm(dim_inner) if sub_ln else nn.Identity()
        self.to_gates = None
        if add_swish_gating:
            self.to_gates = nn.Sequential(nn.Linear(dim, dim_inner, bias=False), nn.SiLU())
        needs_proj = dim_inner != dim or add_swish_gating
        self.to_out = nn.Linear(dim_inner, dim, bias=False) if needs_proj else nn.Identity()

    def forward(
        self,
        x: Tensor,
        ablate_complex: bool = False,
        ablate_state_transition: bool = False,
        cache: Optional[Tensor] = None,
        return_cache: bool = False,
    ):
        """Mix along time.

        Args:
            x: (b, n, D); with ``cache``, only the new positions.
            ablate_complex: keep only the real part of the gate pre-activation.
            ablate_state_transition: use a = 1 (plain cumulative sum of k v^T).
            cache: state after the previous chunk, complex (b, h, d, e).
            return_cache: also return the state after this chunk.

        Returns:
            (b, n, D), or ``(out, state)`` when ``return_cache``.
        """
        check_features(x, self.dim, "GateLoopedAttention")
        check_options("GateLoopedAttention", return_cache=return_cache)
        if x.shape[1] == 0:
            raise ValueError(f"GateLoopedAttention: x has no time steps, shape {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, Tensor):
            raise TypeError(
                f"GateLoopedAttention: cache must be the state tensor returned with return_cache=True, "
                f"got {type(cache).__name__} (an attention layer's (k, v) cache?)"
            )
        b = x.shape[0]
        if cache is not None:
            d = self.to_qkv.out_features // (3 * self.heads)
            if tuple(cache.shape) != (b, self.heads, d, d):
                raise ValueError(
                    f"GateLoopedAttention: cache must be the state from return_cache=True, shape "
                    f"(batch, heads, d, e) = {(b, self.heads, d, d)}, got {tuple(cache.shape)}"
                )
            if cache.device != x.device:
                raise ValueError(f"GateLoopedAttention: cache is on {cache.device}, x on {x.device}")
        # to_a's Linear alone: its (b, n, 2 h) output is each head's gate as (re, im) pairs
        y, h_last = gate_loop_mixer(
            self.to_qkv(x), self.to_a[0](x), cache,
            heads=self.heads,
            frac_gradient=self.frac_gradient_state_transition,
            ablate_complex=ablate_complex,
            ablate_state_transition=ablate_state_transition,
            recompute=self.checkpoint_gate_looped_attn,
            backend=self.scan_backend,
        )  # (b, n, I), (b, h, d, e)
        out = self.maybe_sub_ln(y)
        if self.to_gates is not None:
            out = self.to_gates(x) * out
        out = self.to_out(out)  # (b, n, D)

        if not return_cache:
            return out
        return out, h_last


def _resolve_simple_backend(scan_backend: str, use_heinsen: bool, use_jax: bool) -> str:
    """Map the seed's boolean flags onto one backend name; refuse contradictions."""
    _check_backend(scan_backend)
    if use_heinsen and use_jax:
        raise ValueError("use_heinsen and use_jax_associative_scan cannot both be True")
    alias = "heinsen" if use_heinsen else "jax" if use_jax else None
    if alias is None:
        return scan_backend
    if scan_backend not in ("auto", alias):
        flag = "use_heinsen" if use_heinsen else "use_jax_associative_scan"
        raise ValueError(
            f"{flag}=True asks for scan_backend={alias!r}, which conflicts with "
            f"scan_backend={scan_backend!r}; pass only scan_backend"
        )
    return alias


class SimpleGateLoopLayer(nn.Module):
    """The seed's simplified GateLoop: one real gate per channel, no heads, no output projection.

    ``h_t = sigmoid(a_t) * h_{t-1} + kv_t`` and ``y_t = q_t * h_t`` per channel, where
    q, kv, a are three linear maps of the (optionally RMS-normed) input.

    Args:
        dim: model dimension D.
        prenorm: RMSNorm the input first.
        use_heinsen: seed alias for ``scan_backend="heinsen"``.
        use_jax_associative_scan: seed alias for ``scan_backend="jax"``.
        post_ln: LayerNorm the output.
        reverse: run the recurrence from the last position to the first.
        scan_backend: backend name for ``gate_loop_scan``.

    Forward cache: the state after the last position, shape (b, D), same dtype as the scan
    output. (The seed returned a tuple; its JAX path returned the unscanned gate and input,
    which did not continue the sequence. Here the cache is always the scanned state.)
    """

    def __init__(
        self,
        dim: int,
        prenorm: bool = True,
        use_heinsen: bool = False,
        use_jax_associative_scan: bool = False,
        post_ln: bool = False,
        reverse: bool = False,
        scan_backend: str = "auto",
    ):
        super().__init__()
        check_sizes("SimpleGateLoopLayer", dim=dim)
        check_options("SimpleGateLoopLayer", prenorm=prenorm, use_heinsen=use_heinsen,
                      use_jax_associative_scan=use_jax_associative_scan, post_ln=post_ln, reverse=reverse)
        self.dim = dim
        self.reverse = reverse
        self.scan_backend = _resolve_simple_backend(scan_backend, use_heinsen, use_jax_associative_scan)

        # module structure (and so state-dict keys) follows the seed
        self.norm = RMSNorm(dim) if prenorm else nn.Identity()
        self.to_qkva = nn.Sequential(
            nn.Linear(dim, dim * 3, bias=False),
            Rearrange("b n (qkva d) -> qkva b n d", qkva=3),
        )
        self.maybe_post_ln = nn.LayerNorm(dim) if post_ln else nn.Identity()

    def forward(self, x: Tensor, cache: Optional[Tensor] = None, return_cache: bool = False):
        """Mix along time.

        Args:
            x: (b, n, D); with ``cache``, only the new positions.
            cache: state after the previous chunk, (b, D).
            return_cache: also return the state after this chunk.

        Returns:
            (b, n, D), or ``(out, state)`` when ``return_cache``.
        """
        if self.reverse and (cache is not None or return_cache):
            raise ValueError(
                "SimpleGateLoopLayer(reverse=True) cannot continue from or return a cache: "
                "a reversed scan needs the whole sequence"
            )
        check_features(x, self.dim, "SimpleGateLoopLayer")
        check_options("SimpleGateLoopLayer", return_cache=return_cache)
        if x.shape[1] == 0:
            raise ValueError(f"SimpleGateLoopLayer: x has no time steps, shape {tuple(x.shape)}")
        if cache is not None:
            if not isinstance(cache, Tensor):
                raise TypeError(f"SimpleGateLoopLayer: cache must be the state tensor returned with "
                                f"return_cache=True, got {type(cache).__name__}")
            if tuple(cache.shape) != (x.shape[0], self.dim):
                raise ValueError(f"SimpleGateLoopLayer: cache must have shape (batch, dim) = "
                                 f"{(x.shape[0], self.dim)}, got {tuple(cache.shape)}")
            if cache.device != x.device:
                raise ValueError(f"SimpleGateLoopLayer: cache is on {cache.device}, x on {x.device}")
        x = self.norm(x)
        # to_qkva's Linear alone: q, kv and the gates' pre-activations side by side, (b, n, 3 D)
        y, h_last = simple_gate_loop_mixer(self.to_qkva[0](x), cache, reverse=self.reverse,
                                           backend=self.scan_backend)
        out = self.maybe_post_ln(y)
        if not return_cache:
            return out
        return out, h_last
