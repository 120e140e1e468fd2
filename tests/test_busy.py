"""A busy machine: the command-line modules ask OpenMP's threads to spin only briefly before they sleep while they wait
(unless the user chose a policy), and they ask it before PyTorch loads OpenMP, the only moment OpenMP reads it."""
import ast, os, subprocess, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1] / 'weclip'
CLIS = ('train', 'evaluate', 'predict', 'bench')


def _is_wait_policy_default(node) -> bool:
    return isinstance(node, ast.If) and "os.environ['GOMP_SPINCOUNT'] = '10000'" in ast.unparse(node)


@pytest.mark.parametrize('name', CLIS)
def test_wait_policy_is_set_before_anything_loads_torch(name):
    body = ast.parse((PKG / f'{name}.py').read_text()).body
    where = next(i for i, n in enumerate(body) if _is_wait_policy_default(n))
    before = [n for n in body[:where] if isinstance(n, (ast.Import, ast.ImportFrom))]
    # only the standard library (and __future__) may be imported before it: none of them loads torch
    names = {a.name.split('.')[0] for n in before if isinstance(n, ast.Import) for a in n.names} | \
            {(n.module or '.').split('.')[0] or '.' for n in before if isinstance(n, ast.ImportFrom)}
    assert names and not names - set(sys.stdlib_module_names) - {'__future__'}, names


@pytest.mark.parametrize('given, spin', [({}, '10000'), ({'OMP_WAIT_POLICY': 'ACTIVE'}, '-'),
                                         ({'OMP_WAIT_POLICY': 'PASSIVE'}, '-'), ({'GOMP_SPINCOUNT': '7'}, '7')])
def test_wait_policy_default_and_the_users_choice(given, spin):
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')} | given
    code = "import os, weclip.train, torch; print(os.environ.get('GOMP_SPINCOUNT', '-'))"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [spin]        # a policy the user chose is theirs: nothing set beside it
