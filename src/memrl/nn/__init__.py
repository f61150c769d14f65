"""Shared building blocks: vision backbones (cnn, resnet18, vit_b_16)."""

from memrl.nn.backbones import BACKBONES, Backbone, make_backbone

__all__ = ["BACKBONES", "Backbone", "make_backbone"]
