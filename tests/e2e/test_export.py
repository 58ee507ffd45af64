"""`cifar-dist export`: each format checks itself on the run's test set and prints its accuracy; the
files take raw pixels (normalisation inside), any batch size, and carry their class names; a file
that fails its check is not written; `serve --backend onnx` serves the onnx file, and refuses a
damaged one."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cifar_dist import cli
from cifar_dist.config import load_config
from cifar_dist.data import load_dataset
from cifar_dist.export import CARD_KEY, FORMATS, READERS
from cifar_dist.predict import load_classifier, probabilities
from cifar_dist.rundir import CONFIG, MODEL, SUMMARY, RunDir
from tests.helpers import PY, TINY, run, train_cmd
from tests.helpers.serving import start_server


@pytest.fixture(scope="module")
def module_env(cache_dir) -> dict[str, str]:
    return dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_env) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "e"
    run(train_cmd(*TINY, f"run.dir={run_dir}"), module_env)
    return run_dir


@pytest.fixture(scope="module")
def exported(trained, module_env) -> dict[str, str]:
    """Each format exported to its default path in the run dir; the command's output per format. onnx
    through the installed command; the others in this process (no second start of torch)."""
    out = {"onnx": run([PY, "-m", "cifar_dist.cli", "export", str(trained), "--format", "onnx"], module_env).stdout}
    for fmt in ("torchscript", "safetensors"):
        proc = export(Path(module_env["CIFAR_DIST_CACHE"]), trained, fmt)
        assert proc.returncode == 0, proc.stderr
        out[fmt] = proc.stdout
    return out


@pytest.fixture(scope="module")
def test_set(cache_dir):
    return load_dataset(load_config(None, TINY + [f"data.cache_dir={cache_dir}"]).data, announce=lambda s: None)


def in_process(argv: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    """`cifar-dist ARGV` run in this process (cli.main: what the command runs), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with (mock.patch.dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir)), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err)):
        code = cli.main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def export(cache_dir: Path, run_dir: Path, fmt: str, *args: str) -> subprocess.CompletedProcess:
    return in_process(["export", str(run_dir), "--format", fmt, *args], cache_dir)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_checks_itself_and_prints_its_test_accuracy(exported, trained, fmt):
    out = exported[fmt]
    summary = RunDir(trained).summary()
    path = trained / f"model{FORMATS[fmt]}"
    assert out.startswith(f"{path} ({fmt}, ") and path.is_file()
    check = re.search(r"check on 300 test images against torch: max \|logit difference\| (\S+) \(<= 0.0001: ok\), "
                      r"same top-1 on (\S+)% \(>= 99.9%: ok\)", out)
    assert check and float(check.group(1)) <= 1e-4 and float(check.group(2)) >= 99.9, out
    accuracy = re.search(r"test accuracy of the exported model: (\S+)% on 300 test images; summary.json's: (\S+)% "
                         r"\((\S+) points apart, <= 0.05: ok\)", out)
    assert accuracy, out
    assert accuracy.group(2) == f"{100 * summary['test_accuracy']:.2f}" and float(accuracy.group(3)) <= 0.05
    assert not list(trained.glob(".*.tmp*"))  # no temporary file left beside it


def test_the_files_take_raw_pixels_any_batch_and_carry_their_card(exported, trained, test_set):
    net, classes, stats = load_classifier(trained / MODEL)
    pixels = test_set.test_x[:7].numpy()
    expected = probabilities(net, stats, torch.from_numpy(pixels)).numpy()  # predict's normalisation and net
    summary = RunDir(trained).summary()

    import onnx
    import onnxruntime as ort

    onnx_file = trained / "model.onnx"
    proto = onnx.load(onnx_file)
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]  # a named, dynamic batch axis
    assert outp.name == "logits" and "uint8 (N, 32, 32, 3)" in proto.doc_string
    card = json.loads({p.key: p.value for p in proto.metadata_props}[CARD_KEY])
    assert card["classes"] == classes and card["run_id"] == summary["run_id"] and card["model"] == "blitz"
    assert (card["mean"], card["std"]) == (list(stats.mean), list(stats.std))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])  # onnxruntime alone
    for x in (pixels, pixels[:1]):
        logits = session.run(None, {"pixels": x})[0]
        assert np.abs(torch.softmax(torch.from_numpy(logits), 1).numpy() - expected[: len(x)]).max() < 1e-5

    extra = {f"{CARD_KEY}.json": ""}
    with warnings.catch_warnings():  # torch deprecates TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(trained / "model.torchscript.pt", _extra_files=extra)  # torch alone, no cifar_dist code
    assert json.loads(extra[f"{CARD_KEY}.json"])["classes"] == classes
    for x in (pixels, pixels[:1]):
        got = torch.softmax(scripted(torch.from_numpy(x)), 1).detach().numpy()
        assert np.abs(got - expected[: len(x)]).max() < 1e-5

    from safetensors import safe_open

    with safe_open(trained / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()[CARD_KEY])["classes"] == classes
        assert f.get_tensor("normalize.mean").tolist() == pytest.approx(list(stats.mean))
        assert {k.removeprefix("net.") for k in f.keys() if k.startswith("net.")} == set(net.state_dict())  # noqa: SIM118
    for fmt, reader in READERS.items():  # and the project's own readers of each format
        card, logits = reader(trained / f"model{FORMATS[fmt]}")
        assert card.classes == classes and card.test_accuracy == summary["test_accuracy"]
        assert np.abs(torch.softmax(torch.from_numpy(logits(pixels)), 1).numpy() - expected).max() < 1e-5


def test_a_file_that_fails_its_check_is_not_written(trained, cache_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("model.onnx", "model.torchscript.pt", "model.safetensors"))
    summary = json.loads((copy / SUMMARY).read_text())
    (copy / SUMMARY).write_text(json.dumps({**summary, "test_accuracy": summary["test_accuracy"] - 0.1}))
    proc = export(cache_dir, copy, "torchscript")
    assert proc.returncode == 1, proc.stderr
    assert "points apart, <= 0.05: FAILED" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {copy / 'model.torchscript.pt'}: the exported model fails its check; nothing written"
    assert sorted(p.name for p in copy.iterdir() if "torchscript" in p.name) == []

    # A run evaluated with test-time flips: its summary is not what one forward pass gives, so the
    # file is held to the torch net's own fp32 accuracy instead, and says so.
    config = yaml.safe_load((copy / CONFIG).read_text())
    config["eval"]["tta_flip"] = True
    (copy / CONFIG).write_text(yaml.safe_dump(config))
    proc = export(cache_dir, copy, "torchscript", "--out", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "the torch net's fp32 (summary.json's" in proc.stdout and "test-time augmentation" in proc.stdout
    assert (tmp_path / "m.pt").is_file()


def test_export_mistakes_are_one_error_line(trained, cache_dir, tmp_path):
    mistakes = [
        (["tflite"], "--format: unknown format 'tflite'; choose one of onnx, torchscript, safetensors"),
        (["onnx", "--out", str(tmp_path / "no" / "m.onnx")], f"--out: folder {tmp_path / 'no'} does not exist"),
        (["onnx", "data.source=imagefolder", f"data.path={tmp_path}"], "no train/<class>/<image> files"),
    ]
    for args, said in mistakes:  # (the data's progress line may come first)
        proc = export(cache_dir, trained, *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and said in errors[0], proc.stderr
        assert proc.stderr.endswith(errors[0] + "\n") and proc.stdout == "", proc.stderr
    assert not (tmp_path / "no").exists()


def test_serve_backend_onnx(exported, trained, module_env, tmp_path, test_set):
    image = tmp_path / "x.png"
    Image.fromarray(test_set.test_x[5].numpy()).resize((50, 40)).save(image)
    server = start_server(trained, tmp_path / "serve.log", module_env, "--backend", "onnx")
    try:
        model = httpx.get(f"{server.url}/v1/model").json()
        onnx_file = trained / "model.onnx"
        assert model["backend"] == "onnx" and model["file"] == "model.onnx"
        assert model["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
        assert model["test_accuracy"] == RunDir(trained).summary()["test_accuracy"] and model["classes"] == test_set.classes
        answer = httpx.post(f"{server.url}/v1/predict?top_k=4", content=image.read_bytes(),
                            headers={"content-type": "image/png"}).json()["predictions"][0]["top"]
    finally:
        assert server.stop() == 0
    proc = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(trained), str(image), "--json", "--top-k", "4"],
               module_env)
    want = json.loads(proc.stdout)[0]["top"]
    assert [t["class"] for t in answer] == [t["class"] for t in want]
    assert all(abs(a["probability"] - b["probability"]) <= 2e-4 for a, b in zip(answer, want))


def test_serve_refuses_a_damaged_onnx_file(exported, trained, tmp_path):
    good = (trained / "model.onnx").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # inside the weights: the file still parses
    (tmp_path / "flipped.onnx").write_bytes(bytes(flipped))
    (tmp_path / "short.onnx").write_bytes(good[: len(good) // 2])
    for name, said in (("flipped.onnx", "damaged (its graph does not match the sha256 saved with it)"),
                       ("short.onnx", "damaged or not an onnx file")):
        proc = in_process(["serve", str(tmp_path / name), "--backend", "onnx", "--port", "0"], tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert said in proc.stderr and proc.stdout == "", proc.stderr
