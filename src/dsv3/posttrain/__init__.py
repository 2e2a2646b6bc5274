"""Post-training (DeepSeek-V3 report, section 5): evaluation on verifiable tasks (`evaluate`); SFT, distillation
and GRPO build on it. This layer sits above both `train` and `infer`: it drives the engine for generation and the
trainer for updates."""
