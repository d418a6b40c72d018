"""Measures, over seeds, what the fast tests' learning bounds are set against (issue 14: no bound
that the unmodified recipe misses at some seed). Not part of CI; prints one line a test and recipe
with the lowest value over the seeds and the bound the test holds.

    python tools/seed_margins.py [--seeds 0 1 2 3 4]
"""
import argparse
import importlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), 'tests')]

import torch  # noqa: E402

import conftest  # noqa: E402
import test_model  # noqa: E402
import test_simple  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument('--seeds', nargs='*', type=int, default=[0, 1, 2, 3, 4])
args = parser.parse_args()
data_dir = conftest.write_cache(tempfile.mkdtemp())


def report(test, name, bound, values):
    print(f'{test} [{name}]: bound {bound}, lowest {min(values):.4f}, all {" ".join(f"{v:.4f}" for v in values)}',
          flush=True)
    assert bound is None or min(values) > bound, f'{test} [{name}] misses its bound at some seed'


for name in conftest.RECIPES:
    recipe = importlib.import_module(name)
    # test_training_is_seeded once held this above 0.25, which seeds 2 and 3 missed: it holds no bound now.
    report('test_training_is_seeded (no bound)', name, None, [test_model.train_tiny(
        recipe, data_dir, seed, opt__train_epochs=1.5)[1]['tta_val_acc'] for seed in args.seeds])
    report('test_train_on_a_masked_loader_with_overrides', name, 0.9,
           [test_model.train_on_even_classes(recipe, data_dir, seed)[2] for seed in args.seeds])
muon = importlib.import_module('airbench94_muon')
accuracies = []
for seed in args.seeds:
    torch.manual_seed(seed)
    hyp = conftest.tiny_hyp(muon)
    accuracies.append(muon.train(hyp, *conftest.tiny_loaders(muon, data_dir, hyp), device='cpu', verbose=False)[1]
                      ['tta_val_acc'])
report('test_cpu_path_compiles_nothing_by_default', 'airbench94_muon', 0.25, accuracies)
simple = test_simple.simple
simple.WIDTHS, simple.BATCH_SIZE, simple.EPOCHS = test_simple.SMALL_WIDTHS, 32, 5  # the small_recipe fixture's
accuracies = []
for seed in args.seeds:
    torch.manual_seed(seed)
    accuracies.append(simple.train(data_dir)[1])
report('test_seeded_training_lowers_the_loss', 'cifar94_simple', 50, accuracies)
