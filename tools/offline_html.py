"""The notebooks as HTML pages that read anywhere without a network: a folder you can copy, zip or open from a USB stick.

    python tools/offline_html.py OUTDIR [NOTEBOOK ...]     # default: every notebook in nbs/

Each notebook becomes OUTDIR/NAME.html, rendered from its committed outputs (nothing runs). MathJax is copied into
OUTDIR/mathjax/ (from the `jupyter-server-mathjax` package that `[dev]` installs) and every page loads it by a
relative URL, so the folder keeps its equations wherever it goes; links between notebooks (`04_rfm.ipynb`) point at
the pages (`04_rfm.html`). The pages show what nbdev's documentation shows: cells marked `#| hide` (or
`#| include: false`) are left out, `#| echo: false` keeps only a cell's output, `#| output: false` only its code, the
`#|` lines themselves are not shown, and neither are the empty `In [ ]:` prompts. Two spellings that GitHub's
Markdown needs and MathJax 2 reads differently are rewritten on the way: `\\_` inside `\\texttt{...}` (MathJax's
text mode would print the backslash) and `\\|` inside a code span of a table row (a table's escaped pipe, shown as
`|`).
"""
from __future__ import annotations
import re, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATHJAX_CONFIG = 'TeX-AMS-MML_HTMLorMML-full,Safe'


def _directives(src: str) -> tuple[dict, str]:
    "The `#| key: value` lines at the top of a code cell, and the source without them."
    d, lines = {}, src.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r'\s*#\s*\|\s*([\w-]+):?\s*(.*)', lines[i])
        if not m: break
        d[m[1].lower()] = m[2].strip().lower(); i += 1
    return d, '\n'.join(lines[i:]).strip('\n')


def _texttt(m: re.Match) -> str: return m[0].replace('\\_', '_')


def _primes(m: re.Match) -> str:
    "A formula's primes as superscripts: MathJax 2's HTML-CSS output with the STIX-Web fonts fails on `x'` (a 'Math Processing Error'), not on `x^{\\prime}`."
    return re.sub(r"'+", lambda p: '^{' + r'\prime' * len(p[0]) + '}', m[0])


def fix_markdown(src: str) -> str:
    "Markdown as MathJax 2 should see it (`\\_` in `\\texttt{}`, primes as `^{\\prime}`), its links to notebooks pointing at their pages."
    src = re.sub(r'\\texttt\{[^{}]*\}', _texttt, src)
    src = re.sub(r'\$\$.+?\$\$|\$[^$\n]+?\$', _primes, src, flags=re.S)
    return re.sub(r'\]\((?![a-z]+://)([^)\s]+?)\.ipynb(#[^)\s]*)?\)', lambda m: f'](' + m[1] + '.html' + (m[2] or '') + ')', src)


def prepare(nb):
    "The notebook as nbdev's docs show it: hidden cells dropped, directives stripped, markdown fixed (in place)."
    cells = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            c.source = fix_markdown(c.source); cells.append(c); continue
        if c.cell_type != 'code': cells.append(c); continue
        d, body = _directives(c.source)
        if 'hide' in d or d.get('include') == 'false': continue
        if d.get('output') == 'false': c.outputs = []
        c.source = '' if d.get('echo') == 'false' else body
        if not c.source and not c.get('outputs'): continue
        c.execution_count = None
        if not c.source: c.metadata['transient'] = {'remove_source': True}   # nbconvert's flag for a hidden input
        cells.append(c)
    nb.cells = cells
    return nb


def copy_mathjax(out: Path) -> Path:
    "MathJax 2 copied into OUT/mathjax (once); returns its folder."
    try: import jupyter_server_mathjax
    except ImportError: sys.exit('offline HTML needs MathJax on disk: pip install jupyter-server-mathjax (weclip[dev] has it)')
    src, dst = Path(jupyter_server_mathjax.__file__).parent / 'static', out / 'mathjax'
    if not (dst / 'MathJax.js').is_file(): shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def render(out, notebooks=None) -> list[Path]:
    "Write OUT/NAME.html for each notebook (default: every notebook in nbs/), with MathJax beside them; returns the pages."
    import nbformat
    from nbconvert import HTMLExporter
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    copy_mathjax(out)
    ex = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    ex.mathjax_url = f'mathjax/MathJax.js?config={MATHJAX_CONFIG}'   # relative: the folder keeps working when moved
    ex.require_js_url = ''                                            # no widgets in these notebooks
    pages = []
    for p in [Path(n) for n in (notebooks or sorted((ROOT / 'nbs').glob('*.ipynb')))]:
        nb = prepare(nbformat.read(p, as_version=4))
        html, _ = ex.from_notebook_node(nb, resources={'metadata': {'name': p.stem}})
        # a table's escaped pipe (`seg\\|cam`): the table splits on the others, GitHub shows it as |, and so do we
        html = re.sub(r'<code>[^<]*</code>', lambda m: m[0].replace('\\|', '|'), html)
        html = html.replace('<script src=""></script>', '')              # the template's require.js slot, left empty
        page = out / f'{p.stem}.html'
        page.write_text(html, encoding='utf-8'); pages.append(page)
    return pages


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'): sys.exit(__doc__)
    pages = render(sys.argv[1], sys.argv[2:] or None)
    print(f'{len(pages)} pages and MathJax in {sys.argv[1]}: open {pages[0].name} in a browser (the folder can be moved)')
