"""FLOPs of one run of a recipe, as torch counts them (FlopCounterMode): one training step at the
recipe's batch size (forward, backward and the optimizers' steps, Newton-Schulz included) times the
run's steps, plus the forwards of the timed evaluation (the test set with the recipe's TTA). The
per-epoch evaluation outside the clock is left out. Not part of CI; on the CPU, in fp32.
With --time, it also times that training step on this machine (the median of three, after the
counted one), which tells a slow machine from a slow recipe when CPU runs of two days are compared.

    python tools/flops.py [RECIPE ...] [--time]
"""
import argparse
import importlib
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def counted(function):
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def flops_of_a_run(recipe):
    hyp, opt = recipe.hyp, recipe.hyp['opt']
    model = recipe.place_on(recipe.make_net(hyp['net']), 'cpu')
    steps = math.ceil(TRAIN_IMAGES // opt['batch_size'] * opt['train_epochs'])
    if hasattr(recipe, 'make_optimizers'):
        optimizers = recipe.make_optimizers(model, opt, *([steps] if 'total_steps' in
                                                          recipe.make_optimizers.__code__.co_varnames else []))
    else:
        optimizers = [recipe.make_optimizer(model, opt)]
    inputs = torch.randn(opt['batch_size'], 32, 32, 3).permute(0, 3, 1, 2)  # laid out as the loader's crops are
    labels = torch.randint(0, 10, (opt['batch_size'],))

    def step():
        loss = torch.nn.functional.cross_entropy(model(inputs), labels, reduction='sum')
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    per_step = counted(step)
    seconds_per_step = statistics.median(timed(step) for _ in range(3)) if args.time else None
    one_view = counted(lambda: model.eval()(torch.randn(1000, 3, 32, 32))) / 1000
    level, share = hyp['net']['tta_level'], hyp['net'].get('tta_share', 1.0)
    views = {0: 1, 1: 2, 2: 6}[level]
    # With a tta_share below 1 every image gets one view, and the share of them the rest again.
    evaluated = TEST_IMAGES * (1 + views * share) if share < 1 else TEST_IMAGES * views
    return steps, per_step, one_view * evaluated, seconds_per_step


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('recipes', nargs='*', default=['airbench94_muon', 'airbench94_hive'])
parser.add_argument('--time', action='store_true', help='also time one training step on this CPU')
args = parser.parse_args()
for name in args.recipes:
    steps, per_step, evaluation, seconds_per_step = flops_of_a_run(importlib.import_module(name))
    total = steps * per_step + evaluation
    timing = (f'; a step takes {seconds_per_step:.2f} s on {torch.get_num_threads()} CPU threads, the steps '
             f'{steps * seconds_per_step:.0f} s' if seconds_per_step else '')
    print(f'{name}: {steps} steps x {per_step / 1e12:.4f} TFLOPs + evaluation {evaluation / 1e12:.4f} TFLOPs'
          f' = {total / 1e15:.4f} PFLOPs a run{timing}', flush=True)
