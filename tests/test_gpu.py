"""The README's GPU commands, as a user runs them, on a miniature VOC layout at crop 320 with a random ViT-B-16.

Marked `gpu`: skipped without CUDA (CI runs on a CPU). On a CUDA machine: `pytest -m gpu tests/test_gpu.py -v`.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

pytestmark = pytest.mark.gpu
COMMON = ['--preset', 'voc', '--weights', 'none', '--train-split', 'train', '--iters', '6', '--batch-size', '2',
          '--crop-size', '320', '--ckpt-every', '2', '--eval-every', '6', '--eval-images', '2', '--pseudo-images', '2',
          '--rfm-start', '3', '--log-every', '1', '--num-workers', '2']


def run(module, *args, env=None, timeout=900):
    return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    from weclip.data import make_tiny_dataset
    return str(make_tiny_dataset(tmp_path_factory.mktemp('voc') / 'VOC2012', layout='voc', n_train=8, n_val=2))


def weights(out):
    return torch.load(Path(out) / 'last.pt', weights_only=True)['model']


def test_device_rule_on_this_machine():
    from weclip.config import resolve_device
    assert resolve_device('auto') == torch.device('cuda', 0) == resolve_device('cuda')
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f'this machine has {n} CUDA GPU'): resolve_device(f'cuda:{n}')


@pytest.mark.parametrize('amp', ['--amp', '--no-amp'])
def test_train_resume_is_exact(voc, tmp_path, amp):
    """`--device cuda` as the README writes it; a run stopped at 4 and resumed ends where a straight run ends."""
    straight = run('weclip.train', *COMMON, amp, '--data-root', voc, '--device', 'cuda', '--out-dir', str(tmp_path / 'a'))
    assert straight.returncode == 0, straight.stderr[-4000:]
    rows = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['total'] for r in rows if 'total' in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert json.loads((tmp_path / 'a' / 'config.json').read_text())['device'] == 'cuda:0'
    first = run('weclip.train', *COMMON, amp, '--data-root', voc, '--device', 'cuda', '--out-dir', str(tmp_path / 'b'),
                env={'WECLIP_KILL_IN_SAVE': '3'})        # killed writing the checkpoint of iteration 6
    assert first.returncode != 0
    resumed = run('weclip.train', *COMMON, amp, '--data-root', voc, '--device', 'cuda', '--out-dir', str(tmp_path / 'b'),
                  '--resume')
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = weights(tmp_path / 'a'), weights(tmp_path / 'b')
    # same data, RNG and optimizer state; CUDA's atomic-add kernels may order sums differently from run to run
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


def test_resume_on_gpu_from_cpu(voc, tmp_path):
    """A run started on the CPU and resumed on the GPU: AdamW's state moves to the fused kernel's device."""
    first = run('weclip.train', *COMMON, '--data-root', voc, '--device', 'cpu', '--out-dir', str(tmp_path / 'c'),
                env={'WECLIP_KILL_IN_SAVE': '2'})        # killed writing the second checkpoint: last.pt at iteration 2
    assert first.returncode != 0
    assert torch.load(tmp_path / 'c' / 'last.pt', weights_only=True)['iteration'] == 2
    resumed = run('weclip.train', *COMMON, '--data-root', voc, '--device', 'cuda', '--out-dir', str(tmp_path / 'c'),
                  '--resume')
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    state = torch.load(tmp_path / 'c' / 'last.pt', weights_only=True)
    assert state['iteration'] == 6 and all(g['fused'] for g in state['optimizer']['param_groups'])


def test_evaluate_with_crf_and_predict(voc, tmp_path):
    r = run('weclip.train', *COMMON, '--data-root', voc, '--out-dir', str(tmp_path / 'r'))     # --device auto: the GPU
    assert r.returncode == 0, r.stderr[-4000:]
    ck = str(tmp_path / 'r' / 'last.pt')
    from weclip.evaluate import load_model
    rng = torch.cuda.get_rng_state()
    load_model(ck, device='cuda')                         # builds its model from the run's seed ...
    assert torch.equal(rng, torch.cuda.get_rng_state())   # ... and leaves the caller's CUDA generator as it was
    ev = run('weclip.evaluate', '--checkpoint', ck, '--crf', '--crf-workers', '2', '--device', 'cuda', '--quiet')
    assert ev.returncode == 0 and 'mIoU' in ev.stdout, ev.stderr[-4000:]
    doc = json.loads((tmp_path / 'r' / 'eval-val-seg-crf' / 'results.json').read_text())
    assert doc['device'] == 'cuda:0' and sorted(doc['results']) == ['seg', 'seg+crf']
    pr = run('weclip.predict', '--checkpoint', ck, str(Path(voc) / 'JPEGImages'), '--out', str(tmp_path / 'p'), '--crf',
             '--quiet')
    assert pr.returncode == 0 and len(list((tmp_path / 'p').glob('*_overlay.jpg'))) >= 10, pr.stderr[-4000:]


def test_torchrun_nccl(voc, tmp_path):
    """torchrun with one process per GPU. With one GPU the world has one process and no process group (NCCL cannot put
    two ranks on one GPU): the launcher and the LOCAL_RANK device are what is tested; with two or more, NCCL too."""
    n = torch.cuda.device_count()
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
                        '-m', 'weclip.train', *COMMON, '--batch-size', '1', '--data-root', voc, '--device', 'cuda',
                        '--out-dir', str(tmp_path / 'ddp')], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    state = torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)
    assert state['iteration'] == 6 and len(state['rng']) == n and 'cuda' in state['rng'][0]


def test_step_waits_once_on_cuda():
    """A VOC-sized step (ViT-B-16, batch 4, 320², RFM on, bf16) waits for the GPU once: the copy of M_init for the
    box masks. CUDA's own count (set_sync_debug_mode) is printed beside the kit's `DeviceWaits` count."""
    from weclip.bench import stages
    r = stages('ViT-B-16', batch=4, size=320, device='cuda', repeats=2)
    print(json.dumps({k: r[k] for k in ('syncs_per_step', 'waits_per_step', 'waits', 'device_ops_per_step', 'seconds')}))
    assert r['waits_per_step'] == 1, r['waits']
    assert 1 <= r['syncs_per_step'] <= 2, r    # the step's designed wait (an event's, for M_init) is counted: at least 1


def test_world_two_on_one_gpu_nccl(tmp_path, monkeypatch, tmp_path_factory):
    """Every line a world of 2 runs, on one GPU through NCCL: a one-rank group, the trainer told WORLD_SIZE=2 (the
    harness of tests/test_cluster.py); a run stopped at 3 and resumed ends where a straight run ends."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cluster import one_rank_world_two
    from weclip.toy import write_toy_dataset
    toy = str(write_toy_dataset(tmp_path_factory.mktemp('toy') / 'toy', n_train=8, n_val=2, seed=0))
    one_rank_world_two(monkeypatch, toy, tmp_path / 'a', '--device', 'cuda', backend='nccl')
    state = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)
    assert state['iteration'] == 4 and len(state['rng']) == 2 and 'cuda' in state['rng'][0]
    one_rank_world_two(monkeypatch, toy, tmp_path / 'b', '--device', 'cuda', backend='nccl', stop_at=3)
    one_rank_world_two(monkeypatch, toy, tmp_path / 'b', '--device', 'cuda', '--resume', backend='nccl')
    a, b = weights(tmp_path / 'a'), weights(tmp_path / 'b')
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


def test_bf16_pseudo_labels_agree_with_float32_on_gpu():
    "The shipped toy model's pseudo labels under CUDA's own bf16 autocast and in float32: the same on >= 99 % of pixels."
    from weclip.pretrained import pretrained_toy, toy_batch
    from weclip.evaluate import pseudo_labels_of
    model, cfg, _ = pretrained_toy(device='cuda')
    b = toy_batch(norm=cfg.norm)
    fp32 = pseudo_labels_of(model, b['image'], b['labels'])
    with torch.autocast('cuda', dtype=torch.bfloat16): bf16 = pseudo_labels_of(model, b['image'], b['labels'])
    agree = (fp32 == bf16).float().mean().item()
    print(f'bf16 vs float32 pseudo labels on {torch.cuda.get_device_name()}: {agree:.2%} of pixels agree')
    assert agree >= 0.99, agree


def test_gpu_checkpoint_evaluated_on_the_cpu(voc, tmp_path):
    "A checkpoint trained on the GPU is measured with --device cpu (CUDA not needed to read it)."
    r = run('weclip.train', *COMMON, '--iters', '2', '--data-root', voc, '--device', 'cuda', '--out-dir', str(tmp_path / 'g'))
    assert r.returncode == 0, r.stderr[-4000:]
    ev = run('weclip.evaluate', '--checkpoint', str(tmp_path / 'g' / 'last.pt'), '--device', 'cpu', '--source', 'cam',
             '--max-images', '1', '--quiet')
    assert ev.returncode == 0 and 'mIoU' in ev.stdout, ev.stderr[-4000:]
    doc = json.loads((tmp_path / 'g' / 'eval-val-cam' / 'results.json').read_text())
    assert doc['device'] == 'cpu'
