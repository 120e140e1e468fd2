"""README's "When something goes wrong" table, line for line: each row names the test (or notebook) that triggers its
case, and a phrase of the row's message that this test asserts. A new row without a test, or a message changed in the
code and its test but not in the README, fails here."""
import re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# first words of a row's first column -> (file that triggers it, a phrase both the row and that file hold)
COVERAGE = {
    'an option out of range': [('tests/test_train_cli.py', 'box_threshold=2.0 is out of range'),
                               ('tests/test_train_cli.py', "scale_max=inf is out of range")],
    '`--crop-size 7`': [('tests/test_train_cli.py', 'use --crop-size 8')],
    'a new run (no `--resume`)': [('tests/test_train_cli.py', 'already holds a run'),
                                  ('tests/test_train_cli.py', 'or --resume auto')],
    '`--device cuda` without a GPU': [('nbs/09_config.ipynb', 'sees no CUDA GPU here'),
                                      ('nbs/09_config.ipynb', 'CUDA GPU(s)')],
    'a toy `--data-root`': [('tests/test_train_cli.py', 'No toy world at')],
    'a VOC/COCO root in the wrong layout': [('nbs/06_data.ipynb', 'is not a PASCAL VOC layout'),
                                            ('tests/test_data_faults.py', 'not found (splits here')],
    'an empty split file': [('tests/test_data_faults.py', 'lists no images'),
                            ('tests/test_data_faults.py', 'image(s) missing'),
                            ('tests/test_data_faults.py', 'image(s) more than once')],
    'a training split smaller than one batch': [('tests/test_train_cli.py', 'fewer than one batch')],
    '`--preset coco` (or voc) on a root': [('tests/test_train_cli.py', 'classes, but --dataset coco prompts 80: pass the')],
    'a corrupt or truncated picture': [('tests/test_data_faults.py', 'cannot read image'),
                                       ('tests/test_train_cli.py', 'cannot read image')],
    'a picture under 16 pixels': [('tests/test_data_faults.py', 'smallest side weclip reads')],
    '16-bit, CMYK': [('tests/test_data_faults.py', 'Fix: save it as 8-bit RGB')],
    'a mask value outside the classes': [('tests/test_data_faults.py', 'valid 0..20')],
    'a second run in the same `--out-dir`': [('tests/test_train_cli.py', 'is in use by another run (pid')],
    '`--resume` with other settings': [('nbs/09b_checkpoint.ipynb', '(or change lr on purpose: --allow-change lr)'),
                                       ('tests/test_train_cli.py', 'trained on other classes'),
                                       ('tests/test_train_cli.py', 'process(es)')],
    '`--resume` on a `last.pt`': [('tests/test_train_cli.py', 'is not a weclip training checkpoint (it holds'),
                                  ('tests/test_train_cli.py', 'delete it (or move it away)')],
    'a loss that turns NaN/inf': [('nbs/11_train.ipynb', 'The loss is nan at iteration'),
                                  ('nbs/09b_checkpoint.ipynb', '--resume --allow-change lr --lr SMALLER')],
    'a step that leaves NaN/inf weights': [('nbs/11_train.ipynb', 'decoder tensors hold NaN or inf'),
                                           ('tests/test_train_cli.py', 'have blown up (max |w|'),
                                           ('tests/test_train_cli.py', 'there is no good checkpoint to resume yet')],
    'a non-finite, unreadable or missing checkpoint': [('nbs/09b_checkpoint.ipynb', 'is unreadable'),
                                                       ('tests/test_evaluate_cli.py', 'No checkpoint at')],
    'a checkpoint evaluated on a data root with other classes': [('tests/test_evaluate_cli.py', 'in its label file'),
                                                                 ('tests/test_evaluate_cli.py', 'pass --data-root')],
    '`evaluate --resize-long -5`': [('tests/test_evaluate_cli.py', '--resize-long -5 is negative: use 0'),
                                    ('tests/test_evaluate_cli.py', '--max-images -1 is negative'),
                                    ('tests/test_evaluate_cli.py', '--max-side 5 is below 16 pixels')],
    'the disk fills up while a checkpoint is written': [
        ('nbs/09b_checkpoint.ipynb', '; the previous last.pt is untouched'),
        ('nbs/09b_checkpoint.ipynb', 'there is no last.pt to resume yet')],
    'the disk fills up while any other file': [('tests/test_evaluate_cli.py', 'No space left on device); no'),
                                               ('tests/test_evaluate_cli.py', 'Free disk space, or choose another --out.'),
                                               ('tests/test_train_cli.py', 'metrics.jsonl')],
    'Ctrl-C or SIGTERM': [('tests/test_train_cli.py', 'Continue with the same command and --resume.')],
    'a second Ctrl-C': [('tests/test_train_cli.py', 'Stopped at once by a second Ctrl-C')],
    '`--crf` without DenseCRF': [('tests/test_evaluate_cli.py', 'pip install -e ".[crf]"')],
    '`predict --out` equal to': [('tests/test_evaluate_cli.py', 'is the input folder'),
                                 ('tests/test_evaluate_cli.py', 'over the input picture')],
    'two `predict`': [('tests/test_evaluate_cli.py', 'choose another --out,')],
    'a huge picture': [('tests/test_evaluate_cli.py', '--max-side'), ('nbs/10_evaluate.ipynb', 'MAX_GRID')],
}


def table_rows() -> list[tuple[str, str]]:
    text = (ROOT / 'README.md').read_text()
    section = text.split('## When something goes wrong', 1)[1].split('\n## ', 1)[0]
    rows = [l for l in section.splitlines() if l.startswith('| ') and not l.startswith('| input or fault')]
    return [(r.split(' | ')[0][2:], r) for r in rows]


def test_every_row_has_a_test():
    rows = table_rows()
    assert len(rows) >= 25
    for first, _ in rows:
        keys = [k for k in COVERAGE if first.startswith(k)]
        assert len(keys) == 1, f'README row without a test in COVERAGE (or matched twice): {first!r}'
    assert len(rows) == len(COVERAGE), 'a COVERAGE entry names a row the README no longer has'


@pytest.mark.parametrize('key', list(COVERAGE))
def test_row_and_its_test_say_the_same(key):
    row = next(r for first, r in table_rows() if first.startswith(key))
    for path, phrase in COVERAGE[key]:
        source = (ROOT / path).read_text()
        if path.endswith('.ipynb'): source = source.replace('\\"', '"').replace('\\\\', '\\')
        assert phrase.replace('|', '\\|') in row or phrase in row, (key, phrase, 'not in the README row')
        assert phrase in source, (key, phrase, f'not in {path}')
