"""study.py: many trainings of any recipe, with overrides, seeds, torchrun, crash-safe logs and statistics.

    python study.py airbench95 --runs 50 --set opt.lr=9.5        # a recipe of this folder, by name
    python study.py ~/work/my_airbench94.py --runs 200 --seed 0  # any file with the recipe contract
    torchrun --standalone --nproc_per_node=8 study.py airbench94 --runs 1000 --seed 0
    python compare.py logs/airbench94/<study> logs/airbench95/<study>   # did the change matter?

The recipe contract: a Python file (loaded by path, so an edited copy works in any folder, alone)
that defines
    hyp                  the nested dict {'opt': ..., 'aug': ..., 'net': ...}; --set overrides its leaves
    CifarLoader(data_dir, train, batch_size, aug, device=...)  the data, with attributes data_dir,
                         images (a tensor, whose pixel sum fingerprints the data) and labels;
                         it fails with UserError
    train(hyp, train_loader, test_loader, device, run=None, verbose=True) -> (model, result)
                         one timed training; test_loader None builds the recipe's own; result has at
                         least the numbers tta_val_acc, val_acc (0 to 1) and time_seconds (floats or
                         one-element tensors; whatever else JSON cannot hold is logged as its repr)
    warmup(hyp, train_loader, device, verbose=True)  optional: the untimed warm-up (compilation,
                         cuDNN autotuning) wherever the recipe needs one; it may use up the loader
    check_hyp(hyp)       optional: raises UserError for values of its own keys that make no sense
                         (study.py's CHECKS cover the keys of this folder's recipes)
    UserError            optional: an exception whose message is one line that says what to do

What a study does: run i is trained on a training loader built after
torch.manual_seed(run_seed(seed, i)), so a study is the same set of trainings however its runs are
spread over processes. Under torchrun the ranks first check that they are about to run one
experiment (the recipe's source, hyp, data and torch version alike on every machine); rank r of K
trains runs r, r+K, ... on cuda:LOCAL_RANK (or the CPU); after each round the results are gathered
over gloo (small Python objects; its timeout is a day, so a download, a compile or a slow rank
cannot trip it), rank 0 prints the table and writes the one log, and a rank whose run fails stops
the study with one line naming it (a rank whose process dies, with one line from each rank still
alive, rank 0 keeping its own finished runs). The log, logs/<recipe>/<UTC time>-<id>/, holds
summary.json (hyp, every run's result and seed, statistics, status, device, torch, data, command)
and log.pt (the same, the recipe's source and the accuracies as a tensor), rewritten together after
every run: a stopped study (Ctrl-C, SIGTERM, a full disk, a failing run) keeps every finished run.
"""
import argparse
import ast
import contextlib
import copy
import datetime
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import secrets
import shlex
import signal
import sys
import traceback

NOT_STARTED = 'before the study started; nothing was logged'

try:
    import torch
except KeyboardInterrupt:  # Ctrl-C in the second or two that torch takes to load: one line, as after it
    print(f'study.py: interrupted (SIGINT) {NOT_STARTED}', file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.raise_signal(signal.SIGINT)  # as run_as_script ends a stopped study, for the same reason

HERE = os.path.dirname(os.path.abspath(__file__))
LOG_FORMAT = 'airbench-study/1'
GATHER_TIMEOUT = datetime.timedelta(hours=24)


class StudyError(Exception):
    """A problem the user can fix; the message says how. It ends the study in one line."""


class StudyFailed(StudyError):
    """A run failed on some rank; every rank knows, and rank 0 alone reports it."""


class RankLost(StudyError):
    """Another rank's process ended (it failed on its own, or died): the connection broke."""


#############################################
#                 Recipes                   #
#############################################

def load_recipe(spec):
    """The recipe module named by `spec`: a path to a .py file, or the name of a recipe beside
    this file (airbench94). Loaded from its file, under its own name when that name is free."""
    path = spec if spec.endswith('.py') or os.sep in spec else os.path.join(HERE, f'{spec}.py')
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(HERE) if f.startswith('airbench') and f.endswith('.py'))
        raise StudyError(f'no recipe {spec!r}: give a recipe file or one of {", ".join(known)}')
    name = os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if os.path.abspath(path) == os.path.abspath(getattr(loaded, '__file__', None) or '.'):
        loaded.recipe_name = name
        return loaded  # imported already: its compiled networks and any changes made to it hold
    module_name = name if loaded is None else f'{name}_{secrets.token_hex(4)}'
    specification = importlib.util.spec_from_file_location(module_name, os.path.abspath(path))
    recipe = importlib.util.module_from_spec(specification)
    sys.modules[module_name] = recipe  # what torch.compile and pickle look modules up in
    try:
        specification.loader.exec_module(recipe)
    except Exception as exc:
        del sys.modules[module_name]
        raise StudyError(f'cannot load the recipe {path} ({first_line(exc)})') from exc
    missing = [attr for attr in ('hyp', 'CifarLoader', 'train') if not hasattr(recipe, attr)]
    if missing or not isinstance(getattr(recipe, 'hyp', None), dict):
        raise StudyError(f'{path} is not a recipe: it lacks {", ".join(missing) or "a dict hyp"} '
                         f'(study.py --help gives the contract)')
    recipe.recipe_name = name
    return recipe


def user_errors(recipe):
    """The exceptions that end a study in one line: study.py's, and the recipe's UserError."""
    own = getattr(recipe, 'UserError', None)
    return (StudyError, own) if isinstance(own, type) and issubclass(own, Exception) else (StudyError,)


def hyp_keys(tree, prefix=''):
    """Dotted names of every leaf of a nested dict: ['opt.train_epochs', ...]."""
    keys = []
    for name, value in tree.items():
        keys += hyp_keys(value, f'{prefix}{name}.') if isinstance(value, dict) else [prefix + name]
    return keys


def finite(value):
    """Whether every float in value (a number, or tuples and lists of them) is finite: 1e999 is inf."""
    if isinstance(value, (list, tuple)):
        return all(finite(entry) for entry in value)
    return not isinstance(value, float) or math.isfinite(value)


def override_hyp(base, overrides):
    """A deep copy of `base` with `overrides` applied: {'opt.lr': 10.0, 'net.widths.block1': 96}.
    A dict value sets the entries it names. Unknown keys, values whose type differs from the
    entry's (an int for a float is fine) and values that are not finite raise StudyError."""
    result = copy.deepcopy(base)
    pending = list(overrides.items())
    while pending:
        key, value = pending.pop(0)
        *path, leaf = key.split('.')
        node = result
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise StudyError(f'unknown hyp key {key!r}; valid keys: {", ".join(hyp_keys(base))}')
        old = node[leaf]
        if isinstance(old, dict) and isinstance(value, dict):
            pending += [(f'{key}.{name}', entry) for name, entry in value.items()]
            continue
        try:
            node[leaf] = float(value) if type(old) is float and type(value) is int else value
        except OverflowError:
            raise StudyError(f'{key} must be a float (like {old!r}), not an integer of '
                             f'{len(str(value))} digits') from None
        if not finite(node[leaf]):  # 1e999 reads as inf, which passes checks such as v > 0 (a recipe's own may mean it)
            raise StudyError(f'{key} must be finite, not {node[leaf]!r}')
        same_kind = isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))
        if type(node[leaf]) is not type(old) and not same_kind:
            raise StudyError(f'{key} must be of type {type(old).__name__} (like {old!r}), not {value!r}')
    return result


def knots_rise(knots):
    return (len(knots) >= 2 and all(isinstance(k, (list, tuple)) and len(k) == 2
                                    and all(isinstance(v, (int, float)) for v in k) for k in knots)
            and knots[0][0] == 0 and knots[-1][0] == 1 and all(a[0] < b[0] for a, b in zip(knots, knots[1:])))


def compile_backends():
    return torch.compiler.list_backends(exclude_tags=())


# What a value must be, for each key of any recipe (and every leaf under it), checked after --set
# and before any time is spent; the types come from the recipe's own hyp. A recipe may add a
# check_hyp(hyp) of its own for keys of its own.
CHECKS = {
    'opt.train_epochs': (lambda v: v > 0, 'positive'),
    'opt.batch_size': (lambda v: v >= 1, 'at least 1'),
    'opt.lr': (lambda v: v > 0, 'positive'),
    'opt.bias_scaler': (lambda v: v > 0, 'positive'),
    'opt.muon_lr': (lambda v: v > 0, 'positive'),
    'opt.bias_lr': (lambda v: v > 0, 'positive'),
    'opt.head_lr': (lambda v: v > 0, 'positive'),
    'opt.weight_decay': (lambda v: v >= 0, 'at least 0'),
    'opt.momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'opt.muon_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'opt.newton_schulz_steps': (lambda v: v >= 1, 'at least 1'),
    'opt.label_smoothing': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'opt.lr_knots': (knots_rise, '(fraction, multiplier) pairs with fractions rising from 0 to 1'),
    'opt.whiten_bias_epochs': (lambda v: v >= 0, 'at least 0'),
    'opt.proxy_whiten_bias_epochs': (lambda v: v >= 0, 'at least 0'),
    'opt.renorm_intervals': (lambda v: len(v) == 2 and 1 <= v[0] <= v[1], '(first, last) steps, 1 <= first <= last'),
    'opt.lookahead_every': (lambda v: v >= 1, 'at least 1'),
    'opt.lookahead_decay': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'opt.filter_keep': (lambda v: 0 < v <= 1, 'in (0, 1]'),
    'opt.proxy_every': (lambda v: v >= 1, 'at least 1'),
    'aug.translate': (lambda v: 0 <= v <= 31, 'between 0 and 31 pixels (reflect padding needs less than the image)'),
    'aug.cutout': (lambda v: 0 <= v <= 32, 'between 0 and 32 pixels'),
    'aug.brightness': (lambda v: v >= 0, 'at least 0'),
    'aug.contrast': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'net.widths': (lambda v: v >= 1, 'at least 1'),
    'net.proxy_widths': (lambda v: v >= 1, 'at least 1'),
    'net.batchnorm_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'net.whiten_images': (lambda v: v >= 1, 'at least 1'),
    'net.whiten_eps': (lambda v: v > 0, 'positive'),
    'net.tta_level': (lambda v: v in (0, 1, 2), '0, 1 or 2'),
    'net.tta_share': (lambda v: 0 < v <= 1, 'in (0, 1]'),
    'net.compile_backend': (lambda v: v in compile_backends(), 'one of torch.compile\'s backends'),
    'net.compile_mode': (lambda v: v in ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                         "one of 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'"),
}


def check_hyp(hyp, recipe=None):
    """Raises StudyError for the first value that CHECKS (or the recipe's check_hyp) rejects."""
    for key in hyp_keys(hyp):
        value = hyp
        for name in key.split('.'):
            value = value[name]
        for prefix, (ok, meaning) in CHECKS.items():
            if key == prefix or key.startswith(prefix + '.'):
                try:
                    valid = ok(value)
                except TypeError:  # e.g. a list of numbers where pairs belong
                    valid = False
                if not valid:
                    extra = f' ({", ".join(compile_backends())})' if prefix == 'net.compile_backend' else ''
                    raise StudyError(f'{key} must be {meaning}{extra}, not {value!r}')
    if recipe is not None and hasattr(recipe, 'check_hyp'):
        recipe.check_hyp(hyp)


def parse_overrides(assignments):
    """['opt.lr=10', ...] -> {'opt.lr': 10}; values are Python literals, anything else a string."""
    overrides = {}
    for assignment in assignments:
        key, equals, text = assignment.partition('=')
        if not equals or not key.strip():
            raise StudyError(f'--set expects KEY=VALUE, e.g. opt.train_epochs=12, not {assignment!r}')
        try:
            overrides[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = text.strip()
    return overrides


#############################################
#                Statistics                 #
#############################################

def run_seed(base_seed, run):
    """The seed of run `run` of a study: a function of (base_seed, run) alone, so a study is the
    same set of trainings however its runs are ordered or spread over devices."""
    digest = hashlib.sha256(f'{base_seed}:{run}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1  # 63 bits: what torch.manual_seed accepts


def t_two_sided(t, df):
    """P(|T| <= t) for Student's t with integer df >= 1, by the finite series of Abramowitz and
    Stegun 26.7.3 (odd df) and 26.7.4 (even df)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, series = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            series, term = series + term, term * cos2 * 2 * j / (2 * j + 1)
        return 2 / math.pi * (theta + math.sin(theta) * series)
    term, series = 1.0, 0.0
    for j in range(df // 2):
        series, term = series + term, term * cos2 * (2 * j + 1) / (2 * j + 2)
    return math.sin(theta) * series


def t_critical(df, confidence=0.95):
    """The t with P(|T| <= t) = confidence, by bisection: 2.064 for df=24, 1.960 as df grows."""
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < confidence:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) < confidence else (low, middle)
    return high


def summarize(results):
    """Study statistics of the TTA accuracy: n, mean, std, the 95% confidence interval of the mean
    (Student's t), and the mean time. std and the interval need two runs; with one they are None."""
    accs = [r['tta_val_acc'] for r in results]
    n = len(accs)
    stats = {'n': n, 'mean': None, 'std': None, 'ci95': None, 'mean_time_seconds': None,
             'mean_val_acc': None}
    if n:
        stats['mean'] = sum(accs) / n
        stats['mean_time_seconds'] = sum(r['time_seconds'] for r in results) / n
        stats['mean_val_acc'] = sum(r['val_acc'] for r in results) / n
    if n >= 2:
        stats['std'] = math.sqrt(sum((a - stats['mean']) ** 2 for a in accs) / (n - 1))
        half_width = t_critical(n - 1) * stats['std'] / math.sqrt(n)
        stats['ci95'] = [stats['mean'] - half_width, stats['mean'] + half_width]
    return stats


def format_summary(name, stats):
    def pct(x):
        return f'{100 * x:.2f}%'
    line = f'{name}: {stats["n"]} run{"s" if stats["n"] != 1 else ""}, mean TTA accuracy {pct(stats["mean"])}'
    if stats['std'] is not None:
        low, high = stats['ci95']
        line += f' (std {100 * stats["std"]:.2f}, 95% CI {pct(low)} to {pct(high)})'
    return line + f', without TTA {pct(stats["mean_val_acc"])}, mean time {stats["mean_time_seconds"]:.3f} s'


#############################################
#                   Logs                    #
#############################################

def atomic_write(writers):
    """{path: write(file)}: all files are written to temporaries of their own first (random names, which
    no other process writes, on any host) and renamed into place only when every one is complete, so a
    full disk leaves the last complete set. Only a process killed between the renames (SIGKILL, a power
    cut) could leave them one write apart; Ctrl-C and SIGTERM there are followed by a rewrite of both."""
    temporaries = {path: f'{path}.{os.urandom(6).hex()}.tmp' for path in writers}
    try:
        for path, write in writers.items():
            with open(temporaries[path], 'xb') as file:  # the permissions of any new file, not mkstemp's 0600
                write(content := io.BytesIO())  # whole first: torch.save's own writes make a full disk a RuntimeError
                file.write(content.getbuffer())
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)


class StudyLog:
    """logs/<recipe>/<UTC time>-<8 hex>/: log.pt (the recipe's source, the accuracies as a tensor,
    the summary) and summary.json (the summary: info, statistics, every run's result)."""

    def __init__(self, log_root, recipe, info):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H-%M-%SZ')
        self.dir = os.path.join(log_root, recipe.recipe_name, f'{stamp}-{secrets.token_hex(4)}')
        try:
            os.makedirs(self.dir)
        except OSError as exc:
            raise StudyError(f'cannot create the log folder {self.dir} ({first_line(exc)}); '
                             f'give a writable --log-dir') from None
        with open(recipe.__file__, encoding='utf-8') as file:
            self.source = file.read()
        self.results, self.saved = [], 0
        self.info = {'format': LOG_FORMAT, 'script': recipe.recipe_name + '.py', 'status': 'running',
                     'recipe_path': os.path.abspath(recipe.__file__), 'started': stamp,
                     'source_sha256': hashlib.sha256(self.source.encode()).hexdigest(), **info}
        self.write()

    def add(self, *results):
        """Logs finished runs in one write. They are kept in memory whatever stops it (a signal, a full disk):
        the closing rewrite holds them if it can be written, and `saved` counts what the files hold."""
        self.results.extend(results)
        self.write()

    def close(self, status):
        """Marks the log; raises StudyError when it cannot be written."""
        self.info['status'] = status
        self.write()

    def summary(self):
        return {**self.info, **summarize(self.results), 'runs': self.results}

    def write(self):
        summary = self.summary()
        text = json.dumps(summary, indent=2, default=repr) + '\n'  # a recipe's hyp may hold a torch.dtype
        accs = torch.tensor([r['tta_val_acc'] for r in summary['runs']], dtype=torch.float64)
        log = {**summary, 'code': self.source, 'accs': accs}
        try:
            atomic_write({os.path.join(self.dir, 'summary.json'): lambda file: file.write(text.encode()),
                          os.path.join(self.dir, 'log.pt'): lambda file: torch.save(log, file)})
        except OSError as exc:  # a full disk: both files keep their last complete write
            raise StudyError(f'cannot write the log ({first_line(exc)})') from None
        self.saved = len(summary['runs'])  # what the files hold, which a stop reports


def data_fingerprint(train_loader, test_loader):
    """Enough to tell two data sets apart (CIFAR-10 from its JPEG stand-in, a subset)."""
    return {'dir': os.path.abspath(train_loader.data_dir), 'train_images': len(train_loader.images),
            'test_images': len(test_loader.images), 'train_pixel_sum': int(train_loader.images.sum(dtype=torch.int64)),
            'test_pixel_sum': int(test_loader.images.sum(dtype=torch.int64))}


#############################################
#            Processes and devices          #
#############################################

def resolve_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StudyError(f'unknown device {name!r}; use cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):
        raise StudyError(f'device {name!r} is not supported; use cpu, cuda or cuda:N')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise StudyError(f'--device {name} asks for CUDA, but this torch {torch.__version__} sees no '
                         f'CUDA GPU; run with --device cpu, or install a CUDA build of torch')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise StudyError(f'--device {name}: there are only {torch.cuda.device_count()} CUDA devices')
    return device


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'


class Ranks:
    """The processes of one study. Without torchrun there is one, and torch.distributed is never
    touched. Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) there is one per rank,
    and gather() brings every rank's small Python object to every rank, over gloo whatever the
    device: the study moves no tensors between ranks, and gloo's timeout is ours to set."""

    def __init__(self, environ=os.environ):
        self.distributed = 'RANK' in environ and 'WORLD_SIZE' in environ
        self.rank, self.size = int(environ.get('RANK', 0)), int(environ.get('WORLD_SIZE', 1))
        self.local_rank = int(environ.get('LOCAL_RANK', 0))

    def device(self, name):
        """As asked without torchrun; under it, cuda:LOCAL_RANK, or the CPU with --device cpu."""
        if not self.distributed:
            return resolve_device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
        if name not in (None, 'cuda', 'cpu'):
            raise StudyError(f'under torchrun each rank trains on cuda:LOCAL_RANK (--device cuda, the '
                             f'default) or on the CPU (--device cpu), not on --device {name}')
        if name != 'cpu' and not torch.cuda.is_available():
            raise StudyError(f'under torchrun each rank trains on cuda:LOCAL_RANK, but this torch '
                             f'{torch.__version__} sees no CUDA GPU; add --device cpu')
        return resolve_device('cpu' if name == 'cpu' else f'cuda:{self.local_rank}')

    def connect(self, device):
        if self.distributed:
            if device.type == 'cuda':
                torch.cuda.set_device(device)
            torch.distributed.init_process_group('gloo', timeout=GATHER_TIMEOUT)

    def gather(self, value):
        """Every rank's value, in rank order; [value] without torchrun. A rank whose process has ended
        breaks the connection: RankLost, a line of its own, not gloo's traceback."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        try:
            torch.distributed.all_gather_object(values, value)
        except RuntimeError as exc:  # gloo's DistBackendError: '[.../pair.cc:553] Connection closed by peer ...'
            reason = re.sub(r'^\[[^\]]*\]\s*', '', first_line(exc).split(': ', 1)[-1]).split('. ')[0]
            raise RankLost(f'another rank ended the study ({reason}); its line, or torchrun\'s report, '
                           f'says why') from None
        return values

    def close(self):
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def attempt(ranks, errors, what, work):
    """work()'s value. Under torchrun a failure is returned instead, as {'error': ...} naming the
    rank and `what`: the other ranks must hear of it rather than wait for this rank forever.
    Without torchrun it is raised as it is."""
    try:
        return work()
    except Exception as exc:
        if not ranks.distributed:
            raise
        if not isinstance(exc, errors):
            traceback.print_exc()  # a bug or e.g. out of memory: the traceback matters
        return {'error': f'rank {ranks.rank} failed in {what}: '
                         f'{exc if isinstance(exc, errors) else first_line(exc)}'}


def experiment(recipe, study_hyp, fingerprint):
    """What this rank is about to run: the recipe's source, the hyp, the data and torch's version.
    Each rank loads its own recipe file and data (on another machine, perhaps another copy)."""
    with open(recipe.__file__, 'rb') as file:
        source = hashlib.sha256(file.read()).hexdigest()
    try:  # a function's or a set's repr differs from process to process: such a hyp is not compared
        hyp = json.dumps(study_hyp, sort_keys=True)
    except (TypeError, ValueError):
        hyp = None
    return {'recipe source': source, 'hyp': hyp,
            'data': {key: value for key, value in fingerprint.items() if key != 'dir'},  # a folder's name may differ
            'torch version': torch.__version__}


def check_one_experiment(experiments):
    """Raises StudyFailed, on every rank alike, unless every rank's experiment is rank 0's: one log
    must not mix two recipes, two data sets or two torch versions."""
    differing = [f'rank {rank} in its {", ".join(part for part in own if own[part] != experiments[0][part])}'
                 for rank, own in enumerate(experiments) if own != experiments[0]]
    if differing:
        raise StudyFailed(f'the ranks differ from rank 0 ({"; ".join(differing)}): a study is one experiment; '
                          f'give every machine the same recipe file, data and torch')


def stop_on_failures(outcomes):
    """Raises StudyFailed, on every rank alike, when any rank's outcome is a failure."""
    errors = [outcome['error'] for outcome in outcomes if outcome is not None and 'error' in outcome]
    if errors:
        raise StudyFailed('; '.join(errors))


#############################################
#                 The study                 #
#############################################

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='study.py', formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split('\n\nThe recipe contract')[0])
    parser.add_argument('recipe', help='a recipe name (airbench94, airbench95, ...) or the path of a recipe file')
    parser.add_argument('--runs', type=int, default=25, help='timed trainings in the study (default: %(default)s)')
    parser.add_argument('--data-dir', default=None,
                        help='folder of the CIFAR-10 cache, which must exist unless it is the default; '
                             'CIFAR-10 is downloaded into it when missing (default: $CIFAR10_DIR, else ./cifar10)')
    parser.add_argument('--device', default=None,
                        help='cpu, cuda or cuda:N (default: cuda when available). The CPU trains in fp32, '
                             'hundreds of times slower')
    parser.add_argument('--log-dir', default='logs',
                        help='where the study log folder is created (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=None,
                        help='base seed; run i is seeded from (SEED, i), so a study can be repeated '
                             '(default: a random one, printed and logged)')
    parser.add_argument('--no-warmup', action='store_true',
                        help="skip the recipe's untimed warm-up (on CUDA, and wherever a recipe compiles); "
                             'the first run then pays for autotuning or compilation')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help="override a leaf of the recipe's hyp, e.g. --set opt.train_epochs=12 --set "
                             "net.widths.block1=96; the value is a Python literal; repeatable")
    parser.epilog = __doc__[__doc__.index('The recipe contract'):] + keys_epilog(parser, argv)
    parser.error = lambda message: parser.exit(2, f'study.py: error: {message} (see --help)\n')
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f'--runs must be at least 1, not {args.runs}')
    return args


def keys_epilog(parser, argv):
    """With a recipe anywhere in a command line that asks for --help, the hyp keys that --set accepts
    for it (found as the parser finds it: `--runs 5 airbench95 --help` names airbench95, not 5)."""
    asks_for_help = [arg for arg in argv if arg == '-h' or len(arg) > 2 and '--help'.startswith(arg)]  # --hel too
    if not asks_for_help:
        return ''
    finder = copy.copy(parser)

    def no_recipe(message):  # none given, or a value the parser refuses: the help without keys
        raise StudyError(message)
    finder.error = no_recipe
    with contextlib.suppress(StudyError):
        recipe = load_recipe(finder.parse_known_args([arg for arg in argv if arg not in asks_for_help])[0].recipe)
        return f'\n\n--set keys of {recipe.recipe_name}: {", ".join(hyp_keys(recipe.hyp))}\n'
    return ''


def run_study(args, argv, ranks, state):
    """The study itself; `state` keeps the recipe's errors and the log for main's handlers."""
    recipe = load_recipe(args.recipe)
    state['errors'], state['name'] = user_errors(recipe), recipe.recipe_name
    name = recipe.recipe_name
    study_hyp = override_hyp(recipe.hyp, parse_overrides(args.set))
    check_hyp(study_hyp, recipe)
    data_dir = args.data_dir or os.environ.get('CIFAR10_DIR') or 'cifar10'
    if os.path.isfile(data_dir) or (not os.path.isdir(data_dir) and data_dir != 'cifar10'):
        given = '--data-dir' if args.data_dir else '$CIFAR10_DIR'
        raise StudyError(f'{given} {data_dir} is not a folder; correct it, or create it to download '
                         f'CIFAR-10 into it')
    device = ranks.device(args.device)

    def train_loader():
        return recipe.CifarLoader(data_dir, True, study_hyp['opt']['batch_size'], study_hyp['aug'], device=device)

    ranks.connect(device)
    if ranks.local_rank > 0:
        ranks.gather(None)  # wait for local rank 0 to load the data, building the cache if need be
    loaders = attempt(ranks, state['errors'], 'loading the data',
                      lambda: (train_loader(), recipe.CifarLoader(data_dir, False, device=device)))
    if ranks.local_rank == 0:
        ranks.gather(None)
    stop_on_failures(ranks.gather(loaders if isinstance(loaders, dict) else None))
    fingerprint = data_fingerprint(*loaders)
    check_one_experiment(ranks.gather(experiment(recipe, study_hyp, fingerprint)))
    base_seed = ranks.gather(secrets.randbits(32) if args.seed is None else args.seed)[0]
    device_names = ranks.gather(device_name(device))
    own_runs = range(ranks.rank, args.runs, ranks.size)
    if ranks.rank == 0:
        state['log'] = log = StudyLog(args.log_dir, recipe, {
            'command': shlex.join(['study.py'] + argv), 'argv': argv, 'hyp': study_hyp, 'seed': base_seed,
            'device': str(device), 'device_name': device_names[0], 'torch': str(torch.__version__),
            'python': sys.version.split()[0], 'world_size': ranks.size, 'device_names': device_names,
            'data': fingerprint})
        where = device_names[0] if ranks.size == 1 else f'{ranks.size} ranks ({", ".join(device_names)})'
        print(f'{name}: study of {args.runs} run(s) on {where}, torch {torch.__version__}, '
              f'seed {base_seed}, log {log.dir}', flush=True)
    if not own_runs:
        print(f'{name}: rank {ranks.rank} is idle: {args.runs} run(s) for {ranks.size} ranks', flush=True)
    warmup = None
    if hasattr(recipe, 'warmup') and not args.no_warmup and own_runs:
        warmup = attempt(ranks, state['errors'], 'its warm-up',
                         lambda: {'warmed_up': recipe.warmup(study_hyp, loaders[0], device, verbose=ranks.rank == 0)})
    stop_on_failures(ranks.gather(warmup))
    loaders = None  # each run builds its own after seeding: the warm-up may have used these up
    for first_run in range(0, args.runs, ranks.size):  # a round: one run on each rank
        run, outcome = first_run + ranks.rank, None
        if run < args.runs:
            outcome = attempt(ranks, state['errors'], f'run {run}',
                              lambda: train_run(recipe, study_hyp, base_seed, run, train_loader, device, ranks))
        if ranks.rank == 0 and outcome is not None and 'error' not in outcome:
            log.add(outcome)  # before the gather, which a dying rank breaks
        outcomes = ranks.gather(outcome)
        others = [finished for finished in outcomes[1:] if finished is not None and 'error' not in finished]
        if ranks.rank == 0 and others:
            log.add(*others)  # one write for the round: a signal cannot keep some of its runs and drop the rest
            for finished in others:
                print(f'{name}: run {finished["run"]} (rank {finished["rank"]}): TTA accuracy '
                      f'{finished["tta_val_acc"]:.4f} in {finished["time_seconds"]:.3f} s', flush=True)
        stop_on_failures(outcomes)
    stop.held = True  # every run is done: a signal now must not mark a complete study interrupted
    if ranks.rank == 0:
        log.close('complete')  # a full disk here is a failure: the log would still say running
        print(format_summary(name, log.summary()))
        print(f'{name}: log written to {log.dir}')


def train_run(recipe, study_hyp, base_seed, run, make_train_loader, device, ranks):
    """Run `run` of the study, seeded from (base_seed, run) before its loader is built: its entry in
    the log, as JSON holds it."""
    seed = run_seed(base_seed, run)
    torch.manual_seed(seed)
    _, result = recipe.train(study_hyp, make_train_loader(), None, device, run=run, verbose=ranks.rank == 0)
    entry = {'run': run, 'seed': seed, **result, **({'rank': ranks.rank} if ranks.distributed else {})}
    for key in ('tta_val_acc', 'val_acc', 'time_seconds'):
        try:
            entry[key] = float(entry[key])
            if not math.isfinite(entry[key]):  # nan from an empty test set: no statistic could use it
                raise ValueError
        except (KeyError, TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of many numbers
            raise StudyError(f'{recipe.recipe_name}.train returned {entry.get(key)!r:.60} as {key}, not a finite '
                             f'number (the recipe contract, in study.py --help)') from None
    return json.loads(json.dumps(entry, default=lambda value: value.item() if isinstance(value, torch.Tensor)
                                 and value.numel() == 1 else repr(value)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ranks = Ranks()
    state = {'errors': (StudyError,), 'log': None, 'name': 'study.py'}
    previous_handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in [number for number, handler in previous_handlers.items() if handler is not signal.SIG_IGN]:
        signal.signal(number, stop)  # ignored (a background job's Ctrl-C) stays ignored
    stop.held = False  # until the study is stopping, or done
    try:
        run_study(parse_args(argv), argv, ranks, state)  # parsing too: --help may load a recipe, torch and all
    except KeyboardInterrupt as exc:
        stop.held = True  # stop holds them already; a KeyboardInterrupt raised in a recipe does not
        log, signal_name = state['log'], str(exc) or 'SIGINT'
        status = 128 + signal.Signals.__members__.get(signal_name, signal.SIGINT)  # a recipe's own: as Ctrl-C
        if ranks.rank > 0:
            fail(f'interrupted ({signal_name}); rank 0 keeps the log', ranks, status)
        if log is None:
            fail(f'interrupted ({signal_name}) {NOT_STARTED}', ranks, status)
        with contextlib.suppress(StudyError):  # then it keeps its last complete write
            log.close('interrupted')
        fail(f'interrupted ({signal_name}); {log.saved} finished run(s) kept in {log.dir}', ranks, status)
    except Exception as exc:
        stop.held = True  # first, and no call (a call runs a pending signal's handler): none may escape this one
        log = state['log']
        if log is not None:
            with contextlib.suppress(StudyError):
                log.close('failed')
        kept = '' if log is None else f'; {log.saved} finished run(s) kept in {log.dir}'
        if not isinstance(exc, state['errors']):  # a bug or e.g. out of memory: the traceback matters
            traceback.print_exc()
            fail(kept[2:] if kept else f'stopped {NOT_STARTED}', ranks)
        if isinstance(exc, StudyFailed):  # every rank is here: rank 0 reports, then all leave
            if ranks.rank == 0:
                print(f'study.py: error: {exc}{kept}', file=sys.stderr, flush=True)
            with contextlib.suppress(RankLost):
                ranks.gather(None)  # were another rank to exit first, torchrun would stop rank 0
            sys.exit(1)
        fail(f'error: {exc}{kept}', ranks)
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
        with contextlib.suppress(RuntimeError):  # a connection another rank broke
            ranks.close()


def stop(signum, frame):
    """Ctrl-C and SIGTERM (torchrun, schedulers, timeout, kill) end a study alike: the log is marked and
    keeps every finished run. A signal once the study is stopping does nothing: it must not cut the
    last write of the log short, nor escape the handler that makes it with a traceback. (SIG_IGN
    would not do: a signal already pending then prints CPython's 'ignored due to race condition'.)"""
    if not stop.held:
        stop.held = True
        raise KeyboardInterrupt(signal.Signals(signum).name)


def fail(message, ranks, status=1):
    """One line on stderr, no traceback. Under torchrun the line names the rank it comes from."""
    where = f'rank {ranks.rank}: ' if ranks.distributed else ''
    print(f'study.py: {where}{message}', file=sys.stderr, flush=True)
    sys.exit(status)


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0]}' if text else type(exc).__name__


def run_as_script():
    """main() as the program. A study stopped by Ctrl-C or SIGTERM then dies of that signal, its
    line printed and its log written: a shell running a loop of studies (a sweep) stops only when a
    command was killed by the signal, and would go on to the next study after an exit status of 130.
    Under torchrun the process ends at once with os._exit instead, its output flushed and its log
    long written: in ordinary interpreter shutdown, torch.distributed's teardown now and then aborts
    a rank that has finished (SIGABRT, seen with gloo on a busy machine), and torchrun would report
    the finished study as failed."""
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if Ranks().distributed:
        os._exit(status)
    if status - 128 in (signal.SIGINT, signal.SIGTERM):
        signal.signal(status - 128, signal.SIG_DFL)
        signal.raise_signal(status - 128)
    sys.exit(status)


if __name__ == '__main__':
    run_as_script()
