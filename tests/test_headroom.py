"""The toy world's headroom for RFM (issue 18), measured with `weclip.headroom` on fresh scenes.

`test_default_world_meets_the_targets` is the guard the issue asks for: the default world must leave RFM room to
earn its place (`weclip.headroom.TARGETS`, at α=2 on the pseudo labels). The current default world does not, so the
test is a *strict* expected failure: on 400 fresh scenes (seed 2) no propagation gives 85.5, static refinement 64.9,
oracle RFM 78.3, constant-A_f RFM 62.3. When a world with headroom becomes the default, the strict xfail turns into a
failure that asks for the marker to be removed, and from then on the test fails when the world loses its headroom.

`test_large_parts_world_leaves_room_for_propagation` guards the `large-parts` preset found in issue 18: on 400 fresh
scenes (seed 2) it meets the first two targets (no propagation 51.8 < static 56.3 - 3; oracle 68.4 >= static + 5) and
misses the third by 0.9 (constant 55.3), which no world change reached with the shipped tiny CLIP; only the first two
are asserted.
"""
import contextlib, io, os, subprocess, sys
import pytest
from weclip.headroom import measure_headroom, check_targets, headroom_table, main

N = int(os.environ.get('WECLIP_HEADROOM_N', 96))   # scenes: 96 take about 30 s on one core; the report uses 400
SEED = 2                                            # a scene set no world or knob was chosen on


@pytest.fixture(scope='module')
def default_world():
    return measure_headroom('default', n=N, seed=SEED, alphas=(2,), progress=None)


@pytest.mark.xfail(strict=True, reason='issue 18: the current default world has no headroom for RFM (its tiny CLIP '
                   'CAM covers whole objects and its attention already is a semantic affinity): no propagation 85.5 > '
                   'static 64.9 - 3 on 400 fresh scenes')
def test_default_world_meets_the_targets(default_world):
    t = check_targets(default_world)
    assert all(ok for *_, ok in t.values()), headroom_table(default_world)


def test_oracle_affinity_is_no_worse_than_static(default_world):
    # Not a target, a wiring check: an A_f built from the true masks only removes cross-class mass from the attention
    # RFM propagates by, so it must not do worse than the frozen attention alone (measured +13.4 on 400 scenes).
    r = default_world['rows']
    assert r['oracle', 2]['M_p'] >= r['static', 2]['M_p'], headroom_table(default_world)


def test_large_parts_world_leaves_room_for_propagation():
    res = measure_headroom('large-parts', n=N, seed=SEED, alphas=(2,), progress=None)
    t = check_targets(res)
    for name in ('no propagation < static - 3', 'oracle >= static + 5'):
        assert t[name][-1], f'{name} fails:\n' + headroom_table(res)


def test_cli_help_and_bad_input():
    out = subprocess.run([sys.executable, '-m', 'weclip.headroom', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'oracle' in out.stdout and '--checkpoint' in out.stdout
    for bad, msg in ((['--world', 'nope'], 'unknown preset'), (['--set', 'scale=0.5,0.6'], 'scale'),
                     (['--alpha', '0'], 'alpha')):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
            main(bad + ['--n', '1'])
        assert msg in str(e.value), (bad, e.value)
