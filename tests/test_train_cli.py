"""`python -m weclip.train` as a user runs it: --help, bad configuration, and a real kill + resume."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

ARGS = ['--model', 'weclip-tiny', '--weights', 'none', '--train-split', 'train', '--iters', '6', '--batch-size', '2',
        '--decoder-dim', '32', '--num-workers', '0', '--ckpt-every', '1', '--eval-every', '6', '--eval-images', '2',
        '--rfm-start', '2', '--log-every', '1', '--no-report']


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, '-m', 'weclip.train', *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    from weclip.toy import write_toy_dataset
    return str(write_toy_dataset(tmp_path_factory.mktemp('toy') / 'toy', n_train=8, n_val=2, seed=0))


def test_help_lists_every_field():
    from weclip.config import TrainConfig
    import dataclasses
    r = run('--help')
    assert r.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert '--' + f.name.replace('_', '-') in r.stdout


@pytest.mark.parametrize('args, message', [
    (('--box-threshold', '2'), 'box_threshold=2.0 is out of range'),
    (('--batch-size', '0'), 'batch_size=0 is out of range'),
    (('--data-root', '/nonexistent/VOC2012', '--preset', 'voc', '--weights', 'none'), '/nonexistent/VOC2012'),
])
def test_bad_input_one_clear_message(args, message, tmp_path):
    r = run(*args, '--out-dir', str(tmp_path / 'never'))
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    assert not (tmp_path / 'never').exists()           # a run that fails at start leaves no folder behind


def decoder_weights(out):
    return torch.load(Path(out) / 'last.pt', weights_only=True)['model']


def test_kill_and_resume_is_exact(toy, tmp_path):
    common = [*ARGS, '--data-root', toy]
    straight = run(*common, '--out-dir', str(tmp_path / 'a'))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # killed inside the 4th checkpoint write (after the temporary file, before the rename) ...
    killed = run(*common, '--out-dir', str(tmp_path / 'b'), env={'WECLIP_KILL_IN_SAVE': '4'})
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / 'b' / 'last.pt', weights_only=True)['iteration'] == 3   # the 3rd checkpoint, whole
    # ... then resumed with the same command
    resumed = run(*common, '--out-dir', str(tmp_path / 'b'), '--resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = decoder_weights(tmp_path / 'a'), decoder_weights(tmp_path / 'b')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(tmp_path / 'b') if '.tmp' in p]   # no temporary file left behind


def test_sigkill_at_any_time_then_resume(toy, tmp_path):
    common = [*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'c')]
    p = subprocess.Popen([sys.executable, '-m', 'weclip.train', *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, t0 = tmp_path / 'c' / 'last.pt', time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    r = run(*common, '--resume') if ckpt.exists() else run(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = run(*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'd'))
    a, b = decoder_weights(tmp_path / 'c'), decoder_weights(tmp_path / 'd')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_on_cpu(toy, tmp_path):
    """torchrun with 2 gloo processes: each takes half of every batch, only rank 0 writes, resume is exact."""
    def torchrun(out, *extra, env=None):
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               '-m', 'weclip.train', *ARGS, '--data-root', toy, '--iters', '3', '--batch-size', '1',
                               '--eval-every', '3', '--out-dir', str(out), *extra], capture_output=True, text=True,
                              timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    r = torchrun(tmp_path / 'ddp')
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l for l in (tmp_path / 'ddp' / 'metrics.jsonl').read_text().splitlines() if '"total"' in l]
    assert len(rows) == 3                                  # one line per iteration: only rank 0 logs
    state = torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)
    assert state['iteration'] == 3 and len(state['rng']) == 2
    killed = torchrun(tmp_path / 'ddp2', env={'WECLIP_KILL_IN_SAVE': '3'})   # rank 0 dies writing iteration 3
    assert killed.returncode != 0
    assert torch.load(tmp_path / 'ddp2' / 'last.pt', weights_only=True)['iteration'] == 2
    resumed = torchrun(tmp_path / 'ddp2', '--resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = decoder_weights(tmp_path / 'ddp'), decoder_weights(tmp_path / 'ddp2')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_table_at_the_end(toy, tmp_path):
    r = run(*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'r'), '--iters', '2', '--report')
    assert r.returncode == 0, r.stderr[-3000:]
    for word in ('Results on toy val (2 images', 'initial CAM', 'pseudo labels', 'segmentation', 'seg + CRF',
                 'mIoU', f"Saved in {tmp_path / 'r'}"):
        assert word in r.stdout, (word, r.stdout[-3000:])
    assert (tmp_path / 'r' / 'results.json').is_file()
    # a batch log (stdout is a pipe here) shows every evaluation's progress, each pass under its own name
    for label in ('iteration 2: evaluate val: 2/2 in ', 'iteration 2: evaluate train labels: 8/8 in ',
                  'evaluate initial CAM: 2/2 in ', 'evaluate static pseudo labels (RFM off): 2/2 in ',
                  'evaluate RFM pseudo labels: 2/2 in ', 'evaluate segmentation'):
        assert label in r.stdout, (label, r.stdout[-3000:])


def test_sigterm_saves_then_resume_is_exact(toy, tmp_path):
    """A cluster preempts with SIGTERM: the run writes last.pt, says how to continue, and the resume is bit-identical."""
    common = [*ARGS, '--data-root', toy, '--ckpt-every', '100']           # no regular checkpoint before the signal
    p = subprocess.Popen([sys.executable, '-m', 'weclip.train', *common, '--out-dir', str(tmp_path / 's')],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300:                  # wait for the first logged iteration
        m = tmp_path / 's' / 'metrics.jsonl'
        if m.exists() and '"total"' in m.read_text(): break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert 'Stopped by SIGTERM at iteration' in err and 'Continue with the same command and --resume.' in err, err
    assert 'Traceback' not in err, err[-3000:]
    it = torch.load(tmp_path / 's' / 'last.pt', weights_only=True)['iteration']
    assert 1 <= it < 6 and not (tmp_path / 's' / '.lock').exists()
    resumed = run(*common, '--out-dir', str(tmp_path / 's'), '--resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run(*common, '--out-dir', str(tmp_path / 'u'))
    a, b = decoder_weights(tmp_path / 's'), decoder_weights(tmp_path / 'u')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_job_log_shows_progress_and_the_configuration(toy, tmp_path):
    """stdout is not a terminal here, as in a batch job's log: one progress line every --log-every iterations."""
    r = run(*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'p'), '--log-every', '2', '--variant', 'paper')
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith('iteration ') and ' img/s | ETA ' in l]
    assert [l.split(' |')[0] for l in lines] == ['iteration 2/6', 'iteration 4/6', 'iteration 6/6'], r.stdout[-3000:]
    assert ' | total ' in lines[0] and ' | lr ' in lines[0]
    assert any(l.split() == ['decoder_blocks', '=', '12', '(variant', 'paper)'] for l in r.stdout.splitlines()), r.stdout[:3000]
    assert any(l.split()[:3] == ['iters', '=', '6'] and l.endswith('(option)') for l in r.stdout.splitlines())


def test_second_run_in_the_same_folder_is_refused(toy, tmp_path):
    out = tmp_path / 'busy'; out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        import socket
        (out / '.lock').write_text(f'{socket.gethostname()} {holder.pid}')
        r = run(*ARGS, '--data-root', toy, '--out-dir', str(out))
        assert r.returncode != 0 and f'is in use by another run (pid {holder.pid}' in r.stderr, r.stderr[-2000:]
        assert 'Traceback' not in r.stderr and sorted(p.name for p in out.iterdir()) == ['.lock']
    finally:
        holder.kill(); holder.wait()


@pytest.mark.parametrize('args, message', [
    (('--data-root', '/tmp/weclip-no-such-toy-world'), 'No toy world at /tmp/weclip-no-such-toy-world'),
    (('--device', 'gpu'), "device='gpu' is out of range: use auto, cpu, cuda or cuda:N"),
    (('--batch-size', '9'), 'has 8 images, fewer than one batch'),
])
def test_more_bad_input(toy, tmp_path, args, message):
    base = [*ARGS, '--out-dir', str(tmp_path / 'x')] + ([] if '--data-root' in args else ['--data-root', toy])
    r = run(*base, *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    assert not Path('/tmp/weclip-no-such-toy-world').exists()


def test_corrupt_picture_with_loader_workers_is_one_line(toy, tmp_path):
    """A DataLoader worker's error reaches the user as the one line it was, not as the worker's traceback."""
    import shutil
    root = tmp_path / 'toy'; shutil.copytree(toy, root)
    first = (root / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()[0]
    for p in (root / 'JPEGImages').glob(first + '.*'): p.write_bytes(b'not a picture')
    r = run(*ARGS, '--data-root', str(root), '--out-dir', str(tmp_path / 'w'), '--num-workers', '1', '--batch-size', '8',
            '--iters', '1', '--eval-every', '100')
    assert r.returncode != 0 and 'cannot read image' in r.stderr and first in r.stderr, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and 'DataLoader worker' not in r.stderr, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resume_on_another_class_list_is_one_line(toy, tmp_path):
    from weclip.toy import write_toy_dataset
    from weclip.toy import toy_config
    other = str(write_toy_dataset(tmp_path / 'toy4', n_train=8, n_val=2, seed=0,
                                  config=toy_config('default', classes=('circle', 'square', 'star', 'cross'))))
    first = run(*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'o'), '--iters', '2')
    assert first.returncode == 0, first.stderr[-3000:]
    r = run(*ARGS, '--data-root', other, '--out-dir', str(tmp_path / 'o'), '--iters', '2', '--resume')
    assert r.returncode != 0 and 'was trained on other classes than' in r.stderr, r.stderr[-3000:]
    assert "in its label file" in r.stderr and "first difference: 'triangle' there, 'star' here" in r.stderr, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr


def test_fresh_run_into_a_run_is_refused_and_resume_auto_works(toy, tmp_path):
    """A requeued job (or a forgotten --resume) never replaces a run; `--resume auto` is one command for both cases."""
    common = [*ARGS, '--data-root', toy, '--iters', '2', '--eval-every', '2']
    first = run(*common, '--out-dir', str(tmp_path / 'y'), '--resume', 'auto')       # no last.pt yet: starts
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {p: (tmp_path / 'y' / p).read_bytes() for p in ('last.pt', 'best.pt', 'config.json', 'metrics.jsonl')}
    again = run(*common, '--out-dir', str(tmp_path / 'y'))
    assert again.returncode != 0 and 'Traceback' not in again.stderr, again.stderr[-3000:]
    assert again.stderr.strip() == (f"error: {tmp_path / 'y'} already holds a run ({tmp_path / 'y' / 'last.pt'}): continue "
                                    "it with --resume (or --resume auto in a job that may be requeued), or start a new "
                                    f"run with another --out-dir (or delete {tmp_path / 'y'} first to start over).")
    assert all((tmp_path / 'y' / p).read_bytes() == b for p, b in kept.items())      # nothing replaced, nothing appended
    resumed = run(*common, '--out-dir', str(tmp_path / 'y'), '--resume', 'auto', '--iters', '2')
    assert resumed.returncode == 0 and 'Resuming' in resumed.stdout, resumed.stderr[-3000:]


@pytest.mark.parametrize('args, message', [
    (('--poly-power', '-1'), 'poly_power=-1.0 is out of range: it must not be negative'),
    (('--poly-power', 'nan'), 'poly_power=nan is out of range: it must be a finite number'),
    (('--scale-max', 'inf'), 'scale_max=inf is out of range: it must be a finite number'),
    (('--crop-size', '7'), 'crop_size=7 is out of range: the crop must be a whole number of 8-pixel patches of '
                           'weclip-tiny: use --crop-size 8'),
    (('--lr', '-1'), 'lr=-1.0 is out of range'),
    (('--resume', 'sometimes'), "resume='sometimes' is out of range: use --resume, --resume auto"),
])
def test_numeric_options_checked_at_parse_time(args, message, tmp_path):
    from weclip.train import main
    with pytest.raises(SystemExit) as e: main([*ARGS, *args, '--out-dir', str(tmp_path / 'never')])
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert not (tmp_path / 'never').exists()


@pytest.mark.parametrize('obj, what', [({'a': 1}, "a dict without 'iteration'"), ([1, 2], 'list'), (torch.ones(3), 'Tensor'),
                                       ({'iteration': 1, 'best': 0., 'optimizer': {}, 'scheduler': {}, 'rng': [],
                                         'model': {'w': torch.ones(1)}, 'config': {'lr': 1}}, "a dict whose 'config' is not a weclip run's")])
def test_resume_of_a_foreign_last_pt_is_one_line(toy, tmp_path, obj, what):
    from weclip.train import main
    (tmp_path / 'f').mkdir(); torch.save(obj, tmp_path / 'f' / 'last.pt')
    with pytest.raises(SystemExit) as e: main([*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'f'), '--resume'])
    assert f"{tmp_path / 'f' / 'last.pt'} is not a weclip training checkpoint (it holds {what}" in str(e.value), str(e.value)
    assert 'delete it (or move it away) to start a new run' in str(e.value)


def test_diverged_weights_are_never_a_good_checkpoint(toy, tmp_path):
    """--lr 1e30 keeps finite but blown-up weights: never written, and the advice says there is no checkpoint yet."""
    r = run(*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'big'), '--lr', '1e30')
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'decoder tensors have blown up (max |w|' in r.stderr and 'there is no good checkpoint to resume yet' in r.stderr
    assert not (tmp_path / 'big' / 'last.pt').exists()


def test_second_ctrl_c_during_the_save_is_one_line(toy, tmp_path, monkeypatch):
    """Ctrl-C pressed again while the first one's checkpoint is written: one line, and last.pt is the previous whole one."""
    from weclip import train as T
    real, calls = torch.save, []
    def save(obj, f):
        calls.append(1)
        if len(calls) == 2: f.write(b'half'); raise KeyboardInterrupt
        return real(obj, f)
    monkeypatch.setattr(torch, 'save', save)
    out = tmp_path / 'k'
    with pytest.raises(SystemExit) as e: T.main([*ARGS, '--data-root', toy, '--out-dir', str(out)])
    assert str(e.value) == (f"Stopped at once by a second Ctrl-C; {out / 'last.pt'} is the last complete checkpoint: "
                            "continue with the same command and --resume."), str(e.value)
    assert torch.load(out / 'last.pt', weights_only=True)['iteration'] == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == []     # no temporary file, no lock


def test_full_disk_on_metrics_leaves_whole_rows(toy, tmp_path, monkeypatch):
    """A full disk while a metrics row is appended: one line naming metrics.jsonl; the file keeps only whole rows."""
    import json
    from weclip import train as T
    class Full:                                   # a file on a disk that fills up in the middle of row 3
        def __init__(self, f): self.f = f
        def __getattr__(self, k): return getattr(self.f, k)
        def write(self, data):
            if bytes(data).startswith(b'{"iteration": 3'): self.f.write(bytes(data)[:12]); raise OSError(28, 'No space left on device')
            return self.f.write(data)
    real_init = T._Logger.__init__
    def init(self, *a, **k): real_init(self, *a, **k); self.f = Full(self.f)
    monkeypatch.setattr(T._Logger, '__init__', init)
    with pytest.raises(SystemExit) as e: T.main([*ARGS, '--data-root', toy, '--out-dir', str(tmp_path / 'm')])
    assert 'metrics.jsonl (No space left on device)' in str(e.value), str(e.value)
    rows = [json.loads(l) for l in (tmp_path / 'm' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iteration'] for r in rows] == [1, 2]


def test_resume_with_another_process_count_is_one_line(toy, tmp_path):
    from weclip.checkpoint import save_checkpoint
    from weclip.train import main
    out = tmp_path / 'n'
    first = run(*ARGS, '--data-root', toy, '--out-dir', str(out), '--iters', '2', '--eval-every', '2')
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(out / 'last.pt', weights_only=True)
    state['rng'] = state['rng'] * 2                                  # as a 2-process torchrun writes it
    save_checkpoint(state, out / 'last.pt')
    with pytest.raises(SystemExit) as e: main([*ARGS, '--data-root', toy, '--out-dir', str(out), '--iters', '2',
                                               '--eval-every', '2', '--resume'])
    assert f"{out / 'last.pt'} was written by 2 process(es), this run has 1: resume with the same --nproc_per_node" in str(e.value)


def test_label_file_with_another_class_count_names_the_file(tmp_path):
    """--preset coco on a root whose label file lists 3 classes: one line naming the file and the option, no CAM error."""
    from weclip.data import make_tiny_dataset
    from weclip.train import main
    root = make_tiny_dataset(tmp_path / 'coco3', 'coco', n_train=2, n_val=1, classes=['cat', 'dog', 'tree'])
    with pytest.raises(SystemExit) as e:
        main([*ARGS, '--preset', 'coco', '--data-root', str(root), '--out-dir', str(tmp_path / 'never'), '--crop-size', '64'])
    label_file = root / 'ImageSets' / 'Segmentation' / 'cls_labels.json'
    assert str(e.value) == (f"error: The label file {label_file} lists 3 classes, but --dataset coco prompts 80: pass the "
                            f"--preset (or --dataset) that {root} was prepared for, or rebuild its label file with "
                            "data_scripts/prepare_coco.py."), str(e.value)
    assert not (tmp_path / 'never').exists()
