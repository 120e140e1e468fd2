"""`.ci/gpu`, the script a CUDA machine runs, is checked here without one: it parses, shellcheck (where installed)
finds nothing, and every step has a check and a time limit. `DEVICE=cpu BUDGET=2400 bash .ci/gpu` runs its steps on a
CPU (minutes: not in CI)."""
import re, shutil, subprocess
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parents[1] / '.ci' / 'gpu'


def test_parses():
    r = subprocess.run(['bash', '-n', str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_shellcheck_is_clean():
    r = subprocess.run(['shellcheck', str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_every_step_is_limited_and_checked():
    text = SCRIPT.read_text()
    steps = re.findall(r'^\s*step (\S+) (\S+) (\S+) ', text, re.M)
    assert len(steps) >= 12, steps
    names = [n for n, _, _ in steps]
    assert len(set(names)) == len(names), names                         # one log and one verdict per name
    for name, limit, check in steps:
        assert limit.isdigit() and 0 < int(limit) <= 240, (name, limit)
        assert re.search(rf'^{check}\(\) {{', text, re.M), f'step {name}: no check function {check}'
    assert re.search(r'^DEVICE=\$\{DEVICE:-cuda\}; BUDGET=\$\{BUDGET:-480\}', text, re.M)   # 8 minutes on a GPU
