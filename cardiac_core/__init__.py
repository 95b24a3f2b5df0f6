"""What both systems stand on: atomic file writes, image and DICOM reading, XLA helpers, backbones.

Nothing here knows about TAVR keypoints or perfusion polar maps; `tavr_jax` and `perfusion`
build on it, and it imports neither.
"""
