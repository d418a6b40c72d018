"""airbench96_faster: the proxy network, the data filter and its schedule, compilation."""
import collections
import importlib
import math
import time

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import study
from conftest import (RECORDING_BACKEND, TINY, TINY_TRAIN_IMAGES, failed_study, run_main, study_args, tiny_hyp,
                      tiny_loaders)


@pytest.fixture(scope='module')
def faster():
    return importlib.import_module('airbench96_faster')


def test_proxy_network(faster):
    """Widths 32/64/64 and two convs a block, without the residual. Parameters: the whitening conv
    24 * 12 + 24; per block 9 * c_in * c_out + 9 * c_out**2 conv weights and 4 * c_out BatchNorm
    ones; the head 10 * 64."""
    proxy = faster.make_net(faster.hyp['net'], proxy=True)
    assert sum(p.numel() for p in proxy.parameters()) == 146_744
    convs = [m for m in proxy.modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [24, 32, 32, 64, 64, 64, 64]
    block = proxy.block2
    x = torch.randn(2, 32, 8, 8)
    first = block.activ(block.norm1(block.pool(block.conv1(x))))
    assert torch.allclose(block(x), block.activ(block.norm2(block.conv2(first))), atol=1e-6)
    assert faster.make_net(faster.hyp['net']).block2.residual  # the main network keeps its own


def test_filter_keeps_the_highest_proxy_losses(faster):
    """One example per input dimension, so that the proxy's gradient step shows whose losses it
    learned from: only the selected examples' columns of its weight move."""
    n, keep = 1024, 512
    torch.manual_seed(0)
    proxy = nn.Linear(n, 10, bias=False)
    nn.init.normal_(proxy.weight, std=3.0)  # losses spread widely
    inputs, labels = torch.eye(n), torch.randint(10, (n,))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction='none')
    with torch.no_grad():
        losses = loss_fn(proxy(inputs), labels)
    hardest = set(losses.argsort(descending=True)[:keep].tolist())
    assert losses.sort(descending=True).values[keep - 1] > losses.sort(descending=True).values[keep]
    before = proxy.weight.detach().clone()
    optimizer = torch.optim.SGD(proxy.parameters(), lr=0.1)

    chosen_inputs, chosen_labels = faster.select_hardest(proxy, optimizer, inputs, labels, loss_fn, keep,
                                                         learn=False)
    chosen = set(chosen_inputs.argmax(1).tolist())
    assert len(chosen_inputs) == keep and chosen == hardest
    assert torch.equal(chosen_labels, labels[chosen_inputs.argmax(1)])
    assert torch.equal(proxy.weight, before) and proxy.weight.grad is None  # scoring only

    faster.select_hardest(proxy, optimizer, inputs, labels, loss_fn, keep, learn=True)
    moved = set(((proxy.weight - before).abs().sum(0) > 0).nonzero().flatten().tolist())
    assert moved == hardest


def test_proxy_learns_every_4th_batch_inside_the_clock(faster, tiny_data, monkeypatch):
    """Each batch of 32 goes through the filter; the main network trains on the 16 it keeps; the
    proxy's optimizer steps on batches 0, 4, 8, ..., at the rate the schedule gives that batch;
    and the filter's time is training time."""
    calls, optimizer_steps, rates = [], collections.Counter(), collections.defaultdict(list)
    real_select = faster.select_hardest

    def select_slowly(proxy, proxy_optimizer, inputs, labels, loss_fn, keep, learn):
        calls.append((len(inputs), learn))
        time.sleep(0.02)
        return real_select(proxy, proxy_optimizer, inputs, labels, loss_fn, keep, learn)

    def count(optimizer, args, kwargs):
        optimizer_steps[optimizer] += 1
        rates[optimizer].append(optimizer.param_groups[1]['lr'])  # the group of weights
    monkeypatch.setattr(faster, 'select_hardest', select_slowly)
    hyp = tiny_hyp(faster)
    seen_by_main = []
    handle = register_optimizer_step_post_hook(count)
    torch.manual_seed(0)
    real_make_net = faster.make_net

    def make_net_and_watch(hyp_net=None, proxy=False):
        net = real_make_net(hyp_net, proxy)
        if not proxy:
            net.block1.register_forward_pre_hook(
                lambda module, args: seen_by_main.append(len(args[0])) if module.training else None)
        return net
    monkeypatch.setattr(faster, 'make_net', make_net_and_watch)
    try:
        _, result = faster.train(hyp, *tiny_loaders(faster, tiny_data, hyp), device='cpu')
    finally:
        handle.remove()
    steps = result['steps']
    assert steps == TINY_TRAIN_IMAGES // TINY['opt.batch_size'] * TINY['opt.train_epochs']
    assert calls == [(32, step % 4 == 0) for step in range(steps)]
    assert seen_by_main == [16] * steps
    by_steps = sorted(optimizer_steps.items(), key=lambda item: item[1])
    (proxy_optimizer, proxy_steps), (_, network_steps) = by_steps
    assert (proxy_steps, network_steps) == (math.ceil(steps / 4), steps)
    peak = rates[proxy_optimizer][0] / faster.lr_multiplier(0, hyp['opt']['lr_knots'])
    assert rates[proxy_optimizer] == pytest.approx(
        [peak * faster.lr_multiplier(step / steps, hyp['opt']['lr_knots']) for step in range(0, steps, 4)])
    assert result['time_seconds'] > 0.02 * steps


def test_whole_compiled_study_on_tiny_cpu_data(faster, tiny_data, tmp_path, capsys, graphs_compiled):
    """With net.compile_on_cpu, as on CUDA: both networks compile in the first study's warm-up, and
    a second study in the same process compiles nothing."""
    compiled = []
    for name in ('first', 'second'):
        before = len(graphs_compiled)
        status, out, err = run_main(study, capsys, *study_args(
            faster, tiny_data, tmp_path / name, '--runs', '2', '--set', 'net.compile_on_cpu=True',
            '--set', f'net.compile_backend="{RECORDING_BACKEND}"', '--set', 'opt.whiten_bias_epochs=1',
            '--set', 'opt.proxy_whiten_bias_epochs=1',
            '--set', 'net.widths.block1=12'))
        assert status == 0 and err == ''
        warmup, runs = out.split('compiled in ')
        assert runs.count(' eval |') == 2 and 'airbench96_faster: 2 runs, mean TTA accuracy' in runs
        compiled.append(len(graphs_compiled) - before)
    # The network's two variants and evaluation; the proxy's two variants, learning and scoring.
    assert compiled[0] >= 3 + 4 and compiled[1] == 0
    assert {proxy for _, proxy, *_ in faster.COMPILED} == {False, True}


def test_whitening_biases_as_the_published_run_had_them(faster, tiny_data, whitening_bias_history):
    """By default the main network's whitening bias trains in every step of the run (the published
    run never froze it), and the proxy's in none: it stays at zero."""
    convs, had_gradient = whitening_bias_history(faster)
    hyp = tiny_hyp(faster)
    torch.manual_seed(0)
    model, result = faster.train(hyp, *tiny_loaders(faster, tiny_data, hyp), device='cpu', verbose=False)
    main, proxy = convs
    assert had_gradient[main] == [True] * result['steps'] and model.whiten.bias.abs().sum() > 0
    assert len(had_gradient[proxy]) == math.ceil(result['steps'] / hyp['opt']['proxy_every'])
    assert not any(had_gradient[proxy]) and not proxy.bias.any()


@pytest.mark.parametrize('settings, trained', [
    ({}, (1, 45, 0)),  # neither bias freezes mid-run: one epoch compiles all
    ({'opt.whiten_bias_epochs': 40}, (2, 1, 0)),  # the main one does: it freezes after the first epoch
    ({'opt.proxy_whiten_bias_epochs': 2}, (2, 45, 1)),
    ({'opt.train_epochs': 50.0}, (2, 1, 0)),  # not 46 epochs of warm-up
    ({'opt.whiten_bias_epochs': 0, 'opt.proxy_whiten_bias_epochs': 46}, (1, 0, 46))])
def test_warmup_reaches_every_variant_the_runs_use(faster, tiny_data, monkeypatch, settings, trained):
    """(epochs, whitening-bias epochs, the proxy's) of the warm-up: a bias that freezes mid-run in
    the timed runs freezes after the warm-up's first epoch, so that both its variants compile."""
    seen = []
    monkeypatch.setattr(faster, 'train', lambda hyp, *args, **kwargs: seen.append(
        tuple(hyp['opt'][key] for key in ('train_epochs', 'whiten_bias_epochs', 'proxy_whiten_bias_epochs'))))
    hyp = study.override_hyp(faster.hyp, {'net.compile_on_cpu': True, **settings})
    loader = faster.CifarLoader(tiny_data, True, 32, device='cpu')
    assert faster.warmup(hyp, loader, 'cpu', verbose=False) and seen == [trained]


@pytest.mark.parametrize('setting, message', [('opt.filter_keep=0.0', 'opt.filter_keep must be in (0, 1]'),
                                              ('opt.filter_keep=1.5', 'opt.filter_keep must be in (0, 1]'),
                                              ('opt.proxy_every=0', 'opt.proxy_every must be at least 1'),
                                              ('net.proxy_widths.block3=0', 'net.proxy_widths.block3 must be at least 1')])
def test_bad_filter_settings_fail_in_one_line(faster, tiny_data, tmp_path, capsys, setting, message):
    status, err = failed_study(faster, capsys, tiny_data, tmp_path, '--set', setting)
    assert status == 1 and message in err
