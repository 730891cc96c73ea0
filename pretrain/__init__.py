"""Offline pretraining: corpus -> cached latents -> stage-1 LiDB per identity -> hypernetwork -> export.

Run it with `hdb pretrain STAGE --config tiny-cpu --output-dir DIR` or, distributed,
`torchrun --nproc-per-node N -m pretrain STAGE ...` (see pretrain/cli.py and pretrain/configs/).
"""
