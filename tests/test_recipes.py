"""What each sibling adds to the script it derives from: diff bounds, line budgets, compilation.
The records since the paper have their own test files."""
import difflib
import importlib
import os
import re

import pytest
import torch

import study
from conftest import (RECIPES, RECORDING_BACKEND, ROOT, assert_static_batch_sizes, failed_study, run_main, study_args,
                      tiny_hyp, tiny_loaders)

SIBLINGS = [name for name, facts in RECIPES.items() if 'diff_bound' in facts]


def diff_base(name):
    """The script a sibling is read against (`diff BASE.py NAME.py`): airbench94 unless RECIPES says."""
    return RECIPES[name].get('diff_base', 'airbench94')


def source_lines(name):
    with open(os.path.join(ROOT, f'{name}.py'), encoding='utf-8') as file:
        return file.read().splitlines()


def changed_lines(old, new):
    """What `diff old new | grep -c '^[<>]'` counts: lines removed plus lines added."""
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return sum(max(i2 - i1, 0) + max(j2 - j1, 0)
               for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != 'equal')


def test_changed_lines_counts_like_diff():
    assert changed_lines(['a', 'b', 'c'], ['a', 'x', 'c', 'd']) == 3  # b -> x (2), d added (1)
    assert changed_lines(['a'], ['a']) == 0


@pytest.mark.parametrize('name', SIBLINGS)
def test_sibling_stays_within_its_diff_bound(name):
    """`diff <base>.py <sibling>.py` must read as the recipe change and nothing else."""
    changed = changed_lines(source_lines(diff_base(name)), source_lines(name))
    assert changed <= RECIPES[name]['diff_bound'], \
        f'{name}.py differs from {diff_base(name)}.py in {changed} lines; ' \
        f'its bound is {RECIPES[name]["diff_bound"]}'


AIRBENCH = [name for name in RECIPES if name.startswith('airbench')]
# Lines a recipe may have: DESIGN.md's 600 (the paper's scripts have 450-711). muon adds its
# optimizer to airbench94_compiled (588 lines), faster its data filter and the compilation cache to
# airbench96 (577), and hive its jitter, selective TTA and batched Muon to muon (within 220 changed
# lines); no cut found left them readable within 600: their budgets hold them at their present
# length, so that a line more has to be argued for here. Argued so far: 3 lines in every recipe's
# main (2026-12-02) so that an unforeseen error (out of memory, a bug in an edited copy) marks the
# log failed, as study.py does, instead of leaving it running. 2026-12-03: 5 lines in every main, so
# that signals after the first do nothing while the log is marked (Ctrl-C pressed twice), and an
# inherited SIG_IGN is kept, paid for by shorter docstrings and 2000 inlined for TEST_BATCH_SIZE
# (budgets down by 1, 3 and 1). 2026-12-03, later: 1 line in every atomic_write, which serializes a
# file in memory before writing it, so that a full disk is its one line (torch.save's own writes
# turn the ENOSPC into a RuntimeError, which left a traceback and a log marked running).
# 2026-12-04: 2 lines in every main, so that a record attempt stopped by a signal dies of it, as
# study.py does, and a shell's loop of attempts stops at a Ctrl-C (3 more, less 1 from installing
# the handlers with signal.signal's return value).
LINE_BUDGET = {'airbench94_muon': 637, 'airbench96_faster': 654, 'airbench94_hive': 664}


@pytest.mark.parametrize('name', AIRBENCH)
def test_recipe_within_its_line_budget_and_free_of_study_machinery(name):
    lines, budget = source_lines(name), LINE_BUDGET.get(name, 600)
    assert len(lines) <= budget, f'{name}.py has {len(lines)} lines; the budget is {budget}'
    text = '\n'.join(lines)
    for machinery in ('torch.distributed', 'override_hyp', 'RANK', 't_critical', '--set'):
        assert machinery not in text, f'{name}.py holds {machinery}, which belongs in study.py'
    assert not re.findall(r'^(?:import|from) \S*(?:airbench|study|compare)', text, re.MULTILINE)


@pytest.mark.parametrize('name', SIBLINGS)
def test_sibling_keeps_the_anatomy(name):
    """Same sections in the same order, and a docstring that lists the changes."""
    def sections(lines):
        return [line.strip('# ') for line in lines if re.fullmatch(r'#\s+[A-Z][\w ]+[a-z]\s+#', line)]
    assert sections(source_lines(name)) == sections(source_lines('airbench94'))
    assert len(sections(source_lines('airbench94'))) >= 8
    docstring = importlib.import_module(name).__doc__
    changes = docstring.split(f'Changes relative to {diff_base(name)}\n')[1].split('\n\n')[0]
    assert changes.strip() and 'None' not in changes


#############################################
#       airbench94_compiled: compilation    #
#############################################

@pytest.fixture(scope='module')
def compiled():
    return importlib.import_module('airbench94_compiled')


def train_tiny_compiled(recipe, data_dir, seed, **overrides):
    hyp = tiny_hyp(recipe, opt__train_epochs=4, opt__whiten_bias_epochs=2, **overrides)
    torch.manual_seed(seed)
    return recipe.train(hyp, *tiny_loaders(recipe, data_dir, hyp), device='cpu')


def test_compiled_training_equals_plain_training(compiled, tiny_data):
    """The same training, mathematically, through both variants (the swap included)."""
    plain_model, plain = train_tiny_compiled(importlib.import_module('airbench94'), tiny_data, seed=3)
    compiled_model, result = train_tiny_compiled(compiled, tiny_data, seed=3)
    assert result['steps'] == plain['steps']
    assert result['tta_val_acc'] == pytest.approx(plain['tta_val_acc'], abs=0.01)
    assert result['train_loss'] == pytest.approx(plain['train_loss'], rel=1e-4)
    for (name, a), b in zip(plain_model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_network_is_compiled_once_and_reused(compiled, tiny_data, graphs_compiled):
    widths = {'block1': 12, 'block2': 16, 'block3': 16}  # an architecture no other test compiles
    before = len(graphs_compiled)
    first_model, first = train_tiny_compiled(compiled, tiny_data, seed=0, net__widths=widths,
                                             net__compile_backend=RECORDING_BACKEND)
    compilations = len(graphs_compiled)
    # Both variants in training, and evaluation: at least three graphs.
    assert compilations >= 3
    assert_static_batch_sizes(graphs_compiled[before:])
    second_model, second = train_tiny_compiled(compiled, tiny_data, seed=1, net__widths=widths,
                                               net__compile_backend=RECORDING_BACKEND)
    assert len(graphs_compiled) == compilations  # the second run compiled nothing
    assert first_model is not second_model and first['train_loss'] != second['train_loss']
    assert not torch.equal(first_model.head.weight, second_model.head.weight)
    assert second_model.whiten.bias.abs().sum() > 0  # reinitialized as trainable: it trained again


@pytest.mark.parametrize('setting, message', [
    ('net.compile_backend=nope', "net.compile_backend must be one of torch.compile's backends (aot_eager"),
    ('net.compile_mode=fast', "net.compile_mode must be one of 'default'"),
])
def test_bad_compile_settings(compiled, tiny_data, tmp_path, capsys, setting, message):
    status, err = failed_study(compiled, capsys, tiny_data, tmp_path, '--set', setting)
    assert status == 1 and message in err


def test_warmup_compiles_and_reports_its_time(compiled, tiny_data, tmp_path, capsys):
    def study_output(log_dir, *extra):
        status, out, _ = run_main(study, capsys, *study_args(compiled, tiny_data, log_dir, '--runs', '1', *extra))
        assert status == 0
        return out
    out = study_output(tmp_path, '--set', 'opt.train_epochs=5', '--set', 'opt.whiten_bias_epochs=1')
    warmup, runs = out.split('compiled in ')
    assert 'warm-up run on random labels' in warmup
    assert re.match(r'\d+\.\d s', runs)
    # The warm-up trains just long enough to reach the frozen-bias variant: 2 epochs, not 5.
    assert re.findall(r'\|\s+warm-up \|\s+(\d+) \|', warmup) == ['1', '2']
    assert runs.count(' eval |') == 1
    out = study_output(tmp_path / 'no', '--no-warmup')
    assert 'compiled in' not in out and 'warm-up' not in out
