"""VTAB-1k (19 tasks) with ViT-B/16 (ImageNet-21k): SPT's recipe and the honest two-phase protocol.

Recipe (spt_ray/suites.py VTAB): AdamW, batch 64, 100 epochs, cosine schedule with 10 warm-up epochs,
drop-path 0.1, bf16 autocast on GPU; sensitivity from 16 x 32 train800 images per task, computed once per
task on a GPU and shared through Ray's object store; Optuna TPE per task over budget (0.05M..1.0M),
alpha, rank, lr and weight decay with ASHA early stopping; 0.5 GPU per trial.
Phase 1 selects on train800 -> val200; phase 2 retrains the selected config (and the LoRA / Adapter /
linear baselines) on train800val200 with seeds 42, 44, 82, 100, 800 and reports mean / std test accuracy.

On a cluster (attaches to it; the package is installed on every node by cluster/cluster.yaml):
    ray submit cluster/cluster.yaml sweeps/vtab.py -- --data-root /mnt/data/vtab-1k \\
        --weights /mnt/data/weights/ViT-B_16.npz --storage s3://my-bucket/spt-runs
Locally:  python sweeps/vtab.py --data-root ~/data/vtab-1k --weights ViT-B_16.npz --storage runs/vtab
A minute-long check of the whole path on the mini suite:  python sweeps/vtab.py --smoke
"""

import sys

from spt_ray.launch import script_main

if __name__ == "__main__":
    sys.exit(script_main("vtab"))
