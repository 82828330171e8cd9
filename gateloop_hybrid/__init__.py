"""GateLoop layers in PyTorch with the recurrence computed by a pluggable scan (JAX by default).

Drop-in for lucidrains/gateloop-transformer 0.2.5: same constructor and forward arguments,
same state-dict keys, plus ``scan_backend``.
"""

from .scan import gate_loop_scan
from .norms import RMSNorm
from .attention import CausalFullAttention
from .gate_loop import GateLoopedAttention, SimpleGateLoopLayer
from .transformer import Transformer

__all__ = [
    "gate_loop_scan",
    "Transformer",
    "GateLoopedAttention",
    "SimpleGateLoopLayer",
    "CausalFullAttention",
    "RMSNorm",
]
