"""Negative images: CLIP embedding and projection, retrieval, SAE scoring, greedy selection, the proposal, and image-transform negatives."""
