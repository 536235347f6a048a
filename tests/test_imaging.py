import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from zoomless.imaging import (
    DEFAULT_PIXEL_CAP,
    POINTING_SENTENCE,
    VIEWS,
    ImageError,
    box_area_fraction,
    budget_size,
    check_box,
    clamp_box,
    crop_view,
    expand_box,
    from_rel1000,
    load_image,
    overlay_view,
    render_view,
    resize_to_budget,
    scale_box,
    to_rel1000,
    with_pointing_sentence,
    zoom_view,
)
from zoomless.sample import Sample

RED = (255, 0, 0)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return im.getpixel((x, y))


def close(a, b, tol=12) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


def assert_image_error(excinfo, name: str) -> str:
    msg = str(excinfo.value)
    assert msg.startswith(f"{name}: "), msg
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- odd modes


def test_palette_with_transparency_composites_on_white(tmp_path):
    im = Image.new("P", (8, 4))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.paste(1, (4, 0, 8, 4))  # right half index 1 (blue), left half index 0 (red, transparent)
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (8, 4)
    assert px(out, 1, 1) == (255, 255, 255)
    assert px(out, 6, 1) == (0, 0, 255)


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (4, 4))
    im.putpalette([10, 200, 30] * 256)
    path = tmp_path / "pal.gif"
    im.save(path)
    assert px(load_image(str(path)), 0, 0) == (10, 200, 30)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (0, 0, 0, 0)  # fully transparent -> white
    rgba[:, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (0, 0, 0, 128)  # half black over white -> mid gray
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert px(out, 0, 0) == (255, 255, 255)
    assert px(out, 1, 0) == (0, 0, 255)
    assert close(px(out, 2, 0), (127, 127, 127), tol=2)

    la = np.array([[[0, 0], [0, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(str(tmp_path / "la.png"))
    assert px(out, 0, 0) == (255, 255, 255) and px(out, 1, 0) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    out = load_image(str(tmp_path / "c.jpg"))
    assert out.mode == "RGB"
    assert close(px(out, 8, 8), RED, tol=20)


def test_gray_and_bilevel(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "l.png")
    assert px(load_image(str(tmp_path / "l.png")), 2, 2) == (77, 77, 77)

    bits = Image.new("1", (4, 2), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    out = load_image(str(tmp_path / "b.png"))
    assert px(out, 0, 0) == (0, 0, 0) and px(out, 1, 0) == (255, 255, 255)


def test_16bit_png_scales_instead_of_clipping(tmp_path):
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I;16")
    out = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert out.shape == (1, 4, 3)
    assert out[0, 0, 0] == 0
    assert 126 <= out[0, 1, 0] <= 129  # mid gray stays mid gray, not 255
    assert out[0, 2, 0] == 255
    assert out[0, 3, 0] == 4  # 1000 / 257


def test_32bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    assert 126 <= px(load_image(i32), 1, 0)[0] <= 129
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [px(load_image(f), x, 0)[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-100.0, 0.0, 100.0]], dtype=np.float32), "F")
    assert [px(load_image(wide), x, 0)[0] // 2 for x in range(3)] == [0, 63, 127]  # stretched


def test_exif_orientation_6_rotates(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste(RED, (0, 0, 8, 8))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(str(path))
    assert out.size == (20, 40)
    assert close(px(out, 16, 3), RED, tol=30)  # stored top-left is displayed top-right
    assert close(px(out, 3, 3), (0, 0, 255), tol=30)
    assert close(px(out, 16, 36), (0, 0, 255), tol=30)


def test_pil_input_is_converted_and_not_mutated():
    src = Image.new("LA", (3, 3), (0, 0))
    out = load_image(src)
    assert src.mode == "LA" and out.mode == "RGB" and out is not src
    rgb = Image.new("RGB", (3, 3), RED)
    again = load_image(rgb)
    assert again is not rgb and px(again, 1, 1) == RED


def test_bytes_input():
    out = load_image(png_bytes(Image.new("RGB", (6, 3), RED)))
    assert out.size == (6, 3) and px(out, 0, 0) == RED


# ----------------------------------------------------------------------------- broken input


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    noise(64, 64).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(str(path))
    assert_image_error(e, str(path))


def test_zero_byte_missing_and_non_image(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(str(empty))
    assert "empty" in assert_image_error(e, str(empty))

    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as e:
        load_image(str(missing))
    assert "no such file" in assert_image_error(e, str(missing))

    text = tmp_path / "notes.png"
    text.write_text("hello, not an image\n")
    with pytest.raises(ImageError) as e:
        load_image(str(text))
    assert_image_error(e, str(text))

    with pytest.raises(ImageError) as e:
        load_image(b"GIF89a garbage")
    assert_image_error(e, "<bytes>")
    with pytest.raises(ImageError) as e:
        load_image(b"")
    assert_image_error(e, "<bytes>")


def test_name_overrides_and_path_still_shown(tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageError) as e:
        load_image(str(missing), name="sample-7")
    assert str(missing) in assert_image_error(e, "sample-7")


def test_small_cap(tmp_path):
    path = tmp_path / "hundred.png"
    noise(100, 100).save(path)
    with pytest.raises(ImageError) as e:
        load_image(str(path), max_pixels=1000)
    assert "cap" in assert_image_error(e, str(path))
    assert load_image(str(path), max_pixels=10_000).size == (100, 100)


def huge_header_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed)."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("side", [12_000, 100_000])  # over our cap / over PIL's own bomb limit too
def test_huge_header_rejected_without_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_header_png(side, side))
    assert side * side > DEFAULT_PIXEL_CAP
    t = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_image(str(path))
    assert time.perf_counter() - t < 1.0
    assert_image_error(e, str(path))


# ----------------------------------------------------------------------------- geometry


def test_clamp_box():
    assert clamp_box((-5, -3, 700, 500), 640, 480) == (0, 0, 640, 480)
    assert clamp_box((10.4, 10.6, 20.2, 30.9), 640, 480) == (10, 11, 20, 31)
    assert clamp_box((700, 500, 800, 600), 640, 480) == (639, 479, 640, 480)  # at least 1 px
    assert clamp_box((50, 50, 50, 40), 640, 480) == (50, 50, 51, 51)


def test_expand_box():
    assert expand_box((100, 100, 200, 150), 0.1, 640, 480) == (90, 95, 210, 155)
    assert expand_box((100, 100, 110, 110), 0.25, 640, 480) == (97, 97, 113, 113)  # 2.5 px outwards
    assert expand_box((0, 0, 100, 100), 0.5, 120, 120) == (0, 0, 120, 120)
    assert expand_box((10, 10, 20, 20), 0.0, 640, 480) == (10, 10, 20, 20)
    with pytest.raises(ValueError):
        expand_box((10, 10, 20, 20), -0.1, 640, 480)


def test_area_fraction_and_scale():
    assert box_area_fraction((0, 0, 64, 48), 640, 480) == pytest.approx(0.01)
    assert box_area_fraction((600, 0, 700, 480), 640, 480) == pytest.approx(40 / 640)
    assert scale_box((10, 20, 30, 40), 0.5, 2.0) == (5, 40, 15, 80)
    assert scale_box((10, 10, 11, 11), 0.1, 0.1) == (1, 1, 2, 2)


def test_rel1000_round_trip():
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (999, 313), (17, 1000)]:
        for _ in range(200):
            x1, x2 = sorted(rng.choice(w + 1, 2, replace=False))
            y1, y2 = sorted(rng.choice(h + 1, 2, replace=False))
            box = (int(x1), int(y1), int(x2), int(y2))
            rel = to_rel1000(box, w, h)
            assert all(0 <= v <= 1000 for v in rel)
            assert from_rel1000(rel, w, h) == box  # exact when sides < 1000 px
    big = (1234, 567, 3001, 2999)
    back = from_rel1000(to_rel1000(big, 4000, 3000), 4000, 3000)
    assert max(abs(a - b) for a, b in zip(back, big)) <= 2
    assert to_rel1000((0, 0, 640, 480), 640, 480) == (0, 0, 1000, 1000)
    assert from_rel1000((500, 0, 1200, 1000), 640, 480) == (320, 0, 640, 480)


def test_check_box():
    assert check_box([1, 2, 30, 40], 640, 480, "s1") == (1, 2, 30, 40)
    with pytest.raises(ImageError) as e:
        check_box((600, 400, 700, 500), 640, 480, "s1")
    assert str(e.value) == "s1: box [600, 400, 700, 500] lies outside the 640x480 image"
    with pytest.raises(ImageError, match="s1: box .* is empty"):
        check_box((10, 10, 10, 20), 640, 480, "s1")
    with pytest.raises(ImageError, match="s1: box .* not four numbers"):
        check_box((1, 2, 3), 640, 480, "s1")


# ----------------------------------------------------------------------------- views


def test_crop_matches_numpy_slicing():
    im = noise(200, 100)
    crop, rect = crop_view(im, (50, 40, 90, 60), margin=0.25)
    assert rect == (40, 35, 100, 65)
    x1, y1, x2, y2 = rect
    assert np.array_equal(np.asarray(crop), np.asarray(im)[y1:y2, x1:x2])


def test_crop_min_side_and_edges():
    im = noise(200, 100)
    crop, rect = crop_view(im, (100, 50, 104, 52), margin=0.0, min_side=28)
    assert crop.size == (28, 28) and rect[0] <= 100 and rect[2] >= 104
    # at the corner, the crop shifts inwards instead of shrinking
    crop, rect = crop_view(im, (0, 95, 3, 100), margin=0.25, min_side=28)
    assert rect == (0, 72, 28, 100)
    # an image smaller than min_side gives the whole image
    crop, rect = crop_view(noise(20, 10), (2, 2, 4, 4), min_side=28)
    assert rect == (0, 0, 20, 10)


def test_zoom_view():
    im = noise(30, 20)
    assert zoom_view(im).size == (60, 40)
    assert zoom_view(im, 1.5).size == (45, 30)
    assert zoom_view(im, size=(100, 7)).size == (100, 7)
    flat = Image.new("RGB", (10, 10), (0, 200, 0))
    assert px(zoom_view(flat, 3.0), 15, 15) == (0, 200, 0)


def test_overlay_view():
    im = Image.new("RGB", (300, 200), (0, 128, 0))
    box = (100, 50, 200, 150)
    out = overlay_view(im, box)
    assert px(im, 95, 45) == (0, 128, 0)  # input untouched
    x1, y1, x2, y2 = expand_box(box, 0.05, 300, 200)
    assert (x1, y1, x2, y2) == (95, 45, 205, 155)
    a = np.asarray(out)
    for x, y in [(x1, y1), (x2 - 1, y2 - 1), (150, y1), (150, y1 + 4), (x1 + 4, 100), (x2 - 1, 100)]:
        assert tuple(a[y, x]) == RED, (x, y)
    assert (a[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5] == (0, 128, 0)).all()  # inside the outline untouched
    assert tuple(a[y1 - 1, x1 - 1]) == (0, 128, 0)  # outside untouched
    assert (a[:, : x1] == (0, 128, 0)).all()


def test_pointing_sentence():
    assert with_pointing_sentence("What color?") == "What color?\n\n" + POINTING_SENTENCE


def test_resize_to_budget_keeps_box_on_content():
    im = Image.new("RGB", (1000, 700), (255, 255, 255))
    box = (610, 420, 690, 500)
    im.paste((0, 0, 255), box)
    out, nbox = resize_to_budget(im, box, max_pixels=200_000)
    w, h = out.size
    assert w * h <= 200_000 and w % 28 == 0 and h % 28 == 0
    assert w <= 1000 and h <= 700
    cx, cy = (nbox[0] + nbox[2]) // 2, (nbox[1] + nbox[3]) // 2
    assert px(out, cx, cy) == (0, 0, 255)
    # the square's edges land on the rescaled box edges (within a px of resampling blur)
    a = np.asarray(out)[cy]
    blue = np.nonzero(a[:, 2] - a[:, 0] > 128)[0]
    assert abs(blue[0] - nbox[0]) <= 1 and abs(blue[-1] + 1 - nbox[2]) <= 1


def test_resize_to_budget_noop_and_alignment():
    aligned = noise(56, 84)
    out, box = resize_to_budget(aligned, (1, 2, 3, 4), max_pixels=10_000)
    assert out is aligned and box == (1, 2, 3, 4)
    out, box = resize_to_budget(noise(60, 90), None, max_pixels=10_000)
    assert out.size == (56, 84) and box is None  # within budget, aligned by rounding down
    out, _ = resize_to_budget(noise(10, 90), None, max_pixels=10_000)
    assert out.size == (28, 84)  # sides never below the factor
    assert budget_size(4000, 3000, 1_000_000) == (1148, 840)
    with pytest.raises(ValueError):
        budget_size(100, 100, 100)


# ----------------------------------------------------------------------------- render_view


@pytest.fixture
def scene():
    im = Image.new("RGB", (400, 300), (255, 255, 255))
    im.paste((0, 0, 255), (200, 100, 240, 140))
    return Sample(id="s42", image=png_bytes(im), question="What color is the square?", box=(200, 100, 240, 140))


def test_render_full(scene):
    im, q = render_view(scene, "full")
    assert im.size == (400, 300) and q == scene.question
    small, _ = render_view(scene, "full", max_pixels=50_000)
    assert small.width * small.height <= 50_000 and small.width % 28 == 0


def test_render_crop_and_zoom(scene):
    crop, q = render_view(scene, "crop")
    assert crop.size == (60, 60) and q == scene.question  # 40 px box + 10 px each side
    assert px(crop, 30, 30) == (0, 0, 255) and px(crop, 2, 2) == (255, 255, 255)
    zoom, _ = render_view(scene, "zoom", zoom=3.0)
    assert zoom.size == (180, 180) and px(zoom, 90, 90) == (0, 0, 255)
    wide, _ = render_view(scene, "crop", crop_margin=0.5)
    assert wide.size == (80, 80)


def test_render_overlay(scene):
    im, q = render_view(scene, "overlay")
    assert q == with_pointing_sentence(scene.question)
    assert px(im, 198, 98) == RED and px(im, 220, 120) == (0, 0, 255)
    small, _ = render_view(scene, "overlay", max_pixels=40_000)
    a = np.asarray(small)
    assert small.width * small.height <= 40_000
    assert ((a == RED).all(axis=-1)).sum() >= 4 * 5 * 20  # a visible 5 px outline after resizing


def test_render_teacher(scene):
    zoomed, _ = render_view(scene, "zoom")
    teacher, q = render_view(scene, "teacher")
    assert q == scene.question and np.array_equal(np.asarray(teacher), np.asarray(zoomed))
    given = scene.with_(teacher_image=png_bytes(Image.new("RGB", (33, 22), RED)))
    teacher, _ = render_view(given, "teacher")
    assert teacher.size == (33, 22) and px(teacher, 0, 0) == RED


def test_render_uses_given_image(scene):
    other = Image.new("RGB", (400, 300), (0, 255, 0))
    crop, _ = render_view(scene, "crop", image=other)
    assert px(crop, 30, 30) == (0, 255, 0)
    gray = Image.new("L", (400, 300), 9)
    full, _ = render_view(scene, "full", image=gray)
    assert full.mode == "RGB" and px(full, 0, 0) == (9, 9, 9)


def test_render_errors(scene):
    no_box = scene.with_(box=None)
    assert render_view(no_box, "full")[0].size == (400, 300)
    for view in ("crop", "zoom", "overlay", "teacher"):
        with pytest.raises(ImageError, match="^s42: "):
            render_view(no_box, view)
    outside = scene.with_(box=(350, 250, 450, 350))
    with pytest.raises(ImageError) as e:
        render_view(outside, "crop")
    assert str(e.value) == "s42: box [350, 250, 450, 350] lies outside the 400x300 image"
    with pytest.raises(ValueError, match="unknown view"):
        render_view(scene, "sideways")
    broken = scene.with_(image=b"not an image")
    with pytest.raises(ImageError, match="^s42: "):
        render_view(broken, "full")
    assert set(VIEWS) == {"full", "crop", "zoom", "overlay", "teacher"}
