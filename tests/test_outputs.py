"The notebooks' committed outputs (present under every figure, current) and the offline HTML the README promises."
import importlib.util, re, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse, unquote

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('nb_outputs', ROOT / 'tools' / 'outputs.py')
outputs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(outputs)


def test_outputs_committed_and_current():
    bad = outputs.problems()
    assert not bad, (f'{len(bad)} problems with the committed notebook outputs (fix: python tools/outputs.py refresh, '
                     'then commit):\n' + '\n'.join(bad[:30]))


def test_stale_output_is_caught(tmp_path):
    "A cell edited after it ran, and a figure cell without its picture, are both reported."
    import json
    src = (ROOT / 'nbs' / '10c_pretrained.ipynb').read_text()
    nb = json.loads(src)
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and c.get('outputs') and c['metadata'].get('weclip'))
    cell['source'] = ''.join(cell['source']) + '\n# edited after the run'
    fig = next(c for c in nb['cells'] if c['cell_type'] == 'code' and outputs.FIGURE.search(''.join(c['source']))
               and 'export' not in outputs._directives(''.join(c['source'])))
    fig['outputs'] = []
    p = tmp_path / '10c_pretrained.ipynb'; p.write_text(json.dumps(nb))
    bad = outputs.problems([p])
    assert any('stale' in b and cell['id'] in b for b in bad), bad
    assert any('no picture' in b and fig['id'] in b for b in bad), bad


def test_offline_html(tmp_path):
    "`jupyter nbconvert --to html --config tools/offline_html.py` loads MathJax from disk and nothing from the network."
    r = subprocess.run([sys.executable, '-m', 'jupyter', 'nbconvert', '--to', 'html', '--config',
                        str(ROOT / 'tools' / 'offline_html.py'), str(ROOT / 'nbs' / '05_losses.ipynb'),
                        '--output-dir', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    html = (tmp_path / '05_losses.html').read_text()
    scripts = [s for s in re.findall(r'<script[^>]*\ssrc="([^"]*)"', html) if s]
    assert scripts and not [s for s in scripts if s.startswith(('http:', 'https:', '//'))], scripts
    mathjax = next(s for s in scripts if 'MathJax.js' in s)
    path = Path(unquote(urlparse(mathjax).path))
    assert path.is_file() and (path.parent / 'config' / 'TeX-AMS-MML_HTMLorMML-full.js').is_file(), mathjax
    assert '$$' in html or '\\(' in html   # the equations are left for MathJax to typeset
