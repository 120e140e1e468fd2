"""`python -m weclip.evaluate` and `python -m weclip.predict` as a user runs them: outputs, and one clear message per bad input."""
import json, os, subprocess, sys
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, '-m', f'weclip.{module}', *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A toy world (2 val images, also listed as a VOC-style test split) and a checkpoint in the trainer's format."""
    from weclip.backbone import TINY_CLIP
    from weclip.toy import write_toy_dataset
    from weclip.config import make_config
    from weclip.checkpoint import save_checkpoint
    from weclip.model import WeCLIP
    from weclip.data import VOC
    d = tmp_path_factory.mktemp('eval')
    toy = write_toy_dataset(d / 'toy', n_train=1, n_val=2, seed=0)
    sets = toy / 'ImageSets' / 'Segmentation'
    (sets / 'test.txt').write_text((sets / 'val.txt').read_text())     # images only, like VOC's test split
    cfg = make_config('toy', model=TINY_CLIP, weights='none', data_root=str(toy), decoder_dim=32, num_workers=0,
                      out_dir=str(d / 'run'))
    torch.manual_seed(cfg.seed)
    model = WeCLIP.from_config(cfg, classes=VOC(toy, 'val').classes)
    save_checkpoint(dict(iteration=2, best=0.0, model=model.trainable_state_dict(), config=asdict(cfg)),
                    d / 'run' / 'last.pt')
    return d


def test_help():
    for module, opts in (('evaluate', ['--checkpoint', '--split', '--source', '--crf', '--scales', '--no-flip',
                                       '--out', '--device', '--max-images', '--resize-long']),
                         ('predict', ['--checkpoint', '--out', '--crf', '--scales', '--no-flip', 'images'])):
        r = run(module, '--help')
        assert r.returncode == 0, r.stderr
        assert all(o in r.stdout for o in opts), r.stdout


def test_evaluate_val_with_crf(run_dir):
    from weclip.data import VOC, read_mask
    from weclip.metrics import confusion
    from weclip.evaluate import seg_metrics
    out = run_dir / 'ev'
    r = run('evaluate', '--checkpoint', str(run_dir / 'run' / 'last.pt'), '--crf', '--out', str(out), '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'mIoU' in r.stdout and 'seg+crf' in r.stdout and 'crescent' in r.stdout and 'background' in r.stdout
    doc = json.loads((out / 'results.json').read_text())
    assert (doc['split'], doc['source'], doc['scales'], doc['flip'], doc['images']) == ('val', 'seg', [0.75, 1.0], True, 2)
    assert sorted(doc['results']) == ['seg', 'seg+crf']
    for res in doc['results'].values():
        assert 0 <= res['miou'] <= 1 and 0 <= res['pixel_acc'] <= 1 and len(res['iou']) == 9
    # the saved palette PNGs are the CRF predictions, and measuring them again gives the reported mIoU
    val = VOC(run_dir / 'toy', 'val', with_masks=True)
    conf = 0
    for i, name in enumerate(val.names):
        with Image.open(out / 'pred' / f'{name}.png') as im: assert (im.mode, im.size) == ('P', (160, 160))
        conf = conf + confusion(torch.tensor(read_mask(out / 'pred' / f'{name}.png')).long(), val[i]['mask'], 9)
    assert abs(seg_metrics(conf, list(doc['results']['seg']['iou']))['miou'] - doc['results']['seg+crf']['miou']) < 1e-9


def test_evaluate_pseudo_labels(run_dir):
    r = run('evaluate', '--checkpoint', str(run_dir / 'run' / 'last.pt'), '--source', 'pseudo', '--max-images', '1',
            '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((run_dir / 'run' / 'eval-val-pseudo' / 'results.json').read_text())
    assert list(doc['results']) == ['pseudo'] and doc['images'] == 1 and 0 <= doc['results']['pseudo']['miou'] <= 1


def test_evaluate_voc_test_split_layout(run_dir):
    out = run_dir / 'sub'
    r = run('evaluate', '--checkpoint', str(run_dir / 'run' / 'last.pt'), '--split', 'test', '--out', str(out),
            '--scales', '1.0', '--no-flip', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'tar -czf results.tgz results' in r.stdout
    names = (run_dir / 'toy' / 'ImageSets' / 'Segmentation' / 'test.txt').read_text().split()
    sub = out / 'results' / 'VOC2012' / 'Segmentation' / 'comp6_test_cls'
    assert sorted(p.name for p in sub.iterdir()) == sorted(f'{n}.png' for n in names)
    assert json.loads((out / 'results.json').read_text())['results'] == {}


def test_predict_own_images(run_dir):
    pics = run_dir / 'pics'; (pics / 'more').mkdir(parents=True)
    src = Image.open(run_dir / 'toy' / 'JPEGImages' / 'toy_val_000000.jpg')
    src.resize((130, 90)).save(pics / 'wide.jpg'); src.resize((70, 100)).save(pics / 'more' / 'tall.png')
    out = run_dir / 'pred_out'
    r = run('predict', '--checkpoint', str(run_dir / 'run' / 'last.pt'), str(pics), '--out', str(out), '--crf', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    for stem, size in (('wide', (130, 90)), ('tall', (70, 100))):
        with Image.open(out / f'{stem}.png') as im: assert (im.mode, im.size) == ('P', size)
        with Image.open(out / f'{stem}_overlay.jpg') as im:   # the picture, then the legend strip of its colours
            assert im.size[0] == size[0] and im.size[1] > size[1], im.size
        assert f'{stem}.png' in r.stdout


def test_bad_input_one_clear_message(run_dir):
    ck = str(run_dir / 'run' / 'last.pt')
    (run_dir / 'corrupt.pt').write_bytes(b'half a checkpoint')
    (run_dir / 'empty').mkdir(exist_ok=True)
    (run_dir / 'notes.jpg').write_text('not a picture')
    # as a user sees it: a message on stderr, no traceback
    for args, message in [(('evaluate', '--checkpoint', str(run_dir / 'nope.pt')), 'No checkpoint at'),
                          (('predict', '--checkpoint', ck, str(run_dir / 'notes.jpg')), 'cannot read image')]:
        r = run(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])
        assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    # the other cases through the same entry points, in this process (a process start costs seconds here)
    from weclip.evaluate import evaluate_cli
    from weclip.predict import predict_cli
    for cli, args, message in [
            (evaluate_cli, ['--checkpoint', str(run_dir / 'corrupt.pt')], 'is unreadable'),
            (evaluate_cli, ['--checkpoint', ck, '--split', 'test', '--source', 'cam'], 'needs image-level labels'),
            (evaluate_cli, ['--checkpoint', ck, '--source', 'pseudo', '--crf'], '--crf refines the segmentation only'),
            (predict_cli, ['--checkpoint', ck, str(run_dir / 'empty')], 'No images in folder'),
            (predict_cli, ['--checkpoint', ck, str(run_dir / 'missing.jpg')], 'missing.jpg does not exist')]:
        with pytest.raises(SystemExit) as e: cli(args)
        assert message in str(e.value), (args, str(e.value))


def test_crf_is_an_optional_extra(run_dir, monkeypatch):
    """Without pydensecrf2, --crf says how to install it (one line), and everything else still works."""
    for m in ('pydensecrf', 'pydensecrf.densecrf', 'pydensecrf.utils'): monkeypatch.setitem(sys.modules, m, None)
    from weclip.evaluate import evaluate_cli, crf_available
    from weclip.predict import predict_cli
    assert not crf_available()
    ck = str(run_dir / 'run' / 'last.pt')
    for cli, args in ((evaluate_cli, ['--checkpoint', ck, '--crf', '--quiet']),
                      (predict_cli, ['--checkpoint', ck, str(run_dir / 'toy' / 'JPEGImages'), '--crf', '--quiet'])):
        with pytest.raises(SystemExit) as e: cli(args)
        assert 'pip install -e ".[crf]"' in str(e.value) and '3.13' in str(e.value) and '\n' not in str(e.value), str(e.value)
    doc = evaluate_cli(['--checkpoint', ck, '--quiet', '--max-images', '1', '--out', str(run_dir / 'nocrf')])
    assert list(doc['results']) == ['seg']


def test_predict_keeps_the_users_pictures(run_dir):
    """--out never writes over a picture, and a second run into a folder inside the input does not read its own masks."""
    from weclip.predict import predict_cli
    ck = str(run_dir / 'run' / 'last.pt')
    pics = run_dir / 'mine'; pics.mkdir()
    Image.open(run_dir / 'toy' / 'JPEGImages' / 'toy_val_000000.jpg').save(pics / 'a.png')
    before = (pics / 'a.png').read_bytes()
    with pytest.raises(SystemExit) as e: predict_cli(['--checkpoint', ck, str(pics / 'a.png'), '--out', str(pics), '--quiet'])
    assert 'would write a.png over the input picture' in str(e.value)
    with pytest.raises(SystemExit) as e: predict_cli(['--checkpoint', ck, str(pics), '--out', str(pics), '--quiet'])
    assert 'is the input folder' in str(e.value)
    assert (pics / 'a.png').read_bytes() == before
    for _ in range(2):
        done = predict_cli(['--checkpoint', ck, str(pics), '--out', str(pics / 'masks'), '--quiet', '--no-flip', '--scales', '1'])
        assert [d['image'] for d in done] == [str(pics / 'a.png')]
    assert (pics / 'a.png').read_bytes() == before


def test_predict_odd_pictures(run_dir):
    """A 16-bit PNG is the picture (not white), a 1x1 picture gets one line, a huge one is read capped."""
    from weclip.predict import predict_cli
    ck = str(run_dir / 'run' / 'last.pt')
    d = run_dir / 'odd'; d.mkdir()
    g = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(g).save(d / 'deep.png')
    assert Image.open(d / 'deep.png').mode.startswith('I')
    Image.new('RGB', (3000, 2500), (40, 90, 200)).save(d / 'huge.jpg')
    done = predict_cli(['--checkpoint', ck, str(d / 'deep.png'), str(d / 'huge.jpg'), '--out', str(run_dir / 'odd_out'),
                        '--quiet', '--no-flip', '--scales', '1', '--max-side', '512'])
    over = np.asarray(Image.open(done[0]['overlay']).convert('L'), np.float32)[:48]   # the picture, not its legend strip
    assert over.max() - over.min() > 100                     # the gradient, not an all-white picture
    assert tuple(done[1]["size"]) == (427, 512)                # 2500 * 512 / 3000 = 426.7, rounded
    Image.new('RGB', (1, 1)).save(d / 'dot.png')
    r = run('predict', '--checkpoint', ck, str(d / 'dot.png'), '--out', str(run_dir / 'odd_out2'))
    assert r.returncode != 0 and 'is 1x1 pixels' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not (run_dir / 'odd_out2').exists()                  # failed before writing: no empty folder left behind


def test_voc_checkpoint_on_a_root_with_other_classes(tmp_path):
    """The check reads the root's own label file: a VOC checkpoint on a 3-class root in VOC layout is refused, naming it."""
    from weclip.backbone import TINY_CLIP
    from weclip.config import make_config
    from weclip.checkpoint import save_checkpoint
    from weclip.data import make_tiny_dataset
    from weclip.model import WeCLIP
    from weclip.prompts import VOC_CLASSES
    from weclip.evaluate import evaluate_cli
    other = make_tiny_dataset(tmp_path / 'other', n_train=1, n_val=2, n_test=0, classes=['cat', 'dog', 'tree'])
    cfg = make_config('voc', model=TINY_CLIP, weights='none', data_root=str(tmp_path / 'nowhere'), decoder_dim=32)
    torch.manual_seed(0)
    model = WeCLIP.from_config(cfg, classes=list(VOC_CLASSES))
    ck = tmp_path / 'voc.pt'
    save_checkpoint(dict(iteration=1, best=0.0, model=model.trainable_state_dict(), config=asdict(cfg),
                         classes=list(VOC_CLASSES)), ck)
    with pytest.raises(SystemExit) as e:
        evaluate_cli(['--checkpoint', str(ck), '--data-root', str(other), '--quiet', '--out', str(tmp_path / 'ev')])
    msg = str(e.value)
    assert f'{ck} was trained on other classes than {other} has (20 there, 3 in its label file ' in msg, msg
    assert "cls_labels.json; first difference: 'aeroplane' there, 'cat' here): pass --data-root" in msg, msg
    assert not (tmp_path / 'ev' / 'results.json').exists()


def test_inference_options_out_of_range(run_dir):
    from weclip.evaluate import evaluate_cli
    from weclip.predict import predict_cli
    ck = str(run_dir / 'run' / 'last.pt')
    img = str(run_dir / 'toy' / 'JPEGImages' / 'toy_val_000000.jpg')
    for cli, args, message in [
            (evaluate_cli, ['--resize-long', '-5'], '--resize-long -5 is negative: use 0'),
            (evaluate_cli, ['--max-images', '-1'], '--max-images -1 is negative: use 0 (every image'),
            (evaluate_cli, ['--resize-long', '3'], '--resize-long 3 is below one 8-pixel patch of this model: use 0'),
            (evaluate_cli, ['--scales', 'nan'], '--scales nan: every scale must be a positive finite factor'),
            (evaluate_cli, ['--crf-workers', '-2'], '--crf-workers -2 is negative'),
            (predict_cli, [img, '--resize-long', '-5'], '--resize-long -5 is negative'),
            (predict_cli, [img, '--max-side', '5'], '--max-side 5 is below 16 pixels'),
            (predict_cli, [img, '--scales', '0'], 'every scale must be a positive finite factor')]:
        with pytest.raises(SystemExit) as e: cli(['--checkpoint', ck, '--quiet', '--out', str(run_dir / 'never'), *args])
        assert message in str(e.value) and '\n' not in str(e.value), (args, str(e.value))
    assert not (run_dir / 'never' / 'results.json').exists()


def test_two_predict_runs_never_share_an_out_folder(run_dir):
    import socket
    from weclip.predict import predict_cli
    out = run_dir / 'shared'; out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        (out / '.lock').write_text(f'{socket.gethostname()} {holder.pid}')
        with pytest.raises(SystemExit) as e:
            predict_cli(['--checkpoint', str(run_dir / 'run' / 'last.pt'), str(run_dir / 'toy' / 'JPEGImages'),
                         '--out', str(out), '--quiet', '--no-flip', '--scales', '1'])
        assert f'is in use by another run (pid {holder.pid}' in str(e.value) and 'choose another --out,' in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == ['.lock']
    finally:
        holder.kill(); holder.wait()


def test_full_disk_leaves_no_broken_file(run_dir, monkeypatch):
    """ENOSPC in the middle of an overlay JPEG or results.json: one line naming the path, no file under its final name."""
    import errno
    from weclip import data
    from weclip.evaluate import evaluate_cli
    from weclip.predict import predict_cli
    real_open = open
    class Full:
        def __init__(self, f): self.f = f
        def __getattr__(self, k):                 # no fileno: PIL writes through write() as to any stream
            if k == 'fileno': raise AttributeError(k)
            return getattr(self.f, k)
        def __enter__(self): return self
        def __exit__(self, *e): self.f.close()
        def write(self, b): self.f.write(b[:5]); raise OSError(errno.ENOSPC, 'No space left on device')
    def fill_up(name):
        def fake_open(path, *a, **k):
            f = real_open(path, *a, **k)
            return Full(f) if name in str(path) else f
        monkeypatch.setattr(data, 'open', fake_open, raising=False)
    ck = str(run_dir / 'run' / 'last.pt')
    fill_up('_overlay.jpg')
    out = run_dir / 'full'
    with pytest.raises(SystemExit) as e:
        predict_cli(['--checkpoint', ck, str(run_dir / 'toy' / 'JPEGImages' / 'toy_val_000000.jpg'), '--out', str(out),
                     '--quiet', '--no-flip', '--scales', '1'])
    assert str(e.value) == (f"error: Could not write {out / 'toy_val_000000_overlay.jpg'} (No space left on device); no "
                            "toy_val_000000_overlay.jpg was written. Free disk space, or choose another --out."), str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ['toy_val_000000.png']           # the mask whole, no overlay, no temp
    fill_up('results.json')
    with pytest.raises(SystemExit) as e:
        evaluate_cli(['--checkpoint', ck, '--quiet', '--max-images', '1', '--out', str(run_dir / 'ev_full')])
    assert f"Could not write {run_dir / 'ev_full' / 'results.json'} (No space left on device)" in str(e.value), str(e.value)
    assert not (run_dir / 'ev_full' / 'results.json').exists() and not list((run_dir / 'ev_full').glob('.*'))
