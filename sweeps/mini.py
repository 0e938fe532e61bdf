"""The embedded default: SPT against linear probing, full fine-tuning and uniform LoRA on the mini suite.

What it runs (recipe: spt_ray/suites.py MINI, overridable by flags, see --help):
  1. writes the generated mini suite (8 tasks, 32 px, VTAB-1k layout) under <storage>/data;
  2. computes each task's sensitivity map once on the shipped mini ViT (the sensitivity store);
  3. phase 1: per task, Optuna (TPE) + ASHA search SPT-LoRA / SPT-Adapter budgets, alpha, rank, lr and
     weight decay on train800 -> val200, with the baselines run as fixed configurations;
  4. phase 2: the best config of each task (chosen on val200 only) and each baseline are retrained on
     train800val200 with two seeds and tested once on the test split;
  5. prints SPT vs the baselines; everything is in Parquet under <storage>/results.

    python sweeps/mini.py                   # ~minutes on 2 CPU cores, local Ray
    python sweeps/mini.py --smoke           # about a minute
"""

import sys

from spt_ray.launch import script_main

if __name__ == "__main__":
    sys.exit(script_main("mini"))
