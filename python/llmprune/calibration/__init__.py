"""Calibration statistics, one decoder block at a time: activation sums (activations.py), sequential
pruning inside the pass (sequential.py), torchrun set-up (distributed.py), Gram matrices (gram.py),
gradients (gradients.py), MoE routing statistics (routing.py), the pass-time estimate (estimate.py)
and the sidecar files they are written to (sidecar.py). Nothing here imports the command line."""
