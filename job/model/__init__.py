"""Loading AuraFlow components, the tiny model, quantization, LoKr and group offload."""
