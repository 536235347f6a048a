"""`zoomless synth` with a real (random, tiny) Qwen-VL model behind `zoomless serve` on loopback.

A random model writes garbage: parsing must stay strict, nothing may crash, and the funnel must
say where the items died. The exported parquet files are still valid (and empty).
"""

from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from test_synth_oracle import Oracle, funnel, make_world, oracle_server, stage, synth_config
from zoomless.sample import read_samples
from zoomless.serve import load_app, running
from zoomless.synth.export import EASYR1_SCHEMA, OPD_SCHEMA
from zoomless.synth.runner import run_synth

SHORT = {"max_new_tokens": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2.5-VL served on loopback: (base url, served name, model dir)."""
    from zoomless.models.tiny import build_tiny_vlm

    model_dir = build_tiny_vlm(tmp_path_factory.mktemp("m") / "tiny-vl", size="test", max_pixels=224 * 224)
    app = load_app(model_dir, device="cpu")
    with running(app) as url:
        yield url + "/v1", "tiny-vl", model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("zw")
    samples, images = make_world(root, n=2)
    return root, samples, images


def tiny_roles(url: str, model: str) -> dict:
    role = {"base_url": url, "model": model, **SHORT}
    return {name: dict(role) for name in ("lister", "questioner", "validator", "judge", "distractor", "student")} | {
        "teachers": [{"name": "t1", **role}, {"name": "t2", **role}]}


def test_tiny_model_in_every_role(tmp_path, tiny, world):
    url, model, _ = tiny
    root, _, _ = world
    cfg = synth_config(tmp_path, root / "images", url, roles=tiny_roles(url, model),
                       **{"regions.backend": "opencv", "regions.max_per_image": 2})
    out = run_synth(cfg)
    report = funnel(out)
    questions = stage(report, "questions")
    assert questions["in"] == 4 and questions["out"] == 0
    assert sum(questions["dropped"].values()) == 4
    assert set(questions["dropped"]) <= {"no JSON list of questions in the reply", "the model wrote no usable question",
                                         "the model declined (empty list)"}
    assert stage(report, "export")["out"] == 0 and report["pending_total"] == 0
    assert report["tokens"]["questioner"]["requests"] == 4 and report["tokens"]["questioner"]["completion_tokens"] > 0
    assert "## tokens per role" in (out / "funnel.md").read_text()
    # the outputs are valid, empty files that our trainers and EasyR1 can open
    assert read_samples(out / "samples.parquet") == []
    assert pq.read_schema(out / "easyr1.parquet").names == EASYR1_SCHEMA.names
    assert pq.read_schema(out / "vision_opd.parquet").names == OPD_SCHEMA.names

    # garbage is a result too: a rerun does not pay for it again
    run_synth(cfg)
    assert funnel(out)["tokens"]["questioner"]["requests"] == 4

    # the teacher backend: the random lister names no usable object
    cfg.regions.backend = "teacher"
    report = funnel(run_synth(cfg))
    regions = stage(report, "regions")
    assert regions["in"] == 2 and regions["out"] == 0 and sum(regions["dropped"].values()) == 2


def test_tiny_validator_in_process_and_tiny_teachers(tmp_path, tiny, world):
    """Good questions from the oracle, judged and answered by the random model: they die at
    validation, or (validation off) at the consensus."""
    url, model, model_dir = tiny
    root, samples, images = world
    with oracle_server(Oracle(samples, images)) as oracle_url:
        roles = tiny_roles(url, model)
        roles["lister"] = roles["questioner"] = {}  # the oracle (the shared endpoint)
        roles["validator"] = {"model_dir": str(model_dir), **SHORT}  # in-process, no server
        cfg = synth_config(tmp_path, root / "images", oracle_url, roles=roles,
                           **{"regions.max_per_image": 2, "endpoint.max_image_pixels": 112 * 112})
        report = funnel(run_synth(cfg))
        validation = stage(report, "validation")
        assert validation["in"] == 12 and validation["out"] == 0
        assert validation["dropped"] == {"no verdict line in the reply": 12}
        assert report["tokens"]["validator"]["requests"] == 12

        cfg.validation.enabled = False
        report = funnel(run_synth(cfg))
    consensus = stage(report, "consensus")
    assert stage(report, "answers")["out"] == 12 and consensus["in"] == 12 and consensus["out"] == 0
    assert set(consensus["dropped"]) <= {"no teacher gave an extractable answer", "agreement under 75% of 8 votes"}
    assert report["tokens"]["t1"]["requests"] >= 12 and report["tokens"]["t2"]["completion_tokens"] > 0
    assert stage(report, "export")["out"] == 0
