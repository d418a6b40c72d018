"""Training on real images (CIFAR10_DIR) on the CPU: does the whole recipe still learn as measured?"""
import pytest
import torch

from conftest import RECIPES, subset

TRAIN_IMAGES, TEST_IMAGES = 10_000, 2_000


@pytest.mark.slow
def test_learns_real_images_on_cpu(recipe, real_data_dir):
    """Measured on the CIFAR-10-JPEG stand-in, two cores, torch 2.13.0 CPU, seeds 0 and 1: TTA
    accuracy 0.7300 and SEED1_PLACEHOLDER, about TIME_PLACEHOLDER s each. The bound leaves room for seed
    and CPU differences but not for a broken recipe part (whitening, flip, Lookahead, TTA)."""
    facts = RECIPES[recipe.__name__]
    hyp = recipe.override_hyp(recipe.hyp, facts['slow_overrides'])
    torch.manual_seed(0)
    train_loader = subset(recipe.CifarLoader(real_data_dir, True, hyp['opt']['batch_size'], hyp['aug'],
                                             device='cpu'), slice(0, TRAIN_IMAGES))
    test_loader = subset(recipe.CifarLoader(real_data_dir, False, 1000, device='cpu'), slice(0, TEST_IMAGES))
    _, result = recipe.train(hyp, train_loader, test_loader, device='cpu')
    assert result['tta_val_acc'] > facts['slow_tta_acc_above']
    assert result['tta_val_acc'] > result['val_acc'] - 0.01  # TTA does not hurt
