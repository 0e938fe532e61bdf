"""The five FGVC datasets (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) with
ViT-B/16: the VTAB recipe with FGVC's splits (train -> val for the search, train+val -> test for the final
phase) and augmentation (resize 256/224, random crop, flip; sensitivity without augmentation).

    ray submit cluster/cluster.yaml sweeps/fgvc.py -- --data-root /mnt/data/fgvc \\
        --weights /mnt/data/weights/ViT-B_16.npz --storage s3://my-bucket/spt-runs
    python sweeps/fgvc.py --smoke
"""

import sys

from spt_ray.launch import script_main

if __name__ == "__main__":
    sys.exit(script_main("fgvc"))
