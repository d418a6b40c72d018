"""FLOPs of one run of a recipe, as torch counts them (FlopCounterMode): one training step at the
recipe's batch size (forward, backward and the optimizers' steps, Newton-Schulz included) times the
run's steps, plus the forwards of the timed evaluation (the test set with the recipe's TTA). The
per-epoch evaluation outside the clock is left out. Not part of CI; on the CPU, in fp32.

    python tools/flops.py [RECIPE ...]
"""
import argparse
import importlib
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


def counted(function):
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def flops_of_a_run(recipe):
    hyp, opt = recipe.hyp, recipe.hyp['opt']
    model = recipe.place_on(recipe.make_net(hyp['net']), 'cpu')
    steps = math.ceil(TRAIN_IMAGES // opt['batch_size'] * opt['train_epochs'])
    if hasattr(recipe, 'make_optimizers'):
        optimizers = recipe.make_optimizers(model, opt, *([steps] if 'total_steps' in
                                                          recipe.make_optimizers.__code__.co_varnames else []))
    else:
        optimizers = [recipe.make_optimizer(model, opt)]
    inputs = torch.randn(opt['batch_size'], 3, 32, 32)
    labels = torch.randint(0, 10, (opt['batch_size'],))

    def step():
        loss = torch.nn.functional.cross_entropy(model(inputs), labels, reduction='sum')
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    per_step = counted(step)
    one_view = counted(lambda: model.eval()(torch.randn(1000, 3, 32, 32))) / 1000
    level, share = hyp['net']['tta_level'], hyp['net'].get('tta_share', 1.0)
    views = {0: 1, 1: 2, 2: 6}[level]
    # With a tta_share below 1 every image gets one view, and the share of them the rest again.
    evaluated = TEST_IMAGES * (1 + views * share) if share < 1 else TEST_IMAGES * views
    return steps, per_step, one_view * evaluated


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('recipes', nargs='*', default=['airbench94_muon', 'airbench94_hive'])
args = parser.parse_args()
for name in args.recipes:
    steps, per_step, evaluation = flops_of_a_run(importlib.import_module(name))
    total = steps * per_step + evaluation
    print(f'{name}: {steps} steps x {per_step / 1e12:.4f} TFLOPs + evaluation {evaluation / 1e12:.4f} TFLOPs'
          f' = {total / 1e15:.4f} PFLOPs a run', flush=True)
