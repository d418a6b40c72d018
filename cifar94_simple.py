"""cifar94_simple.py [RUNS]: "94% on CIFAR-10 in 94 lines and 94 seconds" (94.02% mean, A10)."""
import hashlib, os, sys, tarfile, time, urllib.request

import torch
from torch import nn

EPOCHS, BATCH_SIZE, MOMENTUM, WEIGHT_DECAY = 24, 512, 0.9, 5e-4 * 512  # the loss is a sum: x 512
WIDTHS, CROP_PADDING, CUTOUT = (3, 64, 128, 128, 128, 256, 512, 512, 512), 4, 8  # CUTOUT: a side
URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
DEVICE, DTYPE = ('cuda', torch.float16) if torch.cuda.is_available() else ('cpu', torch.float32)

def load_cifar10(data_dir):  # [train, test]: {'images': uint8 N x 32 x 32 x 3, 'labels': int64 N}
    if not os.path.exists(f'{data_dir}/test.pt'):  # the cache is written train.pt first
        tarball = os.path.join(data_dir, os.path.basename(URL))
        try:  # a partial download fails the md5 check below
            os.makedirs(data_dir, exist_ok=True)
            if not os.path.exists(tarball):
                urllib.request.urlretrieve(URL, tarball)
        except OSError as error:  # a data_dir that is a file fails here too, as no download does
            sys.exit(f'{data_dir} is a file; set CIFAR10_DIR' if os.path.isfile(data_dir) else
                     f'cannot download {URL} ({error}); put that file in {data_dir}/ by hand')
        with open(tarball, 'rb') as file:
            if hashlib.md5(file.read()).hexdigest() != 'c32a1d4ab5d03f1284b67883e8d87530':
                sys.exit(f'{tarball} is damaged (its md5 is wrong): delete it and run again')
        with tarfile.open(tarball) as tar:  # records: a label byte, then R, G, B planes of 32 x 32
            raw = b''.join(tar.extractfile(m).read() for m in sorted(tar.getnames()) if '.bin' in m)
        records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 1 + 3 * 32 * 32)
        images = records[:, 1:].view(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous()
        for split, i in ('train', slice(50000)), ('test', slice(50000, None)):
            cache = dict(images=images[i].clone(), labels=records[i, 0].long(), classes=CLASSES)
            torch.save(cache, f'{data_dir}/{split}.pt')
    try:  # a truncated file, or a pickle of another kind: one line, not a traceback
        data = [torch.load(f'{data_dir}/{s}.pt', weights_only=True) for s in ('train', 'test')]
        if all(d['images'].shape[1:] == (32, 32, 3) and d['labels'].ndim == 1 for d in data):
            return data
    except Exception as bad:
        sys.exit(f'cannot read {data_dir}/train.pt or test.pt ({type(bad).__name__}): delete both')
    sys.exit(f'{data_dir}/train.pt or test.pt holds no CIFAR-10 images: delete both, run again')

def make_net():  # each 3x3 conv: a 2x2 max-pool if it doubles the width, then BatchNorm and CELU
    layers = []
    for c_in, c_out in zip(WIDTHS, WIDTHS[1:]):  # channels in and out
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        layers += [nn.MaxPool2d(2)] * (c_out == 2 * c_in) + [nn.BatchNorm2d(c_out), nn.CELU(0.075)]
    return nn.Sequential(*layers, nn.MaxPool2d(4), nn.Flatten(), nn.Linear(c_out, 10, bias=False))

def augment(images):  # N x C x 32 x 32: random crops of the padded images, flips, cutout squares
    n, grid, device = len(images), torch.arange(32, device=images.device), images.device
    top, left = torch.randint(2 * CROP_PADDING + 1, (2, n, 1, 1), device=device)
    cols = torch.where(torch.rand(n, 1, 1, device=device) < 0.5, 31 - grid, grid)  # flipped or not
    padded = nn.functional.pad(images, (CROP_PADDING,) * 4, mode='reflect').movedim(1, 3)
    crops = padded[torch.arange(n, device=device)[:, None, None], top + grid[:, None], left + cols]
    top, left = torch.randint(33 - CUTOUT, (2, n, 1, 1, 1), device=device)
    rows, cols = grid[:, None] - top, grid - left  # offset // CUTOUT == 0: inside the square
    return crops.movedim(3, 1).masked_fill((rows // CUTOUT == 0) & (cols // CUTOUT == 0), 0)

def train(data_dir=None):  # one network, a line per epoch; returns (model, test accuracy in %)
    torch.backends.cudnn.benchmark = DEVICE == 'cuda'  # the shapes never change: autotuning pays
    data = load_cifar10(data_dir or os.environ.get('CIFAR10_DIR') or 'cifar10')
    std, mean = torch.std_mean(data[0]['images'].float(), dim=(0, 1, 2))
    train_x, test_x = [((d['images'] - mean) / std).movedim(3, 1).to(DEVICE, DTYPE) for d in data]
    train_y, test_y = data[0]['labels'].to(DEVICE), data[1]['labels'].to(DEVICE)  # x: channels-last
    model = make_net().to(DEVICE, DTYPE, memory_format=torch.channels_last)  # as x: no copies
    model.apply(lambda m: m.float() if isinstance(m, nn.BatchNorm2d) else m)  # fp32 statistics
    optimizer = torch.optim.SGD(model.parameters(), lr=0, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    steps, training_time = len(train_x) // BATCH_SIZE, 0.0
    for epoch in range(EPOCHS):
        start, order = time.perf_counter(), torch.randperm(len(train_x), device=DEVICE)
        inputs, labels = augment(train_x[order]).split(BATCH_SIZE), train_y[order].split(BATCH_SIZE)
        for step, x, y in zip(range(steps), inputs, labels):  # the last, partial batch is left out
            progress = (epoch + (step + 1) / steps) / EPOCHS  # lr per example: 0.6 / 512 at 20%
            optimizer.param_groups[0]['lr'] = min(0.1 + 2.5 * progress, 0.75 * (1 - progress)) / 512
            logits = model.train()(x) / 8  # small outputs: an implicit bias that generalizes
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.2, reduction='sum')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_loss, train_acc = loss.item() / len(y), 100 * (logits.argmax(1) == y).float().mean()
        training_time += time.perf_counter() - start  # after .item(), which waits for the GPU
        with torch.no_grad():
            predictions = torch.cat([model.eval()(x).argmax(1) for x in test_x.split(1000)])
        test_acc = 100 * (predictions == test_y).float().mean()
        print(f'epoch {epoch + 1:2d}  train loss {train_loss:.3f}  train acc {train_acc:.2f}  '
              f'test acc {test_acc:.2f}  training time {training_time:.2f}', flush=True)
    return model, test_acc.item()

if __name__ == '__main__':
    runs = sys.argv[1] if len(sys.argv) > 1 else '1'
    if len(sys.argv) > 2 or not runs.isdigit() or int(runs) < 1:  # --help: the usage, and status 0
        usage = 'usage: python cifar94_simple.py [RUNS], where RUNS is a whole number, 1 or more'
        sys.exit(print(usage) if runs in ('-h', '--help') else usage)
    print(f'mean of {runs} run(s): {sum(train()[1] for _ in range(int(runs))) / int(runs):.2f}%')
