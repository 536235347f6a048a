import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zoomless.imaging import ImageError, load_image, render_view
from zoomless.sample import Sample, SampleError, read_samples, write_samples


def png_bytes(size=(64, 48), color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    return tmp_path


def rich_sample(image, **changes) -> Sample:
    s = Sample(
        id="q1",
        image=image,
        question="What is written on the sign?",
        answer="STOP",
        options=("GO", "STOP", "YIELD"),
        box=(10, 5, 30, 25),
        dimension="text",
        teacher_image=png_bytes((20, 20), (255, 0, 0)),
        meta={"source": "unit", "score": 0.75},
    )
    return s.with_(**changes)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- round trips


def test_jsonl_relative_path_round_trip(image_dir):
    s = rich_sample("imgs/a.png")
    path = write_samples([s], image_dir / "data.jsonl")
    (back,) = read_samples(path)
    assert back.image == str(image_dir / "imgs" / "a.png")  # resolved against the file's folder
    assert back == s.with_(image=back.image)
    assert load_image(back.image).size == (64, 48)


def test_jsonl_embedded_bytes_round_trip(tmp_path):
    s = rich_sample(png_bytes(), teacher_image=None, options=None, box=None, meta={})
    (back,) = read_samples(write_samples([s], tmp_path / "sub" / "data.jsonl"))
    assert back == s and isinstance(back.image, bytes)


def test_parquet_embeds_path_images(image_dir):
    s = rich_sample(str(image_dir / "imgs" / "a.png"))
    (back,) = read_samples(write_samples([s], image_dir / "data.parquet"))
    assert back.image == (image_dir / "imgs" / "a.png").read_bytes()
    assert back.teacher_image == s.teacher_image
    assert back == s.with_(image=back.image)


def test_parquet_embedded_bytes_come_back_equal(tmp_path):
    images = [png_bytes(color=(i, 2 * i, 3 * i)) for i in range(3)]
    samples = [rich_sample(img, id=f"q{i}") for i, img in enumerate(images)]
    back = read_samples(write_samples(samples, tmp_path / "data.parquet"))
    assert [b.image for b in back] == images
    assert back == samples


def test_answer_letter():
    s = rich_sample(b"x")
    assert s.answer_letter == "B"
    assert s.with_(answer="YIELD").answer_letter == "C"
    assert s.with_(options=None).answer_letter is None
    assert s.with_(answer=None).answer_letter is None


# ----------------------------------------------------------------------------- broken rows


def good_row(**changes):
    row = {"id": "r", "image": "imgs/a.png", "question": "Q?", "answer": "A", "options": ["A", "B"]}
    row.update(changes)
    return row


def test_missing_question(tmp_path):
    bad = dict(good_row())
    del bad["question"]
    path = write_rows(tmp_path / "d.jsonl", [good_row(), bad])
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}:2: ") and "'question'" in str(e.value)


def test_answer_not_in_options(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [good_row(answer="C")])
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}:1: ") and "'answer'" in str(e.value)


def test_box_with_x2_before_x1(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [good_row(), good_row(), good_row(box=[50, 10, 20, 40])])
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}:3: ") and "'box'" in str(e.value)


def test_bad_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good_row()) + "\n" + '{"id": "r2", "image": \n')
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}:2: ") and "JSON" in str(e.value)
    assert "\n" not in str(e.value)


def test_parquet_without_image_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["a"], "question": ["Q?"]}), path)
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(str(path)) and "'image'" in str(e.value)


def test_parquet_bad_row_is_named(tmp_path):
    rows = [rich_sample(png_bytes(), id="ok"), rich_sample(png_bytes(), id="bad")]
    path = write_samples(rows, tmp_path / "d.parquet")
    table = pq.read_table(path)
    answers = table.column("answer").to_pylist()
    answers[1] = "MAYBE"
    pq.write_table(table.set_column(table.column_names.index("answer"), "answer", pa.array(answers)), path)
    with pytest.raises(SampleError) as e:
        read_samples(path)
    assert str(e.value).startswith(f"{path}: row 1: ") and "'answer'" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SampleError, match="no such file"):
        read_samples(tmp_path / "nope.jsonl")


def test_box_outside_image_loads_but_render_fails(image_dir):
    path = write_rows(image_dir / "d.jsonl", [good_row(id="far", box=[40, 30, 90, 70])])
    (s,) = read_samples(path)  # the record does not open images
    assert s.box == (40, 30, 90, 70)
    assert render_view(s, "full")[0].size == (64, 48)
    for view in ("crop", "zoom", "overlay"):
        with pytest.raises(ImageError) as e:
            render_view(s, view)
        assert str(e.value) == "far: box [40, 30, 90, 70] lies outside the 64x48 image"
