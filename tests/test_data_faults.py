"Issue #15: every bad picture, mask or split file gives one `DatasetError` line naming the file; nothing silently wrong."
import warnings
import numpy as np
import pytest
import torch
from PIL import Image

from weclip.data import (VOC, COCO, DatasetError, EvalTransform, TrainTransform, MIN_SIDE, cap_long_side, loader,
                         make_tiny_dataset, one_line, read_image, read_mask, to_rgb, write_mask)


def one_line_error(fn, *contains):
    "Run `fn`, expect a `DatasetError` whose message is one line holding every string of `contains`; return it."
    with pytest.raises(DatasetError) as e: fn()
    msg = str(e.value)
    assert '\n' not in msg, msg
    for c in contains: assert str(c) in msg, (c, msg)
    return msg


def read(path): return read_image(path, min_side=1)   # the hand-made pictures below are a few pixels wide


# ---- 1. every PIL mode, against a hand-made expected array ----------------------------------------------------

def grey(values): return np.repeat(np.asarray(values, np.uint8)[..., None], 3, -1)


def test_16bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    v = np.array([[0, 257, 32767, 32896, 65535]], np.uint16)
    Image.fromarray(v).save(tmp_path / 'g.png')
    with Image.open(tmp_path / 'g.png') as im: assert im.mode == 'I;16'
    np.testing.assert_array_equal(read(tmp_path / 'g.png'), grey([[0, 1, 127, 128, 255]]))   # round(v·255/65535)


def test_16bit_big_endian_tiff(tmp_path):
    v = np.array([[0, 257, 65535], [514, 1000, 60000]])
    Image.frombytes('I;16B', (3, 2), v.astype('>u2').tobytes()).save(tmp_path / 'g.tif')
    with Image.open(tmp_path / 'g.tif') as im: assert im.mode == 'I;16B'
    np.testing.assert_array_equal(read(tmp_path / 'g.tif'), grey([[0, 1, 255], [2, 4, 233]]))


def test_32bit_integer_is_read_as_16bit_and_refused_outside_it(tmp_path):
    Image.fromarray(np.array([[0, 65535, 13107]], np.int32)).save(tmp_path / 'i.tif')
    with Image.open(tmp_path / 'i.tif') as im: assert im.mode == 'I'
    np.testing.assert_array_equal(read(tmp_path / 'i.tif'), grey([[0, 255, 51]]))
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / 'big.tif')
    one_line_error(lambda: read(tmp_path / 'big.tif'), 'big.tif', 'mode I', '0..70000', '8-bit RGB')
    Image.fromarray(np.array([[-5, 10]], np.int32)).save(tmp_path / 'neg.tif')
    one_line_error(lambda: read(tmp_path / 'neg.tif'), 'neg.tif', '-5..10')


def test_float_is_0_to_1_and_refused_outside_it(tmp_path):
    Image.fromarray(np.array([[0, 0.5, 1.0, 0.25]], np.float32)).save(tmp_path / 'f.tif')
    with Image.open(tmp_path / 'f.tif') as im: assert im.mode == 'F'
    np.testing.assert_array_equal(read(tmp_path / 'f.tif'), grey([[0, 128, 255, 64]]))
    Image.fromarray(np.array([[0, 2.0]], np.float32)).save(tmp_path / 'f2.tif')
    one_line_error(lambda: read(tmp_path / 'f2.tif'), 'f2.tif', 'mode F with greyscale values 0..2')
    Image.fromarray(np.array([[0, np.nan]], np.float32)).save(tmp_path / 'nan.tif')
    one_line_error(lambda: read(tmp_path / 'nan.tif'), 'nan.tif', 'outside the 0..1')


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [10, 20, 30, 40], [0, 0, 0, 255], [128, 64, 32, 16]]], np.uint8)
    Image.frombytes('CMYK', (5, 1), cmyk.tobytes()).save(tmp_path / 'c.tif')
    expected = [[[255, 255, 255], [0, 255, 255], [207, 198, 190], [0, 0, 0], [119, 179, 209]]]  # (255-C)(255-K)/255
    np.testing.assert_array_equal(read(tmp_path / 'c.tif'), np.array(expected, np.uint8))


def palette_image():
    p = Image.new('P', (3, 1)); p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255]); p.putdata([0, 1, 2]); return p


def test_palette_without_and_with_transparency(tmp_path):
    palette_image().save(tmp_path / 'p.png')
    np.testing.assert_array_equal(read(tmp_path / 'p.png'), np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]))
    palette_image().save(tmp_path / 'pt.png', transparency=2)                     # one transparent index
    np.testing.assert_array_equal(read(tmp_path / 'pt.png'), np.array([[[255, 0, 0], [0, 255, 0], [255, 255, 255]]]))
    palette_image().save(tmp_path / 'pa.png', transparency=b'\xff\x80\x00')       # an alpha per index
    np.testing.assert_array_equal(read(tmp_path / 'pa.png'), np.array([[[255, 0, 0], [127, 255, 127], [255, 255, 255]]]))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 128], [200, 0, 0, 255], [10, 20, 30, 255]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / 'a.png')
    # round(α·c + (1-α)·255): α=128/255 gives 200 → 227, 0 → 127
    np.testing.assert_array_equal(read(tmp_path / 'a.png'),
                                  np.array([[[255, 255, 255], [227, 127, 127], [200, 0, 0], [10, 20, 30]]], np.uint8))
    la = np.array([[[100, 128], [100, 0], [100, 255]]], np.uint8)
    Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
    np.testing.assert_array_equal(read(tmp_path / 'la.png'), grey([[177, 255, 100]]))
    Image.new('L', (2, 1), 7).save(tmp_path / 'lt.png', transparency=7)          # greyscale with a transparent value
    np.testing.assert_array_equal(read(tmp_path / 'lt.png'), grey([[255, 255]]))


def test_one_bit_and_plain_modes(tmp_path):
    b = Image.new('1', (3, 1)); b.putpixel((1, 0), 1); b.save(tmp_path / 'b.png')
    np.testing.assert_array_equal(read(tmp_path / 'b.png'), grey([[0, 255, 0]]))
    Image.fromarray(np.array([[3, 90, 250]], np.uint8)).save(tmp_path / 'l.png')
    np.testing.assert_array_equal(read(tmp_path / 'l.png'), grey([[3, 90, 250]]))
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    np.testing.assert_array_equal(read(tmp_path / 'rgb.png'), rgb)


def test_in_memory_modes():
    for mode, dtype in (('I;16L', '<u2'), ('I;16N', '=u2'), ('I;16B', '>u2')):
        im = Image.frombytes(mode, (3, 1), np.array([0, 257, 65535], dtype).tobytes())
        np.testing.assert_array_equal(to_rgb(im), grey([[0, 1, 255]]))
    np.testing.assert_array_equal(to_rgb(Image.new('HSV', (1, 1), (0, 255, 255))), [[[255, 0, 0]]])
    np.testing.assert_array_equal(to_rgb(Image.new('RGBa', (1, 1), (100, 50, 0, 255))), [[[100, 50, 0]]])
    np.testing.assert_array_equal(to_rgb(Image.new('La', (1, 1), (0, 0))), [[[255, 255, 255]]])
    np.testing.assert_array_equal(to_rgb(Image.new('La', (1, 1), (50, 128))), grey([[177]]))   # premultiplied: 50 + (1-α)·255
    pa = Image.new('PA', (1, 1)); pa.putpalette([9, 9, 9] * 256)
    np.testing.assert_array_equal(to_rgb(pa), [[[255, 255, 255]]])                # alpha 0: the white background


def test_lab_goes_through_lcms_to_srgb(tmp_path):
    lab = Image.new('LAB', (3, 1)); lab.putdata([(128, 128, 128), (255, 128, 128), (0, 128, 128)])   # a*, b* = 0
    lab.save(tmp_path / 'lab.tif')
    np.testing.assert_allclose(read(tmp_path / 'lab.tif'), grey([[119, 255, 0]]), atol=1)   # L* 50 is sRGB 119


def test_unconvertible_mode_is_refused():
    class Odd:                                  # a mode PIL may add one day
        mode, info = 'BGR;24', {}
    one_line_error(lambda: to_rgb(Odd(), 'odd.bmp'), 'image odd.bmp has pixel mode BGR;24', 'Fix: save it as 8-bit RGB')


def test_16bit_pictures_train_as_themselves(tmp_path):
    "A 16-bit PNG renamed .jpg in a dataset: its samples are the picture, not white."
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    path = root / 'JPEGImages' / '2007_val000.jpg'
    rgb = read_image(path)
    with Image.open(path) as im: Image.fromarray((np.asarray(im.convert('L')).astype(np.uint16) * 257)).save(path, 'PNG')
    s = VOC(root, 'val')[0]
    expected = np.asarray(Image.fromarray(rgb).convert('L'))
    got = (torch.tensor([58.395, 57.12, 57.375])[:, None, None] * s['image'] +
           torch.tensor([123.675, 116.28, 103.53])[:, None, None]).round()
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1)                   # the grey picture, not 255


# ---- 2. a mask value outside the classes ----------------------------------------------------------------------

def test_mask_value_outside_the_classes(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=1, n_val=2, n_test=0)
    path = root / 'SegmentationClassAug' / '2007_val001.png'
    m = read_mask(path).copy()
    assert (m == 255).any()                                                           # VOC-like borders
    m[0, :3] = 37; m[1, 0] = 21; write_mask(path, m)
    val = VOC(root, 'val')
    val[0]                                                                            # the good mask (with 255s) loads
    msg = one_line_error(lambda: val[1], str(path), 'values 21, 37 in 4 pixels', 'valid 0..20', '255 = ignore',
                         'cls_labels.json')
    train_full = VOC(root, 'val', TrainTransform(crop_size=32), with_masks=True)      # --supervision full
    one_line_error(lambda: train_full[1], str(path), '0..20')
    np.testing.assert_array_equal(read_mask(path), m)                                 # reading without classes: as is
    one_line_error(lambda: read_mask(path, 21), 'values 21, 37')



def test_coco_mask_values(tmp_path):
    root = make_tiny_dataset(tmp_path / 'coco', 'coco', n_train=1, n_val=1)
    path = root / 'SegmentationClass' / 'val' / 'COCO_val2014_000000000000.png'
    m = read_mask(path).copy(); m[0, 0] = 80; write_mask(path, m)
    COCO(root, 'val')[0]                                                              # 80 is the last class
    m[0, 0] = 81; write_mask(path, m)
    one_line_error(lambda: COCO(root, 'val')[0], str(path), 'value 81 in 1 pixel,', 'valid 0..80')


# ---- 3. split files ---------------------------------------------------------------------------------------------

def test_empty_split_file_is_refused_at_construction(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    split = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    for text in ('', '\n  \n'):
        split.write_text(text)
        one_line_error(lambda: VOC(root, 'val'), str(split), 'lists no images')
        one_line_error(lambda: VOC(root, 'val', TrainTransform()), str(split), 'lists no images')


def test_split_file_naming_missing_images_or_masks(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    split = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    split.write_text('2007_val000\nno_such_image\n')
    one_line_error(lambda: VOC(root, 'val'), str(split), "names 1 image(s) missing", 'no_such_image.jpg')
    split.write_text('2007_val000\n'); (root / 'SegmentationClassAug' / '2007_val000.png').unlink()
    one_line_error(lambda: VOC(root, 'val'), str(split), 'mask(s) missing', '2007_val000.png')


def test_split_file_that_is_not_text(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    split = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    split.write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF')
    one_line_error(lambda: VOC(root, 'val'), str(split), 'cannot be read as text')


# ---- 4. degenerate and huge sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(1, 1), (15, 200), (300, 3)])
def test_too_small_pictures_are_refused(tmp_path, size):
    Image.new('RGB', size, (1, 2, 3)).save(tmp_path / 'small.png')
    one_line_error(lambda: read_image(tmp_path / 'small.png'), 'small.png', f'is {size[0]}x{size[1]} pixels',
                   f'smallest side weclip reads, {MIN_SIDE}')


def test_smallest_picture_is_read(tmp_path):
    Image.new('RGB', (MIN_SIDE, 40), (1, 2, 3)).save(tmp_path / 'ok.png')
    assert read_image(tmp_path / 'ok.png').shape == (40, MIN_SIDE, 3)


def test_too_small_picture_in_a_dataset(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    path = root / 'JPEGImages' / '2007_train001.jpg'
    Image.new('RGB', (1, 1)).save(path)
    one_line_error(lambda: VOC(root, 'train', TrainTransform(crop_size=32))[1], str(path), '1x1 pixels')


def test_cap_long_side():
    big = np.zeros((6000, 6000, 3), np.uint8); big[:3000] = 200
    small = cap_long_side(big, 512)
    assert small.shape == (512, 512, 3) and small[:250].min() == 200 and small[262:].max() == 0
    assert cap_long_side(np.zeros((6000, 1500, 3), np.uint8), 512).shape == (512, 128, 3)
    assert cap_long_side(np.zeros((3, 9000, 3), np.uint8), 900).shape == (1, 900, 3)   # never a 0-pixel side
    img = np.ones((100, 50, 3), np.uint8)
    assert cap_long_side(img, 100) is img                                               # small enough: untouched
    with pytest.raises(ValueError): cap_long_side(img, 0)


def test_read_image_max_side_decodes_big_jpegs_small(tmp_path):
    a = np.zeros((3000, 4000, 3), np.uint8); a[:, 2000:] = 255
    Image.fromarray(a).save(tmp_path / 'big.jpg', quality=90)
    small = read_image(tmp_path / 'big.jpg', max_side=500)
    assert small.shape == (375, 500, 3)
    assert small[:, :240].mean() < 5 and small[:, 260:].mean() > 250


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new('L', (64, 64)).save(tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)                               # 4096 > 2·1000: PIL refuses
    one_line_error(lambda: read_image(tmp_path / 'bomb.png'), 'bomb.png', 'decompression bomb',
                   'PIL.Image.MAX_IMAGE_PIXELS')


def test_big_pictures_read_without_a_bomb_warning(tmp_path, monkeypatch):
    Image.new('L', (64, 64), 9).save(tmp_path / 'big.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 3000)                               # 3000 < 4096 < 2·3000: a warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        np.testing.assert_array_equal(read_image(tmp_path / 'big.png'), np.full((64, 64, 3), 9, np.uint8))
    assert not seen, [str(w.message) for w in seen]


def test_upright_turns_by_the_exif_orientation(tmp_path):
    a = np.zeros((16, 32, 3), np.uint8); a[:, 16:] = 255                              # black left, white right
    exif = Image.Exif(); exif[0x0112] = 6                                               # shown turned 90° clockwise
    Image.fromarray(a).save(tmp_path / 'phone.png', exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / 'phone.png'), a)               # datasets: the stored pixels
    up = read_image(tmp_path / 'phone.png', upright=True)
    assert up.shape == (32, 16, 3) and up[:16].max() == 0 and up[16:].min() == 255     # black on top, as viewers show


# ---- 5. corrupt files, also through DataLoader workers ----------------------------------------------------------

def corrupt(kind, path):
    rng = np.random.default_rng(0)
    if kind == 'text': path.write_text('this is not a picture')
    elif kind == 'empty': path.write_bytes(b'')
    else:
        fmt = 'JPEG' if kind == 'truncated jpeg' else 'PNG'
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
        data = path.read_bytes(); path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('kind', ['truncated jpeg', 'truncated png', 'text', 'empty'])
def test_corrupt_pictures(tmp_path, kind):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=3, n_val=1, n_test=0)
    path = root / 'JPEGImages' / '2007_train002.jpg'
    corrupt(kind, path)
    ds = VOC(root, 'train', TrainTransform(crop_size=32))
    ds[0]
    one_line_error(lambda: ds[2], f'cannot read image {path} (', 'Fix: replace the file')


def test_one_line_unwraps_a_dataloader_worker_error(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=3, n_val=1, n_test=0)
    corrupt('truncated jpeg', root / 'JPEGImages' / '2007_train001.jpg')
    ds = VOC(root, 'train', EvalTransform())
    with pytest.raises(DatasetError) as direct: ds[1]
    with pytest.raises(DatasetError) as wrapped:
        for _ in loader(ds, 1, train=False, num_workers=1): pass
    text = str(wrapped.value)
    assert 'Caught DatasetError in DataLoader worker process 0' in text and 'Original Traceback' in text
    assert one_line(wrapped.value) == str(direct.value)
    assert '\n' not in one_line(wrapped.value)


def test_one_line_of_plain_exceptions():
    assert one_line(DatasetError('cannot read image a.jpg (x). Fix: y.')) == 'cannot read image a.jpg (x). Fix: y.'
    assert one_line(ValueError('two\n   lines')) == 'two lines'
    assert one_line(RuntimeError()) == 'RuntimeError'
    wrapped = RuntimeError('Caught ZeroDivisionError in DataLoader worker process 3.\nOriginal Traceback (most recent '
                           'call last):\n  File "x.py", line 1, in f\n    1 / 0\nZeroDivisionError: division by zero\n')
    assert one_line(wrapped) == 'ZeroDivisionError: division by zero'                 # not bad input: the type stays
    wrapped = ValueError(str(wrapped).replace('ZeroDivisionError: division by zero', 'weclip.data.DatasetError: bad x'))
    assert one_line(wrapped) == 'bad x'


def test_split_listing_an_image_twice_is_refused(tmp_path):
    "An image listed twice would count twice in every mIoU (evaluate's and training's): refused, naming the file."
    root = make_tiny_dataset(tmp_path / 'coco', 'coco', n_train=2, n_val=2)
    split = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    names = split.read_text().split()
    split.write_text('\n'.join(names + names[:1]) + '\n')
    one_line_error(lambda: COCO(root, 'val'), str(split), 'lists 1 image(s) more than once', names[0], 'one line per image')


def test_missing_split_file_names_the_splits_there(tmp_path):
    root = make_tiny_dataset(tmp_path / 'voc', n_train=2, n_val=1, n_test=0)
    one_line_error(lambda: VOC(root, 'trainaug'), str(root / 'ImageSets' / 'Segmentation' / 'trainaug.txt'),
                   "not found (splits here: ['train', 'train_aug', 'val'])", 'prepare_voc.py')
