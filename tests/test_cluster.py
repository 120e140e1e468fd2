"""What a cluster does to a run: several processes share the evaluation, a scheduler signals the whole process group,
one rank fails alone. Two gloo processes on the CPU stand in for two GPUs."""
import hashlib, json, os, random, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from test_train_cli import ARGS, run, toy, decoder_weights   # noqa: F401 (toy is a fixture)


def torchrun(*args, env=None, timeout=300, nproc=2, script=None):
    "`torchrun --nproc_per_node=nproc` of the trainer (or of `script`), each line prefixed with its rank ([default1]:)."
    target = [str(script)] if script else ['-m', 'weclip.train']
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           '--tee', '3', *target, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def test_ddp_evaluation_is_sharded_and_exact(toy, tmp_path):
    """Each rank measures its shard of val (and of the training-label subset); the summed counts give exactly the mIoU
    one process measures on the saved model."""
    from weclip.evaluate import load_model, val_miou, pseudo_subset, pseudo_quality
    from weclip.train import build_datasets
    out = tmp_path / 'ddp'
    r = torchrun(*ARGS, '--data-root', toy, '--iters', '2', '--batch-size', '1', '--eval-every', '2',
                 '--pseudo-images', '3', '--dist-timeout', '300', '--out-dir', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    val = next(x for x in rows if 'val_miou' in x); pq = next(x for x in rows if 'pseudo_miou' in x)
    model, cfg, _ = load_model(out / 'last.pt', device='cpu')      # the model both ranks evaluated, in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # as the torchrun processes run (OMP_NUM_THREADS=1): other thread counts round differently
    try:
        one = val_miou(model, build_datasets(cfg)[1], cfg.eval_images)
        sub, _ = pseudo_subset(cfg)
        assert len(sub) == 3                                            # shards of 2 and 1 images
        one_pq = pseudo_quality(model, sub, 2)
    finally: torch.set_num_threads(threads)
    assert (val['val_miou'], val['val_iou'][:1]) == (one['miou'], one['iou'][:1])
    assert (pq['cam_miou'], pq['pseudo_miou']) == (one_pq['cam_miou'], one_pq['pseudo_miou'])
    assert r.stdout.count('val mIoU') == 1                             # printed by rank 0 only


IDENTITY = '''
import hashlib, inspect, json, sys, warnings, torch, torch.distributed as dist
import weclip.train as T
from weclip.config import make_config
cfg = make_config('toy', model='weclip-tiny', weights='none', decoder_dim=32, data_root=sys.argv[1], device='cpu')
rank, world, device = T._distributed(cfg)
def digest(m):
    sd = m.state_dict()
    assert any('text' in k for k in sd), list(sd)[:20]                  # the text features are among the buffers
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for k, v in sd.items()}
real, seen = torch.nn.parallel.DistributedDataParallel, {}
def spy(module, **kw):                                                   # the model as _build made it, before DDP syncs
    seen['built'] = digest(module); return real(module, **kw)
spy.__signature__ = inspect.signature(real)                               # the same arguments as DDP's
torch.nn.parallel.DistributedDataParallel = spy
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    model, net = T._build(cfg, T.build_datasets(cfg)[0].classes, rank, world, device)
mine = dict(built=seen['built'], wrapped=digest(model), draw=torch.rand(1).item(),
            warnings=[str(x.message) for x in w if 'buffers' in str(x.message)])
every = [None] * world; dist.all_gather_object(every, mine)
if rank == 0: open(sys.argv[2], 'w').write(json.dumps(every))
dist.destroy_process_group()
'''


def test_ranks_build_identical_models(toy, tmp_path):
    """With random weights (--weights none) the backbone, the text features and the decoder are the same on every rank
    before DDP syncs anything; the ranks then draw different random numbers (dropout, augmentation)."""
    script = tmp_path / 'identity.py'; script.write_text(IDENTITY)
    r = torchrun(toy, str(tmp_path / 'digests.json'), script=script)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads((tmp_path / 'digests.json').read_text())
    assert len(a['built']) > 50 and a['built'] == b['built'] and a['wrapped'] == b['wrapped']
    assert any(k.startswith('backbone') for k in a['built'])
    assert a['draw'] != b['draw']
    assert a['warnings'] == b['warnings'] == []                         # no deprecated DDP argument


def test_a_failing_rank_stops_every_rank_with_one_line(toy, tmp_path):
    """Rank 0 cannot write its checkpoint (last.pt turned into a folder after the first one): both processes stop
    within seconds, non-zero, each with one line that names rank 0 and why."""
    out = tmp_path / 'f'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--tee', '3',
           '-m', 'weclip.train', *ARGS, '--data-root', toy, '--iters', '200', '--batch-size', '1', '--eval-every', '1000',
           '--dist-timeout', '600', '--out-dir', str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        last, t0 = out / 'last.pt', time.time()
        while time.time() - t0 < 240 and p.poll() is None:            # after the first checkpoint: last.pt a folder
            try:
                if last.is_file(): last.replace(out / 'first.pt'); last.mkdir(); (last / 'keep').touch(); break
            except OSError: pass                                         # a checkpoint landed in between: again
            time.sleep(0.02)
        t1 = time.time()
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert p.returncode != 0 and time.time() - t1 < 60, err[-3000:]
    lines = [l for l in err.splitlines() if 'error: rank 0 of 2 failed writing last.pt at iteration' in l]
    assert sorted(l.split(':')[0] for l in lines) == ['[default0]', '[default1]'], err[-3000:]
    assert 'so every process stops' in lines[0] and 'Could not write the checkpoint' in lines[0], lines
    assert not [l for l in err.splitlines() if l.startswith('[default') and 'Traceback' in l], err[-3000:]


def test_group_sigterm_with_loader_workers(toy, tmp_path):
    """A scheduler's SIGTERM to the whole process group (the loader's workers too): last.pt, the one-line message,
    and a resume bit-identical to an uninterrupted run."""
    common = [*ARGS, '--data-root', toy, '--ckpt-every', '100', '--num-workers', '2', '--iters', '10']
    straight = run(*common, '--out-dir', str(tmp_path / 'u'))
    assert straight.returncode == 0, straight.stderr[-3000:]
    seed = int(os.environ.get('WECLIP_TRIAL_SEED', time.time_ns() % 10**6))
    print(f'WECLIP_TRIAL_SEED={seed}')                                  # shown if it fails: rerun with the same kills
    rng = random.Random(seed)
    for trial in range(int(os.environ.get('WECLIP_SIGTERM_TRIALS', 1))):   # the three: WECLIP_SIGTERM_TRIALS=3
        out = tmp_path / f's{trial}'
        p = subprocess.Popen([sys.executable, '-m', 'weclip.train', *common, '--out-dir', str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        t0, m, after = time.time(), out / 'metrics.jsonl', rng.randint(1, 5)
        while p.poll() is None and time.time() - t0 < 300:              # after a random number of iterations ...
            if m.exists() and m.read_text().count('"total"') >= after: break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))                                 # ... at a random point of the next one
        os.killpg(p.pid, signal.SIGTERM)                                # the whole group, as a scheduler does
        _, err = p.communicate(timeout=300)
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert re.fullmatch(r'Stopped by SIGTERM at iteration \d+; saved .*last\.pt\. Continue with the same command '
                            r'and --resume\.', err.strip()), err[-3000:]
        it = torch.load(out / 'last.pt', weights_only=True)['iteration']
        assert 1 <= it < 10
        resumed = run(*common, '--out-dir', str(out), '--resume')
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        a, b = decoder_weights(tmp_path / 'u'), decoder_weights(out)
        assert all(torch.equal(a[k], b[k]) for k in a), f'trial {trial}: killed at iteration {it}'


def one_rank_world_two(monkeypatch, toy, out, *extra, stop_at=None, backend='gloo'):
    """The trainer on one process told by WORLD_SIZE that the world has 2, in a one-rank gloo group: every line a world of
    2 runs executes (it trains rank 0's half of each batch). A GPU machine runs the same harness on NCCL with one GPU."""
    import torch.distributed as dist
    from weclip.config import parse_config
    from weclip.train import train
    for k, v in dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0').items(): monkeypatch.setenv(k, v)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = parse_config([*ARGS, '--data-root', toy, '--iters', '4', '--batch-size', '1', '--eval-every', '2',
                            '--pseudo-images', '2', '--out-dir', str(out), *extra])
        return train(cfg, stop_at=stop_at)
    finally:
        if dist.is_initialized(): dist.destroy_process_group()


def test_world_two_code_on_one_process(toy, tmp_path, monkeypatch):
    """DDP wrapping, object collectives, flag all-reduces, two RNG slots in the checkpoint and an exact resume, on one
    process."""
    one_rank_world_two(monkeypatch, toy, tmp_path / 'a')
    state = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)
    assert state['iteration'] == 4 and len(state['rng']) == 2 and (tmp_path / 'a' / 'best.pt').is_file()
    one_rank_world_two(monkeypatch, toy, tmp_path / 'b', stop_at=3)   # stopped after 3 iterations ...
    one_rank_world_two(monkeypatch, toy, tmp_path / 'b', '--resume')  # ... and resumed
    a, b = decoder_weights(tmp_path / 'a'), decoder_weights(tmp_path / 'b')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_evaluation_is_agreed(toy, tmp_path, monkeypatch):
    "An error inside a rank's evaluation shard reaches every rank as one RankFailed line naming the rank and the error."
    import weclip.train
    from weclip.train import RankFailed
    def broken(*a, **kw): raise ValueError('the val split changed under the run')
    monkeypatch.setattr(weclip.train, 'val_miou', broken)
    with pytest.raises(RankFailed, match=r'^rank 0 of 2 failed in the evaluation at iteration 2, so every process stops: '
                                         r'ValueError: the val split changed under the run$'):
        one_rank_world_two(monkeypatch, toy, tmp_path / 'e')


def test_two_nodes_through_a_rendezvous(toy, tmp_path):
    """Two `torchrun --nnodes=2 --nproc_per_node=1` launches meet at a c10d rendezvous on 127.0.0.1, as two nodes of a
    cluster do: they train, rank 0 is killed inside its 2nd checkpoint write, and the same two commands with --resume
    finish bit-identical to an uninterrupted two-node run."""
    import socket
    def nodes(out, *extra, env=None):
        with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
               f'--rdzv-endpoint=127.0.0.1:{port}', f'--rdzv-id={out.name}', '-m', 'weclip.train', *ARGS,
               '--data-root', toy, '--iters', '3', '--batch-size', '1', '--eval-every', '3', '--out-dir', str(out), *extra]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}) for _ in range(2)]
        try: return [(p.communicate(timeout=300)[1], p.returncode) for p in ps]
        finally:
            for p in ps:
                if p.poll() is None: p.kill(); p.wait()
    for err, rc in nodes(tmp_path / 'n'): assert rc == 0, err[-3000:]
    state = torch.load(tmp_path / 'n' / 'last.pt', weights_only=True)
    assert state['iteration'] == 3 and len(state['rng']) == 2
    killed = nodes(tmp_path / 'k', env={'WECLIP_KILL_IN_SAVE': '2'})
    assert any(rc != 0 for _, rc in killed)
    assert torch.load(tmp_path / 'k' / 'last.pt', weights_only=True)['iteration'] == 1
    for err, rc in nodes(tmp_path / 'k', '--resume'): assert rc == 0, err[-3000:]
    a, b = decoder_weights(tmp_path / 'n'), decoder_weights(tmp_path / 'k')
    assert all(torch.equal(a[k], b[k]) for k in a)


PROBE = '''
import json, sys, time, numpy as np
import weclip.evaluate as E                      # as `python -m weclip.evaluate` does: torch and open_clip loaded here
if __name__ == '__main__':
    img = np.zeros((40, 50, 3), np.uint8); p = np.full((2, 40, 50), 0.5, np.float32)
    t0 = time.perf_counter()
    with E.CRFPool(2) as pool:
        [f.result() for f in [pool.submit(img, p) for _ in range(2)]]
        seconds = time.perf_counter() - t0
        loaded = pool.ex.submit(eval, "sorted({m.split('.')[0] for m in __import__('sys').modules} & "
                                      "{'torch', 'open_clip', 'probe'})").result()
        rss = [int(next(l for l in open(f'/proc/{q}/status') if l.startswith('VmRSS')).split()[1]) // 1024
               for q in pool.ex._processes]
    print(json.dumps(dict(loaded=loaded, seconds=seconds, rss_mb=rss)))
'''


def test_crf_workers_load_neither_torch_nor_the_main_module(tmp_path):
    """A CRF worker of a program started with `python -m` (as evaluate and predict are) imports weclip.crf alone, not
    the program's main module with torch and open_clip behind it: small and quick to start."""
    (tmp_path / 'probe.py').write_text(PROBE)
    r = subprocess.run([sys.executable, '-m', 'probe'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode and 'DenseCRF' in r.stderr: pytest.skip('pydensecrf2 is not installed')
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    print(doc)
    assert doc['loaded'] == [] and max(doc['rss_mb']) < 150, doc         # measured: 37 MB each, 0.4 s for both
