"""Parameter and KV-cache accounting (`dsv3 params CONFIG`), computed from a model built on the meta device.

Conventions (those of the DeepSeek-V3 report and its HF checkpoint):
- "main model" = embedding + the num_hidden_layers decoder layers + final norm + output head, every tensor
  counted (norm gains and the routing bias `e_score_correction_bias` included), MTP modules excluded.
- "activated per token" = the main model with each MoE layer's routed experts counted at
  num_experts_per_tok / n_routed_experts; the embedding and head are counted in full (671B: 37.55B; 36.63B
  without the embedding).
- MTP parameters are reported apart: its unique tensors (eh_proj, norms, its block), and the size as stored in a
  checkpoint, which adds its own copies of the embedding and head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .model import DeepseekV3

COMPONENTS = ("embedding", "attention", "dense FFN", "routed experts", "shared experts", "gate", "MTP eh_proj",
              "norms", "head")


def _component(name: str) -> str:
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".self_attn." in name:
        return "attention"  # includes MLA's own q_a_layernorm / kv_a_layernorm
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "gate"  # router matrix and the e_score_correction_bias
    if ".mlp." in name:
        return "dense FFN"
    if ".eh_proj." in name:
        return "MTP eh_proj"
    return "norms"  # block norms, final norm, and the MTP module's enorm / hnorm / shared_head.norm


@dataclass
class ParamReport:
    """Parameter counts of one config by component (`COMPONENTS`), as `count_parameters` returns them."""

    config: ModelConfig
    main: dict[str, int] = field(default_factory=dict)  # component -> main-model parameters
    active: dict[str, int] = field(default_factory=dict)  # component -> parameters activated per token
    mtp: dict[str, int] = field(default_factory=dict)  # component -> MTP modules' unique parameters

    @property
    def total(self) -> int:
        """Main-model parameters (671B: 671.03B)."""
        return sum(self.main.values())

    @property
    def activated(self) -> int:
        """Parameters activated per token, embedding and head included (671B: 37.55B)."""
        return sum(self.active.values())

    @property
    def mtp_unique(self) -> int:
        """The MTP modules' own parameters (the shared embedding and head not counted)."""
        return sum(self.mtp.values())

    @property
    def mtp_stored(self) -> int:
        """As stored in a checkpoint: plus one embedding and one head copy per module."""
        return self.mtp_unique + self.config.num_nextn_predict_layers * (self.main["embedding"] + self.main["head"])

    def kv_bytes_per_token(self, bytes_per_value: float) -> tuple[float, float]:
        """(MLA latent cache, equivalent full per-head K/V cache) bytes per token over the main layers."""
        c = self.config
        latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value
        full = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * bytes_per_value
        return latent, full


def count_parameters(cfg: ModelConfig) -> ParamReport:
    """Count every tensor of a `DeepseekV3(cfg)` built on the meta device (no memory), by component."""
    model = DeepseekV3(cfg, device="meta")
    report = ParamReport(cfg, dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0))
    active_share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    tensors.pop("model.rotary_emb.inv_freq", None)  # derived, never stored
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(cfg.num_hidden_layers,
                                                             cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    for name, t in tensors.items():
        comp, n = _component(name), t.numel()
        if name.startswith(mtp_prefixes):
            report.mtp[comp] += n
            continue
        report.main[comp] += n
        report.active[comp] += round(n * active_share) if comp == "routed experts" else n
    return report


def training_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token: 6 x the activated matmul parameters (the embedding lookup is
    free; the head counts, once more per MTP module) + causal attention 3 x L x H x T x (d_qk + d_v)."""
    r = count_parameters(cfg)
    dense = r.activated - r.main["embedding"] - r.main["norms"]
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    layers = cfg.num_hidden_layers
    if n_mtp:
        per_module_share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
        mtp_active = r.mtp_unique - r.mtp["norms"] - r.mtp["routed experts"] * (1 - per_module_share)
        dense += mtp_active + n_mtp * r.main["head"]
        layers += n_mtp
    attention = 3 * layers * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * dense + attention


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def print_report(report: ParamReport, name: str) -> None:
    """Print the `dsv3 params` tables (components, totals, KV cache per token) to the terminal."""
    from rich.console import Console
    from rich.table import Table

    cfg = report.config
    console = Console()
    table = Table(title=f"dsv3 params: {name}", title_justify="left")
    table.add_column("component")
    table.add_column("main model", justify="right")
    table.add_column("activated / token", justify="right")
    table.add_column("MTP modules", justify="right")
    for comp in COMPONENTS:
        table.add_row(comp, f"{report.main[comp]:,}", f"{report.active[comp]:,}", f"{report.mtp[comp]:,}")
    table.add_row("total", f"{report.total:,}", f"{report.activated:,}", f"{report.mtp_unique:,}", style="bold")
    console.print(table)
    emb = report.main["embedding"]
    console.print(f"main model: {report.total:,} parameters ({_fmt(report.total)})")
    console.print(f"activated per token: {_fmt(report.activated)} incl. embedding and head "
                  f"({_fmt(report.activated - emb)} without the embedding); routed experts counted at "
                  f"{cfg.num_experts_per_tok}/{cfg.n_routed_experts}")
    if cfg.num_nextn_predict_layers:
        console.print(f"MTP ({cfg.num_nextn_predict_layers} module(s)): {_fmt(report.mtp_unique)} unique, "
                      f"{_fmt(report.mtp_stored)} as stored (with its embedding and head copies)")

    kv = Table(title="KV cache per token (all main layers)", title_justify="left")
    kv.add_column("dtype")
    kv.add_column("MLA latent cache (bytes)", justify="right")
    kv.add_column("full per-head K/V (bytes)", justify="right")
    kv.add_column("ratio", justify="right")
    for dt, nbytes in (("fp32", 4), ("bf16", 2), ("fp8", 1)):
        latent, full = report.kv_bytes_per_token(nbytes)
        kv.add_row(dt, f"{latent:,.0f}", f"{full:,.0f}", f"{full / latent:.1f}x")
    console.print(kv)
    console.print(f"latent cache = {cfg.num_hidden_layers} layers x (kv_lora_rank {cfg.kv_lora_rank} + "
                  f"qk_rope_head_dim {cfg.qk_rope_head_dim}) values; full K/V = layers x "
                  f"{cfg.num_attention_heads} heads x (qk {cfg.qk_head_dim} + v {cfg.v_head_dim})")

