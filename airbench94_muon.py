"""airbench94_muon.py: the 94% record since the paper, with the Muon optimizer for conv filters.

Published
    94.01% mean accuracy with TTA, n=200, 2.59 s per run on an NVIDIA A100, 0.29 PFLOPs (airbench
    repository). Measured here: README.md's records table, each figure from a log in logs/records/.

Changes relative to airbench94_compiled
    - Muon for every trained conv filter: Nesterov momentum orthogonalized by a few Newton-Schulz steps, applied
      to a weight first rescaled to Frobenius norm sqrt(out_channels).
    - Nesterov SGD for the biases and the head: rates of its own, decoupled weight decay. All rates fall linearly to 0.
    - No Lookahead. Batch 2000 for 8 epochs; logits divided by the head's input width; the head's weights at unit std.
    - Compiled on the GPU only (Newton-Schulz too); the CPU runs eagerly unless net.compile_on_cpu is set.

What is timed (paper, section 2)
    From the first touch of training data (whitening included) until test-set predictions with TTA exist; not
    the per-epoch evaluation, nor the warm-up run on random labels that comes first where the network is compiled.

Lineage
    Page (2019), "How to train your ResNet" -> tysam-code, hlb-CIFAR10 (2023) -> airbench (2024).

Method (paper, sections 3.1-3.6; the numbers are in `hyp`)
    - VGG-like network: a frozen 2x2 patch-whitening convolution, then three blocks of 3x3 convolutions that start
      as identity (dirac) maps; BatchNorm scales frozen at 1.
    - Muon (Jordan et al., 2024) for conv filters, Nesterov SGD for the rest, on a summed loss with label smoothing.
    - Alternating flip and reflect-padded translation, on the GPU; 6-view test-time augmentation.

Usage
    Run this file for a record attempt; python study.py with its name runs studies; README.md: all else.
"""

import argparse, collections, contextlib, copy, datetime, hashlib, io, json, math, os, signal, sys, tarfile, time
import pathlib, statistics, traceback, urllib.request

import torch
import torch.nn.functional as F
from torch import nn

#############################################
#              Hyperparameters              #
#############################################

# Muon's step length depends on the gradient's direction, not its size. SGD's learning rates are PyTorch's, on the
# loss summed over the batch; its weight decay is per example and decoupled: each step's shrinkage (weight_decay *
# batch_size times the schedule's multiplier, lengthened by momentum as every step is) does not depend on the rate.
hyp = {
    'opt': {
        'train_epochs': 8.0,        # passes over the training set; the last one stops part-way
        'batch_size': 2000,         # examples per optimizer step
        'muon_lr': 0.24,            # size of each filter update relative to the filter's (see Muon)
        'muon_momentum': 0.6,       # Nesterov momentum of Muon
        'newton_schulz_steps': 3,   # iterations that orthogonalize Muon's update
        'momentum': 0.85,           # Nesterov momentum of SGD
        'bias_lr': 0.053,           # SGD's learning rate for the whitening and BatchNorm biases
        'head_lr': 0.67,            # SGD's learning rate for the linear head
        'weight_decay': 2e-6,       # SGD's decay per example (decoupled, see above)
        'label_smoothing': 0.2,     # share of each target spread evenly over the 10 classes
        'lr_knots': ((0.0, 1.0), (1.0, 0.0)),  # (fraction of steps, lr multiplier), for all rates
        'whiten_bias_epochs': 3,    # epochs the whitening bias trains (its rate decays over them)
    },
    'aug': {
        'flip': True,               # alternating horizontal flip (paper, section 3.6)
        'translate': 2,             # pixels of random translation, reflect-padded
    },
    'net': {
        'widths': {'block1': 64, 'block2': 256, 'block3': 256},  # output channels of each block
        'batchnorm_momentum': 0.6,  # weight of the old running statistics (PyTorch's is 1 - this)
        'whiten_images': 5000,      # first training images whose patches set the whitening filters
        'whiten_eps': 5e-4,         # added to the patch-covariance eigenvalues before 1/sqrt
        'tta_level': 2,             # test-time augmentation: 0 none, 1 mirror, 2 mirror + translate
        'compile_backend': 'inductor',  # torch.compile's; 'aot_eager' traces but generates no code
        'compile_mode': 'max-autotune',  # inductor's: autotuned kernels, and CUDA graphs on the GPU
        'compile_on_cpu': False,    # inductor needs a C++ compiler and minutes there: eager instead
    },
}

class UserError(Exception):
    """A problem the user can fix; the message says how. main() prints it as one line."""

#############################################
#                   Data                    #
#############################################

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CIFAR10_MD5 = 'c32a1d4ab5d03f1284b67883e8d87530'
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, of the training images scaled to [0, 1]
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

def default_data_dir():
    return os.environ.get('CIFAR10_DIR') or 'cifar10'

def precision_for(device):
    """The one place dtype and layout are chosen: fp16 channels-last on CUDA (paper); fp32 on the CPU (no fast fp16)."""
    cuda = torch.device(device).type == 'cuda'
    return (torch.float16, torch.channels_last) if cuda else (torch.float32, torch.contiguous_format)

def load_cifar10(data_dir=None, train=True):
    """{'images': uint8 N x 32 x 32 x 3 RGB, 'labels': int64 N, 'classes'} from <data_dir>/train.pt or test.pt,
    a cache built when missing from cifar-10-binary.tar.gz in data_dir, downloaded first if absent."""
    data_dir = data_dir or default_data_dir()
    path = os.path.join(data_dir, 'train.pt' if train else 'test.pt')
    if os.path.isfile(data_dir):
        raise UserError(f'the data folder {data_dir} is a file; give the folder of the CIFAR-10 cache')
    try:
        if not os.path.exists(path) and (not os.path.isdir(data_dir) or os.access(data_dir, os.X_OK)):
            build_cache(data_dir)  # but not in a folder this user may not look into: it only looks empty
        data = torch.load(path, map_location='cpu', weights_only=True)
    except OSError as exc:  # permissions, a full or failing disk: the file itself may be fine
        raise UserError(f'cannot read or build {path} ({first_line(exc)}); check the folder') from None
    except UserError:
        raise
    except Exception as exc:  # a truncated zip, a pickle of the wrong kind
        data = first_line(exc)
    images, labels = (data.get(key) if isinstance(data, dict) else None for key in ('images', 'labels'))
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
            and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and len(labels) > 0
            and labels.shape == images.shape[:1] and 0 <= labels.min() and labels.max() <= 9):
        problem = data if isinstance(data, str) else 'not uint8 images N x 32 x 32 x 3 with int64 labels 0-9'
        raise UserError(f'{path} is not a CIFAR-10 cache ({problem}); delete it and run again to rebuild it')
    return {'images': images, 'labels': labels, 'classes': data.get('classes', CIFAR10_CLASSES)}

def build_cache(data_dir):
    """Writes train.pt and test.pt from the binary tarball (downloaded if absent), whose records (a label byte, then
    the red, green and blue 32x32 planes) are read as bytes: nothing is unpickled or extracted to disk. Its md5 makes
    it CIFAR-10's, byte for byte, so the records need no further checks."""
    os.makedirs(data_dir, exist_ok=True)
    tarball = os.path.join(data_dir, os.path.basename(CIFAR10_URL))
    if not os.path.exists(tarball):
        print(f'downloading {CIFAR10_URL} to {tarball}', file=sys.stderr)
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response:
                atomic_write({tarball: lambda file: file.write(response.read())})
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out
            raise UserError(f'cannot download {CIFAR10_URL} ({first_line(exc)}); download it by hand '
                            f'and put it in {os.path.abspath(data_dir)}/') from None
    raw = pathlib.Path(tarball).read_bytes()
    if hashlib.md5(raw).hexdigest() != CIFAR10_MD5:
        pathlib.Path(tarball).unlink(missing_ok=True)  # another process may have removed it first
        raise UserError(f'{tarball} has md5 {hashlib.md5(raw).hexdigest()}, not {CIFAR10_MD5}: it is '
                        f'damaged or not CIFAR-10, so it was removed; run again to download it afresh')
    members = {'train': [f'data_batch_{i}.bin' for i in range(1, 6)], 'test': ['test_batch.bin']}
    with tarfile.open(fileobj=io.BytesIO(raw), mode='r:gz') as tar:
        splits = {split: b''.join(tar.extractfile(f'cifar-10-batches-bin/{name}').read() for name in names)
                  for split, names in members.items()}
    records = {split: torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 1 + 3 * 32 * 32)
               for split, raw in splits.items()}
    atomic_write({os.path.join(data_dir, f'{split}.pt'): lambda file, r=r: torch.save(
        {'images': r[:, 1:].view(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous(), 'labels': r[:, 0].long(),
         'classes': CIFAR10_CLASSES}, file) for split, r in records.items()})

def atomic_write(writers):
    """{path: write(file)}: each file goes to a temporary beside it (a random name, which no process on any host
    shares), all renamed into place once all are complete: a full disk leaves the old files, a kill mid-rename a mix."""
    temporaries = {path: f'{path}.{os.urandom(6).hex()}.tmp' for path in writers}
    try:
        for path, write in writers.items():
            with open(temporaries[path], 'xb') as file:  # the permissions of any new file: a cache can be shared
                write(content := io.BytesIO())  # whole first: torch.save's own writes make a full disk a RuntimeError
                file.write(content.getbuffer())
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            pathlib.Path(temporary).unlink(missing_ok=True)  # renamed, or never created

def first_line(exc):
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0]}' if text else type(exc).__name__

def random_corners(images, size):
    """Top and left corners (N x 1 x 1 each) of size x size squares placed uniformly inside images N x C x H x W."""
    return [torch.randint(extent - size + 1, (len(images), 1, 1), device=images.device) for extent in images.shape[2:]]

def batch_crop_flip(padded, size, flip):
    """A random size x size window of each image (of images padded by r, a translation by up to r pixels), mirrored
    where the boolean `flip` is set, in one gather over (image, row, col)."""
    top, left = random_corners(padded, size)
    offsets = torch.arange(size, device=padded.device)
    cols = left + torch.where(flip.view(-1, 1, 1), offsets.flip(0), offsets).view(-1, 1, size)
    index = torch.arange(len(padded), device=padded.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[index, top + offsets.view(1, size, 1), cols].permute(0, 3, 1, 2)

class CifarLoader:
    """CIFAR-10 batches on one device, augmented a whole epoch at a time there. `images` (uint8, N x 32 x 32 x 3)
    and `labels` are plain attributes: replace them (say, with a masked subset) and the loader serves that data.
    aug: {'flip': alternating flip on/off, 'translate': pixels of random reflect-padded translation}."""
    def __init__(self, data_dir=None, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, device=None):
        if unknown := set(aug or {}) - (known := {'flip', 'translate'}):
            raise UserError(f'unknown augmentation {", ".join(sorted(unknown))}; known: {", ".join(sorted(known))}')
        self.data_dir = data_dir or default_data_dir()
        data = load_cifar10(self.data_dir, train)
        self.device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.images, self.labels = data['images'].to(self.device), data['labels'].to(self.device)
        self.classes, self.aug, self.batch_size, self.epoch = data['classes'], dict(aug or {}), batch_size, 0
        self.drop_last, self.shuffle = (train if given is None else given for given in (drop_last, shuffle))
        self.prepared_for = None  # what self.source, the normalized and padded images, was made from
    def __len__(self):
        return len(self.images) // self.batch_size if self.drop_last else math.ceil(len(self.images) / self.batch_size)
    def normalize(self, images):
        """uint8 N x H x W x C -> standardized N x C x H x W, in the device's precision from the start (fp16: half the
        bytes of a detour through fp32). The permuted N x H x W x C is already channels-last: no copy on the GPU."""
        dtype, memory_format = precision_for(self.device)
        mean, std = (torch.tensor(s, dtype=dtype, device=images.device) * 255 for s in (CIFAR10_MEAN, CIFAR10_STD))
        return ((images.to(dtype) - mean) / std).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    def __iter__(self):
        if len(self.images) != len(self.labels):
            raise UserError(f'the loader has {len(self.images)} images, {len(self.labels)} labels; use the same mask')
        pad, flip = self.aug.get('translate', 0), self.aug.get('flip', False)
        if self.prepared_for != (id(self.images), pad):
            # Normalized and padded once per dataset, not per epoch; the flip parity drawn here sets epoch 1's flips.
            normalized = self.normalize(self.images)
            self.source = F.pad(normalized, (pad,) * 4, mode='reflect') if pad > 0 else normalized
            self.flip_parity = torch.rand(len(self.images), device=self.device) < 0.5
            self.prepared_for = (id(self.images), pad)
        images = self.source
        if pad > 0 or flip:
            # Alternating flip: random at first, then each the other way, so any two epochs in a row show both mirrors.
            images = batch_crop_flip(images, 32, self.flip_parity ^ bool(self.epoch % 2) if flip
                                     else torch.zeros_like(self.flip_parity))
        self.epoch += 1
        order = (torch.randperm if self.shuffle else torch.arange)(len(images), device=self.device)
        for batch in order.split(self.batch_size)[:len(self)]:  # [:len(self)]: drop_last drops the short batch
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
    nn.init.dirac_(conv.weight[:channels_in])  # dirac_ runs under no_grad itself
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
    net = nn.Sequential(collections.OrderedDict(
        whiten=nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True),
        activ=nn.GELU(),
        block1=ConvBlock(whiten_width, widths['block1'], momentum),
        block2=ConvBlock(widths['block1'], widths['block2'], momentum),
        block3=ConvBlock(widths['block2'], widths['block3'], momentum),
        pool=nn.MaxPool2d(3),
        flatten=nn.Flatten(),
        head=nn.Linear(widths['block3'], 10, bias=False),
        scale=Scale(1 / widths['block3']),  # with the head at unit std, keeps the first logits small
    ))
    with torch.no_grad():
        net.head.weight.div_(net.head.weight.std())  # unit standard deviation, as the scale assumes
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

COMPILED = {}  # (architecture, device, precision) -> (network, variant with bias, variant without, newton_schulz)

def compiles(hyp_net, device):
    """Whether the network and Newton-Schulz are compiled: always on CUDA, on the CPU if net.compile_on_cpu asks."""
    return torch.device(device).type == 'cuda' or hyp_net['compile_on_cpu']

def compiled_net(hyp_net, device):
    """(model, train_bias, freeze_bias, orthogonalize): a fresh network, its two compiled variants and newton_schulz,
    compiled once per process and architecture; later calls copy fresh weights into the tensors that the compiled code
    and its CUDA graphs use. Newton-Schulz, called a few times a step, compiles in default mode: no CUDA graphs."""
    fresh = place_on(make_net(hyp_net), device)
    if not compiles(hyp_net, device):
        return fresh, fresh, fresh, newton_schulz
    key = (json.dumps(hyp_net, sort_keys=True), str(device), str(precision_for(device)))
    if key not in COMPILED:
        backend, mode = hyp_net['compile_backend'], hyp_net['compile_mode']
        options = dict(backend=backend, mode=mode if backend == 'inductor' else None,  # others have none
                       dynamic=False)  # the training and evaluation batch sizes get kernels of their own
        torch._dynamo.config.recompile_limit += 8  # all networks' graphs share nn.Sequential's code
        COMPILED[key] = (fresh, torch.compile(fresh, **options), torch.compile(fresh, **options),
                         torch.compile(newton_schulz, backend=backend, dynamic=False))
    model, train_bias, freeze_bias, orthogonalize = COMPILED[key]
    model.load_state_dict(fresh.state_dict())
    for param, fresh_param in zip(model.parameters(), fresh.parameters()):
        param.requires_grad = fresh_param.requires_grad
    return model, train_bias, freeze_bias, orthogonalize

#############################################
#              Initialization               #
#############################################

def init_whitening_conv(conv, images, eps=5e-4):
    """Sets conv's filters so that its first half of outputs are the whitened patches of `images` (normalized,
    N x C x H x W): filter i is the i-th eigenvector of the patches' covariance over sqrt(eigenvalue + eps), so the
    outputs have variance about 1 and are uncorrelated. The second half are negated: the GELU after loses nothing."""
    patches = F.unfold(images.float(), conv.kernel_size).transpose(1, 2).flatten(0, 1)  # rows: C x kh x kw
    # Normalized images have about zero mean, so the second moment serves as the covariance.
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.flip(0)  # largest variance first
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]).view_as(conv.weight))

#############################################
#             Optimizer helpers             #
#############################################

def newton_schulz(matrix, steps):
    """An approximately orthogonal matrix with the singular vectors of `matrix` (2-D), in bfloat16.
    Scaled to unit Frobenius norm, every singular value s lies in [0, 1]; a step X <- aX + (bA + cA^2)X with A = XX^T
    maps each s to a*s + b*s^3 + c*s^5; the coefficients trade exactness for speed: 3 steps bring every value above
    about 0.02 to about 0.7-1.2, not to 1, and leave smaller ones (directions the gradient hardly has) smaller."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.bfloat16()
    x = x / (x.norm() + 1e-7)
    if tall := x.shape[0] > x.shape[1]:  # iterate on the wide side, whose A is the smaller matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x

class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for conv filters. Each step keeps a Nesterov momentum buffer (buffer = momentum *
    buffer + grad; direction = grad + momentum * buffer), rescales the weight to Frobenius norm sqrt(out_channels) and
    subtracts lr times the direction, reshaped to out_channels x (the rest) and orthogonalized, of norm up to about
    sqrt(out_channels) too: lr bounds the step relative to the weight, and with the norm fixed it needs no decay."""
    def __init__(self, params, lr, momentum, newton_schulz_steps, orthogonalize=newton_schulz):
        super().__init__(params, dict(lr=lr, momentum=momentum, newton_schulz_steps=newton_schulz_steps))
        self.orthogonalize = orthogonalize
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for weight in group['params']:
                if weight.grad is None:
                    continue
                if 'momentum_buffer' not in (state := self.state[weight]):
                    state['momentum_buffer'] = torch.zeros_like(weight.grad)
                buffer = state['momentum_buffer'].mul_(group['momentum']).add_(weight.grad)
                direction = weight.grad.add(buffer, alpha=group['momentum'])
                weight.mul_(math.sqrt(len(weight)) / weight.norm())
                update = self.orthogonalize(direction.reshape(len(weight), -1), group['newton_schulz_steps'])
                weight.add_(update.view(weight.shape), alpha=-group['lr'])  # casts as it adds: one kernel

def make_optimizers(model, hyp_opt, orthogonalize=newton_schulz):
    """(sgd, muon): Muon for the conv filters (4-D weights), Nesterov SGD for the rest in three groups (the whitening
    bias, the BatchNorm biases, the head), its decay decoupled: passed divided by the rate PyTorch multiplies it by."""
    decay = hyp_opt['weight_decay'] * hyp_opt['batch_size']
    norm_biases = [module.bias for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    filters = [p for p in model.parameters() if p.dim() == 4 and p.requires_grad]
    groups = [dict(params=[model.whiten.bias], lr=hyp_opt['bias_lr']),
              dict(params=norm_biases, lr=hyp_opt['bias_lr']),
              dict(params=[model.head.weight], lr=hyp_opt['head_lr'])]
    for group in groups:
        group['weight_decay'] = decay / group['lr']
    muon = Muon(filters, hyp_opt['muon_lr'], hyp_opt['muon_momentum'], hyp_opt['newton_schulz_steps'], orthogonalize)
    return torch.optim.SGD(groups, momentum=hyp_opt['momentum'], nesterov=True, fused=True), muon  # as the record

def lr_multiplier(progress, knots):
    """The learning-rate multiplier at `progress` (0 to 1): linear between knots, (fraction of steps, multiplier)."""
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if progress <= x1:
            return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)
    return knots[-1][1]

#############################################
#                Evaluation                 #
#############################################

def predict(model, inputs, tta_level):
    """Logits averaged over test-time views (paper, section 3.5). Level 1: the image and its mirror. Level 2: also
    both translated one pixel up-left and one down-right; untranslated views weigh 0.25 each, translated 0.125 each.
    Crops and CUDA's padding lose the network's memory layout (channels-last on CUDA): the crops get it back."""
    if tta_level == 0:
        return model(inputs)
    mirrored = 0.5 * model(inputs) + 0.5 * model(inputs.flip(-1))
    if tta_level == 1:
        return mirrored
    padded = F.pad(inputs, (1,) * 4, mode='reflect')
    shifted = [v.to(memory_format=precision_for(v.device)[1]) for v in (padded[..., :-2, :-2], padded[..., 2:, 2:])]
    translated = sum(0.5 * model(view) + 0.5 * model(view.flip(-1)) for view in shifted) / len(shifted)
    return 0.5 * mirrored + 0.5 * translated

def infer(model, loader, tta_level=0):
    """Logits (fp32, N x 10) of all loader.images, in order, unshuffled and unaugmented: a training loader works too."""
    if tta_level not in (0, 1, 2):
        raise UserError(f'tta_level must be 0, 1 or 2, not {tta_level!r}')
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = loader.normalize(loader.images)
        logits = torch.cat([predict(model, batch, tta_level).float() for batch in inputs.split(loader.batch_size)])
    model.train(was_training)
    return logits

def evaluate(model, loader, tta_level=0):
    """Accuracy (0 to 1) on loader's images."""
    return (infer(model, loader, tta_level).argmax(1) == loader.labels).float().mean().item()

#############################################
#                 Training                  #
#############################################

class Clock:
    """Adds up the seconds spent in `with clock:` blocks: CUDA events on the device's stream (they time
    its queued work, not the Python that queues it, whichever GPU is current), time.perf_counter on the CPU."""
    def __init__(self, device):
        self.cuda, self.device, self.seconds = torch.device(device).type == 'cuda', torch.device(device), 0.0
    def now(self):
        if self.cuda:
            (event := torch.cuda.Event(enable_timing=True)).record(torch.cuda.current_stream(self.device))
        return event if self.cuda else time.perf_counter()
    def __enter__(self):
        self.start = self.now()
    def __exit__(self, *exc_info):
        end = self.now()
        self.seconds += (torch.cuda.synchronize(self.device) or self.start.elapsed_time(end) / 1000) if self.cuda \
            else end - self.start

def print_row(cells, head=False, rule=False):
    """A row of the per-epoch table (floats to 4 places, None blank); rules around a head, and below a `rule` row."""
    texts = [f'{x:.4f}' if isinstance(x, float) else '' if x is None else str(x) for x in cells]
    line = '| ' + ' | '.join(text.rjust(len(column)) for text, column in zip(texts, COLUMNS)) + ' |'
    print(*['-' * len(line)] * head, line, *['-' * len(line)] * (head or rule), sep='\n', flush=True)

COLUMNS = ('run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'time_seconds')

def train(hyp=hyp, train_loader=None, test_loader=None, device=None, run=None, verbose=True):
    """Trains one network with the recipe in `hyp`; returns (model, result), result holding tta_val_acc, val_acc,
    time_seconds, train_loss, train_acc and steps. Loaders default to CIFAR-10 in default_data_dir() (the test loader
    to the train loader's folder), `device` to the train loader's. `run` labels the per-epoch table's rows (head above
    run 0 or None); verbose=False prints nothing. On CUDA this sets cudnn.benchmark: every step has the same shapes."""
    opt = hyp['opt']
    if train_loader is None:
        train_loader = CifarLoader(None, True, opt['batch_size'], hyp['aug'], device=device)
    device = torch.device(device or train_loader.device)
    if test_loader is None:
        test_loader = CifarLoader(train_loader.data_dir, False, 2000, device=device)  # any size predicts the same
    total_steps = math.ceil(len(train_loader) * opt['train_epochs'])
    if total_steps == 0:
        raise UserError(f'{len(train_loader.images)} training images make no full batch of '
                        f'{train_loader.batch_size}; lower opt.batch_size or add images')
    torch.backends.cudnn.benchmark |= device.type == 'cuda'
    if verbose and run in (None, 0, 'warm-up'):
        print_row(COLUMNS, head=True)

    model, train_bias, freeze_bias, orthogonalize = compiled_net(hyp['net'], device)
    sgd, muon = make_optimizers(model, opt, orthogonalize)
    whiten_bias_steps = max(len(train_loader) * opt['whiten_bias_epochs'], 1)

    def over(steps):  # the schedule's multiplier over the first `steps` steps, then its last value
        return lambda step: lr_multiplier(min(step / steps, 1.0), opt['lr_knots'])
    # One multiplier per SGD group: the whitening bias (over its epochs, then it is frozen), BatchNorm biases, head.
    schedulers = [torch.optim.lr_scheduler.LambdaLR(sgd, [over(whiten_bias_steps)] + 2 * [over(total_steps)]),
                  torch.optim.lr_scheduler.LambdaLR(muon, over(total_steps))]
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
                model.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer, scheduler in zip((sgd, muon), schedulers):
                    optimizer.step()
                    scheduler.step()
                step += 1
                if step == total_steps:
                    break
        train_loss = loss.item() / len(labels)
        train_acc = (outputs.detach().argmax(1) == labels).float().mean().item()
        if not math.isfinite(train_loss):
            raise UserError(f'training diverged (loss {train_loss} after epoch {epoch + 1}); '
                            f'lower learning rates (opt.muon_lr, opt.bias_lr, opt.head_lr) may help')
        val_acc = evaluate(net, test_loader, tta_level=0)
        if verbose:
            print_row([run, epoch + 1, train_loss, train_acc, val_acc, None, clock.seconds])

    with clock:  # test-set predictions with TTA stop the clock
        tta_val_acc = evaluate(net, test_loader, tta_level=hyp['net']['tta_level'])
    if verbose:
        print_row([run, 'eval', None, None, None, tta_val_acc, clock.seconds], rule=True)
    model = copy.deepcopy(model)  # the next run in this process reinitializes model's tensors in place
    return model, {'tta_val_acc': tta_val_acc, 'val_acc': val_acc, 'time_seconds': clock.seconds,
                   'train_loss': train_loss, 'train_acc': train_acc, 'steps': total_steps}

def warmup(hyp=hyp, train_loader=None, device=None, verbose=True):
    """The untimed warm-up before timed runs (paper, section 2), where the network is compiled: one training on random
    labels (which replace train_loader's), just long enough to compile both variants. Returns whether it trained."""
    if not compiles(hyp['net'], device or train_loader.device):
        return False
    started, epochs = time.perf_counter(), min(hyp['opt']['train_epochs'], hyp['opt']['whiten_bias_epochs'] + 1)
    hyp = {**hyp, 'opt': {**hyp['opt'], 'train_epochs': epochs}}
    if verbose:
        print('warm-up run on random labels, not part of the study')
    train_loader.labels = torch.randint_like(train_loader.labels, len(CIFAR10_CLASSES))
    train(hyp, train_loader, None, device, 'warm-up', verbose)
    if verbose:
        print(f'compiled in {time.perf_counter() - started:.1f} s (warm-up run included)')
    return True

#############################################
#              Record attempt               #
#############################################

def write_log(folder, info, results):
    """log.pt (all, with this script's source) and summary.json (all but it) in study.py's format, via atomic_write."""
    code = pathlib.Path(__file__).read_text(encoding='utf-8')
    accs, times = [result['tta_val_acc'] for result in results], [result['time_seconds'] for result in results]
    summary = {**info, 'source_sha256': hashlib.sha256(code.encode()).hexdigest(), 'n': len(accs),
               'mean': statistics.fmean(accs) if accs else None, 'std': statistics.stdev(accs) if len(accs) > 1
               else None, 'mean_time_seconds': statistics.fmean(times) if times else None, 'runs': results}
    log = {**summary, 'code': code, 'accs': torch.tensor(accs, dtype=torch.float64)}
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write({os.path.join(folder, 'summary.json'): lambda f: f.write(json.dumps(summary, indent=2).encode()),
                      os.path.join(folder, 'log.pt'): lambda f: torch.save(log, f)})
    except OSError as exc:
        raise UserError(f'cannot write the log in {folder} ({first_line(exc)}); make ./logs writable') from None
    return summary

def main(argv=None):
    """A record attempt: the warm-up (on CUDA), then --runs timed trainings, logged after each."""
    name = os.path.splitext(os.path.basename(__file__))[0]
    parser = argparse.ArgumentParser(prog=f'{name}.py', description=__doc__.split('\n\n')[0], epilog=(
        f'It logs to logs/{name}/. Overrides, seeds, many GPUs: python study.py {name} --help'))
    parser.add_argument('--runs', type=int, default=25, help='timed trainings (default: %(default)s)')
    parser.add_argument('--data-dir', default=default_data_dir(), help='folder of the CIFAR-10 cache, '
                        'downloaded there when missing (default: $CIFAR10_DIR, else ./cifar10)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda, cuda:N or cpu (default: %(default)s; the CPU is hundreds of times slower)')
    args = parser.parse_args(argv)
    previous_handlers = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(number) is not signal.SIG_IGN}  # a background job's Ctrl-C stays ignored
    folder, results, saved, stop.held = None, [], 0, False  # saved: how many runs the log on disk holds
    try:
        if args.runs < 1:
            raise UserError(f'--runs must be at least 1, not {args.runs}')
        if not os.path.isdir(args.data_dir) and args.data_dir != 'cifar10':
            raise UserError(f'--data-dir {args.data_dir} is not a folder; correct it or create it to download into it')
        try:
            torch.empty(0, device=(device := torch.device(args.device)))
        except (RuntimeError, AssertionError) as exc:  # a CPU-only torch asserts
            raise UserError(f'cannot use --device {args.device} ({first_line(exc)}); try --device cpu') from None
        loader = CifarLoader(args.data_dir, True, hyp['opt']['batch_size'], hyp['aug'], device=device)
        data = {'dir': os.path.abspath(args.data_dir), 'train_images': len(loader.images),
                'train_pixel_sum': int(loader.images.sum(dtype=torch.int64))}  # tells data sets apart
        warmup(hyp, loader)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H-%M-%SZ')
        folder = os.path.join('logs', name, f'{stamp}-{os.getpid()}')
        info = {'format': 'airbench-study/1', 'script': f'{name}.py', 'status': 'running', 'started': stamp,
                'command': ' '.join(sys.argv), 'hyp': hyp, 'device': str(device), 'torch': str(torch.__version__),
                'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', 'data': data}
        write_log(folder, info, results)
        for run in range(args.runs):
            seed = torch.seed()  # logged, so that any run can be repeated
            loader = CifarLoader(args.data_dir, True, hyp['opt']['batch_size'], hyp['aug'], device=device)
            results.append({'run': run, 'seed': seed, **train(hyp, loader, None, device, run=run)[1]})
            saved = write_log(folder, info, results)['n']  # a signal that cuts this short: rewritten below
        summary = write_log(folder, {**info, 'status': 'complete'}, results)
        print(f'{name}: {summary["n"]} run{"s" * (summary["n"] > 1)}, mean TTA accuracy {100 * summary["mean"]:.2f}%, '
              f'std {100 * (summary["std"] or 0):.2f}, mean time {summary["mean_time_seconds"]:.3f} s; log {folder}')
    except (Exception, KeyboardInterrupt) as exc:  # Exception: a UserError, or a bug or e.g. out of memory
        stop.held = True  # first, and no call: a second Ctrl-C or SIGTERM must not cut the log's last write short
        if not isinstance(exc, (UserError, KeyboardInterrupt)):
            traceback.print_exc()  # a bug's traceback matters; the line after it still says where the runs are
            exc = UserError(first_line(exc))
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = f'interrupted ({str(exc) or "SIGINT"})' if interrupted else f'error: {exc}'
        if folder and os.path.isdir(folder):
            with contextlib.suppress(UserError):  # a full disk: the log keeps its last complete write
                saved = write_log(folder, {**info, 'status': 'interrupted' if interrupted else 'failed'}, results)['n']
            message += f'; {saved} finished run(s) kept in {folder}'
        print(f'{name}.py: {message}', file=sys.stderr)
        number = signal.Signals.__members__.get(str(exc), signal.SIGINT)
        if interrupted and argv is None:  # as the program, die of it (as study.py does): a shell's loop then stops
            sys.stdout.flush(), signal.signal(number, signal.SIG_DFL), signal.raise_signal(number)
        sys.exit(128 + number if interrupted else 1)
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)

def stop(signum, frame):
    """Ctrl-C or SIGTERM ends the attempt; signals after it do nothing (SIG_IGN would warn of one already pending)."""
    if not stop.held:
        stop.held = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

if __name__ == '__main__':
    main()
