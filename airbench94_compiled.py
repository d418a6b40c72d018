"""airbench94_compiled.py: airbench94 under torch.compile, for studies of many trainings.

Published
    94.01% mean accuracy with TTA, n=1000, 3.29 s per run on an NVIDIA A100 (paper, section 3.7).
    Measured here: README.md's records table, each figure from a log in logs/records/.

Changes relative to airbench94
    The same training, mathematically, under torch.compile: two variants of the network (whitening
    bias trained, then frozen) share weights, compiled once per process in a study's warm-up run.

What is timed (paper, section 2)
    From the first touch of training data (the whitening initialization included) until test-set
    predictions with test-time augmentation exist. Per-epoch evaluation without TTA is outside the
    clock. On CUDA a warm-up run on random labels comes first and is not counted.

Lineage
    Page (2019), "How to train your ResNet" -> tysam-code, hlb-CIFAR10 (2023) -> airbench (2024).

Method (paper, sections 3.1-3.6; the numbers are in `hyp`)
    - VGG-like network: a frozen 2x2 patch-whitening convolution, then three blocks of 3x3
      convolutions; BatchNorm scales frozen at 1; every later conv starts as an identity (dirac)
      transform.
    - Nesterov SGD on a summed loss with label smoothing, BatchNorm biases at a higher learning
      rate, a piecewise-linear schedule, Lookahead towards a moving average every few steps.
    - Alternating flip and reflect-padded translation, on the GPU; 6-view test-time augmentation.

Usage
    Run with --help for the options; README.md shows studies, library use and measured results.
"""

import argparse
import ast
import copy
import datetime
import hashlib
import http.client
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.request
import zlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

#############################################
#              Hyperparameters              #
#############################################

# Learning rate and weight decay are given in decoupled form (Page, 2019), so each can be tuned on
# its own: `lr` is the average step per 1024 examples whatever the momentum, and `weight_decay` the
# shrinkage per 1024 examples whatever the learning rate. make_optimizer turns them into PyTorch's.
hyp = {
    'opt': {
        'train_epochs': 9.9,        # passes over the training set; the last one stops part-way
        'batch_size': 1024,         # examples per optimizer step
        'lr': 11.5,                 # learning rate per 1024 examples (decoupled, see above)
        'momentum': 0.85,           # Nesterov momentum
        'weight_decay': 0.0153,     # weight decay per 1024 examples (decoupled, see above)
        'bias_scaler': 64.0,        # BatchNorm biases learn this many times faster, same decay
        'label_smoothing': 0.2,     # share of each target spread evenly over the 10 classes
        'lr_knots': ((0.0, 0.2), (0.23, 1.0), (1.0, 0.07)),  # (fraction of steps, lr multiplier)
        'whiten_bias_epochs': 3,    # epochs the whitening bias trains before it is frozen
        'lookahead_every': 5,       # steps between Lookahead updates
        'lookahead_decay': 0.95,    # per step; an update uses decay**every * (step/steps)**3
    },
    'aug': {
        'flip': True,               # alternating horizontal flip (paper, section 3.6)
        'translate': 2,             # pixels of random translation, reflect-padded
        'cutout': 0,                # side of a square zeroed at random in each image; 0: none
    },
    'net': {
        'widths': {'block1': 64, 'block2': 256, 'block3': 256},  # output channels of each block
        'batchnorm_momentum': 0.6,  # weight of the old running statistics (PyTorch's is 1 - this)
        'scaling_factor': 1 / 9,    # multiplies the logits
        'whiten_images': 5000,      # first training images whose patches set the whitening filters
        'whiten_eps': 5e-4,         # added to the patch-covariance eigenvalues before 1/sqrt
        'tta_level': 2,             # test-time augmentation: 0 none, 1 mirror, 2 mirror + translate
        'compile_backend': 'inductor',  # torch.compile's; 'aot_eager' traces but generates no code
        'compile_mode': 'max-autotune',  # inductor's: autotuned kernels, and CUDA graphs on the GPU
    },
}

TEST_BATCH_SIZE = 2000  # evaluation only: any size gives the same predictions
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


class UserError(Exception):
    """A problem the user can fix; the message says how. main() prints it as one line."""


#############################################
#                   Data                    #
#############################################

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CIFAR10_MD5 = 'c32a1d4ab5d03f1284b67883e8d87530'
CIFAR10_TARBALL = 'cifar-10-binary.tar.gz'
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, of the training images scaled to [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# A binary record: one label byte, then the 32x32 red, green and blue planes, each row-major.
RECORD_BYTES = 1 + 3 * 32 * 32
TARBALL_MEMBERS = {
    'train': [f'cifar-10-batches-bin/data_batch_{i}.bin' for i in range(1, 6)],
    'test': ['cifar-10-batches-bin/test_batch.bin'],
}


def default_data_dir():
    return os.environ.get('CIFAR10_DIR') or 'cifar10'


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def precision_for(device):
    """The one place dtype and memory layout are chosen: fp16 channels-last on CUDA as in the paper,
    fp32 in the usual layout on the CPU (which has no fast fp16 convolutions)."""
    if torch.device(device).type == 'cuda':
        return torch.float16, torch.channels_last
    return torch.float32, torch.contiguous_format


def load_cifar10(data_dir=None, train=True):
    """The training or test split as a dict: `images` (uint8, N x 32 x 32 x 3, RGB), `labels`
    (int64, N) and `classes`, read from <data_dir>/train.pt or test.pt. When that cache is missing
    it is built from cifar-10-binary.tar.gz in data_dir, which is downloaded first if absent."""
    data_dir = data_dir or default_data_dir()
    path = os.path.join(data_dir, 'train.pt' if train else 'test.pt')
    if not os.path.exists(path):
        build_cache(data_dir)
    return read_cache(path)


def read_cache(path):
    remedy = f'delete {path} and run again to rebuild it'
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except OSError as exc:  # permissions, a disk error: the file itself may be fine
        raise UserError(f'cannot read the CIFAR-10 cache {path} ({first_line(exc)})') from None
    except Exception as exc:  # a truncated zip, a pickle of the wrong kind: the content is damaged
        raise UserError(f'cannot load the CIFAR-10 cache {path} ({first_line(exc)}); {remedy}') from None
    images = data.get('images') if isinstance(data, dict) else None
    labels = data.get('labels') if isinstance(data, dict) else None
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            and images.dim() == 4 and images.shape[1:] == (32, 32, 3)
            and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
            and labels.shape == (len(images),) and len(labels) > 0
            and 0 <= labels.min() and labels.max() < len(CIFAR10_CLASSES)):
        raise UserError(f'{path} is not a CIFAR-10 cache (a dict of uint8 images N x 32 x 32 x 3 '
                        f'and int64 labels 0-9); {remedy}')
    return {'images': images, 'labels': labels, 'classes': data.get('classes', CIFAR10_CLASSES)}


def build_cache(data_dir):
    """Writes train.pt and test.pt from the binary tarball, downloading it when it is not there."""
    os.makedirs(data_dir, exist_ok=True)
    tarball = os.path.join(data_dir, CIFAR10_TARBALL)
    if not os.path.exists(tarball):
        download(CIFAR10_URL, tarball)
    actual_md5 = md5_of(tarball)
    if actual_md5 != CIFAR10_MD5:
        os.remove(tarball)
        raise UserError(f'{tarball} has md5 {actual_md5}, not {CIFAR10_MD5}: it is damaged or not '
                        f'CIFAR-10, so it was removed; run again to download it afresh')
    for split, data in parse_cifar10_tarball(tarball).items():
        atomic_write(os.path.join(data_dir, f'{split}.pt'),
                     lambda file, data=data: torch.save(data, file))


def download(url, path):
    print(f'downloading {url} to {path}', file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            atomic_write(path, lambda file: shutil.copyfileobj(response, file, 1 << 20))
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts: OSError
        raise UserError(f'cannot download {url} ({first_line(exc)}); download {CIFAR10_TARBALL} by '
                        f'hand and put it in {os.path.abspath(os.path.dirname(path))}/') from None


def md5_of(path):
    digest = hashlib.md5()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def parse_cifar10_tarball(path):
    """{'train': data, 'test': data} from the fixed-size records of the binary tarball. Only the
    known members are read, and as bytes: nothing is unpickled or extracted to disk."""
    try:
        with tarfile.open(path, 'r:gz') as tar:
            return {split: parse_records(b''.join(read_member(tar, name) for name in names))
                    for split, names in TARBALL_MEMBERS.items()}
    except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f'{path} is not a readable CIFAR-10 binary tarball ({first_line(exc)}); '
                        f'delete it and run again') from None


def read_member(tar, name):
    member = tar.extractfile(name)  # KeyError when absent, None when not a regular file
    if member is None:
        raise tarfile.TarError(f'{name} is not a regular file')
    return member.read()


def parse_records(raw):
    if not raw or len(raw) % RECORD_BYTES:
        raise tarfile.TarError(f'{len(raw)} bytes are not whole {RECORD_BYTES}-byte records')
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, RECORD_BYTES)
    labels = records[:, 0].long()
    if labels.max() >= len(CIFAR10_CLASSES):
        raise tarfile.TarError(f'label {labels.max().item()} is not a CIFAR-10 class')
    images = records[:, 1:].view(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous()
    return {'images': images, 'labels': labels, 'classes': CIFAR10_CLASSES}


def atomic_write(path, write):
    """Calls write(file) on a temporary file beside `path`, then renames it over `path`, so that
    readers (and interrupted runs) never leave a half-written file behind."""
    directory = os.path.dirname(path) or '.'
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + '.', suffix='.tmp')
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, 'wb') as file:
            write(file)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache from others
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0]}' if text else type(exc).__name__


def batch_flip_lr(images, flip_mask):
    """Mirrors left-right the images (N x C x H x W) whose entry in the boolean flip_mask is set."""
    return torch.where(flip_mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_corners(images, size):
    """Top and left corners (each N x 1 x 1), uniform over the positions where a size x size
    square lies wholly inside the images (N x C x H x W)."""
    n, _, height, width = images.shape
    top = torch.randint(height - size + 1, (n, 1, 1), device=images.device)
    left = torch.randint(width - size + 1, (n, 1, 1), device=images.device)
    return top, left


def batch_crop(padded, size):
    """A random size x size window of each image. Of images padded by r pixels on every side, this
    is a random translation by up to r pixels in each direction."""
    n = len(padded)
    top, left = random_corners(padded, size)
    offsets = torch.arange(size, device=padded.device)
    rows, cols = top + offsets.view(1, size, 1), left + offsets.view(1, 1, size)
    index = torch.arange(n, device=padded.device).view(n, 1, 1)
    # One gather over (image, row, col) picks every window at once; channels ride along.
    return padded.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2)


def batch_cutout(images, size):
    """Cutout (DeVries and Taylor, 2017): each image with a random size x size square, wholly
    inside it, set to zero, which after normalization is the mean color."""
    top, left = random_corners(images, size)
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.clone().masked_fill_(inside.unsqueeze(1), 0)  # clone keeps the memory layout


class CifarLoader:
    """CIFAR-10 batches on one device, augmented a whole epoch at a time on that device.

    `images` (uint8, N x 32 x 32 x 3) and `labels` are plain attributes: replace them, e.g. with a
    masked subset, before iterating, and the loader serves that data instead.
    aug: {'flip': alternating flip on/off, 'translate': pixels of random reflect-padded translation,
    'cutout': side of the square zeroed at a random place in each image, after translation and flip}.
    """

    AUGMENTATIONS = ('flip', 'translate', 'cutout')

    def __init__(self, data_dir=None, train=True, batch_size=500, aug=None, drop_last=None,
                 shuffle=None, device=None):
        unknown = sorted(set(aug or {}) - set(self.AUGMENTATIONS))
        if unknown:
            raise UserError(f'unknown augmentation {", ".join(unknown)}; '
                            f'known: {", ".join(self.AUGMENTATIONS)}')
        self.data_dir = data_dir or default_data_dir()
        data = load_cifar10(self.data_dir, train)
        self.device = torch.device(device) if device is not None else default_device()
        self.images = data['images'].to(self.device)
        self.labels = data['labels'].to(self.device)
        self.classes = data['classes']
        self.aug = dict(aug or {})
        self.batch_size = batch_size
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle = train if shuffle is None else shuffle
        self.epoch = 0
        self._prepared_for = None  # the (images, translate) that the cached tensors belong to

    def __len__(self):
        if self.drop_last:
            return len(self.images) // self.batch_size
        return math.ceil(len(self.images) / self.batch_size)

    def normalize(self, images):
        """uint8 N x H x W x C -> standardized N x C x H x W in the device's precision."""
        dtype, memory_format = precision_for(self.device)
        mean = torch.tensor(CIFAR10_MEAN, device=images.device) * 255
        std = torch.tensor(CIFAR10_STD, device=images.device) * 255
        standardized = ((images.float() - mean) / std).permute(0, 3, 1, 2)
        return standardized.to(dtype).contiguous(memory_format=memory_format)

    def _prepare(self):
        # Normalizing and padding once per dataset, not per epoch, keeps the epoch's work to one
        # crop and one flip. The flip parity is drawn here: it decides the first epoch's flips.
        pad = self.aug.get('translate', 0)
        normalized = self.normalize(self.images)
        self._source = F.pad(normalized, (pad,) * 4, mode='reflect') if pad > 0 else normalized
        self._flip_parity = torch.rand(len(self.images), device=self.device) < 0.5
        self._prepared_for = (self.images, pad)

    def __iter__(self):
        if len(self.images) != len(self.labels):
            raise UserError(f'the loader holds {len(self.images)} images but {len(self.labels)} labels; '
                            f'mask both with the same mask')
        prepared_images, prepared_pad = self._prepared_for or (None, None)
        if prepared_images is not self.images or prepared_pad != self.aug.get('translate', 0):
            self._prepare()
        images = self._source
        if self.aug.get('translate', 0) > 0:
            images = batch_crop(images, self.images.shape[1])
        if self.aug.get('flip', False):
            # Alternating flip: random in the first epoch, then each image the other way than in
            # the epoch before, so every two consecutive epochs hold both mirror images of each.
            images = batch_flip_lr(images, self._flip_parity ^ bool(self.epoch % 2))
        if self.aug.get('cutout', 0) > 0:
            images = batch_cutout(images, self.aug['cutout'])
        self.epoch += 1
        order = (torch.randperm if self.shuffle else torch.arange)(len(images), device=self.device)
        for i in range(len(self)):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield images[batch], self.labels[batch]


#############################################
#                  Network                  #
#############################################

class BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale is frozen at 1 and whose bias learns. Page (2019) saw the scales do
    little but follow weight decay; the next convolution can absorb any scale anyway."""

    def __init__(self, num_features, momentum, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


def make_conv(channels_in, channels_out):
    """A 3x3 convolution without bias whose first channels_in filters start as the identity map
    (paper, section 3.3): each block starts by passing its input through, easing early training."""
    conv = nn.Conv2d(channels_in, channels_out, kernel_size=3, padding='same', bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:channels_in])
    return conv


class ConvBlock(nn.Module):
    """conv -> 2x2 max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU. Pooling before the
    BatchNorm normalizes a quarter of the activations for the same result."""

    def __init__(self, channels_in, channels_out, batchnorm_momentum):
        super().__init__()
        self.conv1 = make_conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = make_conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def make_net(hyp_net=None):
    """The network on the CPU in fp32, whitening weights not yet set (see init_whitening_conv).
    Feature maps: 32 -> 31 (2x2 conv, no padding) -> 15 -> 7 -> 3 -> 1."""
    hyp_net = hyp_net or hyp['net']
    widths, momentum = hyp_net['widths'], hyp_net['batchnorm_momentum']
    whiten_width = 2 * 3 * 2 * 2  # each of the 12 dimensions of a 2x2x3 patch, and its negation
    net = nn.Sequential(OrderedDict(
        whiten=nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True),
        activ=nn.GELU(),
        block1=ConvBlock(whiten_width, widths['block1'], momentum),
        block2=ConvBlock(widths['block1'], widths['block2'], momentum),
        block3=ConvBlock(widths['block2'], widths['block3'], momentum),
        pool=nn.MaxPool2d(3),
        flatten=nn.Flatten(),
        head=nn.Linear(widths['block3'], 10, bias=False),
        scale=Scale(hyp_net['scaling_factor']),
    ))
    # The whitening filters are computed, not learned; only their bias trains, for a few epochs.
    net.whiten.weight.requires_grad = False
    nn.init.zeros_(net.whiten.bias)
    return net


def place_on(model, device):
    """Moves the model to the device in its precision; BatchNorm stays fp32 (paper) for stable statistics."""
    dtype, memory_format = precision_for(device)
    model = model.to(device=device, dtype=dtype, memory_format=memory_format)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    return model


COMPILED = {}  # (architecture, device, precision) -> (network, variant with bias, variant without)


def compiled_net(hyp_net, device):
    """(model, train_bias, freeze_bias): the network, freshly initialized, and its two compiled
    variants, compiled once per process and architecture as each first runs. Later calls draw new
    weights exactly as make_net does and copy them into the same tensors, so that the compiled code
    (and its CUDA graphs) keep working on them."""
    fresh = place_on(make_net(hyp_net), device)
    key = (json.dumps(hyp_net, sort_keys=True), str(device), str(precision_for(device)))
    if key not in COMPILED:
        backend, mode = hyp_net['compile_backend'], hyp_net['compile_mode']
        options = dict(backend=backend, mode=mode if backend == 'inductor' else None)  # others have none
        torch._dynamo.config.recompile_limit += 8  # all networks' graphs share nn.Sequential's code
        COMPILED[key] = (fresh, torch.compile(fresh, **options), torch.compile(fresh, **options))
    model, train_bias, freeze_bias = COMPILED[key]
    with torch.no_grad():
        model.load_state_dict(fresh.state_dict())
    for param, fresh_param in zip(model.parameters(), fresh.parameters()):
        param.requires_grad = fresh_param.requires_grad
    return model, train_bias, freeze_bias


#############################################
#              Initialization               #
#############################################

def init_whitening_conv(conv, images, eps=5e-4):
    """Sets conv's filters so that its first half of outputs are the whitened patches of `images`
    (normalized, N x C x H x W): filter i is the i-th eigenvector of the patches' covariance divided
    by sqrt(eigenvalue + eps), so each output has variance about 1 and the outputs are uncorrelated.
    The second half are the negated filters, so the GELU that follows loses no information."""
    channels, (kernel_h, kernel_w) = conv.in_channels, conv.kernel_size
    patches = F.unfold(images.float(), (kernel_h, kernel_w)).transpose(1, 2)
    patches = patches.reshape(-1, channels * kernel_h * kernel_w)
    # Normalized images have about zero mean, so the second moment serves as the covariance.
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.flip(0)  # largest variance first
    filters = filters.reshape(-1, channels, kernel_h, kernel_w)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]))


#############################################
#             Optimizer helpers             #
#############################################

class LookaheadState:
    """Lookahead (Zhang et al., 2019) towards a moving average: each update moves the average
    towards the network, then puts the network at the average. BatchNorm statistics included."""

    def __init__(self, net):
        self.net_ema = {name: value.detach().clone() for name, value in net.state_dict().items()}

    def update(self, net, decay):
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                average = self.net_ema[name]
                average.lerp_(value, 1 - decay)
                value.copy_(average)


def make_optimizer(model, hyp_opt):
    """Nesterov SGD with the decoupled hyperparameters in PyTorch's terms. The loss is summed over
    the batch, so the gradient grows with the batch and a per-example rate serves every batch size;
    steady Nesterov momentum m lengthens steps by 1 + 1/(1 - m), which the rate is divided by; and
    PyTorch multiplies weight decay by the rate, so the decay is passed divided by it."""
    momentum = hyp_opt['momentum']
    kilo_step = 1024 * (1 + 1 / (1 - momentum))
    lr = hyp_opt['lr'] / kilo_step
    decay = hyp_opt['weight_decay'] * hyp_opt['batch_size'] / kilo_step
    bias_lr = lr * hyp_opt['bias_scaler']
    norm_biases = [module.bias for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    bias_ids = {id(bias) for bias in norm_biases}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in bias_ids]
    groups = [dict(params=norm_biases, lr=bias_lr, weight_decay=decay / bias_lr),
              dict(params=others, lr=lr, weight_decay=decay / lr)]
    return torch.optim.SGD(groups, momentum=momentum, nesterov=True)


def lr_multiplier(progress, knots):
    """The schedule's learning-rate multiplier at `progress` (0 to 1 through the steps): linear
    between the knots, (fraction of steps, multiplier) pairs from 0 to 1."""
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if progress <= x1:
            return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)
    return knots[-1][1]


#############################################
#                Evaluation                 #
#############################################

def predict(model, inputs, tta_level):
    """Logits averaged over test-time views (paper, section 3.5). Level 1: the image and its mirror.
    Level 2: also both views translated one pixel up-left and one down-right; the two untranslated
    views weigh 0.25 each, the four translated ones 0.125 each."""
    if tta_level == 0:
        return model(inputs)
    mirrored = 0.5 * model(inputs) + 0.5 * model(inputs.flip(-1))
    if tta_level == 1:
        return mirrored
    height, width = inputs.shape[-2:]
    padded = F.pad(inputs, (1,) * 4, mode='reflect')
    shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
    translated = sum(0.5 * model(view) + 0.5 * model(view.flip(-1)) for view in shifted) / len(shifted)
    return 0.5 * mirrored + 0.5 * translated


def infer(model, loader, tta_level=0):
    """Logits (fp32, N x 10) for every image in loader.images, in order: the loader's shuffling and
    augmentation are not used, so this works on a training loader too."""
    if tta_level not in (0, 1, 2):
        raise UserError(f'tta_level must be 0, 1 or 2, not {tta_level!r}')
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = loader.normalize(loader.images)
        logits = torch.cat([predict(model, batch, tta_level).float()
                            for batch in inputs.split(loader.batch_size)])
    model.train(was_training)
    return logits


def evaluate(model, loader, tta_level=0):
    """Accuracy (0 to 1) on loader's images."""
    logits = infer(model, loader, tta_level)
    return (logits.argmax(1) == loader.labels).float().mean().item()


#############################################
#                 Training                  #
#############################################

class Clock:
    """Adds up the seconds spent in `with clock:` blocks: CUDA events on the GPU (they time the
    queued GPU work, not the Python that queues it), time.perf_counter on the CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self):
        if self.device.type == 'cuda':
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(torch.cuda.current_stream(self.device))
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        if self.device.type == 'cuda':
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            torch.cuda.synchronize(self.device)
            self.seconds += self.start.elapsed_time(end) / 1000
        else:
            self.seconds += time.perf_counter() - self.start


def train(hyp=hyp, train_loader=None, test_loader=None, device=None, run=None):
    """Trains one network with the recipe in `hyp` and returns (model, result); result holds
    tta_val_acc, val_acc, time_seconds, train_loss, train_acc and steps. The train loader defaults
    to CIFAR-10 in default_data_dir(), the test loader to the train loader's folder; `device` to
    the train loader's, else CUDA when present. `run` labels the rows this prints. On CUDA this
    turns on cudnn.benchmark for the process: every step has the same shapes, so autotuning pays."""
    check_hyp(hyp)
    opt = hyp['opt']
    if device is None:
        device = train_loader.device if train_loader is not None else default_device()
    device = torch.device(device)
    if train_loader is None:
        train_loader = CifarLoader(None, True, opt['batch_size'], hyp['aug'], device=device)
    if test_loader is None:
        test_loader = CifarLoader(train_loader.data_dir, False, TEST_BATCH_SIZE, device=device)
    total_steps = math.ceil(len(train_loader) * opt['train_epochs'])
    if total_steps == 0:
        raise UserError(f'{len(train_loader.images)} training images make no full batch of '
                        f'{train_loader.batch_size}; lower opt.batch_size or add images')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    model, train_bias, freeze_bias = compiled_net(hyp['net'], device)
    optimizer = make_optimizer(model, opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step / total_steps, opt['lr_knots']))
    lookahead = LookaheadState(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=opt['label_smoothing'], reduction='none')
    clock = Clock(device)

    with clock:  # the first touch of training data starts the clock
        first_images = train_loader.normalize(train_loader.images[:hyp['net']['whiten_images']])
        init_whitening_conv(model.whiten, first_images, hyp['net']['whiten_eps'])

    step = 0
    for epoch in range(math.ceil(opt['train_epochs'])):
        # Freezing the bias once it has settled saves its gradient without costing accuracy.
        model.whiten.bias.requires_grad = epoch < opt['whiten_bias_epochs']
        net = train_bias if model.whiten.bias.requires_grad else freeze_bias  # weights are shared
        with clock:
            model.train()
            for inputs, labels in train_loader:
                outputs = net(inputs)
                loss = loss_fn(outputs, labels).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if step % opt['lookahead_every'] == 0:
                    decay = opt['lookahead_decay'] ** opt['lookahead_every'] * (step / total_steps) ** 3
                    lookahead.update(model, decay)
                if step == total_steps:
                    lookahead.update(model, decay=1.0)  # end exactly at the average
                    break
        train_loss = loss.item() / len(labels)
        train_acc = (outputs.detach().argmax(1) == labels).float().mean().item()
        if not math.isfinite(train_loss):
            raise UserError(f'training diverged: the loss is {train_loss} after epoch {epoch + 1}; '
                            f'a lower opt.lr may help')
        val_acc = evaluate(net, test_loader, tta_level=0)
        TABLE.row(run=run, epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc,
                  val_acc=val_acc, time_seconds=clock.seconds)

    with clock:  # test-set predictions with TTA stop the clock
        tta_val_acc = evaluate(net, test_loader, tta_level=hyp['net']['tta_level'])
    TABLE.row(run=run, epoch='eval', tta_val_acc=tta_val_acc, time_seconds=clock.seconds, last=True)
    model = copy.deepcopy(model)  # the next run in this process reinitializes model's tensors in place
    return model, {'tta_val_acc': tta_val_acc, 'val_acc': val_acc, 'time_seconds': clock.seconds,
                   'train_loss': train_loss, 'train_acc': train_acc, 'steps': total_steps}


#############################################
#          Logging and command line         #
#############################################

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
LOG_FORMAT = 'airbench-study/1'


class Table:
    """The per-epoch table on stdout; its header comes before its first row. Under torchrun only
    rank 0 prints it: one table to read, in which every run's eval row appears as it arrives."""

    def __init__(self, columns):
        self.columns = columns
        self.header_printed = False
        self.quiet = False

    def line(self, cells):
        return '| ' + ' | '.join(cell.rjust(len(column)) for cell, column in zip(cells, self.columns)) + ' |'

    def row(self, last=False, **values):
        if self.quiet:
            return
        rule = '-' * len(self.line(self.columns))
        if not self.header_printed:
            print(rule, self.line(self.columns), rule, sep='\n')
            self.header_printed = True
        cells = [f'{v:.4f}' if isinstance(v, float) else '' if v is None else str(v)
                 for v in (values.get(column) for column in self.columns)]
        print(self.line(cells), flush=True)
        if last:
            print(rule, flush=True)


TABLE = Table(('run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'time_seconds'))


def hyp_keys(tree, prefix=''):
    """Dotted names of every leaf of a nested dict: ['opt.train_epochs', ...]."""
    keys = []
    for name, value in tree.items():
        keys += hyp_keys(value, f'{prefix}{name}.') if isinstance(value, dict) else [prefix + name]
    return keys


def override_hyp(base, overrides):
    """A deep copy of `base` with `overrides` applied: {'opt.lr': 10.0, 'net.widths.block1': 96}.
    A dict value sets the entries it names. Unknown keys and values whose type differs from the
    entry's (an int for a float is fine) raise UserError."""
    result = copy.deepcopy(base)
    pending = list(overrides.items())
    while pending:
        key, value = pending.pop(0)
        *path, leaf = key.split('.')
        node = result
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserError(f'unknown hyp key {key!r}; valid keys: {", ".join(hyp_keys(base))}')
        old = node[leaf]
        if isinstance(old, dict) and isinstance(value, dict):
            pending += [(f'{key}.{name}', entry) for name, entry in value.items()]
            continue
        node[leaf] = float(value) if type(old) is float and type(value) is int else value
        same_kind = isinstance(old, (list, tuple)) and isinstance(value, (list, tuple))
        if type(node[leaf]) is not type(old) and not same_kind:
            raise UserError(f'{key} must be of type {type(old).__name__} (like {old!r}), not {value!r}')
    return result


def check_hyp(hyp):
    """Rejects values that would fail or make no sense, before any training time is spent."""
    opt, net = hyp['opt'], hyp['net']
    knots = opt['lr_knots']
    problems = [
        (opt['train_epochs'] > 0, 'opt.train_epochs must be positive'),
        (opt['batch_size'] >= 1, 'opt.batch_size must be at least 1'),
        (0 <= opt['momentum'] < 1, 'opt.momentum must be in [0, 1)'),
        (opt['lr'] > 0 and opt['bias_scaler'] > 0, 'opt.lr and opt.bias_scaler must be positive'),
        (0 <= opt['label_smoothing'] <= 1, 'opt.label_smoothing must be in [0, 1]'),
        (opt['lookahead_every'] >= 1, 'opt.lookahead_every must be at least 1'),
        (len(knots) >= 2 and all(isinstance(k, (list, tuple)) and len(k) == 2
                                 and all(isinstance(v, (int, float)) for v in k) for k in knots)
         and knots[0][0] == 0 and knots[-1][0] == 1 and all(a[0] < b[0] for a, b in zip(knots, knots[1:])),
         'opt.lr_knots must be (fraction, multiplier) pairs with fractions rising from 0 to 1'),
        (0 <= opt['lookahead_decay'] <= 1, 'opt.lookahead_decay must be in [0, 1]'),
        (hyp['aug']['translate'] >= 0, 'aug.translate must be at least 0'),
        (0 <= hyp['aug']['cutout'] <= 32, 'aug.cutout must be between 0 and 32 pixels'),
        (all(w >= 1 for w in net['widths'].values()), 'net.widths must be at least 1'),
        (net['whiten_images'] >= 1 and net['whiten_eps'] > 0,
         'net.whiten_images must be at least 1 and net.whiten_eps positive'),
        (0 <= net['batchnorm_momentum'] < 1, 'net.batchnorm_momentum must be in [0, 1)'),
        (net['tta_level'] in (0, 1, 2), 'net.tta_level must be 0, 1 or 2'),
        (net['compile_backend'] in torch.compiler.list_backends(exclude_tags=()) and net['compile_mode'] in
         COMPILE_MODES, f'net.compile_backend must be one of {torch.compiler.list_backends(exclude_tags=())} '
                        f'and net.compile_mode one of {COMPILE_MODES}'),
    ]
    for ok, message in problems:
        if not ok:
            raise UserError(message)


def parse_overrides(assignments):
    """['opt.lr=10', ...] -> {'opt.lr': 10}; values are Python literals, anything else a string."""
    overrides = {}
    for assignment in assignments:
        key, equals, text = assignment.partition('=')
        if not equals or not key:
            raise UserError(f'--set expects KEY=VALUE, e.g. opt.lr=10.0, not {assignment!r}')
        try:
            overrides[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = text.strip()
    return overrides


def resolve_device(name):
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'unknown device {name!r}; use cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):
        raise UserError(f'device {name!r} is not supported; use cpu, cuda or cuda:N')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name} asks for CUDA, but this torch {torch.__version__} sees no '
                        f'CUDA GPU; run with --device cpu, or install a CUDA build of torch')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f'--device {name}: there are only {torch.cuda.device_count()} CUDA devices')
    return device


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu ({torch.get_num_threads()} threads)'


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


class StudyLog:
    """logs/<script>/<UTC time>-<8 hex>/: log.pt (the script's source, hyp, accuracies as a tensor,
    every run's result) and summary.json (the same without the source). Both are rewritten
    atomically after every run, so an interrupted study keeps every finished run."""

    def __init__(self, log_root, hyp, argv, device, base_seed, device_names):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H-%M-%SZ')
        self.dir = os.path.join(log_root, SCRIPT, f'{stamp}-{secrets.token_hex(4)}')
        os.makedirs(self.dir)
        with open(__file__, encoding='utf-8') as file:
            self.source = file.read()
        self.results = []
        self.info = {'format': LOG_FORMAT, 'script': SCRIPT + '.py', 'status': 'running',
                     'command': ' '.join([sys.argv[0] if sys.argv[0] else SCRIPT + '.py'] + argv),
                     'argv': argv, 'hyp': hyp, 'seed': base_seed, 'device': str(device),
                     'device_name': device_name(device), 'torch': str(torch.__version__),
                     'python': sys.version.split()[0], 'started': stamp,
                     'world_size': len(device_names), 'device_names': device_names}
        self.write()

    def add(self, result):
        self.results.append(result)
        self.write()

    def close(self, status):
        self.info['status'] = status
        self.write()

    def summary(self):
        return {**self.info, **summarize(self.results), 'runs': self.results}

    def write(self):
        summary = self.summary()
        text = json.dumps(summary, indent=2) + '\n'
        accs = torch.tensor([r['tta_val_acc'] for r in self.results], dtype=torch.float64)
        log = {**summary, 'code': self.source, 'accs': accs}
        atomic_write(os.path.join(self.dir, 'summary.json'), lambda file: file.write(text.encode()))
        atomic_write(os.path.join(self.dir, 'log.pt'), lambda file: torch.save(log, file))


def format_summary(stats):
    def pct(x):
        return f'{100 * x:.2f}%'
    line = f'{SCRIPT}: {stats["n"]} runs, mean TTA accuracy {pct(stats["mean"])}'
    if stats['std'] is not None:
        low, high = stats['ci95']
        line += f' (std {100 * stats["std"]:.2f}, 95% CI {pct(low)} to {pct(high)})'
    return line + f', without TTA {pct(stats["mean_val_acc"])}, mean time {stats["mean_time_seconds"]:.3f} s'


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def parse_args(argv):
    parser = OneLineParser(
        prog=SCRIPT + '.py', description=__doc__.splitlines()[0],
        epilog='Every study writes logs/<script>/<time>-<id>/summary.json and log.pt, updated after '
               'each run. Data: the CIFAR-10 cache (train.pt, test.pt) in the data folder; when it is '
               f'missing, {CIFAR10_TARBALL} is downloaded from {CIFAR10_URL} into that folder. Many GPUs: '
               f'torchrun --nproc_per_node=K {SCRIPT}.py --runs N (README.md: Running large studies).')
    parser.add_argument('--runs', type=int, default=25,
                        help='number of timed trainings in the study (default: %(default)s)')
    parser.add_argument('--data-dir', default=None,
                        help='folder of the CIFAR-10 cache (default: $CIFAR10_DIR, else ./cifar10)')
    parser.add_argument('--device', default=None,
                        help='cpu, cuda or cuda:N (default: cuda when available). The CPU trains in '
                             'fp32, hundreds of times slower (README.md has CPU timings)')
    parser.add_argument('--log-dir', default='logs',
                        help='where the study log folder is created (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=None,
                        help='base seed; run i is seeded from (SEED, i), so a study can be repeated '
                             '(default: a random one, printed and logged)')
    parser.add_argument('--no-warmup', action='store_true',
                        help='skip the untimed warm-up run on random labels that precedes the study '
                             'and compiles the network (the first run then pays for compilation)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override a hyp entry, e.g. --set opt.lr=10.0 --set net.widths.block1=96; '
                             f'the value is a Python literal; repeatable. Keys: {", ".join(hyp_keys(hyp))}')
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f'--runs must be at least 1, not {args.runs}')
    return args


class Ranks:
    """The processes of one study. Without torchrun there is one, and torch.distributed is never
    touched. Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) there is one per rank:
    rank r trains runs r, r + K, r + 2K, ... of the study on its own device, and after each round
    of K runs the outcomes are gathered, so that rank 0 logs every run as it arrives and every
    rank learns at once when another one failed."""

    def __init__(self, environ=os.environ):
        self.distributed = 'RANK' in environ and 'WORLD_SIZE' in environ
        self.rank, self.size = int(environ.get('RANK', 0)), int(environ.get('WORLD_SIZE', 1))
        self.local_rank = int(environ.get('LOCAL_RANK', 0))

    def device(self, name):
        """As asked without torchrun; under it, cuda:LOCAL_RANK, or the CPU with --device cpu."""
        if not self.distributed:
            return resolve_device(name)
        if name not in (None, 'cuda', 'cpu'):
            raise UserError(f'under torchrun each rank trains on cuda:LOCAL_RANK (--device cuda, the '
                            f'default) or on the CPU (--device cpu), not on --device {name}')
        if name != 'cpu' and not torch.cuda.is_available():
            raise UserError(f'under torchrun each rank trains on cuda:LOCAL_RANK, but this torch '
                            f'{torch.__version__} sees no CUDA GPU; add --device cpu')
        return resolve_device('cpu' if name == 'cpu' else f'cuda:{self.local_rank}')

    def connect(self, device):
        if self.distributed:
            if device.type == 'cuda':
                torch.cuda.set_device(device)
            torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
            # torchrun ends a study whose rank died by sending the others SIGTERM: close the log.
            signal.signal(signal.SIGTERM, signal.default_int_handler)

    def gather(self, value):
        """Every rank's value, in rank order; [value] without torchrun."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def close(self):
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class StudyFailed(UserError):
    """A run failed on some rank; every rank knows, and rank 0 alone reports it."""


def train_run(ranks, run, run_hyp, base_seed, loaders, device):
    """Run `run` of the study, seeded from (base_seed, run): its entry in the log."""
    seed = run_seed(base_seed, run)
    torch.manual_seed(seed)
    _, result = train(run_hyp, *loaders, device, run=run)
    return {'run': run, 'seed': seed, **result, **({'rank': ranks.rank} if ranks.distributed else {})}


def attempt(ranks, what, work):
    """work()'s value. Under torchrun a failure is returned instead, as {'error': ...} naming the
    rank and `what`: the other ranks must hear of it rather than wait for this rank forever.
    Without torchrun it is raised as it is."""
    try:
        return work()
    except Exception as exc:
        if not ranks.distributed:
            raise
        if not isinstance(exc, UserError):
            traceback.print_exc()  # a bug or e.g. out of memory: the traceback matters
        return {'error': f'rank {ranks.rank} failed in {what}: '
                         f'{exc if isinstance(exc, UserError) else first_line(exc)}'}


def stop_on_failures(outcomes):
    """Raises StudyFailed, on every rank alike, when any rank's outcome is a failure."""
    errors = [outcome['error'] for outcome in outcomes if outcome is not None and 'error' in outcome]
    if errors:
        raise StudyFailed('; '.join(errors))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ranks = Ranks()
    log = None
    try:
        run_hyp = override_hyp(hyp, parse_overrides(args.set))
        check_hyp(run_hyp)
        device = ranks.device(args.device)
        data_dir = args.data_dir or default_data_dir()

        def loaders():
            return (CifarLoader(data_dir, True, run_hyp['opt']['batch_size'], run_hyp['aug'], device=device),
                    CifarLoader(data_dir, False, TEST_BATCH_SIZE, device=device))

        ranks.connect(device)
        if ranks.local_rank > 0:
            ranks.gather(None)  # wait for local rank 0 to load the data, building the cache if need be
        train_loader, test_loader = loaders()  # missing or damaged data fails here, before any log
        if ranks.local_rank == 0:
            ranks.gather(None)
        base_seed = ranks.gather(secrets.randbits(32) if args.seed is None else args.seed)[0]
        device_names = ranks.gather(device_name(device))
        own_runs = range(ranks.rank, args.runs, ranks.size)
        TABLE.quiet = ranks.rank > 0
        if ranks.rank == 0:
            log = StudyLog(args.log_dir, run_hyp, argv, device, base_seed, device_names)
            where = device_names[0] if ranks.size == 1 else f'{ranks.size} ranks ({", ".join(device_names)})'
            print(f'{SCRIPT}: study of {args.runs} run(s) on {where}, torch {torch.__version__}, '
                  f'seed {base_seed}, log {log.dir}')
            if device.type == 'cpu':
                print(f'{SCRIPT}: training on the CPU in fp32, hundreds of times slower than a GPU')
        if not own_runs:
            print(f'{SCRIPT}: rank {ranks.rank} is idle: {args.runs} run(s) for {ranks.size} ranks')
        warmup = None
        if not args.no_warmup and own_runs:  # a short one: enough epochs to compile both variants
            print(f'{SCRIPT}: warm-up run on random labels, not part of the study; it compiles the network')
            train_loader.labels = torch.randint_like(train_loader.labels, len(CIFAR10_CLASSES))
            warmup_epochs = min(run_hyp['opt']['train_epochs'], run_hyp['opt']['whiten_bias_epochs'] + 1)
            warmup_hyp = override_hyp(run_hyp, {'opt.train_epochs': warmup_epochs})
            started = time.perf_counter()
            warmup = attempt(ranks, 'its warm-up run',
                             lambda: train(warmup_hyp, train_loader, test_loader, device)[1])
            print(f'{SCRIPT}: compiled in {time.perf_counter() - started:.1f} s (warm-up run included)')
        stop_on_failures(ranks.gather(warmup))
        for first_run in range(0, args.runs, ranks.size):  # a round: one run on each rank
            run, outcome = first_run + ranks.rank, None
            if run < args.runs:
                if train_loader.epoch > 0:  # used by the warm-up or the run before
                    train_loader, test_loader = loaders()
                loaders_of_run = (train_loader, test_loader)
                outcome = attempt(ranks, f'run {run}',
                                  lambda: train_run(ranks, run, run_hyp, base_seed, loaders_of_run, device))
            outcomes = ranks.gather(outcome)
            for rank, finished in enumerate(outcomes):
                if log is not None and finished is not None and 'error' not in finished:
                    log.add(finished)
                    if rank > 0:
                        TABLE.row(run=finished['run'], epoch='eval', tta_val_acc=finished['tta_val_acc'],
                                  time_seconds=finished['time_seconds'], last=True)
            stop_on_failures(outcomes)
        if log is not None:
            log.close('complete')
            print(format_summary(log.summary()))
            print(f'{SCRIPT}: log written to {log.dir}')
    except UserError as exc:
        kept = ''
        if log is not None:
            log.close('failed')
            kept = f'; {len(log.results)} finished run(s) kept in {log.dir}'
        if isinstance(exc, StudyFailed):  # every rank is here: rank 0 reports, then all leave
            if ranks.rank == 0:
                print(f'{SCRIPT}.py: error: {exc}{kept}', file=sys.stderr, flush=True)
            ranks.gather(None)  # were another rank to exit first, torchrun would stop rank 0
            sys.exit(1)
        fail(f'error: {exc}{kept}', rank=ranks)
    except KeyboardInterrupt:
        if ranks.rank > 0:
            fail('interrupted; rank 0 keeps the log', status=130, rank=ranks)
        if log is None:
            fail('interrupted before the study started; nothing was logged', status=130, rank=ranks)
        log.close('interrupted')
        fail(f'interrupted; {len(log.results)} finished run(s) kept in {log.dir}', status=130, rank=ranks)
    except Exception:  # a bug or e.g. out of memory: the traceback matters, and so do the finished runs
        if log is not None:
            log.close('failed')
            print(f'{SCRIPT}.py: {len(log.results)} finished run(s) kept in {log.dir}', file=sys.stderr)
        raise
    finally:
        ranks.close()


def fail(message, status=1, rank=None):
    """One line on stderr, no traceback; 130 is the shell's status for an interrupt. Under torchrun
    the line names the rank it comes from."""
    where = f'rank {rank.rank}: ' if rank is not None and rank.distributed else ''
    print(f'{SCRIPT}.py: {where}{message}', file=sys.stderr)
    sys.exit(status)


def run_as_script():
    """main() as the program. Under torchrun the process then ends at once with os._exit, its
    output flushed and its log long written: in ordinary interpreter shutdown, torch.distributed's
    teardown now and then aborts a rank that has finished (SIGABRT, seen with gloo on a busy
    machine), and torchrun would report the finished study as failed."""
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    if not Ranks().distributed:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == '__main__':
    run_as_script()
