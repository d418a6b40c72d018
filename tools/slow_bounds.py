"""Measures the slow tests' accuracies over seeds, to set their bounds (tests/conftest.py RECIPES:
slow_overrides, slow_images, slow_tta_acc_above). Not part of CI.

    CIFAR10_DIR=<decoded stand-in> python tools/slow_bounds.py [RECIPE ...] [--seeds 0 1 2 3 4]
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), 'tests')]

import conftest  # noqa: E402
from test_slow import train_small_on_real_images  # noqa: E402
import importlib  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('recipes', nargs='*', default=list(conftest.RECIPES))
parser.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2, 3, 4])
args = parser.parse_args()
for name in args.recipes:
    recipe = importlib.import_module(name)
    for seed in args.seeds:
        started = time.perf_counter()
        _, result = train_small_on_real_images(recipe, os.environ['CIFAR10_DIR'], seed)
        print(f'{name} seed {seed}: tta {result["tta_val_acc"]:.4f} val {result["val_acc"]:.4f} '
              f'{time.perf_counter() - started:.1f} s', flush=True)
