"""The reproduction notebook's GPU cells in SMOKE mode: every step of the VOC and COCO recipe, end to end, on the CPU."""
import os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_notebook_smoke():
    nbdev_test = shutil.which('nbdev_test') or str(Path(sys.executable).parent / 'nbdev_test')
    r = subprocess.run([nbdev_test, '--path', str(ROOT / 'nbs' / '13_reproduce.ipynb'), '--flags', 'gpu'],
                       capture_output=True, text=True, cwd=ROOT, timeout=1200,
                       env={**os.environ, 'WECLIP_SMOKE': '1', 'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 0 and 'Success' in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
