"""The toy world's command line, run as a user runs it (a subprocess): help, a tiny dataset, and bad input."""
import json, os, subprocess, sys
import numpy as np
import pytest
from PIL import Image


def run(*args):
    return subprocess.run([sys.executable, '-m', 'weclip.toy', *args], capture_output=True, text=True, timeout=300)


def test_help_lists_options():
    r = run('--help')
    assert r.returncode == 0
    for opt in ('--out', '--n-train', '--n-val', '--size', '--seed', '--preset', '--classes', '--train-clip'):
        assert opt in r.stdout


def test_writes_a_tiny_voc_layout(tmp_path):
    out = tmp_path / 'toy'
    r = run('--out', str(out), '--n-train', '6', '--n-val', '3', '--size', '64', '--seed', '3', '--preset', 'easy')
    assert r.returncode == 0, r.stderr
    assert 'wrote 6 train + 3 val' in r.stdout
    sets = out / 'ImageSets' / 'Segmentation'
    train = sets.joinpath('train.txt').read_text().split()
    assert len(train) == 6 and sets.joinpath('train_aug.txt').read_text().split() == train
    assert len(sets.joinpath('val.txt').read_text().split()) == 3
    doc = json.loads(sets.joinpath('cls_labels.json').read_text())
    caps = json.loads(sets.joinpath('captions.json').read_text())
    assert doc['classes'] == ['circle', 'square', 'triangle', 'star', 'cross', 'hexagon', 'diamond', 'crescent']
    assert set(doc['labels']) == set(caps) and len(caps) == 9
    for name, labels in doc['labels'].items():
        with Image.open(out / 'JPEGImages' / f'{name}.jpg') as im: assert im.size == (64, 64)
        for d in ('SegmentationClassAug', 'SegmentationClass'):
            with Image.open(out / d / f'{name}.png') as m:
                assert m.mode == 'P'
                present = sorted(int(v) - 1 for v in np.unique(np.asarray(m)) if v)
            assert present == labels and labels                 # labels are exactly the mask's classes
        words = set(caps[name].replace(',', ' ').split())
        assert sorted(words & set(doc['classes'])) == sorted(doc['classes'][c] for c in labels)
    assert json.loads(sets.joinpath('toy.json').read_text())['complete'] is True
    # the loader of weclip.data reads it unchanged
    from weclip.data import VOC
    assert len(VOC(out, 'train')) == 6 and VOC(out, 'val')[0]['mask'].shape == (64, 64)
    # a rerun is a no-op that still succeeds
    r2 = run('--out', str(out), '--n-train', '6', '--n-val', '3', '--size', '64', '--seed', '3', '--preset', 'easy')
    assert r2.returncode == 0, r2.stderr


def test_class_subset(tmp_path):
    r = run('--out', str(tmp_path / 't'), '--n-train', '3', '--n-val', '0', '--size', '32', '--classes', 'star,cross',
            '--quiet')
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / 't/ImageSets/Segmentation/cls_labels.json').read_text())
    assert doc['classes'] == ['star', 'cross'] and all(set(v) <= {0, 1} for v in doc['labels'].values())


@pytest.mark.parametrize('args, message', [
    (('--classes', ''), 'no classes requested'),
    (('--classes', 'circle,boat'), 'must be distinct names among'),
    (('--size', '100'), 'not a multiple of the patch size 8'),
    (('--n-train', '-1'), 'n_train = -1'),
    (('--n-val', '-5'), 'n_val = -5'),
])
def test_bad_input_one_clear_message(tmp_path, args, message):
    r = run('--out', str(tmp_path / 'bad'), '--quiet', *args)
    assert r.returncode != 0
    assert message in r.stderr and 'Traceback' not in r.stderr


def test_train_clip_is_reserved(tmp_path):
    r = run('--train-clip', '--out', str(tmp_path))
    assert r.returncode != 0 and 'python -m weclip.toyclip --train' in r.stderr and 'Traceback' not in r.stderr


def test_other_seed_in_same_folder_refused(tmp_path):
    assert run('--out', str(tmp_path / 'w'), '--n-train', '2', '--n-val', '1', '--size', '32', '--quiet').returncode == 0
    r = run('--out', str(tmp_path / 'w'), '--n-train', '2', '--n-val', '1', '--size', '32', '--seed', '9', '--quiet')
    assert r.returncode != 0 and 'another seed or config' in r.stderr


def test_missing_out_is_a_usage_error():
    r = run('--n-train', '2')
    assert r.returncode == 2 and '--out DIR is required' in r.stderr


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC while a toy picture is written: one line naming it and the fix; no picture under its final name."""
    import errno
    from weclip import data
    from weclip.data import WriteError
    from weclip.toy import write_toy_dataset
    real_open = open
    def fake_open(path, *a, **k):
        if str(path).endswith('.jpg.tmp-' + str(os.getpid())) and 'val_000001' in str(path):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, *a, **k)
    monkeypatch.setattr(data, 'open', fake_open, raising=False)
    with pytest.raises(WriteError) as e: write_toy_dataset(tmp_path / 'toy', n_train=1, n_val=2, seed=0)
    pic = tmp_path / 'toy' / 'JPEGImages' / 'toy_val_000001.jpg'
    assert str(e.value) == (f'Could not write {pic} (No space left on device); no toy_val_000001.jpg was written. Free '
                            'disk space, or write the toy world elsewhere ($WECLIP_CACHE for the cached one, --out for '
                            'python -m weclip.toy).'), str(e.value)
    assert not pic.exists() and not list(pic.parent.glob('.*'))
    from weclip.toy import main                                 # the command line: the same line, no traceback
    with pytest.raises(SystemExit) as e: main(['--out', str(tmp_path / 'cli'), '--n-train', '1', '--n-val', '2', '--quiet'])
    assert str(e.value).startswith(f"error: Could not write {tmp_path / 'cli' / 'JPEGImages' / 'toy_val_000001.jpg'} (No space")
