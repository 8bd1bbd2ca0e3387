"""Packaging: mixpo imports and runs its torch backend without triton (a CPU-only install),
reports its version, and ships its type marker."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NO_TRITON = """
import sys
class BlockTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (blocked by the test)")
sys.meta_path.insert(0, BlockTriton())
import importlib.util
importlib.util.find_spec = (lambda find: lambda name, *a: None if name.split(".")[0] == "triton"
                            else find(name, *a))(importlib.util.find_spec)
import torch, mixpo
hidden, weight = torch.randn(2, 4, 8), torch.randn(50, 8)
labels = torch.randint(0, 50, (2, 4)); labels[:, 0] = -100
out = mixpo.linear_preference_loss(hidden, weight, labels, backend="auto", token_metrics=True)
out.loss.backward() if out.loss.requires_grad else None
print("loss", round(out.loss.item(), 4), sorted(out.metrics())[:2])
try:
    mixpo.linear_preference_loss(hidden, weight, labels, backend="triton")
except ValueError as error:
    print("triton:", error)
print("modules:", sorted(name for name in sys.modules if name.split(".")[0] == "triton"))
from mixpo.cli import main
main(["--version"])
"""


def test_runs_without_triton_and_reports_version():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True,
                            env=env, timeout=300)
    assert "loss " in result.stdout, result.stderr[-2000:]
    assert "triton: backend='triton' needs the triton package" in result.stdout
    assert "mixpo 0.2.0" in result.stdout
    assert "modules: []" in result.stdout            # nothing tried to load triton for real


def test_type_marker_is_shipped():
    assert (REPO / "mixpo" / "py.typed").is_file()
    setup = (REPO / "setup.py").read_text()
    assert '"py.typed"' in setup and "triton>=3.6" in setup and "license=" in setup
