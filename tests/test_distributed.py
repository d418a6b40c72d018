"""One study over several processes: torchrun with gloo on the CPU, and the log rank 0 writes."""
import importlib
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import RECIPES, ROOT, run_main, tiny_set_args

AIRBENCH_SCRIPTS = [name for name in RECIPES if name.startswith('airbench')]
STUDY_TIMEOUT = 240  # seconds; a hang is a failure, not a stuck CI


@pytest.fixture
def airbench94():
    return importlib.import_module('airbench94')


def torchrun(recipe, data_dir, log_dir, *args, script=None, processes=2, device=('--device', 'cpu')):
    """The recipe (or a script around it) under torchrun, at test size: (process, seconds taken)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={processes}', script or os.path.join(ROOT, f'{recipe.__name__}.py'),
               '--data-dir', data_dir, '--log-dir', str(log_dir), *device, *tiny_set_args(recipe), *args]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=STUDY_TIMEOUT,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return done, time.monotonic() - started


def only_summary(log_dir, recipe):
    [folder] = os.listdir(log_dir / recipe.__name__)
    with open(log_dir / recipe.__name__ / folder / 'summary.json') as file:
        return json.load(file)


def test_two_processes_train_one_study(airbench94, tiny_data, tmp_path, capsys):
    done, _ = torchrun(airbench94, tiny_data, tmp_path / 'two', '--runs', '4', '--seed', '7')
    assert done.returncode == 0, done.stderr
    summary = only_summary(tmp_path / 'two', airbench94)
    assert summary['status'] == 'complete' and summary['n'] == 4 and summary['world_size'] == 2
    assert [run['run'] for run in summary['runs']] == [0, 1, 2, 3]
    assert [run['rank'] for run in summary['runs']] == [0, 1, 0, 1]  # rank r trains r, r + 2, ...
    assert done.stdout.count(' eval |') == 4 and done.stdout.count('run | epoch') == 1  # rank 0 prints
    assert 'mean TTA accuracy' in done.stdout
    # The same study in one process, without torchrun: the same runs with the same seeds.
    status, _, _ = run_main(airbench94, capsys, '--data-dir', tiny_data, '--log-dir', str(tmp_path / 'one'),
                            '--device', 'cpu', '--runs', '4', '--seed', '7', *tiny_set_args(airbench94))
    single = only_summary(tmp_path / 'one', airbench94)
    assert status == 0 and single['world_size'] == 1 and 'rank' not in single['runs'][0]
    assert [run['seed'] for run in single['runs']] == [run['seed'] for run in summary['runs']]


def test_more_ranks_than_runs(airbench94, tiny_data, tmp_path):
    done, _ = torchrun(airbench94, tiny_data, tmp_path, '--runs', '1')
    assert done.returncode == 0, done.stderr
    assert 'rank 1 is idle: 1 run(s) for 2 ranks' in done.stdout
    assert only_summary(tmp_path, airbench94)['n'] == 1


def failing_in_run(tmp_path, run, failure):
    """A script that runs airbench94.main(), except that run `run` executes `failure` instead."""
    wrapper = tmp_path / f'fails_in_run_{run}.py'
    wrapper.write_text(
        f'import os\nimport sys\nsys.path.insert(0, {ROOT!r})\nimport airbench94\n'
        'real_train = airbench94.train\n\n'
        'def train(*args, run=None, **kwargs):\n'
        f'    if run == {run}:\n'
        f'        {failure}\n'
        '    return real_train(*args, run=run, **kwargs)\n\n'
        'airbench94.train = train\nairbench94.main()\n')
    return str(wrapper)


def test_a_failing_rank_stops_the_study(airbench94, tiny_data, tmp_path):
    """Rank 1 fails in its first run (run 1): the study ends at once, naming rank and run, and the
    log keeps run 0, which rank 0 finished in the same round."""
    script = failing_in_run(tmp_path, 1, 'raise RuntimeError("CUDA out of memory (simulated)")')
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'logs', '--runs', '6', script=script)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    assert 'rank 1 failed in run 1: RuntimeError: CUDA out of memory (simulated)' in done.stderr
    summary = only_summary(tmp_path / 'logs', airbench94)
    assert summary['status'] == 'failed' and [run['run'] for run in summary['runs']] == [0]
    assert f'1 finished run(s) kept in {tmp_path / "logs"}' in done.stderr


def test_a_rank_that_dies_outright(airbench94, tiny_data, tmp_path):
    """Rank 1's process ends in run 5 (its third): torchrun stops rank 0, which marks the log
    interrupted and keeps the runs of the two rounds gathered before."""
    script = failing_in_run(tmp_path, 5, 'os._exit(1)')
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'logs', '--runs', '6', script=script)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    summary = only_summary(tmp_path / 'logs', airbench94)
    assert summary['status'] == 'interrupted' and 2 <= summary['n'] <= 4
    assert f'rank 0: interrupted; {summary["n"]} finished run(s) kept in' in done.stderr


@pytest.mark.skipif(importlib.import_module('torch').cuda.is_available(), reason='this machine has CUDA')
def test_torchrun_without_cuda_asks_for_the_cpu(airbench94, tiny_data, tmp_path):
    done, _ = torchrun(airbench94, tiny_data, tmp_path, processes=1, device=())
    assert done.returncode != 0
    assert 'airbench94.py: rank 0: error: under torchrun each rank trains on cuda:LOCAL_RANK' in done.stderr
    assert 'add --device cpu' in done.stderr and not os.listdir(tmp_path)


def test_a_diverging_run_is_one_clear_line(airbench94, tiny_data, tmp_path, capsys):
    status, _, err = run_main(airbench94, capsys, '--data-dir', tiny_data, '--log-dir', str(tmp_path),
                              '--device', 'cpu', '--runs', '2', *tiny_set_args(airbench94),
                              '--set', 'opt.lr=1e30')
    assert status == 1 and 'training diverged: the loss is nan' in err and 'opt.lr' in err
    assert err.count('\n') == 1 and '0 finished run(s) kept in' in err


@pytest.mark.parametrize('name', AIRBENCH_SCRIPTS)
def test_every_airbench_script_shares_the_distributed_code(airbench94, name):
    recipe = importlib.import_module(name)
    shared = ('Ranks', 'StudyFailed', 'train_run', 'attempt', 'stop_on_failures', 'fail', 'run_as_script')
    for function in shared:
        ours, base = getattr(recipe, function), getattr(airbench94, function)
        assert inspect.getsource(ours) == inspect.getsource(base), function
