"The notebooks' committed outputs (present under every figure, current) and the offline HTML the README promises."
import importlib.util, re, shutil, subprocess, sys
import pytest
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


def test_smoke_cells_run_in_refresh_and_are_checked(tmp_path):
    "13_reproduce's `#| gpu` cells run (SMOKE) under refresh and must show their outputs; elsewhere, and for nbdev_test, they are skipped."
    import json
    test = lambda src, smoke: outputs.skipped(src, smoke)
    assert test('#| gpu\nx = 1', False) and not test('#| gpu\nx = 1', True)
    assert test('#| slow\nx = 1', True) and test('#| eval: false\nx = 1', True) and not test('x = 1', False)
    assert '13_reproduce' in outputs.SMOKE_RUNS and outputs.SMOKE_RUNS['13_reproduce']['WECLIP_SMOKE'] == '1'
    assert 'gpu' in (ROOT / 'settings.ini').read_text().split('tst_flags')[1].splitlines()[0]   # nbdev_test skips them
    nb = json.loads((ROOT / 'nbs' / '13_reproduce.ipynb').read_text())
    gpu = [c for c in nb['cells'] if c['cell_type'] == 'code' and 'gpu' in outputs._directives(''.join(c['source']))]
    assert len(gpu) >= 5 and all(c.get('outputs') for c in gpu)          # committed: the SMOKE run's outputs
    fig = next(c for c in gpu if outputs.FIGURE.search(''.join(c['source'])))
    fig['outputs'] = []
    stale = next(c for c in gpu if c is not fig)
    stale['source'] = ''.join(stale['source']) + '\n# edited after the run'
    p = tmp_path / '13_reproduce.ipynb'; p.write_text(json.dumps(nb))
    bad = outputs.problems([p])
    assert any('no picture' in b and fig['id'] in b for b in bad), bad
    assert any('stale' in b and stale['id'] in b for b in bad), bad
    q = tmp_path / 'other' / '99_other.ipynb'; q.parent.mkdir(); q.write_text(json.dumps(nb))   # not a SMOKE notebook
    assert not any(c['id'] in b for b in outputs.problems([q]) for c in (fig, stale))


def _tiny_notebook(path):
    "A notebook with each thing the offline pages must handle."
    import nbformat
    from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell, new_output
    nb = new_notebook(cells=[
        new_markdown_cell('# Tiny\n\n$$1/\\tau = e^{\\texttt{logit\\_scale}}$$ and [the RFM](04_rfm.ipynb#Layers)\n\n'
                          "$\\sigma'(z)$ and $S_{ij'}$ aren't in the same formula\n\n"
                          '| a | b |\n|---|---|\n| x | `--source seg\\|cam\\|pseudo` |'),
        new_code_cell('#| hide\nSECRET_HIDDEN_CELL = 1'),
        new_code_cell('#| echo: false\nSECRET_ECHO_SOURCE = 2',
                      outputs=[new_output('stream', name='stdout', text='shown output of a hidden input\n')]),
        new_code_cell('#| export\ndef shown(): return 3')])
    nbformat.write(nb, str(path))


def _moved_pages(tmp_path) -> Path:
    "The tiny notebook's offline pages, written by `tools/offline_html.py` and then moved to another folder."
    nbp = tmp_path / 'src' / '99_tiny.ipynb'; nbp.parent.mkdir(); _tiny_notebook(nbp)
    out = tmp_path / 'pages'
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'offline_html.py'), str(out), str(nbp)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    moved = tmp_path / 'elsewhere' / 'copy'; shutil.copytree(out, moved); shutil.rmtree(out)
    return moved


def test_offline_html(tmp_path):
    "`python tools/offline_html.py OUT NB`: a folder that still shows its equations after it is moved, as nbdev's docs show it."
    moved = _moved_pages(tmp_path)
    html = (moved / '99_tiny.html').read_text()
    scripts = [s for s in re.findall(r'<script[^>]*\ssrc="([^"]*)"', html)]
    mathjax = [s for s in scripts if 'MathJax.js' in s]
    assert len(mathjax) == 1 and not re.match(r'[a-z]+:|/', mathjax[0]), scripts           # relative
    assert (moved / urlparse(mathjax[0]).path).is_file()                                  # and there in the copy
    assert (moved / 'mathjax' / 'config' / 'TeX-AMS-MML_HTMLorMML-full.js').is_file()
    assert not [s for s in scripts if not s or s.startswith(('http:', 'https:', '//', 'file:'))], scripts
    for absolute in (str(tmp_path), str(ROOT), 'site-packages', 'file://'): assert absolute not in html, absolute
    assert 'SECRET_HIDDEN_CELL' not in html                                      # #| hide: the cell is not shown
    assert 'SECRET_ECHO_SOURCE' not in html and 'shown output of a hidden input' in html   # #| echo: false: its output only
    assert 'def' in html and 'shown' in html and '#| export' not in html and '#|' not in html   # directives not shown
    assert 'In&nbsp;[' not in html and 'class="jp-InputPrompt' not in html             # no empty prompts
    assert 'href="04_rfm.html#Layers"' in html and '.ipynb' not in html         # links between pages
    assert '\\texttt{logit_scale}' in html and 'seg|cam|pseudo' in html        # as MathJax and a reader should see them
    assert '$$' in html                                                          # equations left for MathJax
    assert "\\sigma^{\\prime}(z)" in html and "S_{ij^{\\prime}}" in html and "aren't" in html   # primes MathJax 2 can draw


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')


@pytest.mark.skipif(CHROMIUM is None, reason='no Chromium on this machine (Debian: apt install chromium)')
def test_offline_html_typesets_in_a_browser(tmp_path):
    "The moved pages opened in headless Chromium: MathJax typesets every formula, with no processing error."
    page = _moved_pages(tmp_path) / '99_tiny.html'
    r = subprocess.run([CHROMIUM, '--headless=new', '--no-sandbox', '--disable-gpu', '--allow-file-access-from-files',
                        '--virtual-time-budget=20000', '--dump-dom', page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert 'MathJax_Display' in dom or 'class="MathJax' in dom, dom[-2000:]      # typeset, from the copied MathJax
    assert 'Math Processing Error' not in dom, re.findall(r'.{300}Math Processing Error', dom)[:2]
    assert 'class="MathJax_Error"' not in dom
