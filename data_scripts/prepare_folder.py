#!/usr/bin/env python
"""Prepare your own pictures for weclip: a folder of pictures with image-level tags -> the layout `weclip.data.VOC`
reads, which `python -m weclip.train --data-root OUT` trains on (preset `custom`, chosen from the folder).

SRC is one of:
  a folder of pictures plus a tag file (SRC/*.csv or *.json, or --tags FILE): CSV rows `image,labels` with the
      labels separated by ';' (a header row is optional; a picture on several rows gets all their tags), or JSON
      {"a.jpg": ["scratch", "dent"], ...} or [{"image": "a.jpg", "labels": "scratch;dent"}, ...];
  one sub-folder per class (the ImageFolder convention; a picture is tagged with its folder's name).
The tag `background` (a folder named background) marks pictures that show none of the classes.
Optionally a folder of masks (--masks DIR, or SRC/masks): PNGs named like their pictures, holding class indices
(0 background, 1..C in the order of the class list, 255 ignore) or VOC palette colours. Pictures with a mask become
the val split (mIoU is measured on them); without masks a seeded --val-fraction of the pictures is the val split.

Writes OUT (built beside it under a temporary name, then renamed: never a half folder):
  JPEGImages/NAME.EXT                  the pictures, hard links (else symbolic links, else copies), never rewritten
  SegmentationClass/NAME.png           the masks, as palette PNGs of class indices
  ImageSets/Segmentation/train.txt, val.txt   the split (NAME: the picture's path in SRC, made a safe file name)
  ImageSets/Segmentation/cls_labels.json      {"classes": [...], "labels": {NAME: [class indices]}}
  ImageSets/Segmentation/folder.json          how it was made; marks OUT as a prepared folder
  prompts.txt                                 the --prompts file, when given
Tags are read as written up to spaces, case and Unicode form ('Scratch', 'scratch ' are one class, 'scratch').
Each problem found is one line: what is wrong and how to fix it.

Examples:
  python data_scripts/prepare_folder.py my_pictures data/mine
  python data_scripts/prepare_folder.py my_pictures data/mine --masks my_masks --prompts prompts.txt --force
  python -m weclip.train --data-root data/mine
"""
import argparse, csv, json, os, random, re, shutil, sys, unicodedata
from collections import Counter, defaultdict
from pathlib import Path

PICTURE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
STAMP = 'ImageSets/Segmentation/folder.json'
FORMAT = 'weclip-folder'


class PrepareError(Exception):
    "A problem with the inputs; the message says what is wrong and how to fix it."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', type=Path, help='your folder: pictures + a tag file, or one sub-folder per class')
    p.add_argument('out', type=Path, help='the prepared folder to write (new, or an earlier one with --force)')
    p.add_argument('--tags', type=Path, help='the tag file (CSV or JSON; default: the one *.csv or *.json in SRC)')
    p.add_argument('--masks', type=Path, help='folder of PNG masks for some pictures: they become the val split '
                   '(default: SRC/masks when it exists)')
    p.add_argument('--classes', help="the class list in mask order, comma-separated or a file with one per line "
                   "(default: the tags, sorted); needed when masks hold class indices")
    p.add_argument('--prompts', type=Path, help="a text file of 'class: words CLIP should read' lines (several "
                   "prompts for a class separated by ';'), copied to OUT/prompts.txt")
    p.add_argument('--background-tag', default='background', help="the tag of pictures that show none of the "
                   "classes (default: %(default)s; '' for none)")
    p.add_argument('--val-fraction', type=float, default=0.1, help='share of the pictures held out as the val '
                   'split when no masks are given (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='seed of the train/val split (default: %(default)s)')
    p.add_argument('--copy', action='store_true', help='copy the pictures instead of linking them')
    p.add_argument('--max-side', type=int, default=0, help='write pictures whose long side exceeds this many pixels '
                   'downscaled (their masks too) instead of linking them (default: 0, keep every picture as it is). '
                   'Training crops 320 pixels after a 0.5-2x rescale, as for VOC\'s ~500-pixel pictures: for larger '
                   'photos 512 keeps the tagged objects inside the crops')
    p.add_argument('--force', action='store_true', help='replace OUT when it is an earlier prepared folder')
    return p.parse_args(argv)


def log(*a): print(*a, flush=True)
def note(msg): print(f'note: {msg}', file=sys.stderr, flush=True)


def canonical(tag: str) -> str:
    "A tag as one class name: Unicode NFKC, spaces collapsed and trimmed, lower case."
    return ' '.join(unicodedata.normalize('NFKC', tag).split()).lower()


def safe_name(rel: str) -> str:
    "A file name (no spaces, no folders) for a picture at SRC/`rel`, without its extension."
    stem = rel.rsplit('.', 1)[0] if '.' in Path(rel).name else rel
    return re.sub(r'[^A-Za-z0-9._-]+', '_', stem.replace('/', '__')).strip('.') or 'picture'


def examples(items, n=3) -> str:
    items = sorted(map(str, items))
    return ', '.join(items[:n]) + (f' and {len(items) - n} more' if len(items) > n else '')


def inside(a: Path, b: Path) -> bool:
    "Is `a` equal to or below `b` (both resolved)?"
    return a == b or b in a.parents


# ---------------------------------------------------------------- reading SRC

def find_pictures(folder: Path, skip: list) -> dict:
    "Relative posix path -> Path of every picture under `folder` (recursive), leaving out the `skip` folders."
    found = {}
    for p in sorted(folder.rglob('*')):
        if p.is_file() and p.suffix.lower() in PICTURE_EXTS and not p.name.startswith('.') and \
                not any(inside(p.resolve(), s) for s in skip):
            found[p.relative_to(folder).as_posix()] = p
    return found


def find_tag_file(src: Path, given):
    if given is not None:
        if not given.is_file(): raise PrepareError(f'--tags {given} is not a file. Fix: pass the CSV or JSON of tags.')
        return given
    cands = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in ('.csv', '.json'))
    if len(cands) > 1:
        raise PrepareError(f'{src} holds several tag files ({examples(c.name for c in cands)}). Fix: name the one '
                           'to use with --tags.')
    return cands[0] if cands else None


def split_tags(cell) -> list:
    "The tags of one CSV cell or JSON value (a ';'-separated string or a list), empty entries kept as ''."
    if cell is None: return []
    if isinstance(cell, (list, tuple)): return [str(t) for t in cell]
    return str(cell).split(';') if str(cell).strip() else []


def read_tag_file(path: Path) -> list:
    "Rows (where, image, [raw tags]) of a CSV or JSON tag file."
    try: text = path.read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f'cannot read the tag file {path} ({type(e).__name__}). Fix: save it as UTF-8 text.') from None
    rows = []
    if path.suffix.lower() == '.json':
        try: doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}). Fix: correct it, or use a '
                               'CSV of image,labels rows.') from None
        if isinstance(doc, dict) and not {'image', 'labels'} <= set(doc):
            rows = [(f'{path.name} key {k!r}', k, split_tags(v)) for k, v in doc.items()]
        elif isinstance(doc, list) and all(isinstance(r, dict) and 'image' in r for r in doc):
            rows = [(f'{path.name} item {i}', str(r['image']), split_tags(r.get('labels', r.get('tags')))) for i, r in enumerate(doc)]
        else:
            raise PrepareError(f'{path} is JSON but neither {{"a.jpg": ["tag", ...]}} nor [{{"image": "a.jpg", '
                               '"labels": "tag;tag"}]. Fix: write it in one of those forms.')
        return rows
    lines = list(csv.reader(text.splitlines()))
    lines = [(i + 1, r[0].split(';', 1) if len(r) == 1 and ';' in r[0] else r)   # ';' between the columns (a
             for i, r in enumerate(lines) if any(c.strip() for c in r)]       # spreadsheet's CSV in some locales)
    if not lines: raise PrepareError(f'the tag file {path} is empty. Fix: write one image,labels row per picture.')
    head = [c.strip().lower() for c in lines[0][1]]
    if head and head[0] in ('image', 'file', 'filename', 'file_name', 'path', 'name', 'picture'): lines = lines[1:]
    for n, r in lines:
        if len(r) < 2 and not r[0].strip(): continue
        # labels may hold commas when the ';' list was not quoted: everything after the image is the labels cell
        rows.append((f'{path.name} line {n}', r[0].strip(), split_tags(','.join(r[1:]).replace(',', ';')) if len(r) > 1 else []))
    return rows


def match_picture(image: str, pictures: dict, by_name: dict, by_stem: dict):
    "The relative path of the picture a tag row names: its path in SRC, else its unique file name, else its stem."
    key = image.strip().replace('\\', '/').lstrip('./') if not image.startswith('../') else image
    if key in pictures: return key
    stem = Path(key).stem if Path(key).suffix.lower() in PICTURE_EXTS else Path(key).name
    for table, k in ((by_name, Path(key).name), (by_stem, stem)):
        if k in table and len(table[k]) == 1: return table[k][0]
    return None


# ---------------------------------------------------------------- masks

def read_mask_file(path: Path, n_classes: int, classes: list):
    "(H,W) uint8 class indices of a mask PNG: palette or greyscale indices, or RGB in VOC palette colours."
    import numpy as np
    from PIL import Image
    from weclip.data import voc_palette, IGNORE
    try:
        with Image.open(path) as im:
            im.load(); mode = im.mode
            arr = np.asarray(im.convert('RGB') if mode in ('RGBA', 'RGB', 'LA') else im)
    except Exception as e:
        raise PrepareError(f'cannot read the mask {path} ({type(e).__name__}). Fix: save it as a PNG of class '
                           'indices or VOC palette colours.') from None
    if arr.ndim == 3:
        pal = np.array(voc_palette(), np.int64).reshape(-1, 3)
        code = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(pal[:n_classes].tolist())}
        code[224 << 16 | 224 << 8 | 192] = IGNORE                      # VOC's border colour
        flat = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
        vals, inv = np.unique(flat, return_inverse=True)
        bad = [v for v in vals.tolist() if v not in code]
        if bad:
            rgb = [((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in bad[:3]]
            raise PrepareError(f'mask {path} has colours {rgb} that are not the VOC palette colours of the '
                               f'{n_classes - 1} classes. Fix: paint class c in VOC colour c, or save class indices '
                               'in a greyscale or palette PNG.')
        arr = np.array([code[v] for v in vals.tolist()], np.uint8)[inv.reshape(flat.shape)]
    arr = arr.astype(np.uint8) if arr.dtype != np.uint8 and arr.max(initial=0) < 256 else arr
    if arr.dtype != np.uint8:
        raise PrepareError(f'mask {path} holds values above 255. Fix: save class indices 0..{n_classes - 1} as an 8-bit PNG.')
    bad = (arr >= n_classes) & (arr != IGNORE)
    if bad.any():
        vals = np.unique(arr[bad]).tolist()
        raise PrepareError(f'mask {path} has value{"s" * (len(vals) > 1)} {", ".join(map(str, vals[:5]))} in '
                           f'{int(bad.sum())} pixel(s), outside 0..{n_classes - 1} (0 background, 1..{n_classes - 1} '
                           f'= {", ".join(classes[:5])}{", ..." if len(classes) > 5 else ""}; 255 ignore). Fix: repaint '
                           'the mask, or give the class list in mask order with --classes.')
    return arr


# ---------------------------------------------------------------- the work

def gather(args):
    "Everything OUT will hold, checked: (pictures {name: Path}, labels {name: [idx]}, classes, masks {name: array}, report)."
    src = args.src
    if not src.is_dir(): raise PrepareError(f'{src} is not a folder. Fix: pass the folder that holds your pictures.')
    masks_dir = args.masks if args.masks is not None else (src / 'masks' if (src / 'masks').is_dir() else None)
    if masks_dir is not None and not masks_dir.is_dir():
        raise PrepareError(f'--masks {masks_dir} is not a folder. Fix: pass the folder of mask PNGs.')
    skip = [masks_dir.resolve()] if masks_dir is not None else []
    tag_file = find_tag_file(src, args.tags)
    bg_tag = canonical(args.background_tag) if args.background_tag else None
    raw = defaultdict(list)            # relative path -> raw tags
    untagged, missing, rows_seen, empty_tags, empty_rows = [], [], 0, [], []
    if tag_file is not None:
        pictures = find_pictures(src, skip)
        by_name, by_stem = defaultdict(list), defaultdict(list)
        for rel in pictures: by_name[Path(rel).name].append(rel); by_stem[Path(rel).stem].append(rel)
        for where, image, tags in read_tag_file(tag_file):
            rows_seen += 1
            rel = match_picture(image, pictures, by_name, by_stem)
            if rel is None: missing.append(image); continue
            if any(not t.strip() for t in tags): empty_tags.append(where)
            tags = [t for t in tags if t.strip()]
            if not tags: empty_rows.append(where)
            raw[rel] += tags
        layout = f'pictures + tag file {tag_file.name}'
        if rows_seen and len(missing) == rows_seen:
            raise PrepareError(f'none of the {rows_seen} pictures {tag_file} names is in {src} (e.g. '
                               f'{examples(missing)}). Fix: write the pictures\' paths relative to {src}.')
    else:
        classes_dirs = [d for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith('.')
                        and d.resolve() not in skip]
        if not classes_dirs:
            raise PrepareError(f'{src} has neither a tag file (*.csv, *.json) nor class sub-folders. Fix: add a CSV of '
                               'image,labels rows, or put each class\'s pictures in a folder named after it.')
        pictures = find_pictures(src, skip)
        for rel in pictures:
            parts = rel.split('/')
            if len(parts) > 1: raw[rel].append(parts[0])
        layout = f'one sub-folder per class ({len(classes_dirs)} folders)'
    untagged = sorted(set(pictures) - set(raw) | {r for r, t in raw.items() if not t})
    for r in untagged: raw.pop(r, None)

    # tags -> classes
    spellings = defaultdict(Counter)
    for tags in raw.values():
        for t in tags: spellings[canonical(t)][t] += 1
    variants = {c: s for c, s in spellings.items() if len(s) > 1}
    found = sorted(c for c in spellings if c != bg_tag)
    if args.classes:
        given = Path(args.classes).read_text().splitlines() if Path(args.classes).is_file() else args.classes.split(',')
        classes = [canonical(c) for c in given if c.strip()]
        dup = [c for c, n in Counter(classes).items() if n > 1]
        if dup: raise PrepareError(f'--classes names {examples(dup)} twice. Fix: list each class once.')
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise PrepareError(f'tags {examples(unknown)} are not in --classes. Fix: add them to --classes, or correct '
                               'the tags.')
    else: classes = found
    if not classes:
        raise PrepareError(f'no class tags found in {src} ({layout}). Fix: tag the pictures with what they show.')
    index = {c: i for i, c in enumerate(classes)}
    labels = {rel: sorted({index[canonical(t)] for t in tags if canonical(t) != bg_tag}) for rel, tags in raw.items()}

    # names in OUT
    names, used = {}, set()
    tops = {rel.split('/')[0] if '/' in rel else None for rel in labels}
    cut = len(tops.pop()) + 1 if tag_file is not None and len(tops) == 1 and None not in tops else 0   # 'pictures/' of all
    for rel in sorted(labels):
        base = n = safe_name(rel[cut:]); k = 1
        while n.lower() in used: k += 1; n = f'{base}_{k}'
        used.add(n.lower()); names[rel] = n

    # pictures: readable, big enough
    from PIL import Image
    from weclip.data import MIN_SIDE
    sizes, unreadable = {}, []
    for rel in list(labels):
        try:
            with Image.open(pictures[rel]) as im: sizes[rel] = im.size[::-1]
            if min(sizes[rel]) < MIN_SIDE: raise ValueError('too small')
        except Exception:
            unreadable.append(rel); labels.pop(rel); names.pop(rel)

    # masks
    import numpy as np
    masks = {}
    stray_masks = []
    if masks_dir is not None:
        by_key = {}
        for rel, n in names.items():
            by_key.setdefault(Path(rel).with_suffix('').as_posix(), rel); by_key.setdefault(Path(rel).stem, rel)
        for mp in sorted(masks_dir.rglob('*.png')):
            key = mp.relative_to(masks_dir).with_suffix('').as_posix()
            rel = by_key.get(key) or by_key.get(mp.stem)
            if rel is None: stray_masks.append(mp.name); continue
            m = read_mask_file(mp, len(classes) + 1, classes)
            if m.shape != sizes[rel]:
                raise PrepareError(f'mask {mp} is {m.shape[1]}x{m.shape[0]} pixels, its picture {pictures[rel]} is '
                                   f'{sizes[rel][1]}x{sizes[rel][0]}. Fix: draw the mask at the picture\'s size.')
            masks[rel] = m
    disagree = []                      # a mask's classes against its picture's tags: a wrong class order shows here
    for rel, m in masks.items():
        drawn = {int(v) - 1 for v in np.unique(m) if 0 < v < 255}
        if drawn != set(labels[rel]):
            disagree.append(f"{Path(rel).name} (mask: {', '.join(classes[c] for c in sorted(drawn)) or 'background'}; "
                            f"tags: {', '.join(classes[c] for c in labels[rel]) or 'background'})")
    return dict(disagree=disagree, pictures=pictures, labels=labels, names=names, classes=classes, masks=masks, layout=layout, sizes=sizes,
                tag_file=tag_file, masks_dir=masks_dir, untagged=untagged, missing=missing, variants=variants,
                empty_tags=empty_tags, unreadable=unreadable, stray_masks=stray_masks, bg_tag=bg_tag)


def split(found, val_fraction: float, seed: int):
    "Train and val names: the pictures with masks are val; without masks a seeded `val_fraction` of them, each class in it where the share allows."
    names = found['names']
    if found['masks']:
        val = sorted(names[r] for r in found['masks'])
    else:
        order = sorted(names.values())
        random.Random(seed).shuffle(order)
        k = round(len(order) * val_fraction)
        if val_fraction > 0 and len(order) > 1: k = min(max(k, 1), len(order) - 1)
        labels = {names[r]: l for r, l in found['labels'].items()}
        count = Counter(c for l in labels.values() for c in l)
        chosen = []                       # first one picture of each class that has two (rarest first), then the rest
        for c in sorted(count, key=lambda c: (count[c], c)):
            if len(chosen) < k and count[c] > 1 and not any(c in labels[n] for n in chosen):
                chosen.append(next(n for n in order if c in labels[n] and n not in chosen))
        val = sorted(chosen + [n for n in order if n not in chosen][:k - len(chosen)])
    train = sorted(set(names.values()) - set(val))
    return train, val


def read_prompt_lines(path: Path, classes: list) -> str:
    "The prompt file's text, checked: each line 'class: prompt; prompt' names a class of the list."
    try: text = path.read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f'cannot read --prompts {path} ({type(e).__name__}). Fix: save it as UTF-8 text.') from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith('#'): continue
        cls, sep, words = line.partition(':')
        if not sep or not words.strip():
            raise PrepareError(f'{path} line {n} is not "class: words CLIP should read". Fix: write it so, e.g. '
                               '"scratch: a scratch on metal".')
        if canonical(cls) not in classes:
            raise PrepareError(f'{path} line {n} gives prompts for {cls.strip()!r}, which is not a class (classes: '
                               f'{examples(classes, 6)}). Fix: correct the name or drop the line.')
    return text


def prompts_over(classes: list, prompts_text, limit: int) -> list:
    "The prompts training would give CLIP (the official template, or the prompt file's) longer than `limit` tokens."
    import open_clip
    from weclip.prompts import TEMPLATES_OFFICIAL, count_tokens
    own = {}
    for line in (prompts_text or '').splitlines():
        name, sep, words = line.partition(':')
        if sep and not line.lstrip().startswith('#'): own.setdefault(canonical(name), []).extend(w.strip() for w in words.split(';') if w.strip())
    tok = open_clip.get_tokenizer('ViT-B-16')
    prompts = [p for c in classes for p in own.get(c) or [t.format(c.replace('_', ' ')) for t in TEMPLATES_OFFICIAL]]
    return [p for p in prompts if count_tokens(tok, p) > limit]


def link(src: Path, dst: Path, copy: bool) -> str:
    "Put `src` at `dst`: a hard link, else a symbolic link, else a copy; which one it was."
    if not copy:
        try: os.link(src, dst); return 'hard link'
        except OSError: pass
        try: os.symlink(src.resolve(), dst); return 'symbolic link'
        except OSError: pass
    shutil.copy2(src, dst); return 'copy'


def downscale(src: Path, dst: Path, max_side: int):
    "Write the picture `src` at `dst` with its long side `max_side` (antialiased; JPEG quality 95), pixels as stored."
    from PIL import Image
    with Image.open(src) as im:
        w, h = im.size; r = max_side / max(w, h)
        im = im if im.mode in ('RGB', 'L') else im.convert('RGBA' if 'A' in im.mode or 'transparency' in im.info else 'RGB')
        im = im.resize((max(1, round(w * r)), max(1, round(h * r))), Image.LANCZOS)
        if dst.suffix in ('.jpg', '.jpeg'): im.convert('RGB').save(dst, quality=95)
        else: im.save(dst)


def prepare(args) -> int:
    if args.max_side and args.max_side < 16:
        raise PrepareError(f'--max-side {args.max_side} is too small. Fix: give at least 16 pixels (512 suits most photos), or 0 to keep the pictures.')
    if not 0 <= args.val_fraction < 1:
        raise PrepareError(f'--val-fraction {args.val_fraction} is out of range. Fix: give a share in [0, 1), e.g. 0.1.')
    out, src = args.out, args.src
    if not src.is_dir(): raise PrepareError(f'{src} is not a folder. Fix: pass the folder that holds your pictures.')
    src_r, out_r = src.resolve(), out.resolve()
    if inside(out_r, src_r):
        raise PrepareError(f'OUT {out} is {"SRC itself" if out_r == src_r else "inside SRC " + str(src)}: the '
                           'prepared copy would be read as more pictures next time. Fix: choose an OUT outside SRC.')
    if inside(src_r, out_r):
        raise PrepareError(f'SRC {src} is inside OUT {out}: replacing OUT would delete your pictures. Fix: choose '
                           'another OUT.')
    stamp = out / STAMP
    if out.exists() and not out.is_dir(): raise PrepareError(f'OUT {out} is a file. Fix: choose a folder name.')
    if out.exists() and any(out.iterdir()):
        if not stamp.is_file():
            raise PrepareError(f'OUT {out} already holds files that are not a prepared folder. Fix: choose a new or '
                               'empty folder (nothing there is touched).')
        if not args.force:
            raise PrepareError(f'OUT {out} is already a prepared folder. Fix: pass --force to replace it, or choose '
                               'another OUT (never a mix of two preparations).')
    found = gather(args)
    classes, labels, names, masks = found['classes'], found['labels'], found['names'], found['masks']
    if not labels:
        raise PrepareError(f'no picture in {args.src} is both tagged and readable. Fix: tag the pictures (see '
                           'the notes above).')
    prompts_text = read_prompt_lines(args.prompts, classes) if args.prompts else None
    train, val = split(found, args.val_fraction, args.seed)
    if not train:
        raise PrepareError('every picture went to the val split, none is left to train on. Fix: give masks for only '
                           'some pictures, or lower --val-fraction.')
    by_name = {n: r for r, n in names.items()}

    # notes: one line each
    if found['variants']:
        groups = '; '.join(f"{', '.join(repr(s) for s in sorted(v))} -> {c!r}" for c, v in sorted(found['variants'].items()))
        note(f'tags written in several ways are read as one class ({groups}): spaces, case and Unicode form are ignored.')
    if found['empty_tags']:
        note(f'{len(found["empty_tags"])} row(s) hold an empty tag (";;" or a trailing ";"), skipped: '
             f'{examples(found["empty_tags"])}.')
    if found['missing']:
        note(f'{len(found["missing"])} tagged picture(s) are not in {args.src}, left out: {examples(found["missing"])}. '
             'Fix: add the pictures, or correct their paths in the tag file.')
    if found['untagged']:
        note(f'{len(found["untagged"])} picture(s) have no tags, left out: {examples(found["untagged"])}. Fix: tag '
             f'them' + (f", with '{found['bg_tag']}' if they show none of the classes." if found['bg_tag'] else '.'))
    if found['unreadable']:
        note(f'{len(found["unreadable"])} file(s) cannot be read as pictures of at least 16x16 pixels, left out: '
             f'{examples(found["unreadable"])}.')
    if found['disagree']:
        note(f'{len(found["disagree"])} mask(s) show other classes than their picture\'s tags: {examples(found["disagree"], 2)}. '
             'The tags are kept. Fix: check the masks\' class order (--classes a,b,c gives it) or the tags.')
    if found['stray_masks']:
        note(f'{len(found["stray_masks"])} mask(s) match no tagged picture, unused: {examples(found["stray_masks"])}.')
    too_long = prompts_over(classes, prompts_text, 77)
    if too_long:
        note(f'{len(too_long)} prompt(s) are longer than the 77 tokens ViT-B/16 reads (e.g. {too_long[0]!r}): training '
             'will refuse them. Fix: shorten those class names (--classes, or the tags), or give those classes short '
             'prompts in a --prompts file.')
    large = [r for r, hw in found['sizes'].items() if r in names and max(hw) > 1024]
    if large and not args.max_side:
        note(f'{len(large)} picture(s) are over 1024 pixels on the long side (e.g. {examples(large, 2)}): training '
             'crops 320 pixels out of them after a 0.5-2x rescale, so most crops miss the tagged objects. Fix: '
             '--max-side 512 writes them downscaled (the others stay links).')
    train_labels = [labels[by_name[n]] for n in train]
    everywhere = [classes[c] for c in range(len(classes)) if all(c in l for l in train_labels)]
    if everywhere:
        note(f'{", ".join(map(repr, everywhere))} is on every training picture: nothing contrasts it, so the CAM cannot '
             'learn where it ends. Fix: add background-only pictures (tag them '
             f"'{found['bg_tag'] or 'background'}') or pictures of other classes.")

    # write beside OUT, then rename
    import numpy as np
    from weclip.data import write_label_file, write_mask
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / 'JPEGImages').mkdir(parents=True)
        sets = tmp / 'ImageSets' / 'Segmentation'; sets.mkdir(parents=True)
        how = Counter()
        big = {rel for rel, hw in found['sizes'].items() if args.max_side and max(hw) > args.max_side}
        for rel, n in sorted(names.items()):
            dst = tmp / 'JPEGImages' / (n + found['pictures'][rel].suffix.lower())
            if rel in big: downscale(found['pictures'][rel], dst, args.max_side); how['downscaled copy'] += 1
            else: how[link(found['pictures'][rel], dst, args.copy)] += 1
        from PIL import Image
        for rel, m in masks.items():
            if rel in big:                                                   # the mask follows its picture
                h, w = found['sizes'][rel]; r = args.max_side / max(h, w)
                m = np.asarray(Image.fromarray(m).resize((max(1, round(w * r)), max(1, round(h * r))), Image.NEAREST))
            write_mask(tmp / 'SegmentationClass' / f'{names[rel]}.png', m)
        for split_name, ns in (('train', train), ('val', val)):
            (sets / f'{split_name}.txt').write_text(''.join(f'{n}\n' for n in ns))
        write_label_file(sets / 'cls_labels.json', classes, {names[r]: l for r, l in labels.items()})
        if prompts_text is not None: (tmp / 'prompts.txt').write_text(prompts_text)
        (sets / 'sources.json').write_text(json.dumps({names[r]: str(found['pictures'][r]) for r in sorted(names)}, indent=0))
        doc = dict(format=FORMAT, version=1, source=str(args.src.resolve()), layout=found['layout'], classes=classes,
                   train=len(train), val=len(val), val_masks=bool(masks), val_fraction=args.val_fraction,
                   seed=args.seed, background_tag=found['bg_tag'] or '', prompts=prompts_text is not None)
        (tmp / STAMP).write_text(json.dumps(doc, indent=1))
        old = None
        if out.exists():
            old = out.with_name(f'.{out.name}.old-{os.getpid()}'); os.replace(out, old)
        os.replace(tmp, out)
        if old is not None: shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # the report
    tr, va = Counter(c for n in train for c in labels[by_name[n]]), Counter(c for n in val for c in labels[by_name[n]])
    w = max(max(len(c) for c in classes), len('(background only)') - 4)
    log(f'{args.src} ({found["layout"]}) -> {out}')
    log(f'{len(classes)} classes, pictures per class (train / val):')
    for i, c in enumerate(classes): log(f'  {i + 1:3d} {c:<{w}}  {tr[i]:6d} / {va[i]}')
    bg_train = sum(not labels[by_name[n]] for n in train); bg_val = sum(not labels[by_name[n]] for n in val)
    if bg_train or bg_val: log(f'  {"(background only)":<{w + 4}}  {bg_train:6d} / {bg_val}')
    log(f'split (seed {args.seed}): {len(train)} train, {len(val)} val' +
        (f' = the {len(masks)} pictures with masks (mIoU is measured on them)' if masks else
         f' ({args.val_fraction:g} of the pictures; no masks: training shows a gallery instead of an mIoU)'))
    log(f'pictures without tags: {len(found["untagged"])}; tags without pictures: {len(found["missing"])}; '
        f'unreadable: {len(found["unreadable"])}')
    log(f'pictures placed by ' + ', '.join(f'{k} ({v})' for k, v in how.items()))
    if prompts_text is not None: log(f'prompts: {out / "prompts.txt"}')
    log(f'next: python -m weclip.train --data-root {out}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try: return prepare(args)
    except PrepareError as e:
        print(f'error: {e}', file=sys.stderr); return 1


if __name__ == '__main__':
    sys.exit(main())
