"""Encoders: ConvNeXt backbones, SAFA / GAP heads, the two-tower model."""
