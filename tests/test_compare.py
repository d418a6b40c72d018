"""compare.py: the statistics of studies and of their difference, and its failure messages."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line

sys.path.insert(0, ROOT)
import compare  # noqa: E402  (a top-level script, like the recipes)

# Reference values computed with scipy 1.17.1 (scipy.stats.ttest_ind(second, first,
# equal_var=False), its confidence_interval(), and scipy.stats.t.interval), not with compare.py.
FIRST = [0.9401, 0.9388, 0.9415, 0.9392, 0.9420]
SECOND = [0.9502, 0.9489, 0.9511, 0.9478]
FIRST_MEAN, FIRST_STD, FIRST_CI = 0.94032, 0.001398928161129069, (0.9385830012662527, 0.9420569987337474)
WELCH = {'difference': 0.00918, 'ci95': (0.0068767545807791736, 0.011483245419220758),
         'df': 6.451305561524046, 'p': 4.7238184512408754e-05}
SMALL_SAMPLES = ([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 6.0, 7.0, 9.5])
SMALL_WELCH = {'df': 5.530593107048519, 'p': 0.11462159831641205,
               'ci95': (-0.9714561848192771, 6.771456184819278)}


def test_study_statistics_against_reference_values():
    stats = compare.study_stats(FIRST)
    assert stats['n'] == 5 and stats['mean'] == pytest.approx(FIRST_MEAN, abs=1e-12)
    assert stats['std'] == pytest.approx(FIRST_STD, rel=1e-9)
    assert stats['ci95'] == pytest.approx(FIRST_CI, rel=1e-9)
    assert compare.study_stats([0.9])['std'] is None and compare.study_stats([0.9])['ci95'] is None


@pytest.mark.parametrize('first, second, expected', [
    (FIRST, SECOND, WELCH),
    (*SMALL_SAMPLES, SMALL_WELCH),
])
def test_welch_test_against_reference_values(first, second, expected):
    result = compare.welch(first, second)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-7), key


def test_t_distribution_against_tables():
    for df, t in [(1, 12.7062), (4, 2.7764), (24, 2.0639), (1000, 1.9623)]:  # two-sided 95%
        assert compare.t_critical(df) == pytest.approx(t, abs=1e-4)
        assert compare.t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-4)
    assert compare.t_two_sided_p(0.0, 7.5) == pytest.approx(1.0)


@pytest.mark.parametrize('t, df, p', [  # p = 2 * the integral of the density from t up, by mpmath.quad at 30 digits
    (0.5, 10, 0.6278936057429729), (1.0, 3.5, 0.3813372535634455), (0.1, 40, 0.9208438530452802)])
def test_large_p_values_against_the_density(t, df, p):
    """Small differences: where the incomplete beta function is evaluated through its mirror."""
    assert compare.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-9)


def write_summary(folder, accuracies, times, script='airbench94.py', **extra):
    folder.mkdir(parents=True)
    runs = [{'run': i, 'tta_val_acc': accuracy, 'time_seconds': seconds}
            for i, (accuracy, seconds) in enumerate(zip(accuracies, times))]
    summary = {'format': 'airbench-study/1', 'script': script, 'status': 'complete',
               'device_name': 'NVIDIA A100', 'runs': runs, **extra}
    (folder / 'summary.json').write_text(json.dumps(summary))
    return folder


def run_compare(*paths):
    return subprocess.run([sys.executable, f'{ROOT}/compare.py', *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def test_two_studies_side_by_side(tmp_path):
    first = write_summary(tmp_path / 'a', FIRST, [4.0] * 5)
    second = write_summary(tmp_path / 'b', SECOND, [10.0] * 4, script='airbench95.py')
    done = run_compare(first, second / 'summary.json')  # a folder and a file
    assert done.returncode == 0 and done.stderr == ''
    header, row_a, row_b, *rest = done.stdout.splitlines()
    assert header.split()[:4] == ['study', 'script', 'status', 'n']
    assert row_a.split()[:7] == ['1', 'airbench94.py', 'complete', '5', '94.03%', '0.14', '93.86%']
    assert row_b.split()[:5] == ['2', 'airbench95.py', 'complete', '4', '94.95%']
    assert '4.000 s' in row_a and 'NVIDIA A100' in row_a
    comparison = rest[-1]
    assert '+0.92 points' in comparison and '95% CI +0.69 to +1.15' in comparison
    assert 'Welch p = 4.72e-05' in comparison and 'time ratio 2.500' in comparison


@pytest.mark.parametrize('content, problem', [
    ('{"format": "airbench-study/0", "runs": []}', "its format: 'airbench-study/0'"),
    ('[1, 2]', 'its format: None'),
    ('not json', 'cannot read'),
    ('{"format": "airbench-study/1", "runs": [{"tta_val_acc": "high"}]}', 'its runs are damaged'),
    ('{"format": "airbench-study/1", "runs": [{"time_seconds": 3.0}]}', 'its runs are damaged'),
])
def test_foreign_or_damaged_summaries_get_one_line(tmp_path, content, problem):
    path = tmp_path / 'summary.json'
    path.write_text(content)
    done = run_compare(path)
    assert done.returncode == 1 and done.stdout == '' and problem in done.stderr and str(path) in done.stderr
    assert_one_line(done.stderr)


@pytest.mark.parametrize('args, status', [([], 2), (['--help'], 0)])
def test_usage_without_arguments_or_with_help(args, status):
    done = run_compare(*args)
    assert done.returncode == status and done.stdout.startswith('compare.py: did a recipe change matter?')


def test_missing_path_and_too_few_runs(tmp_path):
    done = run_compare(tmp_path / 'nowhere')
    assert done.returncode == 1 and 'does not exist' in done.stderr
    assert_one_line(done.stderr)
    one_run = write_summary(tmp_path / 'one', [0.94], [3.0])
    done = run_compare(one_run, write_summary(tmp_path / 'two', FIRST, [3.0] * 5))
    assert done.returncode == 0 and done.stdout.count('\n') == 6  # header, 2 rows, 2 paths, note
    assert 'not compared: a difference of means needs at least 2 runs' in done.stdout
    with pytest.raises(compare.UserError, match='at least 2 runs'):
        compare.welch([0.94], FIRST)


def test_a_study_without_finished_runs_is_listed_not_fatal(tmp_path):
    """A diverged study (or one whose batch did not fit) leaves a log without runs: it is listed
    with n 0, and the other studies are still compared."""
    empty = write_summary(tmp_path / 'empty', [], [])
    done = run_compare(write_summary(tmp_path / 'a', FIRST, [4.0] * 5), empty,
                       write_summary(tmp_path / 'b', SECOND, [5.0] * 4))
    assert done.returncode == 0 and done.stderr == ''
    row = done.stdout.splitlines()[2].split()
    assert row[:5] == ['2', 'airbench94.py', 'complete', '0', '-']
    done = run_compare(write_summary(tmp_path / 'c', FIRST, [4.0] * 5), empty)
    assert done.returncode == 0 and 'not compared: a difference of means needs at least 2 runs' in done.stdout


def test_time_of_zero_gives_no_ratio(tmp_path):
    done = run_compare(write_summary(tmp_path / 'a', FIRST, [0.0] * 5), write_summary(tmp_path / 'b', SECOND, [1.0] * 4))
    assert done.returncode == 0 and done.stderr == '' and 'time ratio - (a time of 0)' in done.stdout


def test_notes_on_differences_beyond_the_compared_change(tmp_path):
    """Two studies that also differ in source, hyp, data and setup say so; equal ones say nothing."""
    hyp = {'opt': {'lr': 11.5, 'momentum': 0.85}, 'aug': {'flip': True}}
    data = {'dir': '/a', 'train_images': 50000, 'train_pixel_sum': 100}
    same = dict(source_sha256='abc', hyp=hyp, data=data, torch='2.4.1', world_size=1)
    first = write_summary(tmp_path / 'a', FIRST, [4.0] * 5, **same)
    done = run_compare(first, write_summary(tmp_path / 'b', SECOND, [4.0] * 4, **{**same, 'data': {**data, 'dir': '/b'}}))
    assert 'note:' not in done.stdout  # the same data in another folder is the same data
    other = write_summary(tmp_path / 'c', SECOND, [4.0] * 4, source_sha256='def',
                          hyp={'opt': {'lr': 10.0, 'momentum': 0.85, 'muon_lr': 0.24}, 'aug': {'flip': True}},
                          data={**data, 'train_pixel_sum': 99}, device_name='NVIDIA H100', torch='2.5.0',
                          world_size=1)
    done = run_compare(first, other)
    [note] = [line for line in done.stdout.splitlines() if line.startswith('note:')]
    assert note == ('note: 2 differs from 1 in recipe source; hyp (opt.lr, opt.muon_lr); data (train_pixel_sum); '
                    'setup (device_name, torch)')
    done = run_compare(first, write_summary(tmp_path / 'd', SECOND, [4.0] * 4))  # an older log: nothing to tell
    assert 'note:' not in done.stdout


def test_a_cpu_of_unknown_threads_is_not_a_setup_difference(tmp_path):
    """A record attempt on the CPU logs 'cpu', a study 'cpu (N threads)': the same CPU unless the threads differ."""
    def note(first_cpu, other_cpu):
        pair = tmp_path / f'{first_cpu} vs {other_cpu}'
        done = run_compare(write_summary(pair / 'a', FIRST, [4.0] * 5, device_name=first_cpu),
                           write_summary(pair / 'b', SECOND, [4.0] * 4, device_name=other_cpu))
        return [line for line in done.stdout.splitlines() if line.startswith('note:')]
    assert note('cpu', 'cpu (2 threads)') == [] and note('cpu (2 threads)', 'cpu') == []
    assert note('cpu (2 threads)', 'cpu (16 threads)') == ['note: 2 differs from 1 in setup (device_name)']
    assert note('cpu', 'NVIDIA A100') == ['note: 2 differs from 1 in setup (device_name)']


def test_missing_or_null_text_fields_are_shown_as_unknown(tmp_path):
    """A summary written by hand or by an older tool: null where the table wants text is '?'."""
    done = run_compare(write_summary(tmp_path / 'a', FIRST, [4.0] * 5, script=None, device_name=None, status=None),
                       write_summary(tmp_path / 'b', SECOND, [4.0] * 4))
    assert done.returncode == 0 and done.stderr == ''
    assert done.stdout.splitlines()[1].split()[:4] == ['1', '?', '?', '5']
    assert done.stdout.splitlines()[1].split()[-1] == '?'
