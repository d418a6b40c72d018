"""study.py, once: the command line, --set, seeds, the log, statistics, recipes by path, and every
failure's one-line message (torchrun: test_distributed.py)."""
import errno
import glob
import importlib
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import study
from conftest import (RECIPES, ROOT, assert_one_line, assert_shareable, assert_stopped, both_at_once, disk_filling,
                      failed_study, only_log, read_summary, run_main, sigint_handler, signal_after_first_run,
                      sigterm_as_the_ctrl_c_unwinds, study_args, tiny_overrides, tiny_set_args, train_calling)

SEEDED = ('--seed', '7', '--set', 'opt.label_smoothing = 0.1')  # spaces: the logged command must quote them


@pytest.fixture
def airbench94():
    return importlib.import_module('airbench94')


@pytest.fixture
def two_runs(airbench94, tiny_data, tmp_path, capsys):
    """A complete two-run study of airbench94 through study.main, on tiny data on the CPU."""
    status, out, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '2', *SEEDED))
    return status, out, err, only_log(tmp_path, 'airbench94')


def run_study_process(*args, stdout=subprocess.PIPE, script=os.path.join(ROOT, 'study.py')):
    """study.py as a process of its own, its stderr (and stdout) piped as text. It gets the default
    SIGINT action even where this process ignores SIGINT, as a background job does."""
    return subprocess.Popen([sys.executable, script, *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_study_prints_table_and_statistics(two_runs):
    status, out, err, _ = two_runs
    assert status == 0 and err == ''
    assert out.count(' eval |') == 2 and out.count('run | epoch') == 1
    assert 'airbench94: 2 runs, mean TTA accuracy' in out and '95% CI' in out and 'mean time' in out


@pytest.mark.parametrize('name', list(RECIPES))
def test_study_runs_every_recipe(name, tiny_data, tmp_path, capsys):
    recipe = importlib.import_module(name)
    status, out, err = run_main(study, capsys, *study_args(recipe, tiny_data, tmp_path, '--runs', '1'))
    assert status == 0 and err == ''
    assert f'{name}: 1 run, mean TTA accuracy' in out  # one run: 'run', not 'runs'
    assert read_summary(only_log(tmp_path, name))['n'] == 1


def test_ctrl_c_stops_a_shell_loop_of_studies(airbench94, tiny_data, tmp_path):
    """A sweep as a shell script runs it, stopped by Ctrl-C (to the whole foreground process group, as
    a terminal sends it): the study ends as ever, and so does the loop (bash goes on after a command
    that exited with a status, and stops after one killed by the signal)."""
    command = shlex.join([sys.executable, os.path.join(ROOT, 'study.py'),
                          *study_args(airbench94, tiny_data, tmp_path, '--runs', '500')])
    process = subprocess.Popen(['bash', '-c', f'for lr in 1 2; do {command} > /dev/null; echo next study >&2; done'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = signal_after_first_run(process, tmp_path, 'airbench94', signal.SIGINT, group=True)
    assert 'study.py: interrupted (SIGINT); ' in err and 'next study' not in err
    assert len(os.listdir(tmp_path / 'airbench94')) == 1  # no second study began


def test_study_log_contents(airbench94, two_runs):
    *_, folder = two_runs
    summary = read_summary(folder)
    assert summary['format'] == study.LOG_FORMAT and summary['status'] == 'complete'
    assert summary['script'] == 'airbench94.py' and summary['n'] == 2
    assert summary['recipe_path'] == os.path.join(ROOT, 'airbench94.py')
    assert summary['hyp']['opt']['label_smoothing'] == 0.1 and summary['hyp']['opt']['batch_size'] == 32
    assert summary['seed'] == 7
    assert [run['seed'] for run in summary['runs']] == [study.run_seed(7, i) for i in range(2)]
    accs = [run['tta_val_acc'] for run in summary['runs']]
    assert summary['mean'] == pytest.approx(sum(accs) / 2)
    assert summary['std'] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert summary['torch'] == torch.__version__ and summary['device'] == 'cpu'
    assert summary['data']['train_images'] == 256 and summary['data']['test_images'] == 128
    for split, train in (('train', True), ('test', False)):  # the sums tell two data sets of one size apart
        images = airbench94.load_cifar10(summary['data']['dir'], train)['images']
        assert summary['data'][f'{split}_pixel_sum'] == int(images.sum(dtype=torch.int64))
    assert shlex.split(summary['command']) == ['study.py', *summary['argv']] and 'code' not in summary
    log = torch.load(os.path.join(folder, 'log.pt'), weights_only=True)
    with open(airbench94.__file__) as file:
        assert log['code'] == file.read()
    assert torch.equal(log['accs'], torch.tensor(accs, dtype=torch.float64))
    assert {key: log[key] for key in summary if key != 'hyp'} == {k: v for k, v in summary.items() if k != 'hyp'}
    assert not [name for name in os.listdir(folder) if name.endswith('.tmp')]
    assert_shareable(os.path.join(folder, 'log.pt'), os.path.join(folder, 'summary.json'))


def test_same_seed_same_study(airbench94, two_runs, tiny_data, tmp_path, capsys):
    *_, folder = two_runs
    again = tmp_path / 'again'
    run_main(study, capsys, *study_args(airbench94, tiny_data, again, '--runs', '1', *SEEDED))
    first, repeat = read_summary(folder)['runs'][0], read_summary(only_log(again, 'airbench94'))['runs'][0]
    assert first['seed'] == repeat['seed'] and first['train_loss'] == repeat['train_loss']
    assert first['tta_val_acc'] == repeat['tta_val_acc']


@pytest.mark.parametrize('signal_number, name', [(signal.SIGINT, 'SIGINT'), (signal.SIGTERM, 'SIGTERM')])
def test_stopped_study_keeps_finished_runs(airbench94, tiny_data, tmp_path, signal_number, name):
    """A real Ctrl-C or SIGTERM (a scheduler, timeout, kill) mid-study: one line naming the log,
    the finished runs kept, the log marked interrupted."""
    process = run_study_process(*study_args(airbench94, tiny_data, tmp_path, '--runs', '500'),
                                stdout=subprocess.DEVNULL)
    err = signal_after_first_run(process, tmp_path, 'airbench94', signal_number)
    folder = only_log(tmp_path, 'airbench94')
    summary = read_summary(folder)
    assert process.returncode == -signal_number  # killed by it, as a shell's loop of studies needs (status 128 + it)
    assert_one_line(err)
    assert f'interrupted ({name})' in err and folder in err and f'{summary["n"]} finished run(s)' in err
    assert summary['status'] == 'interrupted' and 1 <= summary['n'] == len(summary['runs']) < 500


@pytest.mark.parametrize('runs, writes_before_full', [(3, 2), (2, 3)])
def test_full_disk_mid_study(airbench94, tiny_data, tmp_path, capsys, monkeypatch, runs, writes_before_full):
    """The disk fills while the log is rewritten after run 1, or as the finished study is marked
    complete: one line and status 1, and summary.json and log.pt both hold their last complete
    write (every run before), never a mix."""
    disk_filling(monkeypatch, study, 'log.pt', lambda write: write > writes_before_full)  # at creation, after run 0, ...
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', str(runs)))
    folder = only_log(tmp_path, 'airbench94')
    assert status == 1
    assert_one_line(err)
    assert 'No space left on device' in err and f'{writes_before_full - 1} finished run(s) kept in {folder}' in err
    summary, log = read_summary(folder), torch.load(os.path.join(folder, 'log.pt'), weights_only=True)
    assert summary['n'] == log['n'] == writes_before_full - 1 and summary['status'] == log['status'] == 'running'
    assert summary['runs'] == log['runs'] and not glob.glob(os.path.join(folder, '*.tmp'))


def test_a_run_the_full_disk_refused_is_kept_once_there_is_room(airbench94, tiny_data, tmp_path, capsys,
                                                                 monkeypatch):
    """The disk refuses only the write after run 1 (another job freed space): the study stops in one
    line, and the rewrite that marks the log failed holds run 1 too."""
    disk_filling(monkeypatch, study, 'log.pt', lambda write: write == 3)  # at creation, after run 0, after run 1
    status, _, err, summary = study_of(3, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 1, 'No space left on device', 'failed', 2)
    assert '2 finished run(s) kept' in err


def test_set_overrides(airbench94):
    parsed = study.parse_overrides(['opt.train_epochs=10', 'aug.flip=False', "net.widths={'block1': 96}",
                                    'opt.lr_knots=((0, 0.2), (0.1, 1), (1, 0))', 'net.compile_mode=default'])
    assert parsed['net.compile_mode'] == 'default'  # not a literal: a string
    del parsed['net.compile_mode']
    new = study.override_hyp(airbench94.hyp, parsed)
    assert new['opt']['train_epochs'] == 10.0 and isinstance(new['opt']['train_epochs'], float)
    assert new['aug']['flip'] is False and new['net']['widths']['block1'] == 96
    assert new['net']['widths']['block2'] == airbench94.hyp['net']['widths']['block2']
    assert airbench94.lr_multiplier(0.1, new['opt']['lr_knots']) == pytest.approx(1)
    assert airbench94.hyp['net']['widths']['block1'] == 64 and airbench94.hyp['aug']['flip']  # untouched


@pytest.mark.parametrize('overrides, message', [
    ({'opt.learning_rate': 1.0}, 'unknown hyp key'),
    ({'net.widths.block4': 8}, 'unknown hyp key'),
    ({'opt.batch_size': 512.5}, 'opt.batch_size must be of type int'),
    ({'aug.flip': 'yes'}, 'aug.flip must be of type bool'),
    ({'opt.lr': 10 ** 400}, 'opt.lr must be a float .* an integer of 401 digits'),
])
def test_bad_overrides(airbench94, overrides, message):
    with pytest.raises(study.StudyError, match=message):
        study.override_hyp(airbench94.hyp, overrides)


def test_unknown_key_lists_valid_ones(airbench94):
    with pytest.raises(study.StudyError) as error:
        study.override_hyp(airbench94.hyp, {'opt.nope': 1})
    assert 'opt.batch_size' in str(error.value) and 'net.widths.block1' in str(error.value)


@pytest.mark.parametrize('name', list(RECIPES))
def test_every_recipe_hyp_passes_the_checks(name):
    study.check_hyp(importlib.import_module(name).hyp)


@pytest.mark.parametrize('args, message', [
    (['--set', 'opt.momentum'], '--set expects KEY=VALUE'),
    (['--set', 'opt.momentum=1.5'], 'opt.momentum must be in [0, 1)'),
    (['--set', 'net.tta_level=3'], 'net.tta_level must be 0, 1 or 2'),
    (['--set', 'aug.translate=40'], 'aug.translate must be between 0 and 31 pixels'),
    (['--set', 'net.widths.block2=0'], 'net.widths.block2 must be at least 1'),
    (['--set', 'opt.momentumm=1'], 'unknown hyp key'),
    (['--set', 'opt.lr_knots=[1, 2]'], 'opt.lr_knots must be (fraction, multiplier) pairs'),
    (['--set', 'opt.train_epochs=1e999'], 'opt.train_epochs must be finite, not inf'),  # passes v > 0
    (['--set', 'opt.lr_knots=((0, 1), (1, -1e999))'], 'opt.lr_knots must be finite, not ((0, 1), (1, -inf))'),
    (['--set', 'opt.momentum=fast'], "opt.momentum must be of type float"),
    (['--runs', '0'], '--runs must be at least 1'),
    (['--runs', 'many'], "invalid int value: 'many'"),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['--data-dir', 'TMP/no/such/folder'], '--data-dir TMP/no/such/folder is not a folder'),
    (['--data-dir', os.path.join(ROOT, 'study.py')], 'is not a folder'),
])
def test_bad_arguments_fail_in_one_line(airbench94, tiny_data, tmp_path, capsys, args, message):
    """TMP: a folder of the test's own, so that a bug that creates the mistyped folder leaves no trace."""
    args, message = [arg.replace('TMP', str(tmp_path)) for arg in args], message.replace('TMP', str(tmp_path))
    status, err = failed_study(airbench94, capsys, tiny_data, tmp_path, *args)
    assert status in (1, 2) and message in err
    assert not (tmp_path / 'no').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda(airbench94, tiny_data, tmp_path, capsys):
    status, err = failed_study(airbench94, capsys, tiny_data, tmp_path, '--device', 'cuda')
    assert status == 1 and 'sees no CUDA GPU' in err and '--device cpu' in err
    assert os.listdir(tmp_path) == []


@pytest.mark.gpu
def test_cuda_study_warms_up_first(airbench94, tiny_data, tmp_path, capsys):
    status, out, _ = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '1', device='cuda'))
    assert status == 0 and 'warm-up run on random labels' in out and out.count(' eval |') == 2
    assert read_summary(only_log(tmp_path, 'airbench94'))['n'] == 1
    status, out, _ = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path / 'no', '--runs', '1',
                                                         '--no-warmup', device='cuda'))
    assert status == 0 and 'warm-up' not in out and out.count(' eval |') == 1


@pytest.mark.parametrize('skip', [False, True])
def test_the_recipes_warmup_runs_once_unless_skipped(airbench94, tiny_data, tmp_path, capsys, monkeypatch, skip):
    """On the CPU too: a recipe that compiles there warms up there. --no-warmup skips it."""
    calls = []
    monkeypatch.setattr(airbench94, 'warmup', lambda hyp, loader, device, verbose: calls.append((hyp, device)))
    status, _, _ = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '2',
                                                       *['--no-warmup'] * skip))
    assert status == 0 and len(calls) == (0 if skip else 1)
    for hyp, device in calls:  # the study's hyp, on the study's device
        assert hyp['opt']['batch_size'] == tiny_overrides(airbench94)['opt.batch_size']
        assert device == torch.device('cpu')


def test_missing_data_offline(airbench94, tmp_path, capsys, monkeypatch):
    from conftest import go_offline
    offline = go_offline(monkeypatch, airbench94, 'CIFAR10_URL')
    (tmp_path / 'empty').mkdir()
    status, _, err = run_main(study, capsys, 'airbench94', '--data-dir', str(tmp_path / 'empty'),
                              '--device', 'cpu', '--log-dir', str(tmp_path / 'logs'))
    progress, error = err.split('\n', 1)  # a 'downloading ...' note, then the error
    assert status == 1 and progress.startswith('downloading')
    assert_one_line(error)
    assert offline in error and str(tmp_path / 'empty') in error and not (tmp_path / 'logs').exists()


def test_damaged_cache(tiny_data, tmp_path, capsys):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    (data_dir / 'train.pt').write_bytes(b'broken')
    os.symlink(os.path.join(tiny_data, 'test.pt'), data_dir / 'test.pt')
    status, _, err = run_main(study, capsys, 'airbench94', '--data-dir', str(data_dir), '--device', 'cpu',
                              '--log-dir', str(tmp_path / 'logs'))
    assert status == 1 and str(data_dir / 'train.pt') in err and 'delete it' in err
    assert_one_line(err)
    assert not os.path.exists(tmp_path / 'logs')


@pytest.mark.parametrize('below_a_file', [False, True])
def test_log_dir_that_cannot_hold_a_log(airbench94, tiny_data, tmp_path, capsys, below_a_file):
    (tmp_path / 'a_file').write_text('')
    log_dir = tmp_path / 'a_file' / 'below' if below_a_file else tmp_path / 'a_file'
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, log_dir, '--runs', '1'))
    assert status == 1 and 'cannot create the log folder' in err and 'writable --log-dir' in err
    assert_one_line(err)


def test_unwritable_log_dir(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """What a folder without write permission gives (root, who runs CI, may write anywhere)."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied', path)
    monkeypatch.setattr(study.os, 'makedirs', refuse)
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '1'))
    assert status == 1 and 'Permission denied' in err and 'writable --log-dir' in err
    assert_one_line(err)


def test_a_diverging_run_is_one_clear_line(airbench94, tiny_data, tmp_path, capsys):
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '2',
                                                        '--set', 'opt.lr=1e30'))
    assert status == 1 and 'training diverged (loss nan' in err and 'opt.lr' in err
    assert err.count('\n') == 1 and '0 finished run(s) kept in' in err
    assert read_summary(only_log(tmp_path, 'airbench94'))['status'] == 'failed'


def test_cifar10_dir_that_is_not_a_folder(airbench94, tmp_path, capsys, monkeypatch):
    """The default folder comes from $CIFAR10_DIR: the message names the variable, not --data-dir."""
    monkeypatch.setenv('CIFAR10_DIR', str(tmp_path / 'no_such_folder'))
    status, _, err = run_main(study, capsys, 'airbench94', '--device', 'cpu', '--log-dir', str(tmp_path / 'logs'))
    assert status == 1 and f'$CIFAR10_DIR {tmp_path / "no_such_folder"} is not a folder' in err
    assert_one_line(err)


def fail_in_run(recipe, monkeypatch, run, exception):
    """recipe.train raises `exception` in run `run` and trains the others."""
    def fail():
        raise exception
    train_calling(recipe, monkeypatch, run, fail)


def test_a_bug_gives_its_traceback_then_what_was_kept(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    fail_in_run(airbench94, monkeypatch, 1, ZeroDivisionError('a bug in an edited recipe'))
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '3'))
    folder = only_log(tmp_path, 'airbench94')
    *traceback_lines, last = err.rstrip('\n').split('\n')
    assert status == 1 and traceback_lines[0] == 'Traceback (most recent call last):'
    assert 'ZeroDivisionError: a bug in an edited recipe' in traceback_lines[-1]
    assert last == f'study.py: 1 finished run(s) kept in {folder}'
    assert read_summary(folder)['status'] == 'failed' and read_summary(folder)['n'] == 1


def test_a_keyboard_interrupt_of_the_recipe_s_own(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt with a message of its own (an edited recipe's, a library's) ends the study
    as Ctrl-C does: one line that gives the message, the log marked, status 130."""
    fail_in_run(airbench94, monkeypatch, 1, KeyboardInterrupt('stopped by a callback'))
    status, _, err, summary = study_of(2, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 130, 'interrupted (stopped by a callback); 1 finished run(s) kept in',
                   'interrupted', 1)

def study_of(runs, recipe, capsys, data_dir, log_dir):
    """study.py on the recipe at test size: (exit status, stdout, stderr, the log's summary)."""
    status, out, err = run_main(study, capsys, *study_args(recipe, data_dir, log_dir, '--runs', str(runs)))
    return status, out, err, read_summary(only_log(log_dir, recipe.__name__))


def signal_as_the_log_is_marked(monkeypatch, signal_number):
    """The signal arrives as StudyLog.close begins (complete, interrupted or failed)."""
    real_close = study.StudyLog.close

    def close_during_a_signal(log, status):
        os.kill(os.getpid(), signal_number)
        return real_close(log, status)
    monkeypatch.setattr(study.StudyLog, 'close', close_during_a_signal)


def test_a_second_signal_cannot_cut_the_last_write_short(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """Ctrl-C in run 1, and another while the log is being marked (a scheduler's SIGTERM after the
    user's Ctrl-C): still one line, and the log marked interrupted with run 0."""
    fail_in_run(airbench94, monkeypatch, 1, KeyboardInterrupt())
    signal_as_the_log_is_marked(monkeypatch, signal.SIGINT)
    with sigint_handler(signal.default_int_handler):  # as in a terminal, whatever pytest's
        status, _, err, summary = study_of(3, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 130, 'interrupted (SIGINT); 1 finished run(s) kept', 'interrupted', 1)


@pytest.mark.parametrize('signals', [both_at_once, sigterm_as_the_ctrl_c_unwinds])
def test_signals_after_the_first_are_ignored(signals, airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM on top of the user's Ctrl-C in run 1: the first (SIGINT) ends the study;
    the other is neither raised again mid-stop nor reported by CPython as a signal 'ignored due to
    race condition'."""
    train_calling(airbench94, monkeypatch, 1, signals)
    status, _, err, summary = study_of(3, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 130, 'interrupted (SIGINT); 1 finished run(s) kept', 'interrupted', 1)


def test_a_signal_while_a_failure_is_logged(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """Run 1 fails (the recipe's UserError), and a SIGTERM comes while the log is marked failed: ignored."""
    fail_in_run(airbench94, monkeypatch, 1, airbench94.UserError('training diverged (simulated)'))
    signal_as_the_log_is_marked(monkeypatch, signal.SIGTERM)
    status, _, err, summary = study_of(3, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 1, 'error: training diverged (simulated); 1 finished run(s) kept', 'failed', 1)


def test_an_ignored_ctrl_c_stays_ignored(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """Started with SIGINT ignored (a shell script's background job): a Ctrl-C to its process group
    does not stop the study, as it does not stop any other program started so."""
    train_calling(airbench94, monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGINT))
    with sigint_handler(signal.SIG_IGN):
        status, _, err, summary = study_of(2, airbench94, capsys, tiny_data, tmp_path)
    assert status == 0 and err == '' and summary['status'] == 'complete' and summary['n'] == 2


def test_a_signal_once_every_run_is_done_leaves_the_study_complete(airbench94, tiny_data, tmp_path, capsys,
                                                                   monkeypatch):
    """SIGTERM as the finished study is marked complete: nothing is left to save, so it is finished as
    if no signal had come."""
    signal_as_the_log_is_marked(monkeypatch, signal.SIGTERM)
    status, out, err, summary = study_of(2, airbench94, capsys, tiny_data, tmp_path)
    assert status == 0 and err == '' and 'airbench94: 2 runs, mean TTA accuracy' in out
    assert summary['status'] == 'complete' and summary['n'] == 2


def test_a_stop_on_a_full_disk_counts_the_runs_the_disk_holds(airbench94, tiny_data, tmp_path, capsys,
                                                              monkeypatch):
    """SIGTERM cuts the write after run 1 short, and the disk is full for the rewrite that would mark
    the log: the line says 1 run is kept, as the files on disk hold, not the 2 in memory."""
    def signalled_then_full(write):
        if write == 3:  # the log at creation, after run 0, after run 1
            os.kill(os.getpid(), signal.SIGTERM)
        return write > 3
    writes = disk_filling(monkeypatch, study, 'log.pt', signalled_then_full)
    status, _, err, summary = study_of(3, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 143, 'interrupted (SIGTERM); 1 finished run(s) kept', 'running', 1)
    assert len(writes) == 4


def test_ctrl_c_while_the_command_line_is_read(tiny_data, tmp_path, capsys, monkeypatch):
    """--help loads the recipe it names (torch's import and all, seconds): a Ctrl-C then is one line too."""
    def parse_args(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, 'parse_args', parse_args)
    status, _, err = run_main(study, capsys, 'airbench94', '--help')
    assert status == 130 and err == 'study.py: interrupted (SIGINT) before the study started; nothing was logged\n'


def test_ctrl_c_while_torch_loads(tmp_path):
    """The first second or two of `python study.py ...` is torch's import: a Ctrl-C then is one line
    too (here a torch, first on the path, whose import is interrupted)."""
    (tmp_path / 'torch').mkdir()
    (tmp_path / 'torch' / '__init__.py').write_text('raise KeyboardInterrupt\n')
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'study.py'), 'airbench94'], capture_output=True,
                          text=True, timeout=60, env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert (done.returncode, done.stdout) == (-signal.SIGINT, '')
    assert done.stderr == 'study.py: interrupted (SIGINT) before the study started; nothing was logged\n'


def gpu_session(tmp_path, **settings):
    """tools/gpu_session.sh with OUT=tmp_path, on the CPU, none of its settings inherited."""
    env = {key: value for key, value in os.environ.items()
           if key not in ('RECIPES', 'RUNS', 'SECONDS_FOR_STUDIES', 'DEVICE') and not key.startswith('STUDY_ARGS_')}
    env.update(OUT=str(tmp_path), DEVICE='cpu', PYTHON=sys.executable, **settings)
    return subprocess.run(['bash', os.path.join(ROOT, 'tools', 'gpu_session.sh')], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(shutil.which('timeout') is None, reason="needs coreutils' timeout")
def test_gpu_session_script_on_the_cpu(tiny_data, tmp_path):
    """tools/gpu_session.sh, which a session lent a GPU runs as it is, on the CPU and tiny data: both
    studies logged where the device tool brings them back, and compare.py's verdict on them."""
    names = ['airbench94_muon', 'airbench94_hive']
    more = {f'STUDY_ARGS_{name}': ' '.join(arg.replace(' ', '') for arg in tiny_set_args(importlib.import_module(name)))
            for name in names}  # Python literals parse without their spaces, which the script splits at
    done = gpu_session(tmp_path, CIFAR10_DIR=str(tiny_data), RUNS='2', **more)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in names:
        assert read_summary(only_log(tmp_path / 'logs', name))['n'] == 2
        assert f'{name} ended with status 0' in (tmp_path / f'{name}.log').read_text()
    assert f'torch {torch.__version__}' in (tmp_path / 'gpu.txt').read_text()
    compare = (tmp_path / 'compare.txt').read_text()
    assert compare.index('airbench94_muon') < compare.index('airbench94_hive') and '2 - 1: mean accuracy' in compare
    failed = gpu_session(tmp_path / 'again', CIFAR10_DIR=str(tiny_data), RECIPES='no_such_recipe')
    assert failed.returncode == 1 and 'gpu_session.sh: not complete: no_such_recipe' in failed.stderr


class RankZeroOfThree(study.Ranks):
    """Rank 0 of a three-rank study, alone in this process: in each round, ranks 1 and 2 'finish' the
    two runs after rank 0's."""

    def __init__(self):
        super().__init__({'RANK': '0', 'WORLD_SIZE': '3', 'LOCAL_RANK': '0'})

    def connect(self, device):
        pass

    def gather(self, value):
        if isinstance(value, dict) and 'run' in value:
            return [value] + [{**value, 'run': value['run'] + rank, 'rank': rank} for rank in (1, 2)]
        return [value] * self.size

    def close(self):
        pass


def test_a_signal_while_a_round_is_logged_keeps_every_rank_s_run(airbench94, tiny_data, tmp_path, capsys,
                                                                  monkeypatch):
    """SIGTERM while rank 0 logs the runs ranks 1 and 2 finished: both are kept, not only the first."""
    monkeypatch.setattr(study, 'Ranks', RankZeroOfThree)
    real_write = study.StudyLog.write

    def write_during_a_signal(log):
        if len(log.results) > 1 and not write_during_a_signal.sent:
            write_during_a_signal.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(log)
    write_during_a_signal.sent = False
    monkeypatch.setattr(study.StudyLog, 'write', write_during_a_signal)
    status, _, err, summary = study_of(6, airbench94, capsys, tiny_data, tmp_path)
    assert_stopped(status, err, summary, 143, 'rank 0: interrupted (SIGTERM); 3 finished run(s) kept', 'interrupted', 3)
    assert [run['run'] for run in summary['runs']] == [0, 1, 2]


def test_run_results_are_logged_as_numbers(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """A recipe may return its accuracies as one-element tensors, and anything else besides: the log
    holds numbers and reprs, not a traceback from JSON. A result that is not a finite number is one line."""
    real_train = airbench94.train

    def train_returning_tensors(*args, **kwargs):
        model, result = real_train(*args, **kwargs)
        return model, {**result, 'tta_val_acc': torch.tensor(result['tta_val_acc']), 'extra': {1, 2}}
    monkeypatch.setattr(airbench94, 'train', train_returning_tensors)
    status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path / 'tensors', '--runs', '1'))
    [run] = read_summary(only_log(tmp_path / 'tensors', 'airbench94'))['runs']
    assert status == 0 and err == '' and isinstance(run['tta_val_acc'], float) and run['extra'] == '{1, 2}'
    for returned, shown in (('high', "'high'"), (float('nan'), 'nan')):
        monkeypatch.setattr(airbench94, 'train', lambda *args, **kwargs: (None, {'tta_val_acc': returned}))
        status, _, err = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path / type(returned).__name__,
                                                           '--runs', '1'))
        assert status == 1 and f'airbench94.train returned {shown} as tta_val_acc, not a finite number' in err
        assert_one_line(err)


def test_each_run_builds_its_loader_after_its_seed(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """So a loader that draws random numbers as it is built makes the same study however it is
    spread; the loader that the study read the data with first is not reused."""
    seeds_at_construction = []

    class RecordingLoader(airbench94.CifarLoader):
        def __init__(self, data_dir=None, train=True, *args, **kwargs):
            super().__init__(data_dir, train, *args, **kwargs)
            if train:
                seeds_at_construction.append(torch.initial_seed())
    monkeypatch.setattr(airbench94, 'CifarLoader', RecordingLoader)
    status, _, _ = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path, '--runs', '2', '--seed', '3'))
    assert status == 0 and seeds_at_construction[1:] == [study.run_seed(3, run) for run in range(2)]


def test_edited_copy_of_a_recipe_runs_by_path(tiny_data, tmp_path, capsys):
    """A researcher's edited copy, alone in another folder, runs unchanged; its log is its own, and
    holds what JSON cannot (a torch.dtype in its hyp) as its repr. Its own default of inf is its
    business (only a --set value must be finite)."""
    folder = tmp_path / 'research'
    folder.mkdir()
    with open(os.path.join(ROOT, 'airbench94.py')) as file:
        source = file.read().replace("'label_smoothing': 0.2,",
                                     "'label_smoothing': 0.15, 'dtype': torch.float16, 'patience': float('inf'),")
    (folder / 'my_airbench.py').write_text(source)
    recipe = importlib.import_module('airbench94')
    args = study_args(recipe, tiny_data, tmp_path / 'logs', '--runs', '1')
    status, out, err = run_main(study, capsys, str(folder / 'my_airbench.py'), *args[1:])
    assert status == 0 and err == '' and 'my_airbench: 1 run' in out
    summary = read_summary(only_log(tmp_path / 'logs', 'my_airbench'))
    assert summary['hyp']['opt']['label_smoothing'] == 0.15 and summary['script'] == 'my_airbench.py'
    assert summary['hyp']['opt']['dtype'] == 'torch.float16' and summary['hyp']['opt']['patience'] == float('inf')
    log = torch.load(os.path.join(only_log(tmp_path / 'logs', 'my_airbench'), 'log.pt'), weights_only=True)
    assert log['code'] == source and log['hyp']['opt']['dtype'] is torch.float16


@pytest.mark.parametrize('content, message', [
    ('hyp = {}\n', 'is not a recipe: it lacks CifarLoader, train'),
    ('raise ImportError("no module named apex")\n', 'cannot load the recipe'),
])
def test_not_a_recipe(tmp_path, capsys, content, message):
    (tmp_path / 'not_a_recipe.py').write_text(content)
    status, _, err = run_main(study, capsys, str(tmp_path / 'not_a_recipe.py'))
    assert status == 1 and message in err
    assert_one_line(err)
    status, _, err = run_main(study, capsys, 'airbench97')
    assert status == 1 and "no recipe 'airbench97'" in err and 'airbench94' in err


def test_help_explains_every_option(capsys):
    status, out, _ = run_main(study, capsys, '--help')
    assert status == 0
    for option in ('--runs', '--data-dir', '--device', '--log-dir', '--seed', '--no-warmup', '--set', 'torchrun'):
        assert option in out
    assert 'CIFAR10_DIR' in out and 'KEY=VALUE' in out and 'recipe contract' in out
    for command in (['airbench94_muon', '--help'], ['--runs', '5', 'airbench94_muon', '--hel']):  # anywhere, abridged
        status, out, _ = run_main(study, capsys, *command)
        keys = out.split('--set keys of airbench94_muon: ')[1]
        assert status == 0 and 'opt.muon_lr' in keys and 'opt.lr,' not in keys


def test_process_exit_status_and_stderr(tmp_path):
    """The real process, not main() in-process: a non-zero status and one line, no traceback."""
    out, err = run_study_process('airbench94', '--data-dir', str(tmp_path), '--set', 'opt.nope=1').communicate(timeout=120)
    assert out == '' and err.startswith('study.py: error: unknown hyp key')
    assert_one_line(err)


def test_import_has_no_side_effects(tmp_path):
    """Importing study.py or a recipe reads no argv, loads no data, prints nothing, writes nothing."""
    code = f'import sys; sys.argv = ["x", "--runs", "0"]; import study, {", ".join(RECIPES)}'
    path = os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')])
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': path})
    assert done.returncode == 0 and done.stdout == '' and done.stderr == '' and os.listdir(tmp_path) == []


def test_student_t_critical_values():
    # Reference values from any table of Student's t (two-sided 95%).
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (24, 2.0639), (999, 1.9623)]:
        assert study.t_critical(df) == pytest.approx(t, abs=1e-4)


def test_summary_statistics():
    results = [{'tta_val_acc': a, 'val_acc': a - 0.01, 'time_seconds': t}
               for a, t in [(0.93, 3.0), (0.94, 4.0), (0.95, 5.0)]]
    stats = study.summarize(results)
    assert stats['n'] == 3 and stats['mean'] == pytest.approx(0.94)
    assert stats['std'] == pytest.approx(0.01) and stats['mean_time_seconds'] == pytest.approx(4.0)
    half_width = 4.3027 * 0.01 / math.sqrt(3)
    assert stats['ci95'] == pytest.approx([0.94 - half_width, 0.94 + half_width], abs=1e-6)
    single = study.summarize(results[:1])
    assert single['std'] is None and single['ci95'] is None and single['mean'] == 0.93
    assert study.format_summary('x', single).startswith('x: 1 run, mean TTA accuracy 93.00%')


def test_run_seeds_are_distinct():
    seeds = [study.run_seed(base, i) for base in (0, 1) for i in range(100)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2 ** 63 for s in seeds)


def test_recipe_by_name_does_not_shadow_a_loaded_module(tmp_path):
    """An edited copy whose file name is that of a recipe already imported gets a module of its own."""
    shutil.copy(os.path.join(ROOT, 'airbench95.py'), tmp_path / 'airbench94.py')
    importlib.import_module('airbench94')
    copy = study.load_recipe(str(tmp_path / 'airbench94.py'))
    assert copy is not sys.modules['airbench94'] and copy.recipe_name == 'airbench94'
    assert copy.hyp['opt']['train_epochs'] == 15.0
