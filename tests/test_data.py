"""The data contract: the binary tarball, the download, the cache, and the loader's augmentations."""
import errno
import hashlib
import importlib
import io
import os
import tarfile
import urllib.request

import pytest
import torch

from conftest import RECIPES, assert_one_line, assert_shareable, disk_filling, subset, write_cache


def make_tarball(path, records_per_batch=3, seed=0):
    """A tarball in the layout of cifar-10-binary.tar.gz with a few random records per batch file;
    returns the expected {'train': (images, labels), 'test': ...} decoded independently of the code."""
    generator = torch.Generator().manual_seed(seed)
    names = {'train': [f'data_batch_{i}.bin' for i in range(1, 6)], 'test': ['test_batch.bin']}
    expected = {}
    with tarfile.open(path, 'w:gz') as tar:
        for split, files in names.items():
            images, labels = [], []
            for name in files:
                label = torch.randint(0, 10, (records_per_batch,), generator=generator)
                planes = torch.randint(0, 256, (records_per_batch, 3, 32, 32), generator=generator)
                raw = b''.join(bytes([int(label[i])]) + bytes(planes[i].flatten().tolist())
                               for i in range(records_per_batch))
                info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
                images.append(planes.permute(0, 2, 3, 1))  # R, G, B planes -> H x W x C
                labels.append(label)
            expected[split] = (torch.cat(images).to(torch.uint8), torch.cat(labels))
    return expected


def serve(recipe, monkeypatch, path):
    """The recipe downloads `path` through a file:// URL, and its md5 is the expected one."""
    monkeypatch.setattr(recipe, 'CIFAR10_URL', path.as_uri())
    monkeypatch.setattr(recipe, 'CIFAR10_MD5', hashlib.md5(path.read_bytes()).hexdigest())


@pytest.fixture
def crafted_tarball(tmp_path, recipe, monkeypatch):
    path = tmp_path / 'served' / 'cifar-10-binary.tar.gz'
    path.parent.mkdir()
    expected = make_tarball(str(path))
    serve(recipe, monkeypatch, path)
    return path, expected


def test_download_parse_and_cache(recipe, crafted_tarball, tmp_path):
    data_dir = tmp_path / 'cifar10'
    _, expected = crafted_tarball
    for split in ('train', 'test'):
        data = recipe.load_cifar10(str(data_dir), train=(split == 'train'))
        images, labels = expected[split]
        assert torch.equal(data['images'], images)
        assert torch.equal(data['labels'], labels)
        assert data['labels'].dtype == torch.int64 and len(data['classes']) == 10
    assert sorted(os.listdir(data_dir)) == ['cifar-10-binary.tar.gz', 'test.pt', 'train.pt']
    cached = torch.load(data_dir / 'train.pt', weights_only=True)  # the airbench cache layout
    assert set(cached) == {'images', 'labels', 'classes'}
    assert_shareable(data_dir / 'train.pt')


def test_tarball_by_hand_is_used_without_download(recipe, crafted_tarball, tmp_path, offline):
    data_dir = tmp_path / 'cifar10'
    data_dir.mkdir()
    served, expected = crafted_tarball
    os.replace(served, data_dir / 'cifar-10-binary.tar.gz')
    data = recipe.load_cifar10(str(data_dir), train=False)
    assert torch.equal(data['labels'], expected['test'][1])


def test_offline_names_url_file_and_folder(recipe, tmp_path, offline):
    with pytest.raises(recipe.UserError) as error:
        recipe.load_cifar10(str(tmp_path / 'cifar10'))
    message = str(error.value)
    assert offline in message and 'cifar-10-binary.tar.gz' in message
    assert str(tmp_path / 'cifar10') in message
    assert_one_line(message)
    assert os.listdir(tmp_path / 'cifar10') == []  # no partial download left behind


def test_md5_mismatch_removes_the_file(recipe, tmp_path):
    data_dir = tmp_path / 'cifar10'
    data_dir.mkdir()
    (data_dir / 'cifar-10-binary.tar.gz').write_bytes(b'not the dataset')
    with pytest.raises(recipe.UserError, match='removed'):
        recipe.load_cifar10(str(data_dir))
    assert not (data_dir / 'cifar-10-binary.tar.gz').exists()


def test_data_dir_that_is_a_file(recipe, tmp_path):
    (tmp_path / 'cifar10').write_text('')
    with pytest.raises(recipe.UserError, match='is a file; give the folder of the CIFAR-10 cache'):
        recipe.load_cifar10(str(tmp_path / 'cifar10'))


def test_folder_without_permission_is_not_a_missing_download(recipe, tiny_data, monkeypatch):
    """A folder this user may not look into makes its files look absent: it must say so, not offer
    a download (root, who runs CI, may look anywhere, so the refusal is simulated)."""
    def build_cache(data_dir):
        raise AssertionError('a download was attempted')
    monkeypatch.setattr(recipe, 'build_cache', build_cache)
    monkeypatch.setattr(recipe.os.path, 'exists', lambda path: False)
    monkeypatch.setattr(recipe.os, 'access', lambda path, mode: False)
    real_load = torch.load

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(torch, 'load', refuse)
    with pytest.raises(recipe.UserError, match='Permission denied') as error:
        recipe.load_cifar10(tiny_data)
    monkeypatch.setattr(torch, 'load', real_load)
    assert 'download' not in str(error.value) and 'check the folder' in str(error.value)


def test_two_processes_over_a_damaged_tarball(recipe, tmp_path, monkeypatch):
    """The loser of the race finds the damaged file already removed by the winner: the same one
    line, not a FileNotFoundError traceback."""
    tarball = tmp_path / 'cifar-10-binary.tar.gz'
    tarball.write_bytes(b'not the dataset')
    real_unlink = os.unlink

    def removed_by_the_other_process_first(path):
        real_unlink(path)
        real_unlink(path)
    monkeypatch.setattr(os, 'unlink', removed_by_the_other_process_first)  # what pathlib's unlink calls
    with pytest.raises(recipe.UserError, match='it was removed; run again'):
        recipe.load_cifar10(str(tmp_path))
    assert not tarball.exists()


def test_interrupted_cache_write_leaves_nothing(recipe, crafted_tarball, tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while the cache is written: no train.pt, test.pt or temporary file
    that a later run would take for the cache."""
    data_dir = tmp_path / 'cifar10'
    data_dir.mkdir()
    served, _ = crafted_tarball
    os.replace(served, data_dir / 'cifar-10-binary.tar.gz')
    real_save, saved = torch.save, []

    def save_then_stop(obj, file, *args, **kwargs):
        saved.append(obj)
        if len(saved) == 2:  # train.pt is written; Ctrl-C while test.pt is
            raise KeyboardInterrupt
        return real_save(obj, file, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        recipe.load_cifar10(str(data_dir))
    assert sorted(os.listdir(data_dir)) == ['cifar-10-binary.tar.gz']


def test_full_disk_while_the_cache_is_built(recipe, crafted_tarball, tmp_path, monkeypatch):
    """The disk fills part-way through test.pt: one line that names the disk's error (not a cache
    that looks damaged), and neither file, which a later run would take for the cache."""
    data_dir = tmp_path / 'cifar10'
    data_dir.mkdir()
    served, _ = crafted_tarball
    os.replace(served, data_dir / 'cifar-10-binary.tar.gz')
    disk_filling(monkeypatch, recipe, 'test.pt', lambda write: True)
    with pytest.raises(recipe.UserError) as error:
        recipe.load_cifar10(str(data_dir))
    assert str(error.value) == (f'cannot read or build {data_dir / "train.pt"} (OSError: [Errno 28] No space left on '
                                f'device); check the folder')
    assert sorted(os.listdir(data_dir)) == ['cifar-10-binary.tar.gz']

def test_an_unwritable_data_folder_stops_before_the_download(recipe, crafted_tarball, tmp_path, monkeypatch):
    """A data folder where no file can be made (read-only, say): one line before a byte of the 170 MB
    is fetched, not after the whole download."""
    real_urlopen, reads = urllib.request.urlopen, []

    def counting_urlopen(*args, **kwargs):
        response = real_urlopen(*args, **kwargs)
        real_read = response.read
        response.read = lambda *size: reads.append(size) or real_read(*size)
        return response

    def read_only(path, mode='r', *args, **kwargs):
        raise PermissionError(errno.EACCES, 'Permission denied', path)
    monkeypatch.setattr(urllib.request, 'urlopen', counting_urlopen)
    monkeypatch.setattr(recipe, 'open', read_only, raising=False)
    with pytest.raises(recipe.UserError, match='Permission denied'):
        recipe.load_cifar10(str(tmp_path / 'cifar10'))
    assert reads == []

def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def damage_garbage(path):
    path.write_bytes(b'\x00garbage' * 100)


def damage_wrong_content(path):
    torch.save({'images': torch.zeros(4, 3, 32, 32)}, path)


@pytest.mark.parametrize('damage', [damage_truncate, damage_garbage, damage_wrong_content])
def test_damaged_cache_is_named(recipe, tmp_path, damage):
    data_dir = write_cache(str(tmp_path / 'cifar10'), n_train=20, n_test=10)
    path = tmp_path / 'cifar10' / 'train.pt'
    damage(path)
    with pytest.raises(recipe.UserError) as error:
        recipe.load_cifar10(data_dir, train=True)
    assert str(path) in str(error.value) and 'delete' in str(error.value)
    assert_one_line(str(error.value))


def test_default_data_dir_follows_environment(recipe, monkeypatch):
    assert recipe.default_data_dir() == 'cifar10'
    monkeypatch.setenv('CIFAR10_DIR', '/somewhere/else')
    assert recipe.default_data_dir() == '/somewhere/else'


# ---- the loader --------------------------------------------------------------------------------

def asymmetric_cache(folder, n=64):
    """Images that differ from their own mirror image and from every translate of each other."""
    write_cache(folder, n_train=n, n_test=8)
    data = torch.load(os.path.join(folder, 'train.pt'), weights_only=True)
    data['images'] = torch.randint(0, 256, data['images'].shape, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8)
    torch.save(data, os.path.join(folder, 'train.pt'))
    return folder


def one_epoch(loader):
    """The epoch's images in dataset order (the loader must not shuffle) as one tensor."""
    return torch.cat([inputs for inputs, _ in loader])


def test_alternating_flip_over_epochs(recipe, tmp_path):
    n = 64
    torch.manual_seed(0)
    loader = recipe.CifarLoader(asymmetric_cache(str(tmp_path)), True, n, aug={'flip': True},
                                shuffle=False, device='cpu')
    plain = loader.normalize(loader.images)
    flipped_in = []
    for _ in range(6):
        epoch = one_epoch(loader)
        is_flipped = (epoch == plain.flip(-1)).flatten(1).all(1)
        assert ((epoch == plain).flatten(1).all(1) ^ is_flipped).all()  # each image: as is, or mirrored
        flipped_in.append(is_flipped)
    assert 0.25 < flipped_in[0].float().mean() < 0.75  # the first epoch flips about half at random
    for before, after in zip(flipped_in, flipped_in[1:]):
        assert torch.equal(after, ~before)  # then every image the other way each epoch


def test_translation_range(recipe, tmp_path):
    n, r = 64, 2
    torch.manual_seed(0)
    loader = recipe.CifarLoader(asymmetric_cache(str(tmp_path)), True, n, aug={'translate': r},
                                shuffle=False, device='cpu')
    padded = torch.nn.functional.pad(loader.normalize(loader.images), (r,) * 4, mode='reflect')
    shifts_seen = set()
    for _ in range(4):
        for i, image in enumerate(one_epoch(loader)):
            matches = [(dy, dx) for dy in range(2 * r + 1) for dx in range(2 * r + 1)
                       if torch.equal(image, padded[i, :, dy:dy + 32, dx:dx + 32])]
            assert len(matches) == 1  # a translate of its own image by at most r pixels
            shifts_seen.add(matches[0])
    assert len(shifts_seen) == (2 * r + 1) ** 2  # and every shift occurs


def positions_in(loader, batches):
    """The dataset index of every image in the batches (the loader must not augment)."""
    plain = loader.normalize(loader.images).flatten(1)
    index_of = {tuple(row[:32].tolist()): i for i, row in enumerate(plain)}
    return torch.tensor([index_of[tuple(image.flatten()[:32].tolist())]
                         for inputs, _ in batches for image in inputs])


@pytest.mark.parametrize('name', [name for name, facts in RECIPES.items() if 'aug.cutout' in facts['hyp']])
def test_cutout_squares_over_an_epoch(name, tiny_data):
    """Each image loses exactly one 12 x 12 square (zero: the mean color), at every position that
    fits (0 to 20 for a corner), new ones each epoch. The 96% recipes have it."""
    loader = importlib.import_module(name).CifarLoader(tiny_data, True, 64, {'cutout': 12}, shuffle=False, device='cpu')
    corners = []
    for _ in range(2):
        images = torch.cat([inputs for inputs, _ in loader])
        zero = (images == 0).all(1)
        rows, cols = zero.any(2), zero.any(1)
        assert (zero.sum((1, 2)) == 144).all() and (rows.sum(1) == 12).all() and (cols.sum(1) == 12).all()
        corners.append(torch.stack([rows.float().argmax(1), cols.float().argmax(1)], 1))
    assert corners[0].min() == 0 and corners[0].max() == 20
    assert not torch.equal(corners[0], corners[1])


def test_batches_cover_each_image_once(recipe, tiny_data):
    torch.manual_seed(0)
    loader = recipe.CifarLoader(tiny_data, True, 50, device='cpu')
    batches = list(loader)
    assert len(batches) == len(loader) == 256 // 50  # the partial last batch is dropped
    positions = positions_in(loader, batches)
    assert len(set(positions.tolist())) == 250 and not torch.equal(positions, torch.arange(250))
    assert torch.equal(torch.cat([labels for _, labels in batches]), loader.labels[positions])
    assert not torch.equal(positions_in(loader, list(loader)), positions)  # reshuffled each epoch
    test_loader = recipe.CifarLoader(tiny_data, False, 50, device='cpu')
    test_batches = list(test_loader)
    assert len(test_batches) == 3 and torch.equal(positions_in(test_loader, test_batches), torch.arange(128))


def test_loader_serves_a_masked_subset(recipe, tiny_data):
    loader = recipe.CifarLoader(tiny_data, True, 16, aug={'flip': True, 'translate': 2}, device='cpu')
    list(loader)  # an epoch on the full set first
    mask = loader.labels < 6
    subset(loader, mask)
    labels = torch.cat([labels for _, labels in loader])
    assert len(loader) == int(mask.sum()) // 16 and (labels < 6).all()


def test_changing_translation_takes_effect(recipe, tmp_path):
    loader = recipe.CifarLoader(asymmetric_cache(str(tmp_path)), True, 64, aug={'translate': 2},
                                shuffle=False, device='cpu')
    assert not torch.equal(one_epoch(loader), loader.normalize(loader.images))
    loader.aug['translate'] = 0
    assert torch.equal(one_epoch(loader), loader.normalize(loader.images))


def test_loader_rejects_mismatched_mask_and_unknown_aug(recipe, tiny_data):
    """A loader knows exactly the augmentations its recipe's hyp names: as the paper's scripts, a
    recipe carries none that it does not use (cutout is the 96% recipes')."""
    known = ', '.join(sorted(recipe.hyp['aug']))
    with pytest.raises(recipe.UserError, match=f'^unknown augmentation no_such_thing; known: {known}$'):
        recipe.CifarLoader(tiny_data, True, 16, aug={'no_such_thing': 12}, device='cpu')
    recipe.CifarLoader(tiny_data, True, 16, aug=recipe.hyp['aug'], device='cpu')  # all of them, accepted
    loader = recipe.CifarLoader(tiny_data, True, 16, device='cpu')
    loader.images = loader.images[:10]
    with pytest.raises(recipe.UserError, match='same mask'):
        next(iter(loader))


def test_normalize_standardizes_channels(recipe, tiny_data):
    images = torch.randint(0, 256, (4096, 2, 2, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    normalized = recipe.CifarLoader(tiny_data, True, 16, device='cpu').normalize(images)
    assert normalized.shape == (4096, 3, 2, 2) and normalized.dtype == torch.float32
    mean = torch.tensor(recipe.CIFAR10_MEAN) * 255
    std = torch.tensor(recipe.CIFAR10_STD) * 255
    expected = (images.float().mean((0, 1, 2)) - mean) / std
    assert torch.allclose(normalized.mean((0, 2, 3)), expected, atol=1e-4)


def test_normalize_in_half_precision(recipe, tiny_data, monkeypatch):
    """The CUDA path (forced on the CPU): fp16 channels-last, computed in fp16 from the uint8 images,
    the fp32 result up to fp16 rounding (1/512 near the largest values, 2.1)."""
    loader = recipe.CifarLoader(tiny_data, True, 16, device='cpu')
    reference = loader.normalize(loader.images)
    monkeypatch.setattr(recipe, 'precision_for', lambda device: (torch.float16, torch.channels_last))
    normalized = loader.normalize(loader.images)
    assert normalized.dtype == torch.float16 and normalized.is_contiguous(memory_format=torch.channels_last)
    assert (normalized.float() - reference).abs().max() < 4e-3
