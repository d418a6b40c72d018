"""Each recipe's own main, the record attempt: its few options, its table and statistics, its log in
study.py's format, and a stop (SIGTERM, Ctrl-C, a full disk) that keeps every finished run."""
import importlib
import glob
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import compare
from conftest import (ROOT, assert_one_line, assert_shareable, assert_stopped, both_at_once, disk_filling, only_log,
                      read_summary, run_main, sigint_handler, signal_after_first_run, sigterm_as_the_ctrl_c_unwinds,
                      tiny_hyp, train_calling)

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def tiny_recipe(recipe, monkeypatch, tmp_path):
    """The recipe with its hyp at test size, run from an empty folder (main logs to ./logs)."""
    monkeypatch.setattr(recipe, 'hyp', tiny_hyp(recipe))
    monkeypatch.chdir(tmp_path)
    return recipe


def test_record_attempt_on_tiny_data(tiny_recipe, tiny_data, tmp_path, capsys):
    status, out, err = run_main(tiny_recipe, capsys, '--runs', '2', '--data-dir', tiny_data, '--device', 'cpu')
    name = tiny_recipe.__name__
    folder = only_log(tmp_path / 'logs', name)
    assert status == 0 and err == ''
    assert re.findall(r'^\|\s+(\S+) \|\s+eval \|', out, re.MULTILINE) == [*['warm-up'] * ('warm-up' in out), '0', '1']
    assert f'{name}: 2 runs, mean TTA accuracy' in out and 'std' in out
    assert os.path.relpath(folder, tmp_path) in out
    summary = read_summary(folder)
    assert summary['format'] == 'airbench-study/1' and summary['status'] == 'complete'
    assert summary['n'] == 2 and [run['run'] for run in summary['runs']] == [0, 1]
    assert summary['hyp']['opt']['batch_size'] == 32 and summary['device'] == 'cpu'
    log = torch.load(os.path.join(folder, 'log.pt'), weights_only=True)
    with open(tiny_recipe.__file__) as file:
        assert log['code'] == file.read()
    assert log['accs'].tolist() == [run['tta_val_acc'] for run in summary['runs']]
    # A run's logged seed repeats it.
    torch.manual_seed(summary['runs'][1]['seed'])
    loader = tiny_recipe.CifarLoader(tiny_data, True, 32, tiny_recipe.hyp['aug'], device='cpu')
    _, again = tiny_recipe.train(tiny_recipe.hyp, loader, None, 'cpu', verbose=False)
    assert again['train_loss'] == summary['runs'][1]['train_loss']
    assert compare.read_study(folder)['n'] == 2  # compare.py reads the recipe's log as study.py's


def test_help_and_bad_options(tiny_recipe, tmp_path, capsys):
    status, out, _ = run_main(tiny_recipe, capsys, '--help')
    assert status == 0 and all(option in out for option in ('--runs', '--data-dir', '--device', 'study.py'))
    options = re.findall(r'^  (-[-\w]+)', out, re.MULTILINE)  # whatever the terminal's width
    assert '--set' not in out and options == ['-h', '--runs', '--data-dir', '--device']  # a record attempt's few
    (tmp_path / 'file').write_text('')
    for args, message in [(['--runs', '0'], '--runs must be at least 1'),
                          (['--data-dir', str(tmp_path / 'missing')], 'is not a folder'),
                          (['--data-dir', str(tmp_path / 'file')], 'is not a folder'),
                          (['--device', 'tpu'], 'cannot use --device tpu')]:
        status, _, err = run_main(tiny_recipe, capsys, *args)
        assert status == 1 and message in err and err.startswith(f'{tiny_recipe.__name__}.py: error: ')
        assert_one_line(err)
    assert not (tmp_path / 'logs').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda(tiny_recipe, tiny_data, capsys):
    status, _, err = run_main(tiny_recipe, capsys, '--data-dir', tiny_data, '--device', 'cuda')
    assert status == 1 and 'cannot use --device cuda' in err and 'try --device cpu' in err
    assert_one_line(err)


def test_full_disk_keeps_the_last_complete_log(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    disk_filling(monkeypatch, tiny_recipe, 'log.pt', lambda write: write > 2)  # at creation and after run 0: room
    status, _, err = run_main(tiny_recipe, capsys, '--runs', '3', '--data-dir', tiny_data, '--device', 'cpu')
    folder = only_log(tmp_path / 'logs', tiny_recipe.__name__)
    assert status == 1 and 'No space left on device' in err and '1 finished run(s) kept in' in err
    assert_one_line(err)
    summary, log = read_summary(folder), torch.load(os.path.join(folder, 'log.pt'), weights_only=True)
    assert summary['n'] == log['n'] == 1 and summary['runs'] == log['runs']
    assert not glob.glob(os.path.join(folder, '*.tmp'))
    assert_shareable(os.path.join(folder, 'log.pt'), os.path.join(folder, 'summary.json'))


def test_logs_that_is_a_file(tiny_recipe, tiny_data, tmp_path, capsys):
    """A record attempt logs to ./logs; where that is a file, one line says so and what to do."""
    (tmp_path / 'logs').write_text('')
    status, _, err = run_main(tiny_recipe, capsys, '--runs', '1', '--data-dir', tiny_data, '--device', 'cpu')
    name = tiny_recipe.__name__
    assert status == 1 and err.startswith(f'{name}.py: error: cannot write the log in logs/{name}/')
    assert err.endswith('); make ./logs writable\n') and (tmp_path / 'logs').is_file()
    assert_one_line(err)

def test_an_unforeseen_error_marks_the_log_failed(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """Out of memory in run 1 (or a bug in an edited copy): its traceback, then one line that says
    where run 0 is kept; the log is marked failed, not left running."""
    real_train = tiny_recipe.train

    def train(*args, **kwargs):
        if kwargs.get('run') == 1:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail')
        return real_train(*args, **kwargs)
    monkeypatch.setattr(tiny_recipe, 'train', train)
    status, _, err = run_main(tiny_recipe, capsys, '--runs', '3', '--data-dir', tiny_data, '--device', 'cpu')
    folder = only_log(tmp_path / 'logs', tiny_recipe.__name__)
    traceback_text, last_line = err.rstrip('\n').rsplit('\n', 1)
    assert status == 1 and traceback_text.startswith('Traceback') and 'more detail' in traceback_text
    assert last_line == (f'{tiny_recipe.__name__}.py: error: OutOfMemoryError: CUDA out of memory. Tried to '
                         f'allocate 2.00 GiB; 1 finished run(s) kept in {os.path.relpath(folder, tmp_path)}')
    summary = read_summary(folder)
    assert summary['status'] == 'failed' and summary['n'] == 1


def terminated_in_run_1(recipe, monkeypatch, capsys, data_dir, log_dir):
    """The record attempt, --runs 5, with a SIGTERM delivered to this very process in run 1:
    (exit status, stderr, summary)."""
    train_calling(recipe, monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    status, _, err = run_main(recipe, capsys, '--runs', '5', '--data-dir', data_dir, '--device', 'cpu')
    return status, err, read_summary(only_log(log_dir, recipe.__name__))


def test_sigterm_ends_the_record_attempt_as_ctrl_c_does(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler, timeout, kill) in the second run: one line, the finished run kept, the
    log marked interrupted, status 143. Both signals' handlers are put back, though the stop ignored them."""
    sigint_handler = signal.getsignal(signal.SIGINT)
    status, err, summary = terminated_in_run_1(tiny_recipe, monkeypatch, capsys, tiny_data, tmp_path / 'logs')
    assert status == 143 and summary['status'] == 'interrupted' and summary['n'] == 1
    assert f'interrupted (SIGTERM); {summary["n"]} finished run(s) kept in' in err
    assert_one_line(err)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is sigint_handler


@pytest.mark.parametrize('moment', ['while', 'after'])
def test_a_signal_at_the_write_of_a_finished_run_keeps_it(moment, tiny_recipe, tiny_data, tmp_path, capsys,
                                                          monkeypatch):
    """SIGTERM while run 0's log is being written, or just after the write returns (the moment a real
    signal once hit in CI): the closing rewrite still holds run 0, and the message counts it."""
    real_write_log = tiny_recipe.write_log

    def write_log(folder, info, results):
        at_run_0 = info['status'] == 'running' and len(results) == 1
        if at_run_0 and moment == 'while':
            os.kill(os.getpid(), signal.SIGTERM)
        summary = real_write_log(folder, info, results)
        if at_run_0 and moment == 'after':
            os.kill(os.getpid(), signal.SIGTERM)
        return summary
    monkeypatch.setattr(tiny_recipe, 'write_log', write_log)
    status, _, err = run_main(tiny_recipe, capsys, '--runs', '3', '--data-dir', tiny_data, '--device', 'cpu')
    summary = read_summary(only_log(tmp_path / 'logs', tiny_recipe.__name__))
    assert status == 143 and 'interrupted (SIGTERM); 1 finished run(s) kept in' in err
    assert summary['status'] == 'interrupted' and summary['n'] == 1


def sigterm_as_the_log_is_marked(recipe, monkeypatch, status):
    """A SIGTERM arrives as the record attempt starts the write that marks its log `status`."""
    real_write_log = recipe.write_log

    def write_log(folder, info, results):
        if info['status'] == status:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write_log(folder, info, results)
    monkeypatch.setattr(recipe, 'write_log', write_log)


def test_a_second_signal_while_the_log_is_marked(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """Another SIGTERM while the log is being marked interrupted (a scheduler's, after the user's
    Ctrl-C): ignored, so still one line and status 143, and that write completes, run 0 in it."""
    sigterm_as_the_log_is_marked(tiny_recipe, monkeypatch, 'interrupted')
    try:
        status, err, summary = terminated_in_run_1(tiny_recipe, monkeypatch, capsys, tiny_data, tmp_path / 'logs')
    except KeyboardInterrupt:
        pytest.fail('the second SIGTERM escaped main: a traceback, not one line')
    assert_stopped(status, err, summary, 143, 'interrupted (SIGTERM); 1 finished run(s) kept in', 'interrupted', 1)


def attempt_of_2_runs(recipe, capsys, data_dir, log_dir):
    """The record attempt, --runs 2: (exit status, stdout, stderr, summary)."""
    status, out, err = run_main(recipe, capsys, '--runs', '2', '--data-dir', data_dir, '--device', 'cpu')
    return status, out, err, read_summary(only_log(log_dir, recipe.__name__))


@pytest.mark.parametrize('signals', [both_at_once, sigterm_as_the_ctrl_c_unwinds])
def test_signals_after_the_first_are_ignored(signals, tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM on top of the user's Ctrl-C in run 1: the first ends the attempt, in one
    line; the other neither escapes with a traceback nor cuts the last write short."""
    train_calling(tiny_recipe, monkeypatch, 1, signals)
    status, _, err, summary = attempt_of_2_runs(tiny_recipe, capsys, tiny_data, tmp_path / 'logs')
    assert_stopped(status, err, summary, 130, 'interrupted (SIGINT); 1 finished run(s) kept in', 'interrupted', 1)


def test_a_keyboard_interrupt_of_its_own(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt with a message of its own (an edited copy's callback, a library's) in run 1
    ends the attempt as Ctrl-C does, in one line that gives the message."""
    def interrupt():
        raise KeyboardInterrupt('stopped by a callback')
    train_calling(tiny_recipe, monkeypatch, 1, interrupt)
    status, _, err, summary = attempt_of_2_runs(tiny_recipe, capsys, tiny_data, tmp_path / 'logs')
    assert_stopped(status, err, summary, 130, 'interrupted (stopped by a callback); 1 finished run(s) kept in',
                   'interrupted', 1)

def test_a_signal_while_a_failure_is_logged(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """Run 1 fails (a UserError), and a SIGTERM comes while the log is marked failed: ignored."""
    def fail():
        raise tiny_recipe.UserError('training diverged (simulated)')
    train_calling(tiny_recipe, monkeypatch, 1, fail)
    sigterm_as_the_log_is_marked(tiny_recipe, monkeypatch, 'failed')
    status, _, err, summary = attempt_of_2_runs(tiny_recipe, capsys, tiny_data, tmp_path / 'logs')
    assert_stopped(status, err, summary, 1, 'error: training diverged (simulated); 1 finished run(s) kept', 'failed', 1)


def test_an_ignored_ctrl_c_stays_ignored(tiny_recipe, tiny_data, tmp_path, capsys, monkeypatch):
    """Started with SIGINT ignored (a shell script's background job): a Ctrl-C to its process group
    does not stop the attempt, as it does not stop any other program started so."""
    train_calling(tiny_recipe, monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGINT))
    with sigint_handler(signal.SIG_IGN):
        status, _, err, summary = attempt_of_2_runs(tiny_recipe, capsys, tiny_data, tmp_path / 'logs')
    assert status == 0 and err == '' and summary['status'] == 'complete' and summary['n'] == 2


def record_attempt_process(tmp_path, tiny_data, runs, before_main=''):
    """A fresh interpreter (its own signal handlers, not pytest's) that runs airbench94's record attempt
    as the program does, main() without argv, on tiny data in tmp_path; `before_main` is Python run
    first, with os, signal and the recipe imported. (Popen with stdout and stderr piped, the recipe.)"""
    recipe = importlib.import_module('airbench94')
    buffered = {key: value for key, value in os.environ.items() if key != 'PYTHONUNBUFFERED'}  # as by default
    wrapper = tmp_path / 'tiny_record_attempt.py'
    wrapper.write_text(f'import os, signal, sys\nsys.path[:0] = [{ROOT!r}, {TESTS!r}]\nimport conftest\n'
                       f'import {recipe.__name__} as recipe\nrecipe.hyp = conftest.tiny_hyp(recipe)\n'
                       f'{before_main}\nrecipe.main()\n')
    process = subprocess.Popen([sys.executable, str(wrapper), '--runs', str(runs), '--data-dir', tiny_data,
                                '--device', 'cpu'], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=buffered,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, recipe


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_stopped_record_attempt_process(signal_number, tiny_data, tmp_path):
    """The real process, stopped after its first run: one line, the log marked interrupted, and the
    process dies of the signal, as study.py does (a shell's loop of attempts stops at a Ctrl-C only
    after a command the signal killed; it goes on after an exit status of 130)."""
    process, recipe = record_attempt_process(tmp_path, tiny_data, 500)
    err = signal_after_first_run(process, tmp_path / 'logs', recipe.__name__, signal_number)
    folder = only_log(tmp_path / 'logs', recipe.__name__)
    summary = read_summary(folder)
    assert process.returncode == -signal_number
    assert_one_line(err)
    name = signal.Signals(signal_number).name
    assert f'interrupted ({name}); {summary["n"]} finished run(s) kept in {os.path.relpath(folder, tmp_path)}' in err
    assert summary['status'] == 'interrupted' and 1 <= summary['n'] < 500


def test_a_process_that_dies_of_its_signal_flushes_its_output_first(tiny_data, tmp_path):
    """What the attempt printed to a pipe (which Python buffers) is still written, though the signal
    kills the process: here a line printed just before a SIGTERM that the attempt sends itself."""
    process, _ = record_attempt_process(tmp_path, tiny_data, 3, before_main=(
        'real_train = recipe.train\n'
        'def train(*args, run=None, **kwargs):\n'
        '    if run == 1:\n'
        '        print("run 1 starts", end="")\n'
        '        os.kill(os.getpid(), signal.SIGTERM)\n'
        '    return real_train(*args, run=run, **kwargs)\n'
        'recipe.train = train'))
    out, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM and 'interrupted (SIGTERM); 1 finished run(s) kept in' in err
    assert out.endswith('run 1 starts')
