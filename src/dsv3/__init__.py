"""dsv3: DeepSeek-V3 in plain PyTorch — model, training, inference, FP8 and scale-out.

Public API:
    ModelConfig                  config with the Hugging Face / DeepSeek `config.json` field names
    get_config(name_or_path)     a preset ("tiny", "small", "deepseek-v3-671b") or a config.json
    DeepseekV3(config)           the nn.Module; model(input_ids).logits is [B, T, vocab]
    load_pretrained(path, dtype) a checkpoint directory in the official format (BF16/FP32 or FP8)
    save_pretrained(model, path) writes that format
    resolve_checkpoint(path)     a checkpoint directory, or a training run's latest checkpoint
"""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, ModelConfig, get_config
from .model import DeepseekV3, ModelOutput
from .runs import resolve_checkpoint

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "get_config", "DeepseekV3", "ModelOutput", "load_pretrained",
           "save_pretrained", "resolve_checkpoint", "CheckpointError", "__version__"]
