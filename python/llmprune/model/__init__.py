"""The model as llmprune sees it: the checkpoint's tensors (checkpoint.py), a weightless skeleton
built from config.json (skeleton.py), the MoE layout of experts on disk (moe_layout.py), the
block-by-block streamer every pass runs on (stream.py), devices and dtypes (devices.py), the loader
of structured outputs (pruned.py) and the packaged demo model (demo.py)."""
