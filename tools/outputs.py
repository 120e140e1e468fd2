"""The notebooks' committed outputs: re-execute them in place, or check that they are present and current.

    python tools/outputs.py refresh [NOTEBOOK ...]   # execute (default: every notebook in nbs/), keep the outputs
    python tools/outputs.py check                    # what CI runs (through tests/test_outputs.py)

`refresh` runs each notebook the way `nbdev_test` does (cells marked `#| slow`, `#| gpu` or `#| eval: false` are
skipped), except that a notebook with a CPU-sized `SMOKE` mode (`SMOKE_RUNS`: 13_reproduce) runs its `#| gpu` cells
in that mode, so its recipe shows the format of every step (`nbdev_test` without `--flags gpu` still skips them).
It runs with one BLAS thread and matplotlib's plain PNG output, so a rerun draws the same pictures. It stamps every
executed code cell with a hash of its source, the library's sources and the shipped weights (cell metadata `weclip`,
which `nbdev_clean` keeps), then runs `nbdev_clean`. `check` fails when a figure cell has no picture, when an output
is stale (its stamp no longer matches: the cell, the library or the weights changed since it ran), or when the
notebooks outgrow 1 MB each or 7 MB together.
"""
from __future__ import annotations
import hashlib, json, os, re, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
MAX_NB, MAX_ALL = 1_000_000, 7_000_000   # the figures with their colour bars take about 6 MB
SKIP_FLAGS = ('slow', 'gpu')
# notebooks whose `#| gpu` cells have a SMOKE mode that runs on a CPU: `refresh` executes those cells with this
# environment (the one tests/test_reproduce.py gives them) and `check` wants their outputs like any other cell's
SMOKE_RUNS = {'13_reproduce': {'WECLIP_SMOKE': '1', 'CUDA_VISIBLE_DEVICES': ''}}
STAGES = ('00_backbone', '01_prompts', '02_cam', '03_decoder', '04_rfm', '05_losses', '08_model', '10_evaluate',
          '10b_predict', '11_train', '06b_owndata')   # the stage notebooks: every `##` section with code shows an output
FIGURE = re.compile(r'^(?!\s*#).*(plt\.|\bshow_(?!doc\b)\w+\(|\.imshow\(|\bsubplots\()', re.M)   # a cell that draws


def _directives(src: str) -> dict:
    "The `#| key value` lines at the top of a cell."
    out = {}
    for line in src.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+:?)\s*(.*)', line)
        if not m: break
        out[m[1]] = m[2].strip()
    return out


def skipped(src: str, smoke: bool = False) -> bool:
    "Whether `refresh` skips this code cell: what `nbdev_test` (without --flags) skips, but `#| gpu` cells run when `smoke`."
    d = _directives(src)
    flags = tuple(f for f in SKIP_FLAGS if not (smoke and f == 'gpu'))
    return any(f in d for f in flags) or d.get('eval:', '').lower() == 'false' or 'nbdev_export(' in src


def library_digest() -> str:
    "One hash of what every output depends on besides its own cell: the library's sources and the shipped weights."
    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / 'weclip').rglob('*') if p.is_file() and p.suffix in ('.py', '.pt', '.json')
                   and p.name != '_modidx.py' and '__pycache__' not in p.parts)
    for p in files: h.update(p.relative_to(ROOT).as_posix().encode()); h.update(p.read_bytes())
    return h.hexdigest()


def stamp(src: str, digest: str) -> str: return hashlib.sha256((digest + '\0' + src).encode()).hexdigest()[:16]


def _source(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def refresh_one(path: str) -> str:
    "Execute one notebook in place (outputs kept, code cells stamped); returns a line for the log."
    os.environ['OMP_NUM_THREADS'] = '1'
    smoke = Path(path).stem in SMOKE_RUNS
    if smoke: os.environ.update(SMOKE_RUNS[Path(path).stem])   # before torch and the notebook read it (a process of its own)
    import time
    import torch; torch.set_num_threads(1)
    from execnb.shell import CaptureShell
    from execnb.nbio import read_nb, write_nb
    path = Path(path).resolve()
    t, nb, digest = time.time(), read_nb(path), library_digest()
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = []       # a cell that prints nothing now must not keep its old output
    shell = CaptureShell(path, mpl_format='png')
    cwd = os.getcwd(); os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type != 'code' or skipped(c.source, smoke))
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type != 'code': continue
        if skipped(c.source, smoke): c.outputs = []; c.metadata.pop('weclip', None)
        else: c.metadata['weclip'] = stamp(c.source, digest)
    write_nb(nb, path)
    return f'{path.name}: {time.time() - t:.0f} s'


def refresh(paths=None, workers: int = 2):
    "Execute `paths` (default: every notebook) in place, `workers` at a time, then `nbdev_clean` them."
    paths = [str(p) for p in (paths or sorted(NBS.glob('*.ipynb')))]
    def one(p):   # a fresh interpreter per notebook, as nbdev_test gives each its own kernel
        r = subprocess.run([sys.executable, __file__, 'refresh-one', p], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS='1'))
        return (r.stdout.strip() if r.returncode == 0 else f'{Path(p).name}: FAILED\n{r.stderr[-3000:]}'), r.returncode
    failed = []
    with ThreadPoolExecutor(workers) as ex:
        for (line, rc), p in zip(ex.map(one, paths), paths):
            print(line, flush=True)
            if rc: failed.append(Path(p).name)
    for p in paths: subprocess.run(['nbdev_clean', '--fname', p], cwd=ROOT, check=True)
    if failed: sys.exit(f'{len(failed)} notebooks failed: {", ".join(failed)} (their outputs are not refreshed)')


def problems(paths=None) -> list[str]:
    "Every reason the committed outputs are not what a rerun gives, as lines."
    digest, out, total = library_digest(), [], 0
    for p in paths or sorted(NBS.glob('*.ipynb')):
        size = p.stat().st_size; total += size
        if size > MAX_NB: out.append(f'{p.name}: {size / 1e6:.2f} MB, over the 1 MB a notebook may have')
        for i, c in enumerate(json.loads(p.read_text())['cells']):
            if c['cell_type'] != 'code': continue
            src = _source(c)
            if skipped(src, p.stem in SMOKE_RUNS): continue
            where = f"{p.name} cell {i} ({c.get('id', '?')})"
            if FIGURE.search(src) and 'export' not in _directives(src) and not any('image/png' in o.get('data', {}) for o in c.get('outputs', [])):
                out.append(f'{where}: draws a figure, and no picture is committed under it')
            if c.get('outputs') and c.get('metadata', {}).get('weclip') != stamp(src, digest):
                out.append(f'{where}: its output is stale (the cell, the library or the weights changed since it ran)')
        if p.stem in STAGES: out += [f'{p.name}: section "{t}" runs code and shows no output under it' for t in silent_sections(p)]
    if total > MAX_ALL: out.append(f'nbs/: {total / 1e6:.2f} MB of notebooks, over the {MAX_ALL / 1e6:.0f} MB they may have together')
    return out


def silent_sections(path) -> list[str]:
    "Titles of the `##` sections of a notebook whose shown code cells (not exported, hidden or skipped) print nothing."
    sections, title = {}, None
    for c in json.loads(Path(path).read_text())['cells']:
        src = _source(c)
        if c['cell_type'] == 'markdown':
            m = re.search(r'^## (.+)$', src, re.M)
            if m: title = m[1].strip(); sections.setdefault(title, [0, 0])
            continue
        d = _directives(src)
        if title is None or 'export' in d or 'hide' in d or skipped(src, Path(path).stem in SMOKE_RUNS): continue
        sections[title][0] += 1; sections[title][1] += bool(c.get('outputs'))
    return [t for t, (n, shown) in sections.items() if n and not shown]


if __name__ == '__main__':
    cmd, args = (sys.argv[1] if len(sys.argv) > 1 else ''), sys.argv[2:]
    if cmd == 'refresh': refresh([Path(a) for a in args] or None)
    elif cmd == 'refresh-one': print(refresh_one(args[0]))
    elif cmd == 'check':
        bad = problems([Path(a) for a in args] or None)
        print('\n'.join(bad) or 'ok: every figure cell has its picture and every output is current')
        if bad: sys.exit(f'{len(bad)} problems: run `python tools/outputs.py refresh` (or name the notebooks) and commit')
    else: sys.exit(__doc__)
