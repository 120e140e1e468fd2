"""data_scripts/prepare_folder.py on small collections in the layouts people have, and on bad input: one line, nothing lost."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip.data import VOC, read_label_file, read_mask, voc_palette

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('prepare_folder', ROOT / 'data_scripts' / 'prepare_folder.py')
prepare_folder = importlib.util.module_from_spec(spec); spec.loader.exec_module(prepare_folder)


def picture(path, colour=(90, 120, 150), size=(40, 32), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path, format=fmt)
    return path


def tagged(tmp_path, rows: dict, extra=(), name='tags.csv'):
    "SRC with one picture per row key (and the `extra` untagged ones) and a CSV of the rows."
    src = tmp_path / 'src'
    for i, img in enumerate(list(rows) + list(extra)):
        if not img.startswith('missing'): picture(src / img, (10 * i, 100, 200))
    (src / name).write_text('image,labels\n' + ''.join(f'{k},{v}\n' for k, v in rows.items()))
    return src


def run(args, capsys):
    rc = prepare_folder.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help():
    r = subprocess.run([sys.executable, str(ROOT / 'data_scripts' / 'prepare_folder.py'), '--help'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'usage:' in r.stdout and '--val-fraction' in r.stdout and 'ImageFolder' in r.stdout


def test_csv_layout_split_links_and_report(tmp_path, capsys):
    rows = {f'a/p{i:02d}.jpg': ('scratch;dent' if i % 3 == 0 else 'scratch' if i % 3 == 1 else 'background') for i in range(20)}
    src = tagged(tmp_path, rows)
    rc, out, err = run([src, tmp_path / 'out', '--val-fraction', '0.2', '--seed', '3'], capsys)
    assert rc == 0, err
    sets = tmp_path / 'out' / 'ImageSets' / 'Segmentation'
    train, val = (sets / 'train.txt').read_text().split(), (sets / 'val.txt').read_text().split()
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    classes, table = read_label_file(sets / 'cls_labels.json')
    assert classes == ['dent', 'scratch'] and len(table) == 20
    assert np.flatnonzero(table['p00']).tolist() == [0, 1] and table['p02'].sum() == 0   # background: no class
    assert 'dent' in out and 'scratch' in out and '(background only)' in out and 'pictures without tags: 0' in out
    # the pictures are the user's files, linked
    assert (tmp_path / 'out' / 'JPEGImages' / 'p00.jpg').stat().st_ino == (src / 'a' / 'p00.jpg').stat().st_ino
    assert len(VOC(tmp_path / 'out', 'train', with_masks=False)) == 16
    # reproducible: the same seed gives the same split, another seed another one
    assert run([src, tmp_path / 'out2', '--val-fraction', '0.2', '--seed', '3'], capsys)[0] == 0
    assert (tmp_path / 'out2' / 'ImageSets/Segmentation/val.txt').read_text().split() == val
    assert run([src, tmp_path / 'out3', '--val-fraction', '0.2', '--seed', '4'], capsys)[0] == 0
    assert (tmp_path / 'out3' / 'ImageSets/Segmentation/val.txt').read_text().split() != val
    assert all(any(table[n][c] for n in val) for c in range(2))             # every class has a val picture


def test_val_split_covers_rare_classes(tmp_path, capsys):
    rows = {f'p{i:02d}.jpg': 'common' for i in range(30)}
    rows.update({'r1.jpg': 'rare', 'r2.jpg': 'rare;common', 'o.jpg': 'once'})
    src = tagged(tmp_path, rows)
    for seed in range(3):
        assert run([src, tmp_path / f'out{seed}', '--seed', str(seed)], capsys)[0] == 0
        val = (tmp_path / f'out{seed}' / 'ImageSets/Segmentation/val.txt').read_text().split()
        assert len(val) == 3 and ('r1' in val) != ('r2' in val) and 'o' not in val   # a class seen once stays in train


def test_imagefolder_and_json_and_png(tmp_path, capsys):
    src = tmp_path / 'folders'
    for c in ('cat', 'dog', 'background'):
        for i in range(3): picture(src / c / f'{i}.png', fmt='PNG')          # the same file names in every class
    picture(src / 'loose.jpg')                                               # not in a class folder: no tags
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 0, err
    classes, table = read_label_file(tmp_path / 'out/ImageSets/Segmentation/cls_labels.json')
    assert classes == ['cat', 'dog'] and len(table) == 9 and table['cat__0'].tolist() == [1, 0]
    assert 'loose.jpg' in err and 'pictures without tags: 1' in out
    ds = VOC(tmp_path / 'out', 'train', with_masks=False)
    assert ds.image_path(ds.names[0]).suffix == '.png' and ds[0]['image'].shape == (3, 32, 40)
    src2 = tmp_path / 'js'
    picture(src2 / 'x.jpg'); picture(src2 / 'y.jpg')
    (src2 / 'labels.json').write_text(json.dumps({'x.jpg': ['Cell'], 'y': 'cell;nucleus'}))
    assert run([src2, tmp_path / 'out_js', '--val-fraction', '0'], capsys)[0] == 0
    classes, table = read_label_file(tmp_path / 'out_js/ImageSets/Segmentation/cls_labels.json')
    assert classes == ['cell', 'nucleus'] and table['y'].tolist() == [1, 1]


def test_masks_become_val(tmp_path, capsys):
    src = tagged(tmp_path, {f'p{i}.jpg': 'dent;scratch' if i == 1 else 'dent' if i % 2 else 'scratch' for i in range(8)})
    m = np.zeros((32, 40), np.uint8); m[5:15, 5:25] = 2; m[0, 0] = 255
    Image.fromarray(m).save(picture(src / 'masks' / 'p0.png'))               # greyscale class indices
    pal = np.array(voc_palette(), np.uint8).reshape(-1, 3)
    rgb = pal[np.where(m == 255, 0, m)]; rgb[:5] = pal[1]
    Image.fromarray(rgb).save(src / 'masks' / 'p1.png')                      # RGB in VOC palette colours
    rc, out, err = run([src, tmp_path / 'out', '--classes', 'dent,scratch'], capsys)
    assert rc == 0, err
    val = VOC(tmp_path / 'out', 'val')
    assert val.names == ['p0', 'p1'] and val.with_masks and 'pictures with masks' in out
    assert (read_mask(val.mask_path('p0')) == m).all()
    assert (read_mask(val.mask_path('p1'))[:5] == 1).all() and (read_mask(val.mask_path('p1'))[10, 10] == 2)
    assert 'show other classes' not in err
    rc, out, err = run([src, tmp_path / 'out_swapped', '--classes', 'scratch,dent'], capsys)   # the wrong class order
    assert rc == 0 and "p0.jpg (mask: dent; tags: scratch)" in err and '--classes' in err


# ---------------------------------------------------------------- bad input: one line each, nothing lost

def one_error(err):
    lines = [l for l in err.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def test_tags_without_pictures_pictures_without_tags_empty_and_variant_tags(tmp_path, capsys):
    rows = {'a.jpg': 'Scratch', 'b.jpg': 'scratch ', 'c.jpg': 'ｓｃｒａｔｃｈ;;dent', 'd.jpg': '', 'e.jpg': 'DENT',
            'missing1.jpg': 'dent', 'f.jpg': 'big  dent'}
    src = tagged(tmp_path, rows, extra=['g.jpg'])
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 0, err
    classes, table = read_label_file(tmp_path / 'out/ImageSets/Segmentation/cls_labels.json')
    assert classes == ['big dent', 'dent', 'scratch']                          # one class per spelling group
    assert table['c'].tolist() == [0, 1, 1] and set(table) == {'a', 'b', 'c', 'e', 'f'}
    notes = [l for l in err.splitlines() if l.startswith('note:')]
    assert any("'Scratch'" in l and "'scratch'" in l for l in notes)          # the spellings merged, named
    assert any('empty tag' in l and 'line 4' in l for l in notes)
    assert any('missing1.jpg' in l and 'not in' in l for l in notes)
    assert any('no tags' in l and 'd.jpg' in l and 'g.jpg' in l for l in notes)
    assert 'pictures without tags: 2; tags without pictures: 1' in out
    assert len(err.splitlines()) == len(notes) == 4                          # one line per problem


def test_single_class_everywhere(tmp_path, capsys):
    src = tagged(tmp_path, {f'p{i}.jpg': 'crack' for i in range(6)})
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 0
    line = next(l for l in err.splitlines() if 'every training picture' in l)
    assert "'crack'" in line and 'background-only pictures' in line and 'other classes' in line


def test_mask_outside_the_classes_writes_nothing(tmp_path, capsys):
    src = tagged(tmp_path, {f'p{i}.jpg': 'dent' for i in range(4)})
    m = np.zeros((32, 40), np.uint8); m[3:6, 3:6] = 7
    Image.fromarray(m).save(picture(src / 'masks' / 'p0.png'))
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    line = one_error(err)
    assert rc == 1 and 'has value 7 in 9 pixel(s), outside 0..1' in line and '--classes' in line
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('.out.tmp*'))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / 'masks' / 'p0.png')
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 1 and 'is 10x10 pixels' in one_error(err)


def test_out_inside_src_and_second_run(tmp_path, capsys):
    src = tagged(tmp_path, {f'p{i}.jpg': 'dent;rust' if i % 2 else 'rust' for i in range(5)})
    for out in (src, src / 'prepared'):
        rc, _, err = run([src, out], capsys)
        assert rc == 1 and 'inside SRC' in one_error(err) or 'SRC itself' in one_error(err)
    assert not (src / 'prepared').exists()
    rc, _, err = run([src, tmp_path], capsys)                                 # SRC inside OUT
    assert rc == 1 and 'inside OUT' in one_error(err)
    out = tmp_path / 'out'
    assert run([src, out], capsys)[0] == 0
    before = sorted(p.name for p in (out / 'JPEGImages').iterdir())
    (src / 'p9.jpg').write_bytes((src / 'p0.jpg').read_bytes())
    (src / 'tags.csv').write_text((src / 'tags.csv').read_text() + 'p9.jpg,dent\n')
    rc, _, err = run([src, out], capsys)                                      # a second run: refused, OUT as it was
    assert rc == 1 and '--force' in one_error(err)
    assert sorted(p.name for p in (out / 'JPEGImages').iterdir()) == before
    assert run([src, out, '--force'], capsys)[0] == 0                         # replaced whole, never mixed
    assert sorted(p.name for p in (out / 'JPEGImages').iterdir()) == sorted(before + ['p9.jpg'])
    other = tmp_path / 'notes'; other.mkdir(); (other / 'mine.txt').write_text('keep')
    rc, _, err = run([src, other, '--force'], capsys)                         # a folder that is not ours: untouched
    assert rc == 1 and 'not a prepared folder' in one_error(err) and (other / 'mine.txt').read_text() == 'keep'


def test_other_bad_inputs(tmp_path, capsys):
    rc, _, err = run([tmp_path / 'nothing', tmp_path / 'out'], capsys)
    assert rc == 1 and 'is not a folder' in one_error(err)
    empty = tmp_path / 'empty'; empty.mkdir(); picture(empty / 'a.jpg')
    rc, _, err = run([empty, tmp_path / 'out'], capsys)
    assert rc == 1 and 'neither a tag file' in one_error(err)
    src = tagged(tmp_path, {'a.jpg': 'x', 'b.jpg': 'y'})
    rc, _, err = run([src, tmp_path / 'out', '--classes', 'x'], capsys)
    assert rc == 1 and "'y'" in one_error(err) or 'y' in one_error(err)
    (tmp_path / 'p.txt').write_text('z: a photo of z\n')
    rc, _, err = run([src, tmp_path / 'out', '--prompts', tmp_path / 'p.txt'], capsys)
    assert rc == 1 and "'z', which is not a class" in one_error(err)
    (src / 'tags.csv').write_text('image,labels\nnope.jpg,x\n')
    rc, _, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 1 and 'none of the 1 pictures' in one_error(err)
    assert not (tmp_path / 'out').exists()


def test_train_refuses_a_prompt_too_long(tmp_path, capsys):
    "A class name longer than the CLIP's context: the trainer says which prompt, in one line, before any training."
    long = ' '.join(['defect'] * 40)
    src = tagged(tmp_path, {f'p{i}.jpg': long if i % 2 else 'rust' for i in range(6)})
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 0 and '77 tokens' not in err                               # fits ViT-B/16's 77, not the tiny CLIP's 32
    much_longer = tagged(tmp_path / 'b', {'a.jpg': ' '.join(['defect'] * 80), 'b.jpg': 'rust'})
    rc, out, err = run([much_longer, tmp_path / 'out_b'], capsys)
    assert rc == 0 and 'longer than the 77 tokens ViT-B/16 reads' in err     # said at once, before any training
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'weclip.train', '--data-root', str(tmp_path / 'out'), '--model', 'weclip-tiny',
                        '--weights', 'toy', '--out-dir', str(tmp_path / 'run'), '--num-workers', '0'],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().count('\n') == 0 and 'tokens long' in r.stderr and 'at most 32' in r.stderr
    assert 'prompt file' in r.stderr
    assert not (tmp_path / 'run').exists()


def test_large_pictures_noted_then_downscaled_with_their_masks(tmp_path, capsys):
    src = tagged(tmp_path, {'small.jpg': 'dent', 'p1.jpg': 'rust', 'p2.jpg': 'dent;rust'})
    picture(src / 'big.png', size=(1200, 600), fmt='PNG')
    (src / 'tags.csv').write_text((src / 'tags.csv').read_text() + 'big.png,dent\n')
    m = np.zeros((600, 1200), np.uint8); m[100:300, 200:600] = 1
    Image.fromarray(m).save(picture(src / 'masks' / 'big.png'))
    rc, out, err = run([src, tmp_path / 'out'], capsys)
    assert rc == 0 and 'over 1024 pixels' in err and '--max-side 512' in err
    rc, out, err = run([src, tmp_path / 'out2', '--max-side', '512'], capsys)
    assert rc == 0 and 'over 1024' not in err and 'downscaled copy (1)' in out
    val = VOC(tmp_path / 'out2', 'val')
    s = val[0]
    assert s['image'].shape == (3, 256, 512) and s['mask'].shape == (256, 512)
    assert abs(int((s['mask'] == 1).sum()) - 200 * 400 * (512 / 1200) ** 2) < 300      # the box, scaled with its picture
    assert (tmp_path / 'out2/JPEGImages/small.jpg').stat().st_ino == (src / 'small.jpg').stat().st_ino   # the others: links
    assert run([src, tmp_path / 'out3', '--max-side', '8'], capsys)[0] == 1


def test_semicolon_csv_and_no_val_pictures(tmp_path, capsys):
    src = tmp_path / 'src'
    for i in range(4): picture(src / f'p{i}.jpg')
    (src / 'tags.csv').write_text('image;labels\np0.jpg;dent;rust\np1.jpg;rust\np2.jpg;dent\np3.jpg;rust\n')
    rc, out, err = run([src, tmp_path / 'out', '--val-fraction', '0'], capsys)
    assert rc == 0, err
    classes, table = read_label_file(tmp_path / 'out/ImageSets/Segmentation/cls_labels.json')
    assert classes == ['dent', 'rust'] and table['p0'].tolist() == [1, 1] and len(table) == 4
    from weclip.config import make_config
    from weclip.owndata import custom_datasets
    train, val = custom_datasets(make_config('custom', data_root=str(tmp_path / 'out')))
    assert len(train) == 4 and val.names == train.names and not val.with_masks    # the gallery shows training pictures
    assert 'no val pictures' in capsys.readouterr().out


def test_train_evaluate_predict_on_a_folder_without_masks(tmp_path, capsys):
    "The commands a user runs after preparing: train (gallery, no best.pt), evaluate (one line: no masks), predict (own names)."
    src = tagged(tmp_path, {f'p{i}.jpg': ['dent', 'rust', 'dent;rust'][i % 3] for i in range(10)})
    assert run([src, tmp_path / 'out'], capsys)[0] == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    def cli(*args):
        return subprocess.run([sys.executable, '-m', *map(str, args)], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp_path)
    r = cli('weclip.train', '--data-root', tmp_path / 'out', '--model', 'weclip-tiny', '--weights', 'none', '--crop-size', '32',
            '--iters', '2', '--batch-size', '2', '--num-workers', '0', '--out-dir', tmp_path / 'run')
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"gallery (initial CAM, pseudo labels, prediction) of val pictures in {tmp_path / 'run/gallery/iter_000002.png'}" in r.stdout
    assert (tmp_path / 'run/gallery/iter_000002.png').is_file() and not (tmp_path / 'run/best.pt').exists()
    r = cli('weclip.evaluate', '--checkpoint', tmp_path / 'run/last.pt')
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'has no masks' in r.stderr and 'gallery' in r.stderr
    r = cli('weclip.predict', '--checkpoint', tmp_path / 'run/last.pt', src / 'p1.jpg', '--out', tmp_path / 'pred', '--quiet')
    assert r.returncode == 0 and 'knows 2 classes and background: dent, rust.' in r.stdout, r.stderr[-2000:]
