"""The backbone's command line and its error messages, run as a user runs them (a subprocess)."""
import subprocess, sys
import pytest


def run(*args):
    return subprocess.run([sys.executable, '-m', 'weclip.backbone', *args], capture_output=True, text=True, timeout=600)


def test_help_lists_options():
    r = run('--help')
    assert r.returncode == 0
    for opt in ('--model', '--weights', '--size', '--batch', '--device'):
        assert opt in r.stdout


def test_random_weights_forward_prints_shapes():
    r = run('--weights', 'none', '--size', '224', '--batch', '2')
    assert r.returncode == 0, r.stderr
    assert 'FrozenCLIP(ViT-B-16: 12 blocks, width 768, 12 heads, patch 16, embed 512)' in r.stdout
    assert 'patches (2, 196, 512)' in r.stdout and 'attn (2, 12, 196, 196)' in r.stdout


@pytest.mark.parametrize('args, message', [
    (('--model', 'ViT-Q-99', '--weights', 'none'), "Unknown open_clip model 'ViT-Q-99'"),
    (('--weights', '/nonexistent/ViT-B-16.pt'), 'does not exist'),
    (('--weights', 'none', '--size', '300'), 'not a multiple of the patch size 16'),
])
def test_bad_input_one_clear_message(args, message):
    r = run(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert 'Traceback' not in r.stderr


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / 'ViT-B-16.pt'
    bad.write_bytes(b'\x00' * 1000)
    r = run('--weights', str(bad))
    assert r.returncode != 0 and 'corrupt or truncated' in r.stderr and 'Traceback' not in r.stderr


def test_offline_openai_without_cache_names_both_ways(tmp_path, monkeypatch):
    # no download attempt: an empty cache and download=False must fail at once with both remedies named
    from weclip.backbone import load_clip, BackboneError
    with pytest.raises(BackboneError) as e:
        load_clip('ViT-B-16', 'openai', cache_dir=str(tmp_path), download=False)
    msg = str(e.value)
    assert "pretrained='openai'" in msg and '/path/to/ViT-B-16.pt' in msg


def test_offline_download_fails_fast_with_the_right_option(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE), the missing weights get one line at once, naming --weights, the option train takes."""
    from weclip.backbone import load_clip, BackboneError
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(BackboneError) as e:
        load_clip('ViT-B-16', 'openai', cache_dir=str(tmp_path))
    msg = str(e.value)
    assert 'cannot be downloaded: HF_HUB_OFFLINE is set' in msg and '--weights /path/to/ViT-B-16.pt' in msg, msg
    assert '--clip-weights' not in msg


def test_loading_the_shipped_weights_prints_no_warning():
    r = subprocess.run([sys.executable, '-W', 'error::FutureWarning', '-c',
                        'from weclip.backbone import load_clip, TINY_CLIP; load_clip(TINY_CLIP, "toy")'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'FutureWarning' not in r.stderr, r.stderr[-2000:]
