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
    assert 'Traceback' not in r.stderr
