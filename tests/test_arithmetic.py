"""Each recipe's arithmetic pinned directly, against a hand computation, never through agreement
between two copies of a recipe (which cannot see a bug that both copies have): every Lookahead
update that train() makes, the whitening where a patch direction's variance equals eps, the loss of
a training step, and the learning rate of every step as train() applies it."""
import importlib
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import RECIPES, TINY, TINY_TRAIN_IMAGES, tiny_hyp, tiny_loaders

SGD_RECIPES = [name for name, facts in RECIPES.items() if facts['optimizer'] == 'sgd']
# 1.6 epochs of 8 batches: 13 steps, so the run stops inside an epoch, and the last step (13) is
# not a multiple of Lookahead's 5: the final copy is an update of its own.
EPOCHS, STEPS = 1.6, math.ceil(TINY_TRAIN_IMAGES // TINY['opt.batch_size'] * 1.6)


def piecewise_linear(x, knots):
    """The schedule's multiplier, written out apart from the recipes' lr_multiplier."""
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f'{x} lies outside the knots {knots}')


def train_tiny(recipe, data_dir, **overrides):
    hyp = tiny_hyp(recipe, opt__train_epochs=EPOCHS, **overrides)
    torch.manual_seed(0)
    model, result = recipe.train(hyp, *tiny_loaders(recipe, data_dir, hyp), device='cpu', verbose=False)
    assert result['steps'] == STEPS
    return hyp, model, result


def holds(optimizer, tensor):
    return any(p is tensor for group in optimizer.param_groups for p in group['params'])


@pytest.fixture
def main_network_steps(whitening_bias_history):
    """watch(recipe) -> a list that gets, before each step of an optimizer that trains the main
    network (the first whose whitening is initialized, not a data filter's proxy), its groups' rates."""
    rates, whitening_convs = [], []

    def record(optimizer, args, kwargs):
        if whitening_convs and whitening_convs[0] and holds(optimizer, whitening_convs[0][0].bias):
            rates.append([group['lr'] for group in optimizer.param_groups])
    handle = register_optimizer_step_pre_hook(record)

    def watch(recipe):
        whitening_convs[:] = []
        convs, _ = whitening_bias_history(recipe)
        whitening_convs.append(convs)
        return rates
    yield watch
    handle.remove()


@pytest.mark.parametrize('name', SGD_RECIPES)
def test_every_lookahead_update_that_train_makes(name, tiny_data, monkeypatch):
    """At every 5th step, decay**5 * (step/steps)**3; at the last step, 1.0 (the network ends at
    the average); nothing else. The returned network is the average."""
    recipe = importlib.import_module(name)
    updates, states = [], []
    steps_taken = [0]

    class RecordedLookahead(recipe.LookaheadState):
        def __init__(self, net):
            super().__init__(net)
            states.append(self)
            self.head = net.head.weight

        def update(self, net, decay):
            updates.append((steps_taken[0], decay))
            super().update(net, decay)

    def count(optimizer, args, kwargs):
        if states and holds(optimizer, states[0].head):
            steps_taken[0] += 1
    monkeypatch.setattr(recipe, 'LookaheadState', RecordedLookahead)
    handle = register_optimizer_step_pre_hook(count)
    try:
        hyp, model, result = train_tiny(recipe, tiny_data)
    finally:
        handle.remove()
    every, decay = hyp['opt']['lookahead_every'], hyp['opt']['lookahead_decay']
    expected = [(step, decay ** every * (step / STEPS) ** 3) for step in range(every, STEPS + 1, every)]
    expected.append((STEPS, 1.0))
    assert [step for step, _ in updates] == [step for step, _ in expected]
    assert [decay for _, decay in updates] == pytest.approx([decay for _, decay in expected], rel=1e-12)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, states[0].net_ema[key]), key


def patch_second_moment(images, kernel_size):
    patches = nn.functional.unfold(images.double(), kernel_size).transpose(1, 2).flatten(0, 1)
    return patches.T @ patches / len(patches)


def test_whitening_where_a_direction_has_variance_eps(recipe):
    """A patch direction of variance lambda comes out with variance lambda / (lambda + eps): 1/2
    where lambda equals eps, which tells eps inside the square root from eps outside it. Outputs
    are uncorrelated, ordered by the input variance, largest first; the second half negated."""
    eps = recipe.hyp['net']['whiten_eps']
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 3, 32, 32, generator=generator)
    # Blue copies green but for noise of variance 2 eps: (green - blue) / sqrt(2) has variance eps.
    images[:, 2] = images[:, 1] + math.sqrt(2 * eps) * torch.randn(200, 32, 32, generator=generator)
    conv = recipe.make_net(recipe.hyp['net']).whiten
    recipe.init_whitening_conv(conv, images, eps=eps)
    moment = patch_second_moment(images, conv.kernel_size)
    spectrum = torch.linalg.eigvalsh(moment).flip(0)  # largest first
    expected = spectrum / (spectrum + eps)
    assert 0.4 < expected.min() < 0.6  # the test holds a direction whose variance is about eps
    weight = conv.weight.detach().double().flatten(1)
    half = len(weight) // 2
    assert torch.equal(weight[half:], -weight[:half])
    whitened = weight[:half] @ moment @ weight[:half].T
    assert torch.allclose(whitened, torch.diag(expected), atol=2e-3)


def test_training_loss_is_the_smoothed_cross_entropy_summed(recipe, tiny_data, monkeypatch):
    """The last training step's loss, which train() reports per example, is F.cross_entropy with
    the recipe's label smoothing, summed over the batch."""
    calls, real_cross_entropy = [], nn.functional.cross_entropy

    def record(logits, targets, *args, **kwargs):
        calls.append((logits.detach().clone(), targets.clone()))
        return real_cross_entropy(logits, targets, *args, **kwargs)
    monkeypatch.setattr(nn.functional, 'cross_entropy', record)
    hyp, _, result = train_tiny(recipe, tiny_data)
    logits, targets = calls[-1]
    expected = real_cross_entropy(logits.float(), targets, label_smoothing=hyp['opt']['label_smoothing'],
                                  reduction='sum') / len(targets)
    assert hyp['opt']['label_smoothing'] > 0
    assert result['train_loss'] == pytest.approx(expected.item(), rel=1e-5)


def test_each_step_uses_its_own_gradient(recipe, tiny_data):
    """When an optimizer steps, every gradient it holds is the one that step's backward computed,
    not a sum with earlier steps' gradients: they are cleared before each backward. (Checked from
    each optimizer's second step on: its first step is when its tensors are found.)"""
    latest, handles, agrees = {}, [], []

    def check(optimizer, args, kwargs):
        for param in (p for group in optimizer.param_groups for p in group['params'] if p.grad is not None):
            if id(param) in latest:
                agrees.append(torch.equal(param.grad, latest[id(param)]))
            else:  # from now on, remember what each backward computes for it
                handles.append(param.register_hook(lambda grad, key=id(param): latest.__setitem__(key, grad.clone())))
                latest[id(param)] = param.grad.clone()
    handle = register_optimizer_step_pre_hook(check)
    try:
        train_tiny(recipe, tiny_data)
    finally:
        handle.remove()
        for each in handles:
            each.remove()
    assert len(agrees) > STEPS and all(agrees)


@pytest.mark.parametrize('name', SGD_RECIPES)
def test_learning_rate_of_every_step_as_train_applies_it(name, tiny_data, main_network_steps):
    """Step s of S uses the decoupled base rate (per 1024 examples, over 1 + 1/(1 - momentum)),
    times the schedule at s/S; BatchNorm biases bias_scaler times that."""
    recipe = importlib.import_module(name)
    rates = main_network_steps(recipe)
    hyp, _, _ = train_tiny(recipe, tiny_data)
    opt = hyp['opt']
    base = opt['lr'] / (1024 * (1 + 1 / (1 - opt['momentum'])))
    expected = [[opt['bias_scaler'] * base * piecewise_linear(step / STEPS, opt['lr_knots']),
                 base * piecewise_linear(step / STEPS, opt['lr_knots'])] for step in range(STEPS)]
    assert len(rates) == STEPS
    assert rates == [pytest.approx(pair, rel=1e-9) for pair in expected]
