"""data_scripts/prepare_voc.py and prepare_coco.py on tiny synthetic inputs in the real formats."""
import importlib.util, json, subprocess, sys, tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip.data import COCO, VOC, IGNORE, TrainTransform, make_tiny_dataset, read_label_file, read_mask

SCRIPTS = Path(__file__).resolve().parents[1] / 'data_scripts'
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # pycocotools' numpy-2 __array__ notice


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


prepare_voc, prepare_coco = load('prepare_voc'), load('prepare_coco')


@pytest.mark.parametrize('script', ['prepare_voc.py', 'prepare_coco.py'])
def test_help(script):
    r = subprocess.run([sys.executable, str(SCRIPTS / script), '--help'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'usage:' in r.stdout and 'weclip.data' in r.stdout


# ---------------------------------------------------------------- VOC + SBD

def sbd_mat(path, mask):
    "An SBD cls .mat: struct GTcls with field Segmentation (plus the other fields SBD has)."
    import scipy.io
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {'GTcls': {'Segmentation': mask.astype(np.uint8), 'Boundaries': np.zeros((1, 1)),
                                      'CategoriesPresent': np.unique(mask)[1:]}})


@pytest.fixture
def voc_inputs(tmp_path):
    "A VOC2012 trainval folder (no SegmentationClassAug) and an SBD release with 2 extra images and 1 overlap."
    voc = make_tiny_dataset(tmp_path / 'VOCdevkit' / 'VOC2012', 'voc', n_train=3, n_val=2, n_test=0)
    for p in ['SegmentationClassAug', 'ImageSets/Segmentation/train_aug.txt', 'ImageSets/Segmentation/cls_labels.json']:
        target = voc / p
        if target.is_dir():
            for f in target.iterdir(): f.unlink()
            target.rmdir()
        else: target.unlink()
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'
    rng = np.random.default_rng(0)
    sbd_masks = {}
    for n in ['2008_sbd000', '2008_sbd001']:
        mask = np.zeros((30, 40), np.uint8); mask[5:20, 10:30] = int(rng.integers(1, 21))
        Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(voc / 'JPEGImages' / f'{n}.jpg')
        sbd_mat(sbd / 'cls' / f'{n}.mat', mask); sbd_masks[n] = mask
    # SBD also holds one VOC train image (VOC's mask wins) and one VOC val image (excluded from train_aug)
    for n in ['2007_train000', '2007_val000']:
        sbd_mat(sbd / 'cls' / f'{n}.mat', np.full(read_mask(voc / 'SegmentationClass' / f'{n}.png').shape, 7, np.uint8))
    (sbd / 'train.txt').write_text('2008_sbd000\n2007_val000\n')
    (sbd / 'val.txt').write_text('2008_sbd001\n2007_train000\n')
    return voc, sbd.parent, sbd_masks


def test_prepare_voc(voc_inputs, tmp_path, capsys):
    voc, sbd, sbd_masks = voc_inputs
    args = ['--voc', str(voc.parent.parent), '--sbd', str(sbd), '--data-dir', str(tmp_path / 'data')]
    assert prepare_voc.main(args) == 1                                     # a subset: counts do not match
    assert 'do not have the published sizes' in capsys.readouterr().err
    assert prepare_voc.main(args + ['--allow-partial']) == 0
    sets = voc / 'ImageSets' / 'Segmentation'
    train_aug = sets.joinpath('train_aug.txt').read_text().split()
    assert train_aug == ['2007_train000', '2007_train001', '2007_train002', '2008_sbd000', '2008_sbd001']
    aug = voc / 'SegmentationClassAug'
    for n, m in sbd_masks.items(): np.testing.assert_array_equal(read_mask(aug / f'{n}.png'), m)
    np.testing.assert_array_equal(read_mask(aug / '2007_train000.png'), read_mask(voc / 'SegmentationClass/2007_train000.png'))
    assert Image.open(aug / '2008_sbd000.png').mode == 'P'
    classes, table = read_label_file(sets / 'cls_labels.json')
    assert len(classes) == 20 and len(table) == 7
    for n in table:
        present = [c - 1 for c in np.unique(read_mask(aug / f'{n}.png')) if c not in (0, IGNORE)]
        assert np.flatnonzero(table[n]).tolist() == present
    # the loader reads the result
    ds = VOC(voc.parent.parent, 'train_aug', TrainTransform(crop_size=32))
    assert len(ds) == 5 and ds[3]['labels'].sum() == 1
    assert len(VOC(voc, 'val')) == 2
    # idempotent: a second run writes nothing new and leaves every file as it was
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in voc.rglob('*') if p.is_file()}
    assert prepare_voc.main(args + ['--allow-partial']) == 0
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in voc.rglob('*') if p.is_file()}
    assert {p: b for p, (_, b) in before.items()} == {p: b for p, (_, b) in after.items()}
    assert all(before[p][0] == after[p][0] for p in before if p.suffix == '.png')
    assert not list(voc.rglob('*.tmp'))


def test_prepare_voc_from_archives(voc_inputs, tmp_path):
    voc, sbd, _ = voc_inputs
    arch = tmp_path / 'arch'; arch.mkdir()
    with tarfile.open(arch / 'VOCtrainval_11-May-2012.tar', 'w') as t: t.add(voc.parent, 'VOCdevkit')
    with tarfile.open(arch / 'benchmark.tgz', 'w:gz') as t: t.add(sbd.parent, 'benchmark_RELEASE')
    data = tmp_path / 'data'
    assert prepare_voc.main(['--voc', str(arch / 'VOCtrainval_11-May-2012.tar'), '--sbd', str(arch / 'benchmark.tgz'),
                             '--data-dir', str(data), '--allow-partial']) == 0
    assert len(VOC(data / 'VOCtrainval_11-May-2012', 'train_aug')) == 5


def test_prepare_voc_from_existing_aug(voc_inputs, tmp_path):
    voc, sbd, sbd_masks = voc_inputs
    aug = tmp_path / 'SegmentationClassAug'                             # a ready-made SegmentationClassAug
    from weclip.data import write_mask
    for n, m in sbd_masks.items(): write_mask(aug / f'{n}.png', m)
    assert prepare_voc.main(['--voc', str(voc), '--aug', str(aug), '--allow-partial']) == 0
    assert (voc / 'ImageSets/Segmentation/train_aug.txt').read_text().split()[-2:] == list(sbd_masks)


def test_prepare_voc_bad_input(voc_inputs, tmp_path, capsys):
    voc, sbd, _ = voc_inputs
    assert prepare_voc.main(['--voc', str(tmp_path / 'nothing'), '--sbd', str(sbd)]) == 1
    assert 'does not exist' in capsys.readouterr().err
    assert prepare_voc.main(['--voc', str(voc)]) == 1
    assert 'neither SBD' in capsys.readouterr().err
    (sbd / 'dataset' / 'cls' / '2008_sbd001.mat').unlink()
    assert prepare_voc.main(['--voc', str(voc), '--sbd', str(sbd), '--allow-partial']) == 1
    err = capsys.readouterr().err
    assert 'no mask for 1 images' in err and '2008_sbd001' in err
    assert not list(voc.rglob('*.tmp'))


# ---------------------------------------------------------------- COCO

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


@pytest.fixture
def coco_inputs(tmp_path):
    "COCO 2014 images + instances json: a polygon (category id 90 -> class 80) under an RLE crowd region (id 1)."
    from weclip.data import COCO_CATEGORIES
    images, ann_dir = tmp_path / 'images', tmp_path / 'annotations'
    ann_dir.mkdir()
    cats = [{'id': i, 'name': n, 'supercategory': 'x'} for i, n in zip(COCO_IDS, COCO_CATEGORIES)]
    for split, n_img in (('train', 3), ('val', 2)):
        (images / f'{split}2014').mkdir(parents=True)
        imgs, anns = [], []
        for k in range(n_img):
            iid = 10 * k + (1 if split == 'train' else 2)
            fn = f'COCO_{split}2014_{iid:012d}.jpg'
            Image.fromarray(np.full((24, 32, 3), 60, np.uint8)).save(images / f'{split}2014' / fn)
            imgs.append({'id': iid, 'file_name': fn, 'height': 24, 'width': 32})
            if k == n_img - 1: continue                                    # last image: no annotations
            big = np.zeros((24, 32), np.uint8); big[2:22, 2:30] = 1    # crowd person, uncompressed RLE
            counts = []
            # uncompressed RLE: run lengths in column-major order, starting with zeros
            flat = big.flatten(order='F'); val, run = 0, 0
            for v in flat:
                if v == val: run += 1
                else: counts.append(run); val, run = v, 1
            counts.append(run)
            anns.append({'id': 100 * iid + 1, 'image_id': iid, 'category_id': 1, 'iscrowd': 1, 'area': float(big.sum()),
                         'segmentation': {'counts': counts, 'size': [24, 32]}, 'bbox': [2, 2, 28, 20]})
            anns.append({'id': 100 * iid + 2, 'image_id': iid, 'category_id': 90, 'iscrowd': 0, 'area': 36.0,
                         'segmentation': [[8, 8, 14, 8, 14, 14, 8, 14]], 'bbox': [8, 8, 6, 6]})
        (ann_dir / f'instances_{split}2014.json').write_text(json.dumps(
            {'images': imgs, 'annotations': anns, 'categories': cats}))
    return images, ann_dir


def test_prepare_coco(coco_inputs, tmp_path):
    images, ann_dir = coco_inputs
    out = tmp_path / 'coco_voc'
    args = ['--images', str(images), '--annotations', str(ann_dir), '--out', str(out)]
    assert prepare_coco.main(args) == 0
    sets = out / 'ImageSets' / 'Segmentation'
    assert sets.joinpath('train.txt').read_text().split() == [f'COCO_train2014_{i:012d}' for i in (1, 11, 21)]
    m = read_mask(out / 'SegmentationClass/train/COCO_train2014_000000000001.png')
    assert m[0, 0] == 0 and m[3, 3] == 1                                   # crowd person (class 1) painted
    assert m[10, 10] == 80                                                 # the smaller toothbrush stays on top
    assert (m == 80).sum() == 36 and set(np.unique(m)) == {0, 1, 80}
    classes, table = read_label_file(sets / 'cls_labels.json')
    assert classes[79] == 'toothbrush' and len(table) == 5
    assert np.flatnonzero(table['COCO_val2014_000000000002']).tolist() == [0, 79]
    assert table['COCO_val2014_000000000012'].sum() == 0                  # no annotations: no labels
    train, val = COCO(out, 'train', TrainTransform(crop_size=16)), COCO(out, 'val')
    assert len(train) == 3 and len(val) == 2 and train.labels.shape == (3, 80)
    assert val[0]['mask'].shape == (24, 32)
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert prepare_coco.main(args) == 0                                    # idempotent
    assert before == {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}


def test_prepare_coco_limit_and_bad_input(coco_inputs, tmp_path, capsys):
    images, ann_dir = coco_inputs
    out = tmp_path / 'coco_voc'
    assert prepare_coco.main(['--images', str(images), '--annotations', str(ann_dir), '--out', str(out),
                              '--limit', '2', '--splits', 'train']) == 0
    assert len(COCO(out, 'train')) == 2
    assert prepare_coco.main(['--images', str(images), '--annotations', str(tmp_path), '--out', str(out)]) == 1
    assert 'instances_train2014.json not found' in capsys.readouterr().err
    (images / 'val2014' / 'COCO_val2014_000000000012.jpg').unlink()
    assert prepare_coco.main(['--images', str(images), '--annotations', str(ann_dir), '--out', str(out),
                              '--splits', 'val']) == 1
    assert '1 images of' in capsys.readouterr().err
