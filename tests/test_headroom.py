"""The toy world's headroom for RFM (issue 18), measured with `weclip.headroom` on fresh scenes.

`test_default_world_meets_the_targets` is the guard the issue asks for: the default world must leave RFM room to
earn its place (`weclip.headroom.TARGETS`, at α=2 on the pseudo labels). On 400 fresh scenes (seed 2) the default
world (`large-parts` with `body_tint=0.25`) and its tiny CLIP give no propagation 38.5, static refinement 67.9, oracle
RFM 81.1, constant-A_f RFM 60.5: margins +26.4, +8.2 and +5.4. The test measures the first N of those scenes and
fails when a change to the world, the tiny CLIP or the stages takes the headroom away.
"""
import contextlib, io, os, subprocess, sys
import pytest
from weclip.headroom import measure_headroom, check_targets, headroom_table, main

N = int(os.environ.get('WECLIP_HEADROOM_N', 96))   # scenes: 96 take about 30 s on one core; the report uses 400
SEED = 2                                            # a scene set no world or knob was chosen on


@pytest.fixture(scope='module')
def default_world():
    return measure_headroom('default', n=N, seed=SEED, alphas=(2,), progress=None)


def test_default_world_meets_the_targets(default_world):
    t = check_targets(default_world)
    assert all(ok for *_, ok in t.values()), headroom_table(default_world)


def test_oracle_affinity_is_no_worse_than_static(default_world):
    # Not a target, a wiring check: an A_f built from the true masks only removes cross-class mass from the attention
    # RFM propagates by, so it must not do worse than the frozen attention alone (measured +13.2 on 400 scenes).
    r = default_world['rows']
    assert r['oracle', 2]['M_p'] >= r['static', 2]['M_p'], headroom_table(default_world)


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
    import json
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = main(['--n', '1', '--alpha', '2', '--json', str(tmp_path / 'h.json')])
    doc = json.loads((tmp_path / 'h.json').read_text())
    assert doc['rows'] and len(doc['rows']) == len(res['rows']) and not list(tmp_path.glob('.*'))
