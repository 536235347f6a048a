"""Public benchmark loaders: one fixture per format, built here with the exact public column names
and encodings (HF {bytes, path} structs, base64 strings, raw bytes, CSV + folder, JSON)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zoomless.eval.benchmarks import BENCHMARKS, benchmark_name, detect_benchmark, load_benchmark
from zoomless.imaging import load_image
from zoomless.sample import LETTERS, SampleError, read_samples, write_samples


def encoded(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def hf_image(data: bytes, name: str = "img.png") -> dict:
    return {"bytes": data, "path": name}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def pixel(ref) -> tuple[int, int, int]:
    return load_image(ref).getpixel((0, 0))


def common_meta(s, bench: str, raw: str) -> None:
    assert s.meta["benchmark"] == bench
    assert s.meta["prompt_final"] is True
    assert s.meta["raw_question"] == raw


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

# ----------------------------------------------------------------------------- ZoomBench


def zoombench_rows(q: str = "query", a: str = "response") -> list[dict]:
    return [
        {
            "id": "zb-0",
            q: "How many screws are on the panel?",
            a: "4",
            "image": hf_image(encoded(RED, (200, 100))),
            "crop_image": hf_image(encoded(GREEN, (20, 10)), "crop.png"),
            "question_type": "fine-grained counting",
            "bbox": [10, 20, 60, 70],
        },
        {
            "id": "zb-1",
            q: "What color is the sign?\n(A) red\n(B) blue",
            a: "B",
            "image": hf_image(encoded(BLUE, (200, 100))),
            "crop_image": None,  # the crop may be missing on a row
            "question_type": "color",
            "bbox": [150, 0, 400, 90],  # outside the 200x100 image: kept in meta, not as a box
        },
    ]


def test_zoombench(tmp_path):
    path = write_parquet(tmp_path / "data" / "test.parquet", zoombench_rows())
    samples = load_benchmark("zoombench", path)
    a, b = samples
    assert (a.id, a.question, a.answer) == ("zb-0", "How many screws are on the panel?", "4")
    assert a.dimension == "fine-grained counting"
    common_meta(a, "zoombench", "How many screws are on the panel?")
    assert a.options is None
    assert pixel(a.image) == RED and load_image(a.image).size == (200, 100)
    assert pixel(a.teacher_image) == GREEN  # the crop view of this sample is the teacher image
    assert a.box == (10, 20, 60, 70)
    assert b.teacher_image is None and b.answer == "B" and b.box is None
    assert b.meta["bbox"] == [150, 0, 400, 90]
    # the folder works as well as the file
    assert [s.id for s in load_benchmark("zoom-bench", tmp_path)] == ["zb-0", "zb-1"]


def test_zoombench_prompt_answer_column_names(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", zoombench_rows(q="prompt", a="answer"))
    a, b = load_benchmark("zoombench", path)
    assert a.question == "How many screws are on the panel?" and a.answer == "4"
    assert b.question.endswith("(B) blue") and b.answer == "B"


# ----------------------------------------------------------------------------- V*

VSTAR_OPTIONS = [("white", "black", "red", "blue"), ("left", "right"), ("rubber", "cotton", "leather", "plastic")]


def vstar_file(tmp_path: Path, n: int = 8) -> Path:
    rows = []
    for i in range(n):
        opts = VSTAR_OPTIONS[i % len(VSTAR_OPTIONS)]
        text = f"What is the attribute of object {i}?\n" + "\n".join(f"({LETTERS[j]}) {o}" for j, o in enumerate(opts))
        rows.append(
            {
                "image": hf_image(encoded((i * 20, 0, 0))),
                "text": text,
                "label": LETTERS[i % len(opts)],
                "question_id": f"sa_{i}",
                "category": "direct_attributes" if i % 2 == 0 else "relative_position",
            }
        )
    return write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)


def test_vstar_seed0_keeps_published_text(tmp_path):
    path = vstar_file(tmp_path)
    rows = pq.read_table(path).to_pylist()
    samples = load_benchmark("vstar", path)
    for row, s in zip(rows, samples):
        assert s.question == row["text"] + "\nAnswer with the option's letter from the given choices directly."
        common_meta(s, "vstar", row["text"])
        assert s.meta["answer_letter"] == row["label"]
        assert s.answer_letter == row["label"]
        assert s.dimension == row["category"] and s.id == row["question_id"]
        assert pixel(s.image) == load_image(row["image"]["bytes"]).getpixel((0, 0))


def test_vstar_shuffle_moves_options_and_gold_follows(tmp_path):
    path = vstar_file(tmp_path)
    base = load_benchmark("vstar", path, seed=0)
    moved = 0
    for seed in (1, 2):
        shuffled = load_benchmark("vstar", path, seed=seed)
        assert [s.question for s in shuffled] == [s.question for s in load_benchmark("vstar", path, seed=seed)]
        for b, s in zip(base, shuffled):
            assert s.answer == b.answer  # the same option text is gold
            assert sorted(s.options) == sorted(b.options)
            letter = s.meta["answer_letter"]
            assert s.answer_letter == letter
            assert f"({letter}) {b.answer}\n" in s.question  # the rewritten text shows it at the new letter
            assert s.meta["raw_question"] == b.meta["raw_question"]
            moved += s.options != b.options
        if seed == 1:
            assert any(s.options != b.options for b, s in zip(base, shuffled))
    assert moved >= 4
    # a row's order does not depend on which rows were loaded
    assert load_benchmark("vstar", path, seed=1, limit=3) == load_benchmark("vstar", path, seed=1)[:3]


def test_vstar_text_that_already_has_the_suffix_is_not_doubled(tmp_path):
    suffix = "Answer with the option's letter from the given choices directly."
    text = "Is the cup left or right?\n(A) left\n(B) right\n" + suffix
    path = write_parquet(
        tmp_path / "v.parquet",
        [{"image": hf_image(encoded(RED)), "text": text, "label": "b", "question_id": "q", "category": "x"}],
    )
    (s,) = load_benchmark("vstar", path)
    assert s.question == text and s.answer == "right" and s.answer_letter == "B"


# ----------------------------------------------------------------------------- HR-Bench


def hrbench_rows(n: int = 2) -> list[dict]:
    return [
        {
            "index": i,
            "question": f"What is written on sign {i}?",
            "answer": "C",
            "A": "STOP",
            "B": "EXIT",
            "C": "OPEN",
            "D": "SALE",
            "category": "single" if i == 0 else "cross",
            "image": b64(encoded(BLUE, fmt="JPEG")),
        }
        for i in range(n)
    ]


def test_hrbench(tmp_path):
    path = write_parquet(tmp_path / "hr_bench_8k.parquet", hrbench_rows())
    a, b = load_benchmark("hrbench-8k", path)
    assert a.question == (
        "What is written on sign 0? Select from the following choices.\n(A) STOP\n(B) EXIT\n(C) OPEN\n(D) SALE"
    )
    assert a.options == ("STOP", "EXIT", "OPEN", "SALE") and a.answer == "OPEN" and a.answer_letter == "C"
    assert (a.id, a.dimension, b.dimension) == ("0", "single", "cross")
    common_meta(a, "hrbench-8k", "What is written on sign 0?")
    assert load_image(a.image).size == (40, 30)
    assert detect_benchmark(path) == "hrbench-8k"


def test_hrbench_folder_picks_the_named_size(tmp_path):
    write_parquet(tmp_path / "hr_bench_4k.parquet", hrbench_rows(1))
    write_parquet(tmp_path / "hr_bench_8k.parquet", hrbench_rows(2))
    assert len(load_benchmark("HR-Bench 4K", tmp_path)) == 1
    assert len(load_benchmark("hrbench-8k", tmp_path)) == 2


def test_bad_base64_names_the_row(tmp_path):
    rows = hrbench_rows(3)
    rows[1]["image"] = "this is %% not base64!"
    path = write_parquet(tmp_path / "hr_bench_4k.parquet", rows)
    with pytest.raises(SampleError, match=r"hr_bench_4k\.parquet: row 1: 'image' is not valid base64"):
        load_benchmark("hrbench-4k", path)
    rows[1]["image"] = b64(b"valid base64 but no image inside")
    path = write_parquet(tmp_path / "hr_bench_4k.parquet", rows)
    with pytest.raises(SampleError, match=r"row 1: 'image' is not an image"):
        load_benchmark("hrbench-4k", path)
    assert len(load_benchmark("hrbench-4k", path, limit=1)) == 1  # rows before the bad one load


# ----------------------------------------------------------------------------- MME-RealWorld


def mme_rows() -> list[dict]:
    return [
        {
            "index": 7,
            "question": "What is the speed limit?",
            "multi-choice options": ["(A) 30", "(B) 50", "(C) 60", "(D) 80", "(E) The image does not feature it."],
            "answer": "B",
            "category": "autonomous_driving",
            "l2-category": "perception",
            "bytes": b64(encoded(GREEN)),
        }
    ]


def test_mme_realworld_en(tmp_path):
    path = write_parquet(tmp_path / "MME-RealWorld-Lmms-eval" / "data" / "train-00000.parquet", mme_rows())
    (s,) = load_benchmark("mme-realworld", path.parent)
    assert s.question == (
        "What is the speed limit? The choices are listed below:\n(A) 30\n(B) 50\n(C) 60\n(D) 80\n"
        "(E) The image does not feature it.\nSelect the best answer to the above multiple-choice question "
        "based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
        "The best answer is: "
    )
    assert s.options == ("30", "50", "60", "80", "The image does not feature it.")
    assert s.answer == "50" and s.answer_letter == "B" and s.dimension == "autonomous_driving"
    assert s.meta["l2_category"] == "perception"
    common_meta(s, "mme-realworld", "What is the speed limit?")
    assert pixel(s.image) == GREEN
    assert detect_benchmark(path) == "mme-realworld"


def test_mme_realworld_cn(tmp_path):
    rows = mme_rows()
    rows[0]["question"] = "限速是多少？"
    path = write_parquet(tmp_path / "data" / "test.parquet", rows)
    (s,) = load_benchmark("mme-realworld-cn", path)
    assert s.question.startswith("限速是多少？ 选项如下所示:\n(A) 30\n")
    assert s.question.endswith("\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： ")
    assert s.answer == "50"
    assert detect_benchmark(path) == "mme-realworld-cn"  # Chinese question text
    lite = write_parquet(tmp_path / "MME-RealWorld-lite-lmms-eval" / "data" / "train.parquet", mme_rows())
    assert detect_benchmark(lite.parent.parent) == "mme-realworld-lite"
    assert load_benchmark("mme-realworld-lite", lite)[0].meta["benchmark"] == "mme-realworld-lite"


# ----------------------------------------------------------------------------- MMStar


def test_mmstar_raw_bytes(tmp_path):
    q = "Which option describes the image?\nOptions: A: a cat, B: a dog, C: a car, D: a tree"
    text_columns = ("index", "question", "answer", "category", "l2_category")
    schema = pa.schema([(k, pa.string()) for k in text_columns] + [("image", pa.binary())])  # raw bytes
    row = {"index": "12", "question": q, "answer": "B", "category": "coarse perception", "l2_category": "image scene"}
    row["image"] = encoded(RED, fmt="JPEG")
    path = write_parquet(tmp_path / "mmstar.parquet", [row], schema)
    (s,) = load_benchmark("mmstar", path)
    assert (s.id, s.question, s.answer, s.options, s.dimension) == ("12", q, "B", None, "coarse perception")
    assert s.meta["l2_category"] == "image scene"
    common_meta(s, "mmstar", q)
    assert load_image(s.image).size == (40, 30)
    assert detect_benchmark(path) == "mmstar"


# ----------------------------------------------------------------------------- POPE


def test_pope(tmp_path):
    rows = [
        {"id": str(i), "question_id": "1", "question": "Is there a dog in the image?", "answer": ans,
         "image_source": "COCO_val2014_000000310196", "category": cat, "image": hf_image(encoded(BLUE))}
        for i, (cat, ans) in enumerate([("adversarial", "yes"), ("random", "No")])
    ]
    path = write_parquet(tmp_path / "Full" / "adversarial-00000-of-00001.parquet", rows)
    a, b = load_benchmark("pope", path)
    assert a.question == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert (a.answer, b.answer) == ("yes", "no")
    assert (a.id, b.id) == ("adversarial/1", "random/1")  # question ids repeat across splits
    assert a.dimension == "adversarial" and a.meta["image_source"] == "COCO_val2014_000000310196"
    common_meta(a, "pope", "Is there a dog in the image?")
    assert pixel(a.image) == BLUE
    assert detect_benchmark(tmp_path) == "pope"


# ----------------------------------------------------------------------------- CV-Bench


def test_cvbench(tmp_path):
    prompt = "How many cars are in the image? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1"
    for kind in ("2D", "3D"):
        rows = [{"idx": 0, "type": kind, "task": "Count" if kind == "2D" else "Depth", "image": hf_image(encoded(RED)),
                 "prompt": prompt, "answer": "(B)", "source": "ADE20K"}]
        write_parquet(tmp_path / f"test_{kind.lower()}.parquet", rows)
    a, b = load_benchmark("cv-bench", tmp_path)
    assert (a.id, b.id) == ("2d/0", "3d/0")
    assert a.question == prompt and a.answer == "B" and a.options is None
    assert (a.dimension, b.dimension) == ("Count", "Depth")
    assert a.meta["type"] == "2D" and a.meta["source"] == "ADE20K"
    common_meta(a, "cvbench", prompt)
    assert pixel(a.image) == RED
    assert detect_benchmark(tmp_path / "test_3d.parquet") == "cvbench"


# ----------------------------------------------------------------------------- MMVP


def mmvp_folder(tmp_path: Path) -> Path:
    root = tmp_path / "MMVP"
    (root / "MMVP Images").mkdir(parents=True)
    with (root / "Questions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerow([1, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"])
        w.writerow(
            [2, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b) Closed"],
        )
    for i, color in ((1, RED), (2, GREEN)):
        Image.new("RGB", (16, 16), color).save(root / "MMVP Images" / f"{i}.jpg")
    return root


def test_mmvp(tmp_path):
    root = mmvp_folder(tmp_path)
    a, b = load_benchmark("mmvp", root)
    assert a.question == "Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed"
    assert (a.answer, b.answer) == ("A", "B")
    assert a.meta["pair"] == b.meta["pair"] == 0
    common_meta(a, "mmvp", "Are the butterfly's wings closer to being open or closed?")
    assert isinstance(a.image, str) and Path(a.image).is_absolute()
    assert load_image(b.image).getpixel((8, 8))[1] > 200
    assert detect_benchmark(root) == "mmvp"
    assert load_benchmark("mmvp", root / "Questions.csv") == [a, b]


def test_mmvp_missing_image_names_the_row(tmp_path):
    root = mmvp_folder(tmp_path)
    (root / "MMVP Images" / "2.jpg").unlink()
    with pytest.raises(SampleError, match=r"Questions\.csv: row 1: no image named 2\.\*"):
        load_benchmark("mmvp", root)


# ----------------------------------------------------------------------------- VisualProbe


def test_visualprobe(tmp_path):
    level = tmp_path / "VisualProbe_Hard"
    (level / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), BLUE).save(level / "images" / "0001.png")
    Image.new("RGB", (20, 20), RED).save(level / "images" / "0002.png")
    rows = [
        {"problem": "<image>\nWhat is the number on the bus?", "solution": "42", "images": ["images/0001.png"]},
        {"problem": "What brand is the cup? <image>", "solution": "<answer>Acme</answer>", "image": "images/0002.png"},
    ]
    (level / "val.json").write_text(json.dumps(rows))
    a, b = load_benchmark("visualprobe", tmp_path)
    assert a.question == "What is the number on the bus?" and a.answer == "42"
    assert b.question == "What brand is the cup?" and b.answer == "Acme"
    assert a.dimension == "hard" and a.id == "hard/0"
    common_meta(a, "visualprobe", "<image>\nWhat is the number on the bus?")
    assert pixel(a.image) == BLUE and pixel(b.image) == RED
    assert detect_benchmark(tmp_path) == "visualprobe"
    rows[1]["image"] = "images/missing.png"
    (level / "val.json").write_text(json.dumps(rows))
    with pytest.raises(SampleError, match=r"val\.json: row 1: 'image' file not found"):
        load_benchmark("visualprobe", level / "val.json")
    del rows[1]["solution"]
    (level / "val.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSONL is read too
    with pytest.raises(SampleError, match=r"val\.json: row 1: not a visualprobe row: missing column\(s\) 'solution'"):
        load_benchmark("visualprobe", level / "val.json")


# ----------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize(
    "name, row, needle",
    [
        ("zoombench", {"id": "1", "question": "q", "response": "a", "image": None}, r"'query' \(or 'prompt'\)"),
        ("vstar", {"image": None, "question": "q", "label": "A"}, r"'text'"),
        ("hrbench-4k", {"index": 1, "question": "q", "answer": "A", "A": "x", "image": "x"}, r"'B'"),
        ("mme-realworld", {"index": 1, "question": "q", "answer": "A", "image": "x"}, r"'multi-choice options'"),
        ("pope", {"question": "q", "image": None}, r"'answer'"),
    ],
)
def test_wrong_columns_name_file_benchmark_and_column(tmp_path, name, row, needle):
    path = write_parquet(tmp_path / "bench.parquet", [row])
    with pytest.raises(SampleError, match=rf"bench\.parquet: not a {name} file: missing column\(s\) {needle}") as e:
        load_benchmark(name, path)
    assert "found:" in str(e.value)


def test_wrong_csv_columns(tmp_path):
    (tmp_path / "MMVP Images").mkdir()
    (tmp_path / "Questions.csv").write_text("Index,Question,Options\n1,q,(a) x (b) y\n")
    with pytest.raises(SampleError, match=r"not a mmvp file: missing column\(s\) 'Correct Answer'"):
        load_benchmark("mmvp", tmp_path)


def test_limit_image_dir_and_round_trip(tmp_path):
    path = vstar_file(tmp_path, n=5)
    assert len(load_benchmark("vstar", path, limit=2)) == 2
    assert load_benchmark("vstar", path, limit=0) == []
    spilled = load_benchmark("vstar", path, image_dir=tmp_path / "images")
    assert all(isinstance(s.image, str) and Path(s.image).parent == tmp_path / "images" for s in spilled)
    assert [pixel(s.image) for s in spilled] == [pixel(s.image) for s in load_benchmark("vstar", path)]
    # the samples survive the project's own JSONL format, meta included
    back = read_samples(write_samples(load_benchmark("vstar", path, seed=1), tmp_path / "v.jsonl"))
    assert back == load_benchmark("vstar", path, seed=1)


def test_names_and_errors(tmp_path):
    assert benchmark_name("V*") == "vstar" and benchmark_name("MME_RealWorld CN") == "mme-realworld-cn"
    assert set(BENCHMARKS) >= {"zoombench", "vstar", "hrbench-4k", "hrbench-8k", "mme-realworld", "mme-realworld-cn",
                               "mme-realworld-lite", "mmstar", "pope", "cvbench", "mmvp", "visualprobe"}
    with pytest.raises(SampleError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)
    with pytest.raises(SampleError, match="no such file or folder"):
        load_benchmark("vstar", tmp_path / "missing.parquet")
    path = write_parquet(tmp_path / "dup" / "test.parquet", zoombench_rows() * 2)
    with pytest.raises(SampleError, match="duplicate sample id 'zb-0'"):
        load_benchmark("zoombench", path)
    generic = tmp_path / "generic.json"
    generic.write_text(json.dumps([{"images": ["a.png"], "query": "q", "response": "r"}]))
    assert detect_benchmark(generic) is None
    assert detect_benchmark(write_parquet(tmp_path / "zb" / "test.parquet", zoombench_rows())) == "zoombench"
    assert detect_benchmark(vstar_file(tmp_path / "vs")) == "vstar"
