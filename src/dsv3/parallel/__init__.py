"""Scale-out, applied from outside the single-process model: the pipeline x data x expert-parallel mesh
(`mesh`), expert parallelism with all-to-all dispatch (`expert_parallel`), ZeRO-1 (`zero`), the 1F1B / ZB-H1 /
DualPipe / DualPipeV schedules and their executor (`pipeline`) and EPLB redundant-expert placement (`eplb`).
The trainer that runs the schedules is `dsv3.train.pipeline_trainer`; the cost / pipeline-bubble model is
`dsv3.cost`. See DESIGN.md.
"""

from .eplb import rebalance_experts

__all__ = ["rebalance_experts"]
