# nbconvert configuration for HTML that shows its equations without a network: MathJax comes from the local
# jupyter-server-mathjax package (installed with weclip[dev]) instead of a CDN.
#
#     jupyter nbconvert --to html --config tools/offline_html.py nbs/04_rfm.ipynb
#
# The page then loads nothing from the internet (the notebooks use no widgets, so require.js is not needed).
from pathlib import Path
try:
    import jupyter_server_mathjax
except ImportError:
    raise SystemExit('offline HTML needs MathJax on disk: pip install jupyter-server-mathjax (weclip[dev] has it)')
_mathjax = Path(jupyter_server_mathjax.__file__).parent / 'static' / 'MathJax.js'
c = get_config()  # noqa: F821 (nbconvert defines it when it reads this file)
c.HTMLExporter.mathjax_url = _mathjax.as_uri() + '?config=TeX-AMS-MML_HTMLorMML-full,Safe'
c.HTMLExporter.require_js_url = ''
