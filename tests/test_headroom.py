"""The headroom measurement (`weclip.headroom`, notebook 07c) and the results stored in the package.

The stored results (`weclip/assets/weclip-headroom.json`, served by `stored_headroom`) are 400 fresh scenes of the
'headroom' split, seed 2. The tests measure the first N of those scenes again and fail when a stored number is wrong:
each scene's mIoU must match the stored one (up to the last bits a CPU's kernels may move), and each stored pooled
mIoU must lie within four standard errors of the fresh N-scene one (a bootstrap over the fresh scenes). Every trained
row is measured again with the decoder it was stored from, shipped beside the tiny CLIP (`stored_decoder`). The
default world must also meet `TARGETS` on these scenes, so a change to the world, the tiny
CLIP or the stages that takes RFM's headroom away fails here.
"""
import contextlib, io, json, os, subprocess, sys
import numpy as np
import pytest
import torch
from weclip.headroom import (check_targets, headroom_table, main, stored_headroom, stored_decoder, headroom_batch,
                             headroom_model, fresh_scenes, METHODS, CONTROLS)
from weclip.metrics import confusion, miou
from weclip.pretrained import TOY_CHECKPOINT
from weclip.checkpoint import load_checkpoint
from weclip.toy import toy_config

N = int(os.environ.get('WECLIP_HEADROOM_N', 64))   # scenes measured again (the stored results have 400)
STORED = stored_headroom()


def fresh_confusions(stored, checkpoint=None, variant='official', methods=tuple(METHODS)):
    "{(method, 2): ([confusion of each scene's M_f labels], [... of its M_p])} on the first N stored scenes."
    model = headroom_model(checkpoint, None, toy_config('default').classes, variant)
    assert model.variant == stored['variant']
    methods = [m for m in methods if m != 'trained' or checkpoint is not None]
    out = {}
    for start in range(0, N, 16):
        x, y, gt = fresh_scenes(min(16, N - start), stored['seed'], 'default', start)
        for key, pair in headroom_batch(model, x, y, gt, (2,), methods).items():
            c = out.setdefault(key, ([], []))
            for i, lab in enumerate(pair): c[i].extend(confusion(lab[b].cpu(), gt[b], model.n_classes) for b in range(len(gt)))
    return out


def pooled(confs, idx=None):
    "mIoU (%) of the summed confusions (of the scenes `idx`, default all), as `measure_headroom` pools them."
    return 100 * miou(sum(confs[i] for i in (range(len(confs)) if idx is None else idx)))[0]


def as_result(confs, stored):
    "The fresh measurement in `measure_headroom`'s shape, for `check_targets`."
    return dict(stored, n=N, alphas=[2], rows={k: {'M_f': pooled(c[0]), 'M_p': pooled(c[1])} for k, c in confs.items()})


@pytest.fixture(scope='module')
def official(): return fresh_confusions(STORED['official'], TOY_CHECKPOINT)


@pytest.fixture(scope='module')
def paper(): return fresh_confusions(STORED['paper'], stored_decoder('paper'))


@pytest.fixture(scope='module')
def controls():
    return {k: fresh_confusions(r, stored_decoder(k), methods=('trained',)) for k, r in STORED['controls'].items()}


def check_against_stored(confs, stored, seed=0):
    """Each scene's mIoU as stored (the mean difference under half a point: CPU kernels move last bits only), and each
    stored pooled mIoU within four standard errors of the fresh N-scene pooled one: the standard error of an N-scene
    pooled mIoU, from a bootstrap over the fresh scenes, shrunk for the N being part of the stored n."""
    rng = np.random.default_rng(seed)
    for key, cs in confs.items():
        for col, c in zip(('M_f', 'M_p'), cs):
            per = np.array([100 * miou(x)[0] for x in c])
            assert np.abs(per - np.array(stored['scenes'][key][col][:N])).mean() < 0.5, (key, col, 'per-scene mIoU')
            boot = [pooled(c, rng.integers(0, N, N)) for _ in range(200)]
            se = np.std(boot, ddof=1) * np.sqrt(1 - N / stored['n'])
            assert abs(pooled(c) - stored['rows'][key][col]) < 4 * se + 0.5, (key, col, pooled(c), stored['rows'][key][col], se)


def test_stored_results_describe_what_they_measured():
    for name, variant in (('official', 'official'), ('paper', 'paper')):
        s = STORED[name]
        assert (s['n'], s['seed'], s['split'], s['variant']) == (400, 2, 'headroom', variant)
        for key, row in s['rows'].items():
            assert len(s['scenes'][key]['M_p']) == s['n'] and 0 <= row['M_p'] <= 100
    assert ('trained', 2) in STORED['official']['rows'] and ('trained', 1) in STORED['official']['rows']
    assert ('trained', 2) in STORED['paper']['rows']
    assert set(STORED['controls']) == set(CONTROLS)
    for name, r in STORED['controls'].items():
        assert (r['n'], r['seed'], r['variant'], r['checkpoint']) == (400, 2, 'official', stored_decoder(name).name)
        assert set(r['rows']) == {('trained', 2)} and len(r['scenes'][('trained', 2)]['M_p']) == r['n']
    assert [(r['variant'], r['seed'], r.get('control')) for r in STORED['runs']] == (
        [(v, s, None) for v in ('official', 'paper') for s in (0, 1, 2)] + [('official', 0, c) for c in CONTROLS])
    for name in ('official', 'paper', *CONTROLS):            # each shipped decoder's run report is its runs row
        report = load_checkpoint(stored_decoder(name))['results']
        row = [r for r in STORED['runs'] if r['seed'] == 0 and r.get('control', r['variant']) == name]
        assert len(row) == 1 and row[0]['results'] == report, name


def test_stored_official_rule_matches_a_fresh_measurement(official):
    check_against_stored(official, STORED['official'])
    rows_at_2 = {k for k in STORED['official']['rows'] if k[1] in (None, 2)}
    assert set(official) == rows_at_2


def test_stored_paper_rule_matches_a_fresh_measurement(paper):
    check_against_stored(paper, STORED['paper'])
    assert set(paper) == set(STORED['paper']['rows'])


def test_stored_control_runs_match_a_fresh_measurement(controls):
    for name, confs in controls.items():
        check_against_stored(confs, STORED['controls'][name])


def test_the_check_catches_wrong_stored_numbers(official):
    s = STORED['official']
    swapped = dict(s, rows=dict(s['rows']))                         # two rows' pooled numbers exchanged
    swapped['rows']['static', 2], swapped['rows']['oracle', 2] = s['rows']['oracle', 2], s['rows']['static', 2]
    with pytest.raises(AssertionError): check_against_stored(official, swapped)
    shifted = dict(s, scenes=dict(s['scenes']))                     # one row's scenes a point off
    shifted['scenes']['trained', 2] = {k: [v + 1 for v in vs] for k, vs in s['scenes']['trained', 2].items()}
    with pytest.raises(AssertionError): check_against_stored(official, shifted)


def test_default_world_meets_the_targets(official):
    res = as_result(official, STORED['official'])
    assert all(ok for *_, ok in check_targets(res).values()), headroom_table(res, targets=True)


def test_oracle_affinity_is_no_worse_than_static(official):
    # A wiring check: an A_f built from the true masks only removes cross-class mass from the attention RFM
    # propagates by, so it must not do worse than the frozen attention alone.
    r = as_result(official, STORED['official'])['rows']
    assert r['oracle', 2]['M_p'] >= r['static', 2]['M_p']


def test_cli_help_and_bad_input():
    out = subprocess.run([sys.executable, '-m', 'weclip.headroom', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'oracle' in out.stdout and '--checkpoint' in out.stdout
    for bad, msg in ((['--world', 'nope'], 'unknown preset'), (['--set', 'scale=0.5,0.6'], 'scale'),
                     (['--alpha', '0'], 'alpha')):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
            main(bad + ['--n', '1'])
        assert msg in str(e.value), (bad, e.value)


def test_json_is_written_whole(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = main(['--n', '1', '--alpha', '2', '--json', str(tmp_path / 'h.json')])
    doc = json.loads((tmp_path / 'h.json').read_text())
    assert doc['rows'] and len(doc['rows']) == len(res['rows']) and len(doc['scenes']) == len(res['scenes'])
    assert not list(tmp_path.glob('.*'))
