"""Scale-out, applied from outside the single-process model: the pipeline x data x expert-parallel mesh
(`mesh`), expert parallelism with all-to-all dispatch (`expert_parallel`), ZeRO-1 (`zero`), the 1F1B / ZB-H1 /
DualPipe / DualPipeV schedules (`pipeline`) and the trainer that runs them (`pipeline_train`), EPLB redundant-expert
placement (`eplb`) and the cost / pipeline-bubble model (`cost`). See DESIGN.md.
"""

from .eplb import rebalance_experts

__all__ = ["rebalance_experts"]
