"""One study over several processes: study.py under torchrun with gloo on the CPU, and the log
rank 0 writes."""
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_main, study_args
import study

STUDY_TIMEOUT = 240  # seconds; a hang is a failure, not a stuck CI


@pytest.fixture
def airbench94():
    return importlib.import_module('airbench94')


def torchrun(recipe, data_dir, log_dir, *args, recipe_file=None, processes=2):
    """study.py under torchrun on the recipe (or on recipe_file, a recipe by path), at test size:
    (process, seconds taken)."""
    arguments = study_args(recipe, data_dir, log_dir, *args)
    if recipe_file:
        arguments[0] = str(recipe_file)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}',
               os.path.join(ROOT, 'study.py'), *arguments]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=STUDY_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        kill_processes_naming(str(log_dir))  # its ranks, in sessions of their own: left running, they hold
        process.communicate()                # the pipes open (communicate would wait forever) and slow the suite
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), time.monotonic() - started


def kill_processes_naming(text):
    """SIGKILL to every process of this machine whose command line holds `text` (Linux's /proc)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        with contextlib.suppress(OSError):  # ended meanwhile, or not ours
            with open(f'/proc/{pid}/cmdline', 'rb') as file:
                if text.encode() in file.read():
                    os.kill(int(pid), signal.SIGKILL)


def only_summary(log_dir, name):
    [folder] = os.listdir(log_dir / name)
    with open(log_dir / name / folder / 'summary.json') as file:
        return json.load(file)


def test_two_processes_train_one_study_of_a_copy(airbench94, tiny_data, tmp_path, capsys):
    """An unchanged copy of airbench94.py in another folder, by path, over two processes, seeded at
    random: every rank must seed its runs from the one seed the log gives."""
    (tmp_path / 'copy').mkdir()
    shutil.copy(os.path.join(ROOT, 'airbench94.py'), tmp_path / 'copy' / 'copied94.py')
    done, _ = torchrun(airbench94, tiny_data, tmp_path / 'two', '--runs', '4',
                       recipe_file=tmp_path / 'copy' / 'copied94.py')
    assert done.returncode == 0, done.stderr
    summary = only_summary(tmp_path / 'two', 'copied94')
    assert summary['status'] == 'complete' and summary['n'] == 4 and summary['world_size'] == 2
    assert [run['run'] for run in summary['runs']] == [0, 1, 2, 3]
    assert [run['rank'] for run in summary['runs']] == [0, 1, 0, 1]  # rank r trains r, r + 2, ...
    # Rank 0 prints its table; the other rank's runs arrive as one line each.
    assert done.stdout.count(' eval |') == 2 and done.stdout.count('run | epoch') == 1
    assert done.stdout.count('(rank 1): TTA accuracy') == 2 and 'copied94: 4 runs, mean TTA accuracy' in done.stdout
    # The same study in one process, without torchrun, from the logged seed: the same runs, the same seeds.
    status, _, _ = run_main(study, capsys, *study_args(airbench94, tiny_data, tmp_path / 'one', '--runs', '4',
                                                       '--seed', str(summary['seed'])))
    single = only_summary(tmp_path / 'one', 'airbench94')
    assert status == 0 and single['world_size'] == 1 and 'rank' not in single['runs'][0]
    assert [run['seed'] for run in single['runs']] == [run['seed'] for run in summary['runs']]
    # The same trainings, up to the float rounding of one thread per rank against two here.
    assert [run['train_loss'] for run in single['runs']] == pytest.approx([run['train_loss'] for run in summary['runs']],
                                                                          rel=1e-3)


def test_more_ranks_than_runs(airbench94, tiny_data, tmp_path):
    done, _ = torchrun(airbench94, tiny_data, tmp_path, '--runs', '1')
    assert done.returncode == 0, done.stderr
    assert 'rank 1 is idle: 1 run(s) for 2 ranks' in done.stdout
    assert only_summary(tmp_path, 'airbench94')['n'] == 1


def failing_in_run(tmp_path, run, failure):
    """A recipe file: airbench94, except that run `run` executes `failure` instead."""
    wrapper = tmp_path / f'fails_in_run_{run}.py'
    wrapper.write_text(
        f'import os\nimport sys\nsys.path.insert(0, {ROOT!r})\nfrom airbench94 import *\n'
        'from airbench94 import train as real_train\n\n'
        'def train(*args, run=None, **kwargs):\n'
        f'    if run == {run}:\n'
        f'        {failure}\n'
        '    return real_train(*args, run=run, **kwargs)\n')
    return wrapper


def test_a_failing_rank_stops_the_study(airbench94, tiny_data, tmp_path):
    """Rank 1 fails in its first run (run 1): the study ends at once, naming rank and run, and the
    log keeps run 0, which rank 0 finished in the same round."""
    recipe_file = failing_in_run(tmp_path, 1, 'raise RuntimeError("CUDA out of memory (simulated)")')
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'logs', '--runs', '6', recipe_file=recipe_file)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    assert 'rank 1 failed in run 1: RuntimeError: CUDA out of memory (simulated)' in done.stderr
    summary = only_summary(tmp_path / 'logs', 'fails_in_run_1')
    assert summary['status'] == 'failed' and [run['run'] for run in summary['runs']] == [0]
    assert f'1 finished run(s) kept in {tmp_path / "logs"}' in done.stderr


def test_ranks_must_run_one_experiment(airbench94):
    """Each rank loads its own recipe file and data (on other machines, perhaps other copies): any
    difference from rank 0 stops the study on every rank alike, naming the rank and what differs.
    The same data in another folder is no difference."""
    fingerprint = {'dir': '/data/cifar10', 'train_images': 50000, 'train_pixel_sum': 7}
    study.check_one_experiment([study.experiment(airbench94, airbench94.hyp, fingerprint),
                                study.experiment(airbench94, airbench94.hyp, {**fingerprint, 'dir': '/mnt/c10'})])
    # A hyp that JSON cannot hold has no repr that is the same in every process (a set's order, a
    # function's address): it is not compared.
    assert study.experiment(airbench94, {'aug': {'views': {'flip', 'crop'}}}, fingerprint)['hyp'] is None
    own = {'recipe source': 'ab12', 'hyp': '{}', 'data': {'train_images': 50000}, 'torch version': '2.4.1'}
    with pytest.raises(study.StudyFailed) as failure:
        study.check_one_experiment([own, dict(own), {**own, 'data': {'train_images': 3000}, 'torch version': '2.5'}])
    assert str(failure.value).startswith('the ranks differ from rank 0 (rank 2 in its data, torch version): ')
    for part in own:  # each part of an experiment counts
        with pytest.raises(study.StudyFailed, match=f'rank 1 in its {part}\\)'):
            study.check_one_experiment([own, {**own, part: 'other'}])


def test_a_rank_with_another_hyp_stops_the_study_before_it_starts(airbench94, tiny_data, tmp_path):
    """A recipe whose hyp depends on its machine (here on RANK): the one line from rank 0, no log."""
    recipe_file = tmp_path / 'hyp_by_rank.py'
    recipe_file.write_text(f'import os\nimport sys\nsys.path.insert(0, {ROOT!r})\nfrom airbench94 import *\n'
                           "hyp = {**hyp, 'aug': {**hyp['aug'], 'flip': os.environ['RANK'] == '0'}}\n")
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'logs', '--runs', '2', recipe_file=recipe_file)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    assert 'study.py: error: the ranks differ from rank 0 (rank 1 in its hyp): ' in done.stderr
    assert 'study.py", line' not in done.stderr and not (tmp_path / 'logs').exists()

def assert_rank_0_kept(done, summary):
    """Rank 0's one line for a rank whose process died: torchrun's SIGTERM, or the broken connection,
    whichever reached it first, with the log marked to match; no traceback from any rank (torchrun's
    own report of a failed child is one)."""
    stopped = {'interrupted': 'interrupted (SIGTERM)', 'failed': 'error: another rank ended the study'}
    assert f'rank 0: {stopped[summary["status"]]}' in done.stderr and 'study.py", line' not in done.stderr
    assert f'; {summary["n"]} finished run(s) kept in' in done.stderr


def test_a_rank_that_dies_outright(airbench94, tiny_data, tmp_path):
    """Rank 1's process ends in run 5 (its third): rank 0 stops too, keeping the runs of the two
    rounds gathered before, and run 4 if it finished it."""
    recipe_file = failing_in_run(tmp_path, 5, 'os._exit(1)')
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'logs', '--runs', '6', recipe_file=recipe_file)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    summary = only_summary(tmp_path / 'logs', 'fails_in_run_5')
    assert [run['run'] for run in summary['runs']][:4] == [0, 1, 2, 3] and summary['n'] <= 5
    assert_rank_0_kept(done, summary)


def test_a_rank_that_dies_while_rank_0_waits(airbench94, tiny_data, tmp_path):
    """Rank 1's process ends in run 1 once run 0 is in the log, where rank 0 waits for the round's
    results: rank 0 logged its own run before it waited, and keeps it."""
    logs = tmp_path / 'logs'
    recipe_file = failing_in_run(tmp_path, 1, f'wait_for_a_run({str(logs)!r}); os._exit(1)')
    with open(recipe_file, 'a') as file:
        file.write('\ndef wait_for_a_run(logs):\n    import glob, json, time\n'
                   '    while not any(json.load(open(path))["n"] for path in glob.glob(f"{logs}/*/*/summary.json")):\n'
                   '        time.sleep(0.05)\n')
    done, seconds = torchrun(airbench94, tiny_data, logs, '--runs', '4', recipe_file=recipe_file)
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    summary = only_summary(logs, 'fails_in_run_1')
    assert [run['run'] for run in summary['runs']] == [0]
    assert_rank_0_kept(done, summary)


def test_rank_0_failing_alone_is_one_line_on_every_rank(airbench94, tiny_data, tmp_path):
    """Rank 0 alone writes the log, so only it finds --log-dir a file; rank 1, left waiting for it,
    says it is stopped in one line, not gloo's traceback."""
    (tmp_path / 'a_file').write_text('')
    done, seconds = torchrun(airbench94, tiny_data, tmp_path / 'a_file', '--runs', '2')
    assert done.returncode != 0 and seconds < STUDY_TIMEOUT
    assert 'rank 0: error: cannot create the log folder' in done.stderr and 'study.py", line' not in done.stderr
    assert ('rank 1: error: another rank ended the study' in done.stderr
            or 'rank 1: interrupted (SIGTERM); rank 0 keeps the log' in done.stderr)


@pytest.mark.skipif(importlib.import_module('torch').cuda.is_available(), reason='this machine has CUDA')
def test_torchrun_without_cuda_asks_for_the_cpu(airbench94, tiny_data, tmp_path, capsys, monkeypatch):
    """As a rank that torchrun started (its environment), before any connection is made."""
    for key, value in {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(study.torch.distributed, 'init_process_group', lambda *a, **k: pytest.fail('connected'))
    arguments = study_args(airbench94, tiny_data, tmp_path, device=None)
    del arguments[arguments.index('--device'):arguments.index('--device') + 2]
    status, _, err = run_main(study, capsys, *arguments)
    assert status == 1
    assert 'study.py: rank 0: error: under torchrun each rank trains on cuda:LOCAL_RANK' in err
    assert 'add --device cpu' in err and not os.listdir(tmp_path)


def test_gather_timeout_outlasts_a_download_or_a_compile(monkeypatch):
    """The study's collectives wait while another rank downloads, compiles (max-autotune takes
    minutes) or trains alone: their timeout is gloo's, set to a day, not NCCL's 10 minutes."""
    calls = []
    monkeypatch.setattr(study.torch.distributed, 'init_process_group', lambda *a, **k: calls.append((a, k)))
    ranks = study.Ranks({'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0'})
    ranks.connect(study.torch.device('cpu'))
    [(args, kwargs)] = calls
    assert args == ('gloo',) and kwargs['timeout'].total_seconds() >= 6 * 3600
