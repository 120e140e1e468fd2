#!/usr/bin/env python
"""Prepare PASCAL VOC 2012 + SBD for weclip (the layout `weclip.data.VOC` reads).

Builds, inside VOCdevkit/VOC2012:
  SegmentationClassAug/{name}.png   palette PNG class-index masks (0 background, 1..20, 255 ignore) for every
                                    image of train_aug and val: VOC's own mask where it has one, else the
                                    --aug folder's, else SBD's .mat converted
  ImageSets/Segmentation/train_aug.txt  (SBD train + SBD val + VOC train) minus VOC val: 10,582 names
  ImageSets/Segmentation/cls_labels.json  image-level labels of train_aug, train and val (from the masks)
and, given the test archive, merges its 1,456 images and test.txt. Then verifies the counts
(train_aug 10,582 / train 1,464 / val 1,449 / test 1,456) and says what is missing.

Every file is written to a temporary name and renamed, files already there are kept, so the script can be
interrupted and rerun, and rerunning it changes nothing.

Examples:
  python data_scripts/prepare_voc.py --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --data-dir data
  python data_scripts/prepare_voc.py --voc data/VOCdevkit/VOC2012 --aug SegmentationClassAug
  python data_scripts/prepare_voc.py --download --data-dir data        (needs internet)
"""
import argparse, os, shutil, sys, tarfile, urllib.request
from pathlib import Path

URLS = {'voc': 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar',
        'sbd': 'http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz'}
EXPECTED = {'train_aug': 10582, 'train': 1464, 'val': 1449, 'test': 1456}


class PrepareError(Exception):
    "A problem with the inputs; the message says what is missing and how to fix it."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--voc', type=Path, help='VOC2012 folder (or a folder above VOCdevkit/VOC2012), or the '
                   'VOCtrainval_11-May-2012.tar archive (extracted into --data-dir)')
    p.add_argument('--sbd', type=Path, help='SBD release: the benchmark_RELEASE folder (with dataset/cls/*.mat) '
                   'or benchmark.tgz (extracted into --data-dir)')
    p.add_argument('--aug', type=Path, help='an existing SegmentationClassAug folder of class-index PNGs '
                   '(used instead of, or before, SBD)')
    p.add_argument('--test', type=Path, help='VOC2012 test images: the VOC2012test.tar archive or its extracted '
                   'folder (optional; only for test-server submissions)')
    p.add_argument('--data-dir', type=Path, default=Path('data'), help='where archives are extracted and '
                   'downloads go (default: ./data)')
    p.add_argument('--download', action='store_true', help='download the VOC trainval and SBD archives that '
                   'were not given from their official addresses (needs internet)')
    p.add_argument('--allow-partial', action='store_true', help='report count mismatches without failing '
                   '(for subsets)')
    return p.parse_args(argv)


def log(*a): print(*a, flush=True)


def atomic_copy(src: Path, dst: Path):
    "Copy (hard link when possible) `src` to `dst` through a temporary name."
    tmp = dst.with_name(f'.{dst.name}.tmp')
    tmp.unlink(missing_ok=True)
    try: os.link(src, tmp)
    except OSError: shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def download(url: str, dst: Path) -> Path:
    "Download `url` to `dst` unless it is there (through dst.part)."
    if dst.exists(): return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    log(f'downloading {url} -> {dst}')
    part = dst.with_name(dst.name + '.part')
    try:
        from tqdm import tqdm
        with urllib.request.urlopen(url) as r, open(part, 'wb') as f, \
                tqdm(total=int(r.headers.get('Content-Length') or 0), unit='B', unit_scale=True) as bar:
            while chunk := r.read(1 << 20): f.write(chunk); bar.update(len(chunk))
    except OSError as e:
        raise PrepareError(f'cannot download {url} ({e}). Fix: download it by hand and pass its path.') from None
    os.replace(part, dst)
    return dst


def extract(archive: Path, data_dir: Path) -> Path:
    "Extract `archive` into data_dir/<archive stem>/ (through a temporary folder); reuse an earlier extraction."
    stem = archive.name.split('.')[0]
    dst = data_dir / stem
    if dst.is_dir(): return dst
    if not tarfile.is_tarfile(archive): raise PrepareError(f'{archive} is not a tar archive. Fix: pass the '
                                                           'original archive or its extracted folder.')
    tmp = data_dir / f'.{stem}.tmp'
    shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
    log(f'extracting {archive} -> {dst}')
    with tarfile.open(archive) as t:
        try: t.extractall(tmp, filter='data')
        except TypeError: t.extractall(tmp)  # Python without extraction filters
    os.replace(tmp, dst)
    return dst


def find(path: Path, marker: str, what: str, fix: str) -> Path:
    "The folder at or below `path` (3 levels) that contains `marker`."
    if path is None: raise PrepareError(f'no {what} given. Fix: {fix}')
    if not path.exists(): raise PrepareError(f'{path} does not exist ({what}). Fix: {fix}')
    for depth in range(4):
        for cand in sorted([path] if depth == 0 else path.glob('/'.join(['*'] * depth))):
            if (cand / marker).exists(): return cand
    raise PrepareError(f'{path} is not {what}: no {marker} at or below it. Fix: {fix}')


def read_names(path: Path) -> list:
    return [l.split()[0] for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def write_names(path: Path, names):
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(''.join(f'{n}\n' for n in names)); os.replace(tmp, path)


def sbd_mask(mat_path: Path):
    "Class-index mask of an SBD `cls/*.mat` file (struct GTcls, field Segmentation)."
    import numpy as np, scipy.io
    return np.asarray(scipy.io.loadmat(mat_path)['GTcls']['Segmentation'][0, 0], np.uint8)


def main(argv=None) -> int:
    args = parse_args(argv)
    try: return prepare(args)
    except PrepareError as e:
        print(f'error: {e}', file=sys.stderr); return 1


def prepare(args) -> int:
    import numpy as np
    from tqdm import tqdm
    from weclip.data import VOC_CLASSES, IGNORE, read_mask, write_mask, write_label_file
    data_dir = args.data_dir
    voc, sbd = args.voc, args.sbd
    if args.download:
        if voc is None: voc = download(URLS['voc'], data_dir / Path(URLS['voc']).name)
        if sbd is None and args.aug is None: sbd = download(URLS['sbd'], data_dir / Path(URLS['sbd']).name)
    if voc is not None and voc.is_file(): voc = extract(voc, data_dir)
    if sbd is not None and sbd.is_file(): sbd = extract(sbd, data_dir)
    voc = find(voc, 'ImageSets/Segmentation/val.txt', 'a PASCAL VOC 2012 folder',
               'pass --voc with VOCtrainval_11-May-2012.tar or its extracted VOCdevkit/VOC2012, or use --download')
    log(f'VOC 2012: {voc}')
    sets, images = voc / 'ImageSets' / 'Segmentation', voc / 'JPEGImages'
    voc_train, voc_val = read_names(sets / 'train.txt'), read_names(sets / 'val.txt')
    sbd_cls, sbd_names = None, []
    if sbd is not None:
        sbd = find(sbd, 'cls', 'the SBD release (benchmark_RELEASE/dataset)',
                   'pass --sbd with benchmark.tgz or its extracted benchmark_RELEASE folder')
        sbd_cls = sbd / 'cls'
        sbd_names = read_names(sbd / 'train.txt') + read_names(sbd / 'val.txt')
        log(f'SBD: {sbd} ({len(sbd_names)} names)')
    aug_src = args.aug
    if aug_src is not None and not aug_src.is_dir():
        raise PrepareError(f'--aug {aug_src} is not a folder. Fix: pass the extracted SegmentationClassAug folder.')
    aug_names = sorted(p.stem for p in aug_src.glob('*.png')) if aug_src else []
    if not sbd_names and not aug_names:
        raise PrepareError('neither SBD (--sbd) nor an existing SegmentationClassAug (--aug) was given, so '
                           'train_aug cannot be built. Fix: pass --sbd benchmark.tgz, --aug DIR, or use --download.')

    # test images (optional): merge the test archive's images and split list
    if args.test is not None:
        test = args.test
        if test.is_file(): test = extract(test, data_dir)
        test = find(test, 'ImageSets/Segmentation/test.txt', 'the VOC 2012 test set',
                    'pass --test with VOC2012test.tar or its extracted VOCdevkit/VOC2012')
        names = read_names(test / 'ImageSets/Segmentation/test.txt')
        for n in tqdm(names, desc='test images'):
            if not (images / f'{n}.jpg').exists(): atomic_copy(test / 'JPEGImages' / f'{n}.jpg', images / f'{n}.jpg')
        write_names(sets / 'test.txt', names)

    # masks: VOC's own first, then --aug, then SBD
    val_set = set(voc_val)
    train_aug = sorted((set(sbd_names) | set(aug_names) | set(voc_train)) - val_set)
    have_img = {p.stem for p in images.glob('*.jpg')}
    no_img = [n for n in train_aug + voc_val if n not in have_img]
    if no_img:
        raise PrepareError(f'{len(no_img)} images named by the split lists are missing from {images} '
                           f'(e.g. {no_img[:3]}). Fix: use the complete VOCtrainval_11-May-2012 archive.')
    out = voc / 'SegmentationClassAug'; out.mkdir(exist_ok=True)
    voc_gt = voc / 'SegmentationClass'
    missing, made = [], 0
    for n in tqdm(sorted(set(train_aug) | val_set), desc='SegmentationClassAug'):
        dst = out / f'{n}.png'
        if dst.exists(): continue
        if (voc_gt / f'{n}.png').exists(): write_mask(dst, read_mask(voc_gt / f'{n}.png'))
        elif aug_src is not None and (aug_src / f'{n}.png').exists(): write_mask(dst, read_mask(aug_src / f'{n}.png'))
        elif sbd_cls is not None and (sbd_cls / f'{n}.mat').exists(): write_mask(dst, sbd_mask(sbd_cls / f'{n}.mat'))
        else: missing.append(n); continue
        made += 1
    if missing:
        raise PrepareError(f'no mask for {len(missing)} images (e.g. {missing[:3]}): not in {voc_gt}, '
                           f'{aug_src or "--aug (not given)"} nor {sbd_cls or "--sbd (not given)"}. '
                           'Fix: pass the complete SBD release or SegmentationClassAug folder.')
    log(f'SegmentationClassAug: {made} masks written, {len(set(train_aug) | val_set) - made} already there')
    write_names(sets / 'train_aug.txt', train_aug)

    # image-level labels from the masks (0 background and 255 ignore dropped; class c -> index c-1)
    labels = {}
    for n in tqdm(sorted(set(train_aug) | set(voc_train) | val_set), desc='labels'):
        v = np.unique(read_mask(out / f'{n}.png'))
        labels[n] = [int(c) - 1 for c in v if c not in (0, IGNORE)]
    write_label_file(sets / 'cls_labels.json', VOC_CLASSES, labels)
    log(f'labels: {sets / "cls_labels.json"} ({len(labels)} images)')
    return verify(voc, args.allow_partial)


def verify(voc: Path, allow_partial: bool) -> int:
    "Compare the split sizes with the published ones; 1 when train_aug/train/val differ (unless allow_partial)."
    sets, bad = voc / 'ImageSets' / 'Segmentation', []
    for split, n in EXPECTED.items():
        have = len(read_names(sets / f'{split}.txt'))
        ok = have == n
        note = '' if ok else ' (test images come from VOC2012test.tar, via the evaluation server; only needed for ' \
            'test-server submissions)' if split == 'test' else ' MISMATCH'
        log(f'  {split:10s} {have:6d} / {n}{note}')
        if not ok and split != 'test': bad.append(split)
    if bad and not allow_partial:
        print(f'error: {", ".join(bad)} do not have the published sizes. Fix: check that the complete VOC 2012 '
              'trainval archive and SBD release were given (or pass --allow-partial for a subset).', file=sys.stderr)
        return 1
    log('done' + (' (partial)' if bad else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
