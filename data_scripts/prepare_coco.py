#!/usr/bin/env python
"""Prepare MS COCO 2014 for weclip in VOC layout (the layout `weclip.data.COCO` reads).

From the COCO 2014 images (train2014/, val2014/) and annotations/instances_{train,val}2014.json, writes under --out:
  JPEGImages/{train,val}/{file name}.jpg          hard links to the images (copies across file systems)
  SegmentationClass/{train,val}/{file name}.png   palette PNG class-index masks: 0 background, 1..80, no ignore
  ImageSets/Segmentation/{train,val}.txt          image names (file names without .jpg), sorted by image id
  ImageSets/Segmentation/cls_labels.json          image-level labels of every listed image (from the masks)

Category ids: the json's categories sorted by id become classes 1..C (COCO 2014: ids 1..90 with 10 gaps -> 1..80).
Overlaps: annotations are painted in decreasing area order (ties: increasing annotation id), so the smaller object
is on top where two overlap; crowd (RLE) annotations are painted like the others. An image without annotations gets
an all-background mask and no labels.

Every file is written to a temporary name and renamed, files already there are kept: the script can be
interrupted and rerun, and rerunning it changes nothing. --limit N takes the first N images (by id) of each split.

Example:
  python data_scripts/prepare_coco.py --images data/coco --annotations data/coco/annotations --out data/coco_voc
"""
import argparse, json, os, shutil, sys
from pathlib import Path

EXPECTED = {'train': 82783, 'val': 40504}


class PrepareError(Exception):
    "A problem with the inputs; the message says what is missing and how to fix it."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=Path, required=True, help='folder holding train2014/ and val2014/')
    p.add_argument('--annotations', type=Path, required=True,
                   help='folder holding instances_train2014.json and instances_val2014.json')
    p.add_argument('--out', type=Path, required=True, help='output root (VOC layout)')
    p.add_argument('--splits', nargs='+', default=['train', 'val'], choices=['train', 'val'])
    p.add_argument('--limit', type=int, default=None, help='only the first N images (by id) of each split')
    return p.parse_args(argv)


def log(*a): print(*a, flush=True)


def link_or_copy(src: Path, dst: Path):
    tmp = dst.with_name(f'.{dst.name}.tmp')
    tmp.unlink(missing_ok=True)
    try: os.link(src, tmp)
    except OSError: shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def coco_mask(coco, img: dict, cat_to_class: dict):
    "Class-index mask (H,W) uint8 of one image: annotations painted largest first, so smaller ones stay on top."
    import numpy as np
    mask = np.zeros((img['height'], img['width']), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img['id']], iscrowd=None))
    for ann in sorted(anns, key=lambda a: (-a['area'], a['id'])):
        mask[coco.annToMask(ann) > 0] = cat_to_class[ann['category_id']]
    return mask


def main(argv=None) -> int:
    args = parse_args(argv)
    try: return prepare(args)
    except PrepareError as e:
        print(f'error: {e}', file=sys.stderr); return 1


def prepare(args) -> int:
    import numpy as np
    from tqdm import tqdm
    from pycocotools.coco import COCO as COCOApi
    from weclip.data import IGNORE, read_mask, read_label_file, write_mask, write_label_file
    sets = args.out / 'ImageSets' / 'Segmentation'
    sets.mkdir(parents=True, exist_ok=True)
    label_file = sets / 'cls_labels.json'
    classes, labels = None, {}
    if label_file.exists():                                   # keep the labels of the splits not redone now
        classes, table = read_label_file(label_file)
        labels = {n: np.flatnonzero(v).tolist() for n, v in table.items()}
    bad = []
    for split in args.splits:
        ann_file = args.annotations / f'instances_{split}2014.json'
        img_dir = args.images / f'{split}2014'
        if not ann_file.is_file():
            raise PrepareError(f'{ann_file} not found. Fix: pass --annotations with the folder of the COCO 2014 '
                               'annotations (annotations_trainval2014.zip, extracted).')
        if not img_dir.is_dir():
            raise PrepareError(f'{img_dir} not found. Fix: pass --images with the folder holding train2014/ and '
                               'val2014/ (train2014.zip and val2014.zip, extracted).')
        log(f'{split}: reading {ann_file}')
        try: coco = COCOApi(str(ann_file))
        except Exception as e:
            raise PrepareError(f'cannot read {ann_file} ({type(e).__name__}: {e}). Fix: re-extract the annotations.') from None
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c['id'])
        cat_to_class = {c['id']: i + 1 for i, c in enumerate(cats)}
        names_here = [c['name'] for c in cats]
        if classes is not None and classes != names_here:
            raise PrepareError(f'{ann_file} has other categories than {label_file}. Fix: use the COCO 2014 '
                               'annotations for both splits, or delete the output folder and start again.')
        classes = names_here
        imgs = sorted(coco.loadImgs(coco.getImgIds()), key=lambda i: i['id'])[:args.limit]
        missing = [i['file_name'] for i in imgs if not (img_dir / i['file_name']).is_file()]
        if missing:
            raise PrepareError(f'{len(missing)} images of {ann_file} are missing from {img_dir} (e.g. {missing[:3]}). '
                               'Fix: extract the complete image archive (or use --limit for a subset).')
        jpg_out, png_out = args.out / 'JPEGImages' / split, args.out / 'SegmentationClass' / split
        jpg_out.mkdir(parents=True, exist_ok=True); png_out.mkdir(parents=True, exist_ok=True)
        names = []
        for img in tqdm(imgs, desc=f'{split} masks'):
            name = Path(img['file_name']).stem
            if not (jpg_out / f'{name}.jpg').exists(): link_or_copy(img_dir / img['file_name'], jpg_out / f'{name}.jpg')
            png = png_out / f'{name}.png'
            if png.exists(): mask = read_mask(png)
            else: mask = coco_mask(coco, img, cat_to_class); write_mask(png, mask)
            labels[name] = [int(c) - 1 for c in np.unique(mask) if c not in (0, IGNORE)]
            names.append(name)
        tmp = sets / f'.{split}.txt.tmp'
        tmp.write_text(''.join(f'{n}\n' for n in names)); os.replace(tmp, sets / f'{split}.txt')
        write_label_file(label_file, classes, labels)
        expected = EXPECTED[split] if args.limit is None else min(args.limit, EXPECTED[split])
        log(f'  {split}: {len(names)} images, {len(classes)} classes (COCO 2014: {EXPECTED[split]} images, 80 classes)')
        if args.limit is None and len(names) != expected: bad.append(split)
    if bad:
        log(f'note: {", ".join(bad)} differ from the COCO 2014 sizes {EXPECTED}: fine for a subset, '
            'otherwise check that the complete annotations were given.')
    log('done')
    return 0


if __name__ == '__main__':
    sys.exit(main())
