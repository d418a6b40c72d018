"""The mutation trial of the suite (issue 14): plausible one-line bugs, each applied alone to a copy of
the repository, and the fast tests (no CIFAR10_DIR) that concern the mutated file run on it. A
mutant that no test fails survives. Not part of CI: the recipes' 187 mutants took 27 minutes on one
core (2026-12-03), study.py's and compare.py's about 50 minutes more (torchrun's tests, which run first).

    python tools/mutation_trial.py [RECIPE | study | compare ...] [--json results.json] [--confirm-survivors]

For each recipe it runs the tests parametrized with it plus its own tests (OWN_TESTS), never those
in NOT_RUN: the test that compares airbench94 with airbench94_compiled (a bug in both copies passes
it) and those of diff bounds, line budgets and line lengths, so a kill must come from a test that
pins the recipe's arithmetic or behaviour itself. study.py and compare.py get their own tests only (the
study tests, then torchrun's; compare's). The tests run on the unmutated file first (a test that
fails anyway would kill every mutant: the file is then skipped, named), and each test that killed a
mutant runs alone on it afterwards (one that fails there too kills nothing, and its mutants count as
survivors). With --confirm-survivors, a survivor is then run against the whole fast suite (minutes
each). Prints one markdown table per recipe.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIRBENCH = ['airbench94', 'airbench94_compiled', 'airbench95', 'airbench96', 'airbench96_faster',
            'airbench94_muon', 'airbench94_hive']
# Not run: the comparison of airbench94 with airbench94_compiled (a bug in both copies passes it), and
# the tests of how a script reads (diff bounds, line budgets, sections), which any edit can trip.
NOT_RUN = ('test_compiled_training_equals_plain_training', 'test_sibling_stays_within_its_diff_bound',
           'test_recipe_within_its_line_budget', 'test_sibling_keeps_the_anatomy', 'test_line_budget_and_style')
OWN_TESTS = {  # tests that import the recipe themselves, beyond those parametrized with its name
    'airbench94': ['tests/test_main.py::test_stopped_record_attempt_process',  # a fresh interpreter's
                   'tests/test_main.py::test_a_process_that_dies_of_its_signal_flushes_its_output_first'],
    'airbench94_compiled': ['tests/test_recipes.py::test_network_is_compiled_once_and_reused',
                            'tests/test_recipes.py::test_warmup_compiles_and_reports_its_time'],
    'airbench96_faster': ['tests/test_faster.py'],
    'airbench94_muon': ['tests/test_muon.py'],
    'airbench94_hive': ['tests/test_hive.py'],
    'cifar94_simple': ['tests/test_simple.py'],
    'study': ['tests/test_study.py', 'tests/test_distributed.py'],  # the quick ones first
    'compare': ['tests/test_compare.py'],
}

# (what the bug is, the line as it is, the line with the bug), tried on every airbench script
# whose source holds the line. Left out as not bugs: Newton-Schulz iterating on the tall side of a
# matrix (the same arithmetic, transposed, only slower: minutes a test on the CPU).
GENERIC = [
    ('final Lookahead copy removed',
     "                    lookahead.update(model, decay=1.0)  # end exactly at the average\n", ''),
    ('whitening eps added after the square root',
     'torch.sqrt(eigenvalues + eps)', '(torch.sqrt(eigenvalues) + eps)'),
    ('label smoothing not passed to the loss',
     "nn.CrossEntropyLoss(label_smoothing=opt['label_smoothing'], reduction='none')",
     "nn.CrossEntropyLoss(reduction='none')"),
    ('cache files renamed into place one by one (not atomically)',
     "                file.write(content.getbuffer())\n",
     "                file.write(content.getbuffer())\n            os.replace(temporaries.pop(path), path)\n"),
    ('files serialized straight to the disk (a full disk becomes a RuntimeError)',
     "                write(content := io.BytesIO())  # whole first: torch.save's own writes make a full disk a "
     "RuntimeError\n                file.write(content.getbuffer())\n",
     "                write(file)\n"),
    ('the download fetched before the folder is found unwritable',
     "            with open(temporaries[path], 'xb') as file:  # the permissions of any new file: a cache can be shared\n"
     "                write(content := io.BytesIO())",
     "            write(content := io.BytesIO())\n            with open(temporaries[path], 'xb') as file:"),
    ('a KeyboardInterrupt of its own crashes the handler',
     "signal.Signals.__members__.get(str(exc), signal.SIGINT)", "signal.Signals[str(exc) or 'SIGINT']"),
    ('Lookahead decay exponent 3 -> 2', '(step / total_steps) ** 3', '(step / total_steps) ** 2'),
    ('Lookahead one step early', "if step % opt['lookahead_every'] == 0:",
     "if (step + 1) % opt['lookahead_every'] == 0:"),
    ('Lookahead average moved by decay, not 1 - decay', 'lerp_(value, 1 - decay)', 'lerp_(value, decay)'),
    ('whitening filters not negated', 'torch.cat([filters, -filters])', 'torch.cat([filters, filters])'),
    ('whitening filters smallest variance first', '.T.flip(0)  # largest variance first', '.T'),
    ('patch second moment not divided by the count', 'eigh(patches.T @ patches / len(patches))',
     'eigh(patches.T @ patches)'),
    ("BatchNorm momentum passed in the paper's convention", 'momentum=1 - momentum)', 'momentum=momentum)'),
    ('BatchNorm scale trains', '        self.weight.requires_grad = False\n', ''),
    ('dirac init on half the input channels', 'nn.init.dirac_(conv.weight[:channels_in])',
     'nn.init.dirac_(conv.weight[:channels_in // 2])'),
    ('BatchNorm biases at the base rate', "bias_lr = lr * hyp_opt['bias_scaler']", 'bias_lr = lr'),
    ('weight decay coupled to the learning rate', 'weight_decay=decay / lr)', 'weight_decay=decay)'),
    ('plain momentum, not Nesterov', "momentum=hyp_opt['momentum'], nesterov=True)",
     "momentum=hyp_opt['momentum'], nesterov=False)"),
    ('scheduler never stepped', '                scheduler.step()\n', ''),
    ('schedule one step ahead', 'lambda s: lr_multiplier(s / total_steps', 'lambda s: lr_multiplier((s + 1) / total_steps'),
    ('schedule interpolates from 0, not from the knot', 'return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)',
     'return y0 + (y1 - y0) * progress / (x1 - x0)'),
    ('TTA: translated views weigh 1/4, not 1/2', 'return 0.5 * mirrored + 0.5 * translated',
     'return 0.75 * mirrored + 0.25 * translated'),
    ('TTA: both translations the same way', 'for v in (padded[..., :-2, :-2], padded[..., 2:, 2:])]',
     'for v in (padded[..., :-2, :-2], padded[..., :-2, :-2])]'),
    ('flip does not alternate between epochs', 'self.flip_parity ^ bool(self.epoch % 2)', 'self.flip_parity'),
    ('translation zero-padded, not reflected', "F.pad(normalized, (pad,) * 4, mode='reflect')",
     'F.pad(normalized, (pad,) * 4)'),
    ('batches never shuffled', '(torch.randperm if self.shuffle else torch.arange)', 'torch.arange'),
    ('inference in training mode (batch statistics)', '    was_training = model.training\n    model.eval()\n',
     '    was_training = model.training\n'),
    ('whitening bias trains one epoch too many', "epoch < opt['whiten_bias_epochs']",
     "epoch <= opt['whiten_bias_epochs']"),
    ('normalized by the mean std of all channels', '((images.to(dtype) - mean) / std)',
     '((images.to(dtype) - mean) / std.mean())'),
    ('steps rounded down', "total_steps = math.ceil(len(train_loader) * opt['train_epochs'])",
     "total_steps = int(len(train_loader) * opt['train_epochs'])"),
    ('loss averaged over the batch, not summed', 'loss = loss_fn(outputs, labels).sum()',
     'loss = loss_fn(outputs, labels).mean()'),
    ('md5 never checked', 'if hashlib.md5(raw).hexdigest() != CIFAR10_MD5:', 'if False:'),
    ('GELU replaced by ReLU', '        self.activ = nn.GELU()\n', '        self.activ = nn.ReLU()\n'),
    ('pooling after the activation', 'x = self.activ(self.norm1(self.pool(self.conv1(x))))',
     'x = self.pool(self.activ(self.norm1(self.conv1(x))))'),
    ('gradients never zeroed', '                optimizer.zero_grad(set_to_none=True)\n', ''),
    ('logits not scaled', "scale=Scale(hyp_net['scaling_factor'])", 'scale=Scale(1.0)'),
    ('a stop reports the runs in memory, not those on disk', "message += f'; {saved} finished run(s)",
     "message += f'; {len(results)} finished run(s)"),
    ('the closing rewrite holds only the runs known to be saved',
     "'interrupted' if interrupted else 'failed'}, results)['n']",
     "'interrupted' if interrupted else 'failed'}, results[:saved])['n']"),
    ('a bug or out of memory leaves the log running', '    except (Exception, KeyboardInterrupt) as exc:',
     '    except (UserError, KeyboardInterrupt) as exc:'),
    ('a signal while a failure is logged escapes', '        stop.held = True  # first, and no call',
     '        pass  # first, and no call'),
    ('a signal while the first unwinds escapes', '    if not stop.held:\n        stop.held = True\n',
     '    if not stop.held:\n        pass\n'),
    ('an inherited SIG_IGN overridden', 'if signal.getsignal(number) is not signal.SIG_IGN}', 'if True}'),
    ('a stopped attempt exits with a status, not dying of its signal', '        if interrupted and argv is None:',
     '        if False:'),
    ('what a stopped attempt printed is lost as it dies', '            sys.stdout.flush(), signal.signal(number,',
     '            signal.signal(number,'),
]

# What the base recipe, airbench94, gets in full; its siblings share these lines, and get this sample
# of them (the five bugs the issue names first, then others), plus their own; a recipe with a dozen
# bugs of its own or more gets only the first five (those of them its source has).
SAMPLE = ['final Lookahead copy removed', 'whitening eps added after the square root',
          'label smoothing not passed to the loss', 'cache files renamed into place one by one (not atomically)',
          'Lookahead decay exponent 3 -> 2', 'Lookahead average moved by decay, not 1 - decay',
          'whitening filters not negated', "BatchNorm momentum passed in the paper's convention",
          'BatchNorm biases at the base rate', 'weight decay coupled to the learning rate', 'scheduler never stepped',
          'TTA: translated views weigh 1/4, not 1/2', 'flip does not alternate between epochs',
          'inference in training mode (batch statistics)', 'whitening bias trains one epoch too many',
          'loss averaged over the batch, not summed', 'gradients never zeroed', 'logits not scaled',
          'pooling after the activation', 'GELU replaced by ReLU']

OWN = {
    'airbench94_compiled': [
        ('a second run reuses the trained weights', '    model.load_state_dict(fresh.state_dict())\n', ''),
        ('the returned model is the one the next run overwrites',
         '    model = copy.deepcopy(model)  # the next run in this process reinitializes', '    pass  #'),
    ],
    'airbench96': [
        ('residual sum left out', 'return self.activ(x + self.norm3(self.conv3(y)))',
         'return self.activ(self.norm3(self.conv3(y)))'),
        ('cutout square one pixel too tall', '(rows >= top) & (rows < top + size)', '(rows >= top) & (rows <= top + size)'),
        ('cutout never applied', "images = batch_cutout(images, self.aug.get('cutout', 0))", 'pass'),
    ],
    'airbench96_faster': [
        ('the filter keeps the easiest examples', 'hardest = losses.detach().topk(keep, sorted=False).indices',
         'hardest = losses.detach().topk(keep, largest=False, sorted=False).indices'),
        ('the proxy learns from the whole batch', '        losses[hardest].sum().backward()\n',
         '        losses.sum().backward()\n'),
        ('the proxy never learns', '        proxy_optimizer.step()\n', ''),
        ("the proxy's schedule never advances", '                proxy_scheduler.step()\n', ''),
        ('residual sum left out', 'return self.activ(x + self.norm3(self.conv3(y))) if self.residual else y',
         'return self.activ(self.norm3(self.conv3(y))) if self.residual else y'),
        ('cutout square one pixel too tall', '(rows >= top) & (rows < top + size)', '(rows >= top) & (rows <= top + size)'),
    ],
    'airbench94_muon': [
        ("Newton-Schulz's a 3.4445 -> 3.4", 'a, b, c = 3.4445, -4.7750, 2.0315', 'a, b, c = 3.4, -4.7750, 2.0315'),
        ("Newton-Schulz's c 2.0315 -> 2.315", 'a, b, c = 3.4445, -4.7750, 2.0315', 'a, b, c = 3.4445, -4.7750, 2.315'),
        ('one Newton-Schulz step fewer', '    for _ in range(steps):\n', '    for _ in range(steps - 1):\n'),
        ('Muon without Nesterov', "direction = weight.grad.add(buffer, alpha=group['momentum'])", 'direction = buffer'),
        ("Muon's buffer does not decay", "state['momentum_buffer'].mul_(group['momentum']).add_(weight.grad)",
         "state['momentum_buffer'].add_(weight.grad)"),
        ('weights renormalized to norm out_channels', 'weight.mul_(math.sqrt(len(weight)) / weight.norm())',
         'weight.mul_(len(weight) / weight.norm())'),
        ('Muon orthogonalizes the transposed reshape', "direction.reshape(len(weight), -1)", "direction.reshape(-1, len(weight))"),
        ('Muon steps uphill', "alpha=-group['lr'])  # casts as it adds", "alpha=group['lr'])  # casts as it adds"),
        ('head not scaled to unit std', '        net.head.weight.div_(net.head.weight.std())', '        pass'),
        ('logits divided by 9, not by the width', "scale=Scale(1 / widths['block3'])", 'scale=Scale(1 / 9)'),
        ("SGD's decay coupled to the rate", "group['weight_decay'] = decay / group['lr']", "group['weight_decay'] = decay"),
        ("whitening bias's rate decays over the run", '[over(whiten_bias_steps)] + 2 * [over(total_steps)]',
         '3 * [over(total_steps)]'),
        ('BatchNorm biases at the head rate', "dict(params=norm_biases, lr=hyp_opt['bias_lr'])",
         "dict(params=norm_biases, lr=hyp_opt['head_lr'])"),
        ('Muon never steps', 'zip((sgd, muon), schedulers)', 'zip((sgd,), schedulers[:1])'),
        ('gradients never zeroed', '                model.zero_grad(set_to_none=True)\n', ''),
    ],
    'airbench94_hive': [
        ("Newton-Schulz's coefficients muon's", 'a, b, c = 3.4576, -4.7391, 2.0843', 'a, b, c = 3.4445, -4.7750, 2.0315'),
        ('Newton-Schulz normalizes the whole stack, not each matrix', 'x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-5)',
         'x = x / (x.norm() + 1e-5)'),
        ('renormalization interval one step late', 'first + (last - first) * self.steps // self.total_steps',
         'first + (last - first) * (self.steps - 1) // self.total_steps'),
        ('renormalization one step later than due', 'if renorm := self.steps - self.last_renorm >= first',
         'if renorm := self.steps - self.last_renorm > first'),
        ('renormalized to sqrt(in_channels)', 'weight.mul_(math.sqrt(len(weight)) / (weight.norm() + 1e-7))',
         'weight.mul_(math.sqrt(weight.shape[1]) / (weight.norm() + 1e-7))'),
        ("Muon's decay not scaled by the rate", "weight.mul_(1 - group['lr'] * group['weight_decay'])",
         "weight.mul_(1 - group['weight_decay'])"),
        ("Muon's decay left out", "                weight.mul_(1 - group['lr'] * group['weight_decay'])\n", ''),
        ('Muon without Nesterov', "direction = weight.grad.add(buffer, alpha=group['momentum'])", 'direction = buffer'),
        ('jitter scales before it shifts', 'return (images + shift * brightness) * (1 + scale * contrast)',
         'return images * (1 + scale * contrast) + shift * brightness'),
        ('jitter drawn per pixel', 'torch.rand(2, len(images), 1, 1, 1,', 'torch.rand(2, *images.shape,'),
        ('jitter only brightens and raises contrast', 'dtype=images.dtype) * 2 - 1)', 'dtype=images.dtype))'),
        ('TTA for the most confident', 'topk(round(tta_share * len(logits)), largest=False)',
         'topk(round(tta_share * len(logits)), largest=True)'),
        ('TTA for every image', 'topk(round(tta_share * len(logits)), largest=False)', 'topk(len(logits), largest=False)'),
        ("TTA with the paper's weights", 'return (mirrored + 2 * translated) / 3', 'return 0.5 * mirrored + 0.5 * translated'),
        ('whitening bias from zero', '    net.whiten.weight.requires_grad = False\n    return net',
         '    net.whiten.weight.requires_grad = False\n    nn.init.zeros_(net.whiten.bias)\n    return net'),
        ('whitening bias trains 6 steps', "max(math.ceil(len(train_loader) * opt['whiten_bias_epochs']), 1)",
         "max(int(len(train_loader) * opt['whiten_bias_epochs']), 1)"),
        ('GELU in the blocks', '        self.activ = nn.SiLU()\n', '        self.activ = nn.GELU()\n'),
        ('loss averaged over the batch', 'return outputs, loss_fn(outputs, labels).sum()',
         'return outputs, loss_fn(outputs, labels).mean()'),
    ],
    'cifar94_simple': [
        ('label smoothing not applied', 'label_smoothing=0.2, ', ''),
        ('loss averaged, not summed', "reduction='sum')", "reduction='mean')"),
        ('Nesterov off', 'momentum=MOMENTUM, nesterov=True', 'momentum=MOMENTUM, nesterov=False'),
        ('no weight decay', 'weight_decay=WEIGHT_DECAY)', 'weight_decay=0)'),
        ('learning rate peaks at 0.75 late', 'min(0.1 + 2.5 * progress, 0.75 * (1 - progress))',
         'min(0.1 + 0.5 * progress, 0.75 * (1 - progress))'),
        ('logits not scaled', 'logits = model.train()(x) / 8', 'logits = model.train()(x)'),
        ('cutout square one pixel larger', 'torch.randint(33 - CUTOUT, (2, n, 1, 1, 1)', 'torch.randint(32 - CUTOUT, (2, n, 1, 1, 1)'),
        ('cutout never applied', "& (cols // CUTOUT == 0), 0)", "& (cols // CUTOUT == 0) & False, 0)"),
        ('flips never happen', 'torch.where(torch.rand(n, 1, 1, device=device) < 0.5, 31 - grid, grid)', 'grid.expand(n, 1, 32)'),
        ('crops from zero padding', "(CROP_PADDING,) * 4, mode='reflect')", '(CROP_PADDING,) * 4)'),
        ('crop offsets reach one pixel too far', 'torch.randint(2 * CROP_PADDING + 1, (2, n, 1, 1)', 'torch.randint(2 * CROP_PADDING + 2, (2, n, 1, 1)'),
        ('no pooling where the width doubles', '[nn.MaxPool2d(2)] * (c_out == 2 * c_in)', '[nn.MaxPool2d(2)] * 0'),
        ('CELU replaced by ReLU', 'nn.CELU(0.075)', 'nn.ReLU()'),
        ('normalized with the std and mean swapped', '((d[\'images\'] - mean) / std)', '((d[\'images\'] - std) / mean)'),
        ('evaluation in training mode', 'model.eval()(x).argmax(1)', 'model.train()(x).argmax(1)'),
        ('md5 never checked', "!= 'c32a1d4ab5d03f1284b67883e8d87530':", "== 'never':"),
        ('gradients never zeroed', '            optimizer.zero_grad(set_to_none=True)\n', ''),
    ],
}

OWN['study'] = [
    ('run seeds ignore the run', "f'{base_seed}:{run}'", "f'{base_seed}'"),
    ('every run seeded with the base seed', '    torch.manual_seed(seed)\n', '    torch.manual_seed(base_seed)\n'),
    ("a run's loader built before its seed",
     '    torch.manual_seed(seed)\n    _, result = recipe.train(study_hyp, make_train_loader(),',
     '    loader = make_train_loader()\n    torch.manual_seed(seed)\n    _, result = recipe.train(study_hyp, loader,'),
    ('every rank trains the first run of each round', 'run, outcome = first_run + ranks.rank, None',
     'run, outcome = first_run, None'),
    ("rank 1's runs never logged", 'for finished in outcomes[1:] if finished', 'for finished in outcomes[2:] if finished'),
    ('each rank keeps its own random seed', 'args.seed)[0]', 'args.seed)[ranks.rank]'),
    ('std divides by n', "stats['std'] = math.sqrt(sum((a - stats['mean']) ** 2 for a in accs) / (n - 1))",
     "stats['std'] = math.sqrt(sum((a - stats['mean']) ** 2 for a in accs) / n)"),
    ("the interval uses the normal's 1.96", "half_width = t_critical(n - 1) * stats['std']",
     "half_width = 1.96 * stats['std']"),
    ("Student's t series of odd df off", 'term * cos2 * 2 * j / (2 * j + 1)', 'term * cos2 * 2 * j / (2 * j - 1)'),
    ('an int override of a float entry rejected', 'float(value) if type(old) is float and type(value) is int else value',
     'value'),
    ('override types never checked', 'if type(node[leaf]) is not type(old) and not same_kind:', 'if False:'),
    ('--set values kept as strings', 'overrides[key.strip()] = ast.literal_eval(text.strip())',
     'overrides[key.strip()] = text.strip()'),
    ('checks skip the leaves under a key', "if key == prefix or key.startswith(prefix + '.'):", 'if key == prefix:'),
    ('translations up to 40 pass', "(lambda v: 0 <= v <= 31, 'between 0 and 31 pixels",
     "(lambda v: 0 <= v <= 40, 'between 0 and 31 pixels"),
    ('a run logged only at the end', '        self.results.extend(results)\n        self.write()\n',
     '        self.results.extend(results)\n'),
    ("a round's runs logged one write each", '            log.add(*others)  # one write',
     '            [log.add(finished) for finished in others]  # one write'),
    ('a stop reports the runs in memory, not those on disk', "{log.saved} finished run(s) kept in {log.dir}', ranks, status)",
     "{len(log.results)} finished run(s) kept in {log.dir}', ranks, status)"),
    ('a run the disk refused is forgotten', '        self.results.extend(results)\n        self.write()\n',
     '        self.results.extend(results)\n        try:\n            self.write()\n        except StudyError:\n'
     '            del self.results[len(self.results) - len(results):]\n            raise\n'),
    ('a signal after the last run marks a complete study interrupted', '    stop.held = True  # every run is done',
     '    pass  # every run is done'),
    ('log files renamed into place one by one (not atomically)',
     "a full disk a RuntimeError\n                file.write(content.getbuffer())\n",
     "a full disk a RuntimeError\n                file.write(content.getbuffer())\n"
     "            os.replace(temporaries.pop(path), path)\n"),
    ('log files serialized straight to the disk (a full disk becomes a RuntimeError)',
     "                write(content := io.BytesIO())  # whole first: torch.save's own writes make a full disk a "
     "RuntimeError\n                file.write(content.getbuffer())\n",
     "                write(file)\n"),
    ('a KeyboardInterrupt of the recipe\'s own crashes the handler',
     'signal.Signals.__members__.get(signal_name, signal.SIGINT)', 'signal.Signals[signal_name]'),
    ('an infinite --set value accepted', '        if not finite(node[leaf]):  # 1e999', '        if False:  # 1e999'),
    ('ranks not checked for one experiment', '    check_one_experiment(ranks.gather(', '    (ranks.gather('),
    ("a rank's data compared with its folder", "items() if key != 'dir'},  # a folder's name", "items()},  # a folder's name"),
    ('a stopped study marked complete', "log.close('interrupted')", "log.close('complete')"),
    ('a finished study left running', "log.close('complete')  # a full disk", "log.close('running')  # a full disk"),
    ('SIGTERM not handled', "        signal.signal(number, stop)  # ignored (a background job's Ctrl-C) stays ignored\n    stop.held",
     "        pass\n    stop.held"),
    ('an inherited SIG_IGN overridden', 'if handler is not signal.SIG_IGN]:', 'if True]:'),
    ('a signal while a failure is logged escapes', '        stop.held = True  # first, and no call',
     '        pass  # first, and no call'),
    ('--help names the keys of the first argument that is not an option',
     "finder.parse_known_args([arg for arg in argv if arg not in ('-h', '--help')])[0].recipe",
     "[arg for arg in argv if not arg.startswith('-')][0]"),
    ('a nan accuracy logged', '            if not math.isfinite(entry[key]):  # nan', '            if False:  # nan'),
    ('a stopped study exits 1', 'status = 128 + signal.Signals.__members__.get(signal_name, signal.SIGINT)',
     'status = 1'),
    ('a second signal can cut the last write', '    if not stop.held:\n        stop.held = True\n',
     '    if not stop.held:\n        pass\n'),
    ("a lost rank gives gloo's traceback", '        except RuntimeError as exc:  # gloo',
     '        except ValueError as exc:  # gloo'),
    ('a lone failing rank ignored', '    if errors:\n        raise StudyFailed',
     '    if len(errors) > 1:\n        raise StudyFailed'),
    ('gather timeout of ten minutes', 'GATHER_TIMEOUT = datetime.timedelta(hours=24)',
     'GATHER_TIMEOUT = datetime.timedelta(minutes=10)'),
    ('results logged as the recipe returned them', '            entry[key] = float(entry[key])',
     '            entry[key] = entry[key]'),
    ('a mistyped --data-dir accepted',
     "if os.path.isfile(data_dir) or (not os.path.isdir(data_dir) and data_dir != 'cifar10'):",
     'if os.path.isfile(data_dir):'),
    ('CUDA asked for without CUDA accepted', "    if device.type == 'cuda' and not torch.cuda.is_available():\n", '    if False:\n'),
    ('an edited copy mistaken for the imported recipe of its name',
     "if os.path.abspath(path) == os.path.abspath(getattr(loaded, '__file__', None) or '.'):", 'if loaded is not None:'),
    ('--no-warmup ignored', "if hasattr(recipe, 'warmup') and not args.no_warmup and own_runs:",
     "if hasattr(recipe, 'warmup') and own_runs:"),
    ("the test data's fingerprint left out", "'test_pixel_sum': int(test_loader.images.sum(dtype=torch.int64))}",
     "'test_pixel_sum': 0}"),
    ('a Ctrl-C while torch loads gives a traceback', 'except KeyboardInterrupt:  # Ctrl-C in the second or two',
     'except ImportError:  # Ctrl-C in the second or two'),
    ('a stopped study exits with a status, not of its signal (a shell loop goes on)',
     '    if status - 128 in (signal.SIGINT, signal.SIGTERM):\n', '    if False:\n'),
]
OWN['compare'] = [
    ("Welch's degrees of freedom pooled", "df = (va + vb) ** 2 / (va ** 2 / (a['n'] - 1) + vb ** 2 / (b['n'] - 1))",
     "df = a['n'] + b['n'] - 2"),
    ('difference of means the wrong way round', "difference = b['mean'] - a['mean']", "difference = a['mean'] - b['mean']"),
    ('p-value one-sided', "'p': t_two_sided_p(difference / standard_error, df)}",
     "'p': t_two_sided_p(difference / standard_error, df) / 2}"),
    ('std divides by n', 'std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1))',
     'std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n)'),
    ("the incomplete beta's mirror not subtracted from 1", 'return 1 - incomplete_beta(b, a, 1 - x)',
     'return incomplete_beta(b, a, 1 - x)'),
    ("a study's interval with n degrees of freedom", 'half_width = t_critical(n - 1) * std / math.sqrt(n)',
     'half_width = t_critical(n) * std / math.sqrt(n)'),
    ('a different setup not noted', "for part in ('data', 'setup'):", "for part in ('data',):"),
    ('a different recipe source not noted', "        found.append('recipe source')\n", '        pass\n'),
    ('a hyp key only one study has not noted', "if a.get(key, '?') != b.get(key, '?')",
     'if key in a and key in b and a[key] != b[key]'),
    ('the data folder counted as a data difference', "if key != 'dir'}", 'if True}'),
    ('a study of one run aborts the comparison', "min(study['n'] for study in studies) < 2",
     "min(study['n'] for study in studies) < 1"),
    ('time ratio inverted', 'second["mean_time"] / first["mean_time"]', 'first["mean_time"] / second["mean_time"]'),
    ('any format accepted', 'if found != LOG_FORMAT:', 'if found is None:'),
    ('runs without accuracies accepted',
     "isinstance(run, dict) and isinstance(run.get('tta_val_acc'), (int, float))", 'isinstance(run, dict)'),
    ('no arguments exits 0', 'return 0 if argv else 2', 'return 0'),
]


def mutants_of(name):
    with open(os.path.join(ROOT, f'{name}.py'), encoding='utf-8') as file:
        source = file.read()
    generic = [m for m in GENERIC if name in AIRBENCH and m[1] in source]
    if name != 'airbench94':
        generic = [m for m in generic if m[0] in SAMPLE]
    if len(OWN.get(name, [])) >= 12:  # bugs enough of its own: only the generic ones the issue names first
        generic = [m for m in generic if m[0] in SAMPLE[:5]]
    chosen = generic + OWN.get(name, [])
    if only := os.environ.get('MUTANTS_ONLY'):  # 'a|b': the mutants whose description holds a or b
        chosen = [m for m in chosen if any(part in m[0] for part in only.split('|'))]
    for label, old, _ in chosen:
        if source.count(old) != 1:
            sys.exit(f'{name}.py holds the line of mutant "{label}" {source.count(old)} times, not once')
    return source, chosen


def pytest_command(*args):
    return [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-ra', *args]


def selected_tests(work, name):
    listed = subprocess.run(pytest_command('--collect-only', '-o', 'addopts='), cwd=work,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    ids = [i for i in listed if '::' in i and not any(test in i for test in NOT_RUN)]
    own = OWN_TESTS.get(name, [])
    ours = [i for i in ids if name in re.split(r'[\[\]-]', i.partition('[')[2]) or any(i.startswith(o) for o in own)]

    def order(test):  # most mutants die early: arithmetic tests, then the file's own (OWN_TESTS's order)
        return (not test.startswith('tests/test_arithmetic.py'),
                next((n for n, o in enumerate(own) if test.startswith(o)), len(own)))
    return sorted(ours, key=order)


def first_failure(work, tests):
    """The first test that fails on the mutated copy (None when all pass). One process, in the suite's order (the
    tests that pin arithmetic early), stopping at the first failure: a core for the trial, a core for the rest."""
    try:
        run = subprocess.run(pytest_command('-x', '-n', '0', *tests), cwd=work, capture_output=True, text=True,
                             timeout=1200)
    except subprocess.TimeoutExpired:  # a mutant that hangs a test would hang CI too: caught, though not by name
        return '(the tests ran past 20 minutes)'
    # A node id may hold spaces (a parametrized message); pytest ends it with ' - ' and the reason, if any.
    failed = re.findall(r'^(?:FAILED|ERROR) (.+?)(?: - .*)?$', run.stdout, re.MULTILINE)
    if run.returncode == 0:
        return None
    # A test that sends itself a signal, on a mutant whose handler lets it through, stops pytest itself.
    if not failed and (stopped := re.search(r'^(\S+?\.py:\d+): KeyboardInterrupt\b', run.stdout, re.MULTILINE)):
        return f'{os.path.relpath(stopped.group(1), work)} (a KeyboardInterrupt stopped pytest)'
    if not failed:  # no test failed, yet pytest did not succeed: it could not run them
        sys.exit(f'pytest exited {run.returncode} in {work}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}')
    return failed[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('recipes', nargs='*', default=AIRBENCH + ['cifar94_simple', 'study', 'compare'])
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--confirm-survivors', action='store_true', help='run the whole fast suite on each survivor')
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        work = os.path.join(work, 'repo')
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns('.git', 'logs', '__pycache__', 'cifar10'))
        env_note = 'CIFAR10_DIR is set: slow tests run too' if os.environ.get('CIFAR10_DIR') else None
        if env_note:
            print(env_note, file=sys.stderr)
        for name in args.recipes:
            source, mutants = mutants_of(name)
            tests, path, rows = selected_tests(work, name), os.path.join(work, f'{name}.py'), []
            if (failing := first_failure(work, tests)) is not None:  # unmutated: it would kill every mutant
                print(f'{name}: {failing} fails without any mutant; fix it, or what it needs of its '
                      f'environment, first: no mutant of {name} was tried', file=sys.stderr, flush=True)
                results[name] = {'fails_unmutated': failing}
                continue
            for label, old, new in mutants:
                with open(path, 'w', encoding='utf-8') as file:
                    file.write(source.replace(old, new))
                try:
                    killer = first_failure(work, tests)
                    if killer is None and args.confirm_survivors:
                        killer = first_failure(work, [])
                finally:
                    with open(path, 'w', encoding='utf-8') as file:
                        file.write(source)
                rows.append({'mutant': label, 'killed_by': killer})
                print(f'{name}: {label}: {killer or "SURVIVED"}', file=sys.stderr, flush=True)
            # A killer that fails without any mutant (a flaky test, one this environment breaks) kills nothing.
            for killer in sorted({row['killed_by'] for row in rows if '::' in (row['killed_by'] or '')}):
                if first_failure(work, [killer]) is not None:
                    print(f'{name}: {killer} fails unmutated too: its kills count as survivors', file=sys.stderr)
                    for row in rows:
                        if row['killed_by'] == killer:
                            row['killed_by'], row['note'] = None, f'{killer} fails without the mutant too'
            results[name] = rows
            killed = sum(row['killed_by'] is not None for row in rows)
            print(f'\n### {name}: {killed} of {len(rows)} killed\n\n| mutant | killed by |\n| --- | --- |')
            for row in rows:
                note = f" ({row['note']})" if 'note' in row else ''
                print(f"| {row['mutant']} | {row['killed_by'] or '**survived**'}{note} |")
            sys.stdout.flush()
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(results, file, indent=2)


if __name__ == '__main__':
    main()
