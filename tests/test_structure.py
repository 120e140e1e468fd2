"""The package's shape: no import cycle, the trainer on top, and imports inside functions only where they must be."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'weclip'
OPTIONAL = ('matplotlib', 'pydensecrf', 'torch.utils.tensorboard', 'huggingface_hub', 'cv2')   # not needed to train or evaluate


def modules():
    return {p.stem: ast.parse(p.read_text()) for p in PKG.glob('*.py') if not p.stem.startswith('_')}


def weclip_imports(tree, top_level=True):
    "Names of the weclip modules a module imports (at module level, or inside functions)."
    found = set()
    nodes = tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in (nodes if top_level else [x for f in nodes for x in ast.walk(f)]):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1: found.add(mod.split('.')[0])
            elif mod.startswith('weclip.'): found.add(mod.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('weclip.')}
    return found


def test_no_import_cycle_and_train_on_top():
    mods = modules()
    graph = {m: (weclip_imports(t) | weclip_imports(t, top_level=False)) & set(mods) for m, t in mods.items()}
    state = {}
    def visit(m, path):
        if state.get(m) == 'done': return
        assert state.get(m) != 'open', 'import cycle: ' + ' -> '.join(path + [m])
        state[m] = 'open'
        for n in sorted(graph[m]): visit(n, path + [m])
        state[m] = 'done'
    for m in sorted(graph): visit(m, [])
    def below(m, seen=None):
        seen = set() if seen is None else seen
        for n in graph[m] - seen: seen.add(n); below(n, seen)
        return seen
    assert 'train' not in below('evaluate')
    assert not [m for m in graph if 'train' in graph[m]], 'nothing imports the trainer'
    for m in ('config', 'checkpoint', 'metrics'): assert m in below('train') and m in below('evaluate') | {'checkpoint'}



def test_function_level_imports_say_why():
    """An import inside a function is for an optional dependency, or its line says why (a measured start-up cost)."""
    bad = []
    for p in PKG.glob('*.py'):
        if p.stem.startswith('_'): continue
        lines = p.read_text().splitlines()
        for f in [n for n in ast.walk(ast.parse(lines and '\n'.join(lines))) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)): continue
                names = [node.module or ''] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if all(n.startswith(OPTIONAL) for n in names) or '#' in lines[node.lineno - 1]: continue
                bad.append(f'{p.name}:{node.lineno}: {lines[node.lineno - 1].strip()}')
    assert not bad, 'imports inside functions without a reason:\n' + '\n'.join(sorted(set(bad)))


def test_readme_is_not_generated():
    "README.md is written by hand: settings.ini's readme_nb must name no notebook, or nbdev_readme would overwrite it."
    import configparser
    cfg = configparser.ConfigParser(); cfg.read(PKG.parent / 'settings.ini')
    nb = cfg['DEFAULT']['readme_nb']
    assert nb and not (PKG.parent / 'nbs' / nb).exists(), nb


def test_index_quick_start_is_the_readme_s():
    "The landing page's quick start is the README's, word for word: one set of commands and one time, wherever it is read."
    import json, re
    root = PKG.parent
    readme = re.search(r'^## Quick start\n.*?(?=^## )', (root / 'README.md').read_text(), re.S | re.M)
    assert readme, 'README.md has no "## Quick start" section'
    cells = [''.join(c['source']) for c in json.loads((root / 'nbs' / 'index.ipynb').read_text())['cells']]
    index = [s for s in cells if s.startswith('## Quick start')]
    assert len(index) == 1, 'nbs/index.ipynb needs one cell that starts with "## Quick start"'
    assert index[0].strip() == readme.group(0).strip()
