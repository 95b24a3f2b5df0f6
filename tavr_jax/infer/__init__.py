"""Real-time inference: compiled engine, frame streams, post-processing, tracking, outputs."""
