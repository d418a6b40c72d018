"""compare.py: did a recipe change matter? Statistics of airbench studies, side by side.

    python compare.py logs/airbench94/<study> logs/airbench95/<study>     # log folders
    python compare.py logs/records/airbench94/*.json                       # or summary.json files

For every study: script, status, n, mean TTA accuracy, std, the 95% confidence interval of the
mean (Student's t), mean time and device; a study without a finished run is listed with n 0. For
exactly two studies, also the difference of their means with its 95% confidence interval and
two-sided p-value (Welch's t-test: no assumption that the variances are equal), and the ratio of
their mean times. Then a note for each study whose recipe source, hyp, data or setup (the GPUs,
how many ranks, torch's version) differ from study 1's, as far as both logs record them: a
difference there is part of what is being compared (a time ratio between two GPUs is mostly theirs).

It reads the summary.json that study.py and every recipe's own main write (format airbench-study/1) and needs
the Python standard library only, so it runs where torch is not installed. It sits at the top
level beside the scripts because, like them, it is one file to run or copy.
"""
import json
import math
import os
import sys

LOG_FORMAT = 'airbench-study/1'
SETUP = ('device_name', 'device_names', 'world_size', 'torch')  # what a study ran on, where its log says


class UserError(Exception):
    """A problem with the input; the message says which file and what to do."""


#############################################
#       Student's t (standard library)      #
#############################################

def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method), evaluated where it converges fast and mirrored with I_x(a, b) = 1 - I_(1-x)(b, a)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df > 0 degrees of freedom, df not necessarily whole."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_critical(df, confidence=0.95):
    """The t with P(|T| <= t) = confidence, by bisection: 2.064 for df=24, 1.960 as df grows."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1 - confidence:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, df) > 1 - confidence else (low, middle)
    return high


#############################################
#                 Statistics                #
#############################################

def study_stats(accuracies):
    """n, mean, std (n - 1 in the denominator) and the 95% confidence interval of the mean."""
    n = len(accuracies)
    mean = sum(accuracies) / n if n else None
    if n < 2:
        return {'n': n, 'mean': mean, 'std': None, 'ci95': None}
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1))
    half_width = t_critical(n - 1) * std / math.sqrt(n)
    return {'n': n, 'mean': mean, 'std': std, 'ci95': (mean - half_width, mean + half_width)}


def welch(first, second):
    """Welch's t-test of mean(second) - mean(first): the difference, its 95% confidence interval,
    the Welch-Satterthwaite degrees of freedom and the two-sided p-value."""
    a, b = study_stats(first), study_stats(second)
    if a['n'] < 2 or b['n'] < 2:
        raise UserError('a difference of means needs at least 2 runs in each study')
    va, vb = a['std'] ** 2 / a['n'], b['std'] ** 2 / b['n']
    difference = b['mean'] - a['mean']
    standard_error = math.sqrt(va + vb)
    if standard_error == 0:  # both studies constant: no spread to test against
        return {'difference': difference, 'ci95': (difference, difference), 'df': None,
                'p': 1.0 if difference == 0 else 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (a['n'] - 1) + vb ** 2 / (b['n'] - 1))
    half_width = t_critical(df) * standard_error
    return {'difference': difference, 'ci95': (difference - half_width, difference + half_width),
            'df': df, 'p': t_two_sided_p(difference / standard_error, df)}


#############################################
#                  Reading                  #
#############################################

def read_study(path):
    """The summary of the study at `path` (a log folder or its summary.json), checked."""
    file = os.path.join(path, 'summary.json') if os.path.isdir(path) else path
    try:
        with open(file, encoding='utf-8') as handle:
            summary = json.load(handle)
    except FileNotFoundError:
        raise UserError(f'{file} does not exist; give study log folders or their summary.json') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f'cannot read {file} as JSON ({type(exc).__name__}: {exc})') from None
    found = summary.get('format') if isinstance(summary, dict) else None
    if found != LOG_FORMAT:
        raise UserError(f'{file} is not a study summary of format {LOG_FORMAT} (its format: {found!r}); '
                        f'compare.py reads the summary.json that the airbench scripts write')
    runs = summary.get('runs')
    if not isinstance(runs, list) or not all(
            isinstance(run, dict) and isinstance(run.get('tta_val_acc'), (int, float))
            and isinstance(run.get('time_seconds'), (int, float)) for run in runs):
        raise UserError(f'{file}: its runs are damaged (each needs tta_val_acc and time_seconds)')
    accuracies = [run['tta_val_acc'] for run in runs]
    data = summary.get('data') if isinstance(summary.get('data'), dict) else {}
    def cell(*keys):  # the first of these entries that the summary holds, as text for the table
        return next((str(summary[key]) for key in keys if summary.get(key) is not None), '?')
    return {'path': file, 'script': cell('script'), 'status': cell('status'),
            'device': cell('device_name', 'device'), 'accuracies': accuracies,
            'mean_time': sum(run['time_seconds'] for run in runs) / len(runs) if runs else None,
            'source': summary.get('source_sha256'), 'hyp': summary.get('hyp'),
            'data': {key: value for key, value in data.items() if key != 'dir'},
            'setup': {key: summary[key] for key in SETUP if summary.get(key) is not None}, **study_stats(accuracies)}


def leaves(tree, prefix=''):
    """{dotted key: value} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix.rstrip('.'): tree}
    return {key: value for name, entry in tree.items() for key, value in leaves(entry, f'{prefix}{name}.').items()}


def same_entry(key, a, b):
    """A record attempt's log names its CPU 'cpu', a study's 'cpu (N threads)': only a study knows the threads."""
    if key == 'device_name' and 'cpu' in (a, b):
        return str(a).split(' (')[0] == str(b).split(' (')[0]
    return a == b


def differences(first, other):
    """What makes `other` a different experiment from `first`, as far as both logs tell: the recipe's
    source, hyp entries, the data, the setup."""
    found = []
    if first['source'] and other['source'] and first['source'] != other['source']:
        found.append('recipe source')
    if isinstance(first['hyp'], dict) and isinstance(other['hyp'], dict):
        a, b = leaves(first['hyp']), leaves(other['hyp'])
        changed = sorted(key for key in set(a) | set(b) if a.get(key, '?') != b.get(key, '?'))
        if changed:
            found.append(f'hyp ({", ".join(changed[:6])}{", ..." if len(changed) > 6 else ""})')
    for part in ('data', 'setup'):
        changed = sorted(key for key in set(first[part]) & set(other[part])
                         if not same_entry(key, first[part][key], other[part][key]))
        if changed:
            found.append(f'{part} ({", ".join(changed)})')
    return found


#############################################
#                  Report                   #
#############################################

def percent(x):
    return '-' if x is None else f'{100 * x:.2f}%'


def report(studies):
    """The table (and for two studies the comparison) as lines of text, then notes on what differs
    between study 1 and each other study besides what was meant to (read them before a verdict)."""
    header = ('study', 'script', 'status', 'n', 'mean', 'std', '95% CI', 'mean time', 'device')
    rows = [header]
    for number, study in enumerate(studies, 1):
        low_high = study['ci95'] or (None, None)
        interval = '-' if study['ci95'] is None else f'{percent(low_high[0])} to {percent(low_high[1])}'
        std = '-' if study['std'] is None else f'{100 * study["std"]:.2f}'
        time = '-' if study['mean_time'] is None else f'{study["mean_time"]:.3f} s'
        rows.append((str(number), study['script'], study['status'], str(study['n']), percent(study['mean']),
                     std, interval, time, study['device']))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f'{number}: {study["path"]}' for number, study in enumerate(studies, 1)]
    if len(studies) == 2 and min(study['n'] for study in studies) < 2:
        lines.append('2 - 1: not compared: a difference of means needs at least 2 runs in each study')
    elif len(studies) == 2:
        first, second = studies
        test = welch(first['accuracies'], second['accuracies'])
        low, high = test['ci95']
        ratio = f'{second["mean_time"] / first["mean_time"]:.3f}' if first['mean_time'] > 0 else '- (a time of 0)'
        lines.append(f'2 - 1: mean accuracy {100 * test["difference"]:+.2f} points '
                     f'(95% CI {100 * low:+.2f} to {100 * high:+.2f}; Welch p = {test["p"]:.3g}), '
                     f'time ratio {ratio}')
    for number, study in enumerate(studies[1:], 2):
        found = differences(studies[0], study)
        if found:
            lines.append(f'note: {number} differs from 1 in {"; ".join(found)}')
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(arg in ('-h', '--help') for arg in argv):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        print('\n'.join(report([read_study(path) for path in argv])))
    except UserError as exc:
        print(f'compare.py: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
