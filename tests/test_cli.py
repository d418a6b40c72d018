"""The command line: --set, the study and its log, statistics, and every failure's one-line message."""
import copy
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, assert_one_line, failed_study, run_main, tiny_set_args

SEEDED = ('--seed', '7', '--set', 'opt.label_smoothing=0.1')


def study_args(recipe, data_dir, log_dir, *extra, device='cpu'):
    """Arguments of a study of the recipe at test size."""
    return ['--data-dir', data_dir, '--log-dir', str(log_dir), '--device', device,
            *tiny_set_args(recipe), *extra]


def run_script(recipe, *args, stdout=subprocess.PIPE):
    """The recipe started as a process of its own, its stderr (and stdout) piped as text. It gets
    the default SIGINT action even where this process ignores SIGINT, as a background job does."""
    command = [sys.executable, os.path.join(ROOT, f'{recipe.__name__}.py'), *args]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def only_log(recipe, log_dir):
    [folder] = os.listdir(os.path.join(log_dir, recipe.__name__))
    return os.path.join(log_dir, recipe.__name__, folder)


def read_summary(folder):
    with open(os.path.join(folder, 'summary.json')) as file:
        return json.load(file)


@pytest.fixture
def study(recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """A complete two-run study through main(), on tiny data on the CPU."""
    monkeypatch.setattr(recipe.TABLE, 'header_printed', False)  # as in a fresh process
    args = study_args(recipe, tiny_data, tmp_path, '--runs', '2', *SEEDED)
    status, out, err = run_main(recipe, capsys, *args)
    return status, out, err, only_log(recipe, tmp_path)


def test_study_prints_table_and_statistics(recipe, study):
    status, out, err, _ = study
    assert status == 0 and err == ''
    warmups = out.count('warm-up run on random labels')  # CUDA only, except where it compiles
    assert out.count(' eval |') == 2 + warmups and out.count('run | epoch') == 1
    assert 'mean TTA accuracy' in out and '95% CI' in out and 'mean time' in out


def test_study_log_contents(recipe, study):
    *_, folder = study
    summary = read_summary(folder)
    assert summary['format'] == recipe.LOG_FORMAT and summary['status'] == 'complete'
    assert summary['script'] == f'{recipe.__name__}.py' and summary['n'] == 2
    assert summary['hyp']['opt']['label_smoothing'] == 0.1 and summary['hyp']['opt']['batch_size'] == 32
    assert summary['seed'] == 7
    assert [run['seed'] for run in summary['runs']] == [recipe.run_seed(7, i) for i in range(2)]
    accs = [run['tta_val_acc'] for run in summary['runs']]
    assert summary['mean'] == pytest.approx(sum(accs) / 2)
    assert summary['std'] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert summary['torch'] == torch.__version__ and summary['device'] == 'cpu'
    assert '--runs 2' in summary['command'] and 'code' not in summary
    log = torch.load(os.path.join(folder, 'log.pt'), weights_only=True)
    with open(recipe.__file__) as file:
        assert log['code'] == file.read()
    assert torch.equal(log['accs'], torch.tensor(accs, dtype=torch.float64))
    assert not [name for name in os.listdir(folder) if name.endswith('.tmp')]


def test_same_seed_same_study(recipe, study, tiny_data, tmp_path, capsys):
    *_, folder = study
    again = tmp_path / 'again'
    run_main(recipe, capsys, *study_args(recipe, tiny_data, again, '--runs', '1', *SEEDED))
    first, repeat = read_summary(folder)['runs'][0], read_summary(only_log(recipe, again))['runs'][0]
    assert first['seed'] == repeat['seed'] and first['train_loss'] == repeat['train_loss']
    assert first['tta_val_acc'] == repeat['tta_val_acc']


def test_ctrl_c_keeps_finished_runs(recipe, tiny_data, tmp_path):
    """A real SIGINT to the script mid-study: status 130, one line naming the log, runs kept."""
    args = study_args(recipe, tiny_data, tmp_path, '--runs', '500')
    process = run_script(recipe, *args, stdout=subprocess.DEVNULL)

    def finished_runs():
        summaries = glob.glob(os.path.join(tmp_path, recipe.__name__, '*', 'summary.json'))
        return read_summary(os.path.dirname(summaries[0]))['n'] if summaries else 0
    try:
        deadline = time.monotonic() + 300
        while finished_runs() < 1 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert finished_runs() >= 1 and process.poll() is None, 'no run finished in time to interrupt'
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()  # a study of 500 runs must not outlive a failed test
    folder = only_log(recipe, tmp_path)
    summary = read_summary(folder)
    assert process.returncode == 130
    assert_one_line(err)
    assert folder in err and f'{summary["n"]} finished run(s)' in err
    assert summary['status'] == 'interrupted' and 1 <= summary['n'] == len(summary['runs']) < 500


@pytest.mark.gpu
def test_cuda_study_warms_up_first(recipe, tiny_data, tmp_path, capsys):
    args = study_args(recipe, tiny_data, tmp_path, '--runs', '1', device='cuda')
    status, out, _ = run_main(recipe, capsys, *args)
    assert status == 0 and 'warm-up run on random labels' in out and out.count(' eval |') == 2
    assert read_summary(only_log(recipe, tmp_path))['n'] == 1
    status, out, _ = run_main(recipe, capsys, *study_args(recipe, tiny_data, tmp_path / 'no', '--runs', '1',
                                                          '--no-warmup', device='cuda'))
    assert status == 0 and 'warm-up' not in out and out.count(' eval |') == 1


def test_set_overrides(recipe):
    parsed = recipe.parse_overrides(['opt.train_epochs=10', 'aug.flip=False', "net.widths={'block1': 96}",
                                     'opt.lr_knots=((0, 0.2), (0.1, 1), (1, 0))'])
    before = copy.deepcopy(recipe.hyp)
    new = recipe.override_hyp(recipe.hyp, parsed)
    assert new['opt']['train_epochs'] == 10.0 and isinstance(new['opt']['train_epochs'], float)
    assert new['aug']['flip'] is False and new['net']['widths']['block1'] == 96
    assert new['net']['widths']['block2'] == recipe.hyp['net']['widths']['block2']
    assert recipe.lr_multiplier(0.1, new['opt']['lr_knots']) == pytest.approx(1)
    assert recipe.hyp == before  # the module's hyp is untouched


@pytest.mark.parametrize('overrides, message', [
    ({'opt.learning_rate': 1.0}, 'unknown hyp key'),
    ({'net.widths.block4': 8}, 'unknown hyp key'),
    ({'opt.batch_size': 512.5}, 'opt.batch_size must be of type int'),
    ({'aug.flip': 'yes'}, 'aug.flip must be of type bool'),
])
def test_bad_overrides(recipe, overrides, message):
    with pytest.raises(recipe.UserError, match=message):
        recipe.override_hyp(recipe.hyp, overrides)


def test_unknown_key_lists_valid_ones(recipe):
    with pytest.raises(recipe.UserError) as error:
        recipe.override_hyp(recipe.hyp, {'opt.nope': 1})
    assert 'opt.batch_size' in str(error.value) and 'net.widths.block1' in str(error.value)


@pytest.mark.parametrize('args, message', [
    (['--set', 'opt.momentum'], '--set expects KEY=VALUE'),
    (['--set', 'opt.momentum=1.5'], 'opt.momentum must be in [0, 1)'),
    (['--set', 'net.tta_level=3'], 'net.tta_level must be 0, 1 or 2'),
    (['--set', 'opt.momentumm=1'], 'unknown hyp key'),
    (['--set', 'opt.lr_knots=[1, 2]'], 'opt.lr_knots must be (fraction, multiplier) pairs'),
    (['--set', 'opt.momentum=fast'], "opt.momentum must be of type float"),
    (['--runs', '0'], '--runs must be at least 1'),
    (['--runs', 'many'], "invalid int value: 'many'"),
    (['--device', 'tpu'], "unknown device 'tpu'"),
])
def test_bad_arguments_fail_in_one_line(recipe, tiny_data, tmp_path, capsys, args, message):
    status, err = failed_study(recipe, capsys, tiny_data, tmp_path, *args)
    assert status in (1, 2) and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda(recipe, tiny_data, tmp_path, capsys):
    status, err = failed_study(recipe, capsys, tiny_data, tmp_path, '--device', 'cuda')
    assert status == 1 and 'sees no CUDA GPU' in err and '--device cpu' in err
    assert os.listdir(tmp_path) == []


def test_missing_data_offline(recipe, tmp_path, capsys, offline):
    status, _, err = run_main(recipe, capsys, '--data-dir', str(tmp_path / 'none'), '--device', 'cpu',
                              '--log-dir', str(tmp_path / 'logs'))
    progress, error = err.split('\n', 1)  # a 'downloading ...' note, then the error
    assert status == 1 and progress.startswith('downloading')
    assert_one_line(error)
    assert offline in error and str(tmp_path / 'none') in error


def test_damaged_cache_through_main(recipe, tiny_data, tmp_path, capsys):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    (data_dir / 'train.pt').write_bytes(b'broken')
    os.symlink(os.path.join(tiny_data, 'test.pt'), data_dir / 'test.pt')
    status, _, err = run_main(recipe, capsys, '--data-dir', str(data_dir), '--device', 'cpu',
                              '--log-dir', str(tmp_path / 'logs'))
    assert status == 1 and str(data_dir / 'train.pt') in err
    assert_one_line(err)
    assert not os.path.exists(tmp_path / 'logs')


def test_help_explains_every_option(recipe, capsys):
    status, out, _ = run_main(recipe, capsys, '--help')
    assert status == 0
    for option in ('--runs', '--data-dir', '--device', '--log-dir', '--seed', '--no-warmup', '--set'):
        assert option in out
    assert 'CIFAR10_DIR' in out and 'KEY=VALUE' in out


def test_script_process_exit_status_and_stderr(recipe, tmp_path):
    """The real process, not main() in-process: a non-zero status and one line, no traceback."""
    out, err = run_script(recipe, '--data-dir', str(tmp_path), '--set', 'opt.nope=1').communicate(timeout=120)
    assert out == '' and err.startswith(f'{recipe.__name__}.py: error: unknown hyp key')
    assert_one_line(err)


def test_import_has_no_side_effects(recipe, tmp_path):
    """Importing reads no argv, loads no data, prints nothing; and run seeds, which must be the same
    in every process that runs part of a study, come out as in this one."""
    code = (f'import sys; sys.argv = ["x", "--runs", "0"]; import {recipe.__name__} as recipe; '
            f'sys.stderr.write(str(recipe.run_seed(3, 5)))')
    path = os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')])
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': path})
    assert done.returncode == 0 and done.stdout == '' and os.listdir(tmp_path) == []
    assert done.stderr.endswith(str(recipe.run_seed(3, 5)))


def test_student_t_critical_values(recipe):
    # Reference values from any table of Student's t (two-sided 95%).
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (24, 2.0639), (999, 1.9623)]:
        assert recipe.t_critical(df) == pytest.approx(t, abs=1e-4)


def test_summary_statistics(recipe):
    results = [{'tta_val_acc': a, 'val_acc': a - 0.01, 'time_seconds': t}
               for a, t in [(0.93, 3.0), (0.94, 4.0), (0.95, 5.0)]]
    stats = recipe.summarize(results)
    assert stats['n'] == 3 and stats['mean'] == pytest.approx(0.94)
    assert stats['std'] == pytest.approx(0.01) and stats['mean_time_seconds'] == pytest.approx(4.0)
    half_width = 4.3027 * 0.01 / math.sqrt(3)
    assert stats['ci95'] == pytest.approx([0.94 - half_width, 0.94 + half_width], abs=1e-6)
    single = recipe.summarize(results[:1])
    assert single['std'] is None and single['ci95'] is None and single['mean'] == 0.93


def test_run_seeds_are_distinct(recipe):
    seeds = [recipe.run_seed(base, i) for base in (0, 1) for i in range(100)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2 ** 63 for s in seeds)
