"""mixpo as a hostile file system and a hurried user find it: crafted checkpoint files run no
code, outputs never replace what mixpo did not write, no write goes through a planted symlink,
and full disks, read-only directories, Ctrl-C and damaged caches end in one line."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fixtures import (tiny_train_config, tiny_training_setup, ultrafeedback_rows,
                      write_jsonl)
from mixpo.cli import main
from mixpo.files import OUTPUT_MARKER, UnsafeFileError
from mixpo.train import checkpoint
from mixpo.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickling this runs `touch SENTINEL`: what a crafted checkpoint file would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("safety"))


def config(tiny, out, **overrides):
    return tiny_train_config(tiny, out, **{"max_steps": 2, "save_steps": 2, **overrides})


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished 2-step run with checkpoint-2 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(config(tiny, out))
    return out


def _plant(checkpoint_dir: Path, target: str, sentinel: Path) -> Path:
    """Replace one file of `checkpoint_dir` by one that runs code when unpickled."""
    if target == "state/.metadata":
        path = checkpoint_dir / target
        import pickle
        path.write_bytes(pickle.dumps(RunsCode(sentinel)))
        return path
    if target == "state/*.distcp":
        # A DCP checkpoint whose optimizer hyper-parameter entry (stored as pickled bytes,
        # which torch's own planner loads with weights_only=False) runs code.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        state_dir = checkpoint_dir / "state"
        flat = checkpoint_dir.parent / "flat.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(state_dir, flat)
            state = torch.load(flat, weights_only=False)  # the test's own file
            state["optimizer"]["param_groups"][0]["lr"] = RunsCode(sentinel)
            shutil.rmtree(state_dir)
            dcp.save(state, checkpoint_id=str(state_dir))
        flat.unlink()
        return next(state_dir.glob("*.distcp"))
    path = checkpoint_dir / target
    original = torch.load(path, weights_only=False)  # the test's own file
    torch.save({**original, "extra": RunsCode(sentinel)}, path)
    return path


@pytest.mark.parametrize("target", ["trainer_state.pt", "rank_state_0.pt", "state/.metadata",
                                    "state/*.distcp"])
def test_crafted_checkpoint_files_run_no_code_on_resume_or_export(tiny, finished_run, tmp_path,
                                                                  target, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")                     # as if killed before the export
    sentinel = tmp_path / "code-ran"
    planted = _plant(out / "checkpoint-2", target, sentinel)
    assert not sentinel.exists()

    named = "param_groups.0.lr" if target == "state/*.distcp" else planted.name
    with pytest.raises(UnsafeFileError, match=f"{named}.*refused|refused.*{named}"):
        train(config(tiny, out, max_steps=4))
    assert not sentinel.exists()

    # Export reads trainer_state.pt and the model's part of the DCP state only.
    capsys.readouterr()
    code = main(["export", str(out / "checkpoint-2"), "-o", str(tmp_path / "hf")])
    error = capsys.readouterr().err
    assert not sentinel.exists()
    if target in ("trainer_state.pt", "state/.metadata"):
        assert code == 2 and (tmp_path / "hf").exists() is False
        assert error.count("\n") == 1 and "refused" in error and planted.name in error
    else:
        assert code == 0 and (tmp_path / "hf" / "config.json").is_file()


def test_numpy_rng_state_of_older_checkpoints_still_resumes(tiny, finished_run, tmp_path):
    """rank_state files written before the RNG state was saved as plain lists hold a numpy
    array; the weights-only load allows exactly numpy's array globals for them."""
    import numpy as np

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    path = out / "checkpoint-2" / "rank_state_0.pt"
    state = torch.load(path, weights_only=False)
    kind, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), *rest)
    torch.save(state, path)
    assert checkpoint.load_rank_state(out / "checkpoint-2", 0)["rng"]["numpy"][1].dtype == \
        np.uint32
    assert train(config(tiny, out, max_steps=4))["completed_steps"] == 4


def test_a_checkpoint_file_missing_keys_is_damaged_and_skipped(tiny, tmp_path):
    out = tmp_path / "out"
    train(config(tiny, out, max_steps=4))
    shutil.rmtree(out / "final")
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    del state["sampler"]
    torch.save(state, out / "checkpoint-4" / "trainer_state.pt")
    with pytest.warns(UserWarning, match="skipping checkpoint-4: .*trainer_state.pt is damaged"):
        result = train(config(tiny, out, max_steps=4))
    assert result["completed_steps"] == 4


# ---- outputs never replace what mixpo did not write ----------------------------------------
def _users_directory(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def test_data_commands_never_replace_a_users_directory(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", ultrafeedback_rows(8))
    users = _users_directory(tmp_path / "users")
    assert main(["data", "prepare", str(data), "-o", str(users)]) == 2
    error = capsys.readouterr().err
    assert "written by something other than mixpo" in error and error.count("\n") == 1
    assert (users / "notes.txt").read_text() == "mine"

    # Its own earlier output is replaced; another command's is not.
    prepared = tmp_path / "prepared"
    assert main(["data", "prepare", str(data), "-o", str(prepared)]) == 0
    assert json.loads((prepared / OUTPUT_MARKER).read_text()) == \
        {"written_by": "mixpo data prepare"}
    assert main(["data", "prepare", str(data), "-o", str(prepared), "--order", "as-is"]) == 0
    import datasets
    assert len(datasets.load_from_disk(str(prepared))) == 8
    assert main(["data", "pairs", str(data), "-o", str(prepared)]) == 2
    assert "written by `mixpo data prepare`" in capsys.readouterr().err
    # A file output onto a directory is refused too.
    assert main(["data", "prepare", str(data), "-o", str(users / "x.jsonl")]) == 0
    (users / "sub.jsonl").mkdir()
    assert main(["data", "prepare", str(data), "-o", str(users / "sub.jsonl")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_export_and_train_never_replace_a_users_directory(tiny, finished_run, tmp_path, capsys):
    users = _users_directory(tmp_path / "users")
    capsys.readouterr()
    assert main(["export", str(finished_run / "checkpoint-2"), "-o", str(users)]) == 2
    assert "written by something other than mixpo" in capsys.readouterr().err
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    # A second export over the first is its own output.
    target = tmp_path / "exported"
    for _ in range(2):
        assert main(["export", str(finished_run / "checkpoint-2"), "-o", str(target)]) == 0
    # An output_dir whose final/ is the user's is refused before anything loads.
    out = tmp_path / "out"
    _users_directory(out / "final")
    with pytest.raises(ValueError, match="final already exists and was written by something"):
        train(config(tiny, out))
    assert not (out / "config.yaml").exists()


# ---- symlinks --------------------------------------------------------------------------------
def test_lock_and_config_are_never_written_through_symlinks(tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / checkpoint.LOCK_FILE).symlink_to(victim)
    with pytest.raises(ValueError, match="lock file .*symbolic links"):
        train(config(tiny, out))
    assert victim.read_text() == "precious"

    (out / checkpoint.LOCK_FILE).unlink()
    (out / "config.yaml").symlink_to(victim)
    train(config(tiny, out))
    assert victim.read_text() == "precious"
    assert not (out / "config.yaml").is_symlink() and "max_steps: 2" in \
        (out / "config.yaml").read_text()


# ---- full disk, read-only directory, Ctrl-C: one line ----------------------------------------
def _recipe(tiny, tmp_path, **overrides) -> Path:
    recipe = tmp_path / "recipe.yaml"
    values = {k: v for k, v in config(tiny, tmp_path / "unused", **overrides).to_dict().items()
              if v is not None and k != "output_dir" and not isinstance(v, list)}
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return recipe


def _mixpo(*argv, limit_file_bytes=None, **kwargs):
    def limits():
        if limit_file_bytes is not None:  # a disk that fills up: writes past it fail (EFBIG)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mixpo", *argv], preexec_fn=limits, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_full_disk_during_a_checkpoint_save_is_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    process = _mixpo("train", str(_recipe(tiny, tmp_path)), "--output_dir", str(out),
                     limit_file_bytes=64 * 1024)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("mixpo train:")]
    assert lines and "cannot save checkpoint-2" in lines[0] and "earlier checkpoints" in lines[0]
    assert "Traceback" not in err
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint-*"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no process can write into (root included: chattr +i where chmod is not
    enough)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        (path / "probe").touch()
    except OSError:
        pass
    else:
        (path / "probe").unlink()
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only directory here")
        immutable = True
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_a_read_only_output_directory_is_one_line(tiny, finished_run, read_only_dir, capsys):
    capsys.readouterr()
    recipe = _recipe(tiny, read_only_dir.parent)
    assert main(["train", str(recipe), "--output_dir", str(read_only_dir)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "lock file" in error and "ermi" in error
    assert main(["export", str(finished_run / "checkpoint-2"), "-o",
                 str(read_only_dir / "hf")]) == 2
    error = capsys.readouterr().err            # before the model is built: nothing else
    assert error.count("\n") == 1 and f"{read_only_dir}: cannot write here" in error
    data = write_jsonl(read_only_dir.parent / "in.jsonl", ultrafeedback_rows(4))
    assert main(["data", "prepare", str(data), "-o", str(read_only_dir / "p.jsonl")]) == 2
    assert f"{read_only_dir}: cannot write here" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line_saying_how_to_resume(tiny, tmp_path):
    out = tmp_path / "out"
    process = _mixpo("train", str(_recipe(tiny, tmp_path, max_steps=400, save_steps=1)),
                     "--output_dir", str(out))
    deadline = time.time() + 240
    while not (out / "checkpoint-1").is_dir() and time.time() < deadline \
            and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mixpo train: interrupted; rerun the same command to resume from ")
    assert "checkpoint-" in last
