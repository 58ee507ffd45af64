"""`cifar-dist data prepare` as a user runs it: it fills the cache; a damaged archive, a read-only cache
and a cache dir that is a file each end in one line or a decode in memory. The sources, the cache and the
batches in-process: tests/unit/test_data.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PY, run
from tests.helpers.data import write_archive, write_image_tree

CLASSES = ["cat", "dog", "frog"]


def test_data_prepare_command_fills_the_cache(tmp_path, env):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    env["CIFAR_DIST_CACHE"] = str(tmp_path / "c")
    proc = run([PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={root}"], env)
    assert "6 training and 3 test images" in proc.stdout
    assert len(list((tmp_path / "c").glob("imagefolder-*.pt"))) == 1
    bad = run([PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={tmp_path}"],
              env, check=False)
    assert bad.returncode == 2 and "no train/<class>/<image> files" in bad.stderr


def test_data_prepare_on_a_damaged_archive_says_one_line(tmp_path, env):
    _, archive = write_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    env["CIFAR_DIST_CACHE"] = str(tmp_path / "c")
    proc = run([PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={archive}"], env,
               check=False)
    assert proc.returncode == 2 and proc.stdout.startswith("decoding imagefolder data once")
    assert proc.stderr.startswith(f"error: {archive}: damaged archive (") and proc.stderr.count("\n") == 1
    assert not list((tmp_path / "c").glob("*.pt"))


def read_only(folder: Path, args: list[str]) -> list[str]:
    """`args` run with `folder` read-only: by its mode for a plain user; root ignores modes, so for
    root in a private mount namespace where the folder is a read-only bind mount of itself."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return args
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *args]


def test_a_read_only_cache_is_read_and_one_that_cannot_be_written_is_decoded_in_memory(tmp_path, env):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    prepare = [PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={root}"]
    shared, empty = tmp_path / "shared", tmp_path / "empty"
    env["CIFAR_DIST_CACHE"] = str(shared)
    run(prepare, env)  # filled while writable ...
    proc = run(read_only(shared, prepare), env)  # ... then read without a word
    assert proc.stderr == "" and proc.stdout.count("\n") == 1 and "6 training and 3 test images" in proc.stdout
    empty.mkdir()
    env["CIFAR_DIST_CACHE"] = str(empty)
    proc = run(read_only(empty, prepare), env)
    assert proc.stdout.startswith(f"warning: data cache {empty}/imagefolder-") and "cannot be written" in proc.stdout
    assert "decoding imagefolder data in memory" in proc.stdout and "6 training and 3 test images" in proc.stdout
    assert list(empty.iterdir()) == []


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, env):
    root = tmp_path / "src"
    write_image_tree(root, CLASSES, {"train": 2, "test": 1})
    (tmp_path / "afile").write_text("not a folder")
    for cache in (tmp_path / "afile", tmp_path / "afile" / "below"):
        proc = run([PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={root}",
                    f"data.cache_dir={cache}"], env, check=False)
        assert proc.returncode == 2
        assert proc.stderr == f"error: data.cache_dir: {cache} is not a folder (it, or a folder above it, is a file)\n"
