"""Scale-out: expert-parallel load balancing (EPLB) and the cost / pipeline-bubble model.

(Expert-parallel dispatch, ZeRO-1 and the DualPipe schedules are the next pieces of this package.)
"""

from .eplb import rebalance_experts

__all__ = ["rebalance_experts"]
