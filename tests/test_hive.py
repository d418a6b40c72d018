"""airbench94_hive: what it changes from airbench94_muon, each against the fact sheet
(../shared/specs/hiverge-94.md): batched Newton-Schulz, the renormalization steps, Muon's update
and decay, the schedules, the jitter, the flips and crops, selective TTA, the whitening images,
BatchNorm, the parameter groups, and compilation."""
import importlib
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import RECORDING_BACKEND, assert_static_batch_sizes, tiny_hyp, tiny_loaders, write_cache

# The six trained filters of the recipe, as Muon reshapes them: out_channels x (in_channels * 9).
FILTER_SHAPES = [(64, 216), (64, 576), (256, 576), (256, 2304), (256, 2304), (256, 2304)]
# The steps (1-based) at which the published run rescales the filters (the fact sheet, section 3).
RENORM_STEPS = [2, 4, 6, 8, 10, 12, 14, 16, 19, 22, 25, 28, 31, 35, 39, 43, 47, 52, 57, 62, 68, 74, 80, 87, 94,
                102, 110, 119, 128, 138, 149, 160, 172, 185, 199, 214, 230]


@pytest.fixture(scope='module')
def hive():
    return importlib.import_module('airbench94_hive')


def padded_stack(matrices, rows, cols):
    return torch.stack([nn.functional.pad(m, (0, cols - m.shape[1], 0, rows - m.shape[0])) for m in matrices])


def test_batched_newton_schulz_equals_one_matrix_at_a_time(hive):
    """The six filter shapes padded with zeros to 256 x 2304 and orthogonalized as one stack come
    out as each alone does, the padding still zero; and with the published coefficients."""
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(shape, generator=generator) for shape in FILTER_SHAPES]
    together = hive.newton_schulz(padded_stack(matrices, 256, 2304), 3)
    assert together.dtype == torch.float16 and together.shape == (6, 256, 2304)
    for matrix, result in list(zip(matrices, together))[:4]:  # the last three are of one shape
        rows, cols = matrix.shape
        alone = hive.newton_schulz(matrix[None], 3)[0]
        assert (result[:rows, :cols].float() - alone.float()).abs().max() < 2e-3
        assert torch.count_nonzero(result[rows:]) == torch.count_nonzero(result[:, cols:]) == 0
    # One step on a diagonal matrix maps each singular value s to a s + b s^3 + c s^5.
    values = torch.tensor([0.1, 0.3, 0.5, 0.8])
    singular = values.half().double() / values.half().double().norm()
    expected = 3.4576 * singular - 4.7391 * singular ** 3 + 2.0843 * singular ** 5
    assert torch.allclose(hive.newton_schulz(torch.diag(values)[None], 1)[0].double().diagonal(), expected, atol=5e-3)


def run_muon(hive, weights, grads, orthogonalize, total_steps=243, **settings):
    """Muon over `weights` with the recipe's settings (overridden by `settings`), one step per entry
    of `grads` (a list of gradient lists); returns the optimizer."""
    opt = hive.hyp['opt']
    options = dict(lr=opt['muon_lr'], momentum=opt['muon_momentum'], newton_schulz_steps=3,
                   weight_decay=opt['weight_decay'] * opt['batch_size'], renorm_intervals=opt['renorm_intervals'])
    muon = hive.Muon(weights, **{**options, **settings}, total_steps=total_steps, orthogonalize=orthogonalize)
    for step_grads in grads:
        for weight, grad in zip(weights, step_grads):
            weight.grad = grad
        muon.step()
    return muon


def rescaled_steps(hive, renorm_intervals, total_steps):
    """The steps at which Muon rescales a filter: with no gradient to move it and no decay, the only
    ones at which it changes."""
    weight = nn.Parameter(torch.ones(4, 2, 3, 3))
    muon = hive.Muon([weight], lr=0.1, momentum=0.5, newton_schulz_steps=3, weight_decay=0.0,
                     renorm_intervals=renorm_intervals, total_steps=total_steps,
                     orthogonalize=lambda stack, steps: stack * 0)
    rescaled = []
    for step in range(1, total_steps + 1):
        with torch.no_grad():
            weight.fill_(1.0)  # norm sqrt(72), not sqrt(out_channels) = 2
        weight.grad = torch.zeros_like(weight)
        muon.step()
        if not torch.equal(weight.detach(), torch.ones_like(weight)):
            assert weight.norm().item() == pytest.approx(2.0, rel=1e-6)
            rescaled.append(step)
    return rescaled


def test_renormalization_fires_at_the_published_37_steps(hive):
    """At the 37 steps that the fact sheet lists, and never at step 1 or after step 230."""
    assert rescaled_steps(hive, (2, 17), 243) == RENORM_STEPS and len(RENORM_STEPS) == 37


def test_renormalization_interval_follows_the_step_of_any_schedule(hive):
    """The interval at step s is 2 + floor(3 s / 9) over 9 steps from (2, 5): 2, 2, 3, 3, 3, 4, 4, 4,
    5, so it fires at step 2 (2 since 0) and 5 (3 since 2), and at 9 not (4 since 5). The published
    schedule cannot tell s from s - 1 here: 243 steps fire alike with either."""
    assert rescaled_steps(hive, (2, 5), 9) == [2, 5]


def test_muon_update_then_decay_over_two_steps(hive):
    """By hand, with Newton-Schulz replaced by doubling (so the padding and its removal show): step 1
    moves and decays without rescaling; step 2 rescales first (the norm before its update), then
    moves by lr times the orthogonalized Nesterov direction, then decays by lr * weight_decay."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(4, 3, 3, 3), (6, 4, 3, 3)]  # 4 x 27 and 6 x 36, padded to 6 x 48
    weights = [nn.Parameter(3.0 * torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(2)]
    start = [w.detach().clone() for w in weights]
    seen = []

    def double(stack, steps):
        seen.append(stack.shape)
        return 2 * stack
    lr, momentum, decay = 0.2, 0.6, 0.05
    run_muon(hive, weights, grads, double, lr=lr, momentum=momentum, weight_decay=decay)
    assert seen == [(2, 6, 48)] * 2
    for i, shape in enumerate(shapes):
        buffer = grads[0][i]
        expected = (start[i] - lr * 2 * (grads[0][i] + momentum * buffer)) * (1 - lr * decay)
        buffer = momentum * buffer + grads[1][i]
        expected = expected * math.sqrt(shape[0]) / (expected.norm() + 1e-7)
        expected = (expected - lr * 2 * (grads[1][i] + momentum * buffer)) * (1 - lr * decay)
        assert torch.allclose(weights[i].detach(), expected, atol=1e-5)


def test_parameter_groups_rates_and_decays(hive):
    opt = hive.hyp['opt']
    model = hive.make_net(hive.hyp['net'])
    sgd, muon = hive.make_optimizers(model, opt, total_steps=243)
    decay = 1.0418e-6 * 1536
    [filters] = muon.param_groups
    assert len(filters['params']) == 6 and all(p.dim() == 4 for p in filters['params'])
    assert (filters['lr'], filters['momentum'], filters['weight_decay']) == (0.205, 0.655, pytest.approx(decay))
    whiten_bias, norm_biases, head = sgd.param_groups
    assert [id(p) for p in whiten_bias['params']] == [id(model.whiten.bias)]
    assert len(norm_biases['params']) == 6 and [id(p) for p in head['params']] == [id(model.head.weight)]
    assert [group['lr'] for group in sgd.param_groups] == [0.0573, 0.0573, 0.5415]
    for group in sgd.param_groups:  # PyTorch's L2: weight_decay * lr = wd at the peak rate
        assert group['lr'] * group['weight_decay'] == pytest.approx(decay)
        assert group['nesterov'] and group['momentum'] == 0.825 and group['dampening'] == 0 and group['fused']


def test_schedules_at_every_step(hive, tmp_path):
    """The rates of a whole 243-step run (32 batches an epoch, as on CIFAR-10) at every step: the
    whitening bias's falls to 0 over its 7 steps, the others over 243; the bias trains in steps 0-6."""
    data_dir = write_cache(str(tmp_path / 'cifar10'), n_train=64, n_test=16)
    hyp = tiny_hyp(hive, opt__batch_size=2, net__widths={'block1': 4, 'block2': 4, 'block3': 4},
                   opt__train_epochs=7.59)
    rates, bias_trains = [], []

    def record(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.SGD):
            rates.append([group['lr'] for group in optimizer.param_groups])
            bias_trains.append(optimizer.param_groups[0]['params'][0].grad is not None)
        else:
            rates[-1].append(optimizer.param_groups[0]['lr'])
    handle = register_optimizer_step_pre_hook(record)
    torch.manual_seed(0)
    try:
        _, result = hive.train(hyp, *tiny_loaders(hive, data_dir, hyp), device='cpu', verbose=False)
    finally:
        handle.remove()
    assert result['steps'] == len(rates) == 243
    expected = [[0.0573 * max(1 - step / 7, 0), 0.0573 * (1 - step / 243), 0.5415 * (1 - step / 243),
                 0.205 * (1 - step / 243)] for step in range(243)]
    assert rates == [pytest.approx(each) for each in expected]  # every step, so 0, 6, 7 and 242 too
    assert rates[6][0] == pytest.approx(0.0573 / 7) and rates[7][0] == 0 and rates[242][3] == pytest.approx(0.205 / 243)
    assert bias_trains == [True] * 7 + [False] * 236


def test_jitter_ranges_and_one_pair_per_image(hive):
    """y = (x + b) * c with one (b, c) an image: b in +-0.1399, c in 1 +-0.1308, each spread over
    its range; no clamping."""
    torch.manual_seed(0)
    images = torch.randn(4000, 3, 8, 8)
    jittered = hive.batch_jitter(images, 0.1399, 0.1308)
    flat_x, flat_y = images.flatten(1), jittered.flatten(1)
    high, low = flat_x.argmax(1, keepdim=True), flat_x.argmin(1, keepdim=True)  # two pixels far apart
    scale = ((flat_y.gather(1, high) - flat_y.gather(1, low)) / (flat_x.gather(1, high) - flat_x.gather(1, low)))[:, 0]
    shift = flat_y[:, 0] / scale - flat_x[:, 0]
    assert torch.allclose(flat_y, (flat_x + shift[:, None]) * scale[:, None], atol=1e-4)
    assert shift.abs().max() <= 0.1399 + 1e-4 and shift.abs().max() > 0.13
    assert (scale - 1).abs().max() <= 0.1308 + 1e-4 and (scale - 1).abs().max() > 0.12
    assert abs(shift.mean()) < 0.01 and abs(scale.mean() - 1) < 0.01
    assert torch.equal(hive.batch_jitter(images, 0, 0), images)


def test_flips_and_crops_are_uniform(hive, tmp_path):
    """Every image in a batch of 3000 is one of the 25 crops of its reflect-padded self (shifts of
    -2..2 each way), mirrored or not; each crop and each orientation comes up about equally often,
    and every image flips between consecutive epochs."""
    data_dir = write_cache(str(tmp_path / 'cifar10'), n_train=3000, n_test=10)
    loader = hive.CifarLoader(data_dir, True, 3000, {'flip': True, 'translate': 2}, shuffle=False, device='cpu')
    source = nn.functional.pad(loader.normalize(loader.images), (2,) * 4, mode='reflect')
    counts, orientations = torch.zeros(2, 5, 5), []
    for epoch in range(2):
        [(images, _)] = list(loader)
        for flipped in (False, True):
            for top in range(5):
                for left in range(5):
                    view = source[..., top:top + 32, left:left + 32]
                    match = (images == (view.flip(-1) if flipped else view)).flatten(1).all(1)
                    counts[int(flipped), top, left] += match.sum()
                    if match.any():
                        orientations.append((epoch, flipped, match))
    assert counts.sum() == 6000  # each image matched exactly one view, in each epoch
    assert (counts - 6000 / 50).abs().max() < 50  # about 120 each; 50 is over 4 binomial std
    flipped = {epoch: sum(m.long() for e, f, m in orientations if e == epoch and f) for epoch in (0, 1)}
    assert torch.equal(flipped[0] + flipped[1], torch.ones(3000, dtype=torch.long))


class Probe(nn.Module):
    """Logits from a few pixels, so each view gives different logits; images with a larger first
    pixel are more confident."""

    def forward(self, x):
        return torch.cat([8 * x[:, :1, 0, 0], x[:, :, 0, -1], x[:, :, -1, 0], x[:, :, 5, 7]], 1)


def test_selective_tta_goes_to_the_least_confident_quarter(hive, tmp_path):
    data_dir = write_cache(str(tmp_path / 'cifar10'), n_train=10, n_test=200)
    loader = hive.CifarLoader(data_dir, False, 64, device='cpu')
    probe = Probe()
    x = loader.normalize(loader.images)
    plain = probe(x)
    padded = nn.functional.pad(x, (1,) * 4, mode='reflect')
    views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
    six = sum(probe(view) + probe(view.flip(-1)) for view in views) / 6
    least_sure = plain.softmax(1).amax(1).argsort()[:50]
    expected = plain.clone()
    expected[least_sure] = six[least_sure]
    logits = hive.infer(probe, loader, tta_level=2, tta_share=0.25)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert (logits != plain).any(1).sum() == 50  # the others keep their one view
    assert torch.allclose(hive.infer(probe, loader, 2, 1.0), six, atol=1e-5)


def test_whitening_from_the_first_960_images_and_bias_from_default_init(hive, tmp_path, monkeypatch):
    data_dir = write_cache(str(tmp_path / 'cifar10'), n_train=1000, n_test=64)
    hyp = tiny_hyp(hive, net__whiten_images=960, opt__train_epochs=0.1)
    seen = []
    real_init = hive.init_whitening_conv

    def remember(conv, images, eps):
        seen.append((images.clone(), eps, conv.bias.detach().clone()))
        real_init(conv, images, eps)
    monkeypatch.setattr(hive, 'init_whitening_conv', remember)
    train_loader, test_loader = tiny_loaders(hive, data_dir, hyp)
    torch.manual_seed(0)
    hive.train(hyp, train_loader, test_loader, device='cpu', verbose=False)
    [(images, eps, bias)] = seen
    assert torch.equal(images, train_loader.normalize(train_loader.images[:960])) and eps == 5e-4
    assert bias.abs().max() <= 1 / math.sqrt(12) and bias.abs().min() > 0  # PyTorch's init, not zero


def test_batchnorm_momentum_and_blocks(hive):
    model = hive.make_net(hive.hyp['net'])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(m.momentum == pytest.approx(0.4434) and m.eps == 1e-12 for m in norms)
    assert [type(block.activ) for block in (model.block1, model.block2, model.block3)] == [nn.SiLU] * 3
    assert isinstance(model.activ, nn.GELU)
    placed = hive.place_on(model, 'cpu')
    assert all(m.weight.dtype == torch.float32 for m in norms)  # the CPU's precision; fp16 on CUDA
    assert placed is model


def test_compiled_once_and_reused(hive, tiny_data, graphs_compiled):
    """With net.compile_on_cpu, as on CUDA: the training step (forward and loss, one graph each way
    the whitening bias trains), the forward for evaluation and Newton-Schulz (one graph for all six
    filters) compile in the first run; the second run compiles nothing."""
    hyp = tiny_hyp(hive, net__compile_on_cpu=True, net__compile_backend=RECORDING_BACKEND)
    compiled = []
    for seed in (0, 1):
        before = len(graphs_compiled)
        torch.manual_seed(seed)
        hive.train(hyp, *tiny_loaders(hive, tiny_data, hyp), device='cpu', verbose=False)
        compiled.append(graphs_compiled[before:])
    first, second = compiled

    def takes_the_filter_stack(graph):  # Newton-Schulz's input: the six filters, B x rows x cols
        return any(node.op == 'placeholder' and getattr(node.meta.get('example_value'), 'shape', ())[:1] == (6,)
                   and node.meta['example_value'].dim() == 3 for node in graph.graph.nodes)
    assert sum(map(takes_the_filter_stack, first)) == 1 and len(first) >= 4 and second == []
    assert_static_batch_sizes(first)


def test_last_loss_is_kept_before_evaluation_reuses_its_memory(hive, tiny_data, monkeypatch):
    """On CUDA the compiled step's outputs live in CUDA graph memory that the evaluation's graphs
    reuse: the run's train loss and accuracy are copied before the evaluation. Emulated: evaluate
    first overwrites what the last training step returned."""
    returned = []
    real_forward_loss, real_evaluate = hive.forward_loss, hive.evaluate

    def remember(*args):
        returned[:] = real_forward_loss(*args)
        return tuple(returned)

    def overwrite_then_evaluate(*args, **kwargs):
        with torch.no_grad():
            for tensor in returned:
                tensor.fill_(float('nan'))
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(hive, 'forward_loss', remember)
    monkeypatch.setattr(hive, 'evaluate', overwrite_then_evaluate)
    hyp = tiny_hyp(hive)
    torch.manual_seed(0)
    _, result = hive.train(hyp, *tiny_loaders(hive, tiny_data, hyp), device='cpu', verbose=False)
    assert math.isfinite(result['train_loss']) and 0 <= result['train_acc'] <= 1
