"""`qwen-image-edge serve`: request parsing and responses (no Ray), the replica's batching (no Ray),
and the service itself on 127.0.0.1 with 2 replicas (Ray), whose good responses must equal `run`'s files.

The service is started once for the module (a subprocess with its own Ray temp folder; bench/serve.py's
``Service``); its last test stops it and checks that no Ray process is left.
"""

from __future__ import annotations

import base64
import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwen_image_edge.runtime.errors import BackendError, InputError, ManifestError, NumericalError, ShapeError
from qwen_image_edge.serve_http import (
    MAX_BODY_BYTES,
    encode_multipart,
    error_body,
    error_status,
    parse_edit,
    parse_generate,
    response_body,
)

LONG_PROMPT = "red " * 1100  # over the demo's 1024-token limit


def _png(size=(96, 64), mode="RGBA") -> bytes:
    import io

    im = Image.new(mode, size, (255, 255, 255, 255) if mode == "RGBA" else (255, 255, 255))
    ImageDraw.Draw(im).ellipse((8, 8, 40, 40), fill=(220, 30, 30) + ((255,) if mode == "RGBA" else ()))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """A JPEG whose EXIF orientation (6) says: turn 90 degrees to display."""
    import io

    im = Image.new("RGB", (64, 32), (255, 255, 255))
    ImageDraw.Draw(im).rectangle((4, 4, 20, 20), fill=(30, 30, 220))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------ parsing (no Ray)

def test_generate_body_fields_and_format():
    job = parse_generate(b'{"prompt": "a red circle", "seed": 3, "steps": 4, "width": 96, "height": 64, '
                         b'"guidance": 2, "negative_prompt": "blurry", "format": "json"}')
    assert (job.task, job.prompt, job.seed, job.steps, job.width, job.height) == ("generate", "a red circle", 3, 4, 96, 64)
    assert job.guidance == 2.0 and job.negative_prompt == "blurry" and job.as_json and job.images == ()
    assert not parse_generate(b'{"prompt": "x"}').as_json
    assert parse_generate(b'{"prompt": "x"}', accept="application/json").as_json
    assert parse_generate(b'{"prompt": "x", "seed": null}').seed is None  # null: the default


@pytest.mark.parametrize("body, fragment", [
    (b'{"prompt": ', "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b'["a red circle"]', "expected a JSON object, got list"),
    (b'{"seed": 1}', "expected a 'prompt' field"),
    (b'{"prompt": "x", "sampler": "ddim"}', "unknown field(s) ['sampler']"),
    (b'{"prompt": 3}', "prompt: expected a string, got 3"),
    (b'{"prompt": "x", "steps": 1.5}', "steps: expected an integer, got 1.5"),
    (b'{"prompt": "x", "seed": true}', "seed: expected an integer, got True"),
    (b'{"prompt": "x", "seed": -1}', "seed: expected a non-negative integer"),
    (b'{"prompt": "x", "steps": 0}', "steps: expected a positive integer"),
    (b'{"prompt": "x", "guidance": 0.5}', "guidance: expected a number >= 1"),
    (b'{"prompt": "x", "format": "webp"}', "format: expected one of ['png', 'json']"),
])
def test_bad_generate_bodies_are_one_line_input_errors(body, fragment):
    with pytest.raises(InputError) as info:
        parse_generate(body)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert error_status(info.value) == 400


def test_a_body_over_the_limit_is_413():
    with pytest.raises(InputError) as info:
        parse_generate(b" " * (MAX_BODY_BYTES + 1))
    assert error_status(info.value) == 413


def test_edit_form_images_decode_as_run_reads_the_files(tmp_path):
    """Uploaded bytes give the pixels `run --image FILE` works on (load_image of the path: first
    frame, EXIF orientation applied), in form order; text fields are converted to their types."""
    from qwen_image_edge.runtime.images import load_image

    files = [("circle.png", _png()), ("phone.jpg", _rotated_jpeg())]
    body, content_type = encode_multipart({"prompt": "make it blue", "seed": 7, "steps": 3, "guidance": "1.5"}, files)
    job = parse_edit(body, content_type)
    assert (job.task, job.prompt, job.seed, job.steps, job.guidance) == ("edit", "make it blue", 7, 3, 1.5)
    assert len(job.images) == 2 and job.images[1].size == (32, 64)  # turned by its EXIF orientation
    for (name, data), got in zip(files, job.images):
        (tmp_path / name).write_bytes(data)
        want = load_image(tmp_path / name)
        assert np.array_equal(np.asarray(load_image(got)), np.asarray(want)), name


@pytest.mark.parametrize("case, fragment", [
    ("json", "expected multipart/form-data"),
    ("no image", "expected one or more 'image' files"),
    ("garbage", "image 0 ('bad.png'): not a readable image file"),
    ("bad int", "steps: expected an integer, got 'four'"),
    ("unknown", "unknown field(s) ['strength']"),
])
def test_bad_edit_forms(case, fragment):
    fields, files = {"prompt": "x"}, [("a.png", _png())]
    if case == "no image":
        files = []
    elif case == "garbage":
        files = [("bad.png", b"not an image at all")]
    elif case == "bad int":
        fields["steps"] = "four"
    elif case == "unknown":
        fields["strength"] = "0.5"
    body, content_type = encode_multipart(fields, files)
    with pytest.raises(InputError) as info:
        parse_edit(body, "application/json" if case == "json" else content_type)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_error_bodies_are_one_line_and_statuses_split_client_from_server():
    multi = InputError("width 100:\n   expected a multiple of 32\n")
    assert json.loads(error_body(multi)) == {"error": "width 100: expected a multiple of 32"}
    assert [error_status(e) for e in (multi, ShapeError("s"), NumericalError("n"), ManifestError("m"),
                                      BackendError("b"), KeyError("k"))] == [400, 400, 422, 503, 503, 500]
    # an unexpected exception is named only: no message, no traceback reaches the client
    assert json.loads(error_body(KeyError("secret/path"))) == {"error": "internal error (KeyError)"}


def test_json_response_carries_the_png_and_its_parameters():
    png, params = _png(), {"seed": 3, "prompt": "x"}
    assert response_body(png, params, as_json=False) == (png, "image/png")
    body, media = response_body(png, params, as_json=True)
    doc = json.loads(body)
    assert media == "application/json" and base64.b64decode(doc["image"]) == png and doc["parameters"] == params


def test_ray_is_imported_by_the_serve_command_only():
    """The runtime, the request parsing, the replica's runner and the CLI's parser load neither Ray nor torch."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from qwen_image_edge import Pipeline\n"
            "import qwen_image_edge.runtime.pipeline, qwen_image_edge.serve_http, qwen_image_edge.serve_runner\n"
            "from qwen_image_edge.cli import build_parser\n"
            "build_parser().parse_args(['serve', 'x', '--replicas', '2'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'starlette'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("case, fragment", [
    ("missing", "manifest"),
    ("replicas", "--replicas: expected an integer >= 1, got 0"),
    ("wait", "--batch-wait-ms: expected 0..10000 milliseconds, got -5.0"),
    ("port", "cannot listen there"),
])
def test_serve_refuses_bad_options_in_one_line_before_ray_starts(demo_export, tmp_path, capsys, monkeypatch, case,
                                                                fragment):
    import socket

    pytest.importorskip("ray.serve")
    import ray

    from qwen_image_edge.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    argv = ["serve", str(tmp_path / "nowhere") if case == "missing" else str(demo_export)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv += {"replicas": ["--replicas", "0"], "wait": ["--batch-wait-ms", "-5"],
                 "port": ["--port", str(taken.getsockname()[1])]}.get(case, [])
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("qwen-image-edge: error:"), err


# ------------------------------------------------------------------ the replica's batching (no Ray)

@pytest.fixture(scope="module")
def runner(demo_export):
    from qwen_image_edge.serve_runner import Runner

    return Runner.load(demo_export, threads=1)


def test_batches_group_by_key_and_each_result_equals_the_job_alone(runner):
    """Same size/steps/guidance and prompt token counts share one call (batch 2 here); each PNG is
    byte for byte the one its job gives alone (own seed's noise, no padding from a neighbour)."""
    from qwen_image_edge.serve_http import Job

    prompts = ["a red circle on the left on a white background", "a blue circle on the left on a white background",
               "a green square"]
    jobs = [runner.resolve(Job("generate", p, seed=i, steps=2)) for i, p in enumerate(prompts)]
    assert runner.batch_key(jobs[0]) == runner.batch_key(jobs[1]) != runner.batch_key(jobs[2])
    results = runner.generate(jobs)
    assert [r.batch_size for r in results] == [2, 2, 1]
    for job, result in zip(jobs, results):
        (alone,) = runner.generate([job])
        assert alone.batch_size == 1 and alone.png == result.png
        assert result.params["seed"] == job.seed and result.params["negative_prompt"] == " "  # the model's default


def test_a_group_larger_than_the_export_takes_is_split(runner):
    """The export's graphs take at most 4 prompts (B); five alike jobs run as 4 + 1, not as a ShapeError
    that would send each job alone."""
    from qwen_image_edge.serve_http import Job

    assert runner.max_rows == 4 and runner.model_summary()["max_batch"] == 4
    jobs = [runner.resolve(Job("generate", "a red circle", seed=s, steps=1)) for s in range(5)]
    results = runner.generate(jobs)
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 1]
    assert results[4].png == runner.generate([jobs[4]])[0].png


def test_a_bad_job_fails_alone_in_its_batch(runner):
    from qwen_image_edge.serve_http import Job

    good = runner.resolve(Job("generate", "a red circle", seed=1, steps=1))
    wide = [runner.resolve(Job("generate", "a red circle", seed=s, steps=1, width=1024)) for s in (2, 3)]
    long = runner.resolve(Job("generate", LONG_PROMPT, seed=4, steps=1))
    with pytest.raises(InputError, match="over the limit of 1024 tokens"):
        runner.batch_key(long)  # checked before a job joins a batch
    out = runner.generate([wide[0], good, long, wide[1]])
    assert out[1].params["seed"] == 1 and out[1].batch_size == 1
    for i in (0, 2, 3):
        assert isinstance(out[i], InputError), out[i]
    assert "outside the exported range" in str(out[0]) and "over the limit" in str(out[2])


# ------------------------------------------------------------------ the service (Ray)

def _run_expected(export, tmp_path, name, prompt, seed, extra, images=()):
    """`qwen-image-edge run ... --num-images 4`: the files for seeds seed..seed+3."""
    from qwen_image_edge.cli import main

    argv = ["run", "--export", str(export), prompt, "-o", str(tmp_path / f"{name}.png"), "--seed", str(seed),
            "--num-images", "4", *extra]
    for path in images:
        argv += ["--image", str(path)]
    assert main(argv) == 0
    return [(tmp_path / f"{name}-{i}.png").read_bytes() for i in range(4)]


# (name, prompt, first seed, fields, images): 6 generate sets and 2 edit sets of 4 seeds each = 32 requests.
# Sets g1, g2 and g6 share a batch key (prompts of equal token counts), so their requests can share calls.
SETS = [
    ("g1", "a red circle on the left on a white background", 10, {"steps": 3}, ()),
    ("g2", "a blue circle on the left on a white background", 20, {"steps": 3}, ()),
    ("g3", "a green square", 30, {"steps": 3, "width": 96, "height": 64, "guidance": 1}, ()),
    ("g4", "a yellow triangle at the top right on a black background", 40,
     {"steps": 2, "guidance": 3, "negative_prompt": "blurry", "format": "json"}, ()),
    ("g5", "a red circle", 50, {"steps": 4, "width": 64, "height": 128}, ()),
    ("g6", "a green circle on the left on a white background", 60, {"steps": 3}, ()),
    ("e1", "make the circle blue", 70, {"steps": 2}, ("circle.png",)),
    ("e2", "put the square next to the circle", 80, {"steps": 2, "format": "json"}, ("circle.png", "phone.jpg")),
]
FLAGS = {"steps": "--steps", "width": "--width", "height": "--height", "guidance": "--guidance",
         "negative_prompt": "--negative-prompt"}


@pytest.fixture(scope="module")
def service(demo_export):
    pytest.importorskip("ray.serve")
    from bench.serve import Service

    # not waited for here: Ray starts while the test has `run` write the expected files
    svc = Service(demo_export, "--replicas", "2", "--max-batch", "4", "--batch-wait-ms", "100", wait=False)
    yield svc
    svc.close()


def _requests(tmp_path, export):
    """The 32 good requests (with the files `run` wrote for each) and the bad ones, shuffled."""
    (tmp_path / "circle.png").write_bytes(_png())
    (tmp_path / "phone.jpg").write_bytes(_rotated_jpeg())
    good = []
    for name, prompt, seed, fields, images in SETS:
        extra = [a for k, v in fields.items() if k in FLAGS for a in (FLAGS[k], str(v))]
        expected = _run_expected(export, tmp_path, name, prompt, seed, extra, [tmp_path / i for i in images])
        for i in range(4):
            values = {"prompt": prompt, "seed": seed + i, **fields}
            if images:
                body, ctype = encode_multipart(values, [(i_, (tmp_path / i_).read_bytes()) for i_ in images])
                good.append(("/v1/edit", body, {"Content-Type": ctype}, expected[i], fields.get("format")))
            else:
                good.append(("/v1/generate", json.dumps(values).encode(), {}, expected[i], fields.get("format")))
    garbage, ctype = encode_multipart({"prompt": "x"}, [("bad.png", b"\x89PNG but not really")])
    bad = [
        ("/v1/generate", b'{"prompt": "a red circle", "seed": ', {}, "malformed JSON"),
        ("/v1/generate", b'{"prompt": "a red circle", "width": 1024}', {}, "outside the exported range 32..256"),
        ("/v1/generate", b'{"prompt": "a red circle", "width": 100}', {}, "expected a multiple of 32"),
        ("/v1/edit", garbage, {"Content-Type": ctype}, "not a readable image file"),
        ("/v1/generate", json.dumps({"prompt": LONG_PROMPT}).encode(), {}, "over the limit of 1024 tokens"),
        ("/v1/generate", b'{"prompt": "x", "cfg": 3}', {}, "unknown field(s) ['cfg']"),
    ]
    mixed = [("good", g) for g in good] + [("bad", b) for b in bad]
    random.Random(0).shuffle(mixed)
    return mixed


def test_service_answers_32_mixed_requests_at_concurrency_4_as_run_does(service, demo_export, tmp_path):
    """32 good requests (24 generate, 8 edit) and 6 bad ones, 4 at a time, to 2 replicas: every good
    response is byte for byte the PNG `run` writes for the same parameters (JSON: its base64 and
    parameters); every bad one is a 4xx with a one-line error; no 5xx, no failure."""
    from bench.serve import post

    mixed = _requests(tmp_path, demo_export)
    service.wait_ready()
    model = json.loads(post(service.url, "/v1/model").body)
    assert model["sizes"]["max"] == 256 and model["max_prompt_tokens"] == 1024 and model["can_edit"]

    def send(item):
        kind, (path, body, headers, *rest) = item
        return kind, rest, post(service.url, path, body, headers)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, mixed))
    assert not [r.status for _, _, r in answers if r.status >= 500]
    batches = []
    for kind, rest, reply in answers:
        if kind == "bad":
            (fragment,) = rest
            error = json.loads(reply.body)["error"]
            assert 400 <= reply.status < 500 and fragment in error and "\n" not in error, (reply.status, error)
            continue
        expected, fmt = rest
        assert reply.status == 200, reply.body[:300]
        if fmt == "json":
            doc = json.loads(reply.body)
            assert base64.b64decode(doc["image"]) == expected
            assert doc["parameters"] == json.loads(_params_of(expected))
        else:
            assert reply.headers["content-type"] == "image/png" and reply.body == expected
        batches.append(int(reply.headers["x-batch-size"]))
    assert len(batches) == 32
    assert max(batches) > 1, batches  # requests did share pipeline calls, and still equal `run`'s files


def _params_of(png: bytes) -> str:
    import io

    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return im.text["qwen-image-edge"]


def test_service_stops_cleanly_and_leaves_no_ray_process(service):
    service.wait_ready()  # also when run alone
    assert service.tree, "the service started no Ray processes?"
    assert service.stop() == 0, service.output()[-3000:]
    assert service.leftovers() == []
