"""The package imports only downward: every `import` in mixpo/ (module level and inside
functions) names a module of a lower layer, or of its own group in the same layer. The
layers are ARCHITECTURE.md's table. benchmarks/ is a leaf above the package: its modules
import mixpo, mixpo imports none of them (`mixpo bench roofline` runs a script as a
subprocess), and among themselves they import only downward too (BENCHMARK_LAYERS), so their
import graph has no cycle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mixpo"
BENCHMARKS = PACKAGE.parent / "benchmarks"

# Lowest first. Groups on one line share a layer and may not import each other.
LAYERS = (
    ("mixpo.loss_spec", "mixpo.files", "mixpo.data.kinds",    # vocabularies, atomic files,
     "mixpo.schedule"),                                       # learning-rate schedules
    ("mixpo.kernels",),                                       # Triton kernels + torch twins
    ("mixpo.core", "mixpo.data"),                             # the loss API | data steps
    ("mixpo.hf",),                                            # Hugging Face loading, policy
    ("mixpo.scoring", "mixpo.train"),                         # model-based difficulty | trainer
    ("mixpo.integrations",),                                  # TRL
    ("mixpo",),                                               # the package root's exports
    ("mixpo.cli",),                                           # the command line
    ("mixpo.__main__",),
)
# benchmarks/ (each module imported by its name: the scripts run with benchmarks/ on sys.path),
# lowest first; modules on one line share a layer and may not import each other.
BENCHMARK_LAYERS = (
    ("harness",),                       # device, timing, versions, JSON, workers, the peers
    ("roofline",),                      # the roofline model
    ("gpu_check_common", "bench_train_report", "roofline_report"),  # stage framework | reports
    ("gpu_check_tables", "gpu_stage_correctness", "gpu_stage_speed", "gpu_stage_training"),
    ("gpu_check", "bench_linear", "bench_preference_loss", "bench_train", "profile_linear"),
    ("bench_linear_duel",),             # bench_linear's cases timed in alternation
)
CORE = ("mixpo.loss_config", "mixpo.margins", "mixpo.checks", "mixpo.functions", "mixpo.losses",
        "mixpo.modules")


def group_of(module: str) -> str:
    if module in CORE:
        return "mixpo.core"
    best = ""
    for layer in LAYERS:
        for group in layer:
            if (module == group or module.startswith(group + ".")) and len(group) > len(best):
                best = group
    return best


def rank_of(group: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if group in layer)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str):
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            yield target
            # `from mixpo import losses` imports the module mixpo.losses.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file() or \
                        (PACKAGE.parent / candidate.replace(".", "/")).is_dir():
                    yield candidate


def test_every_import_points_down():
    violations = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        name = module_name(path)
        group = group_of(name)
        assert group, f"{name} is in no layer: add it to LAYERS"
        for target in imported_modules(path, name):
            if not target.startswith("mixpo"):
                continue
            target_group = group_of(target)
            if target_group == group:
                continue
            if rank_of(target_group) >= rank_of(group):
                violations.append(f"{name} ({group}) imports {target} ({target_group})")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_upward_imports(tmp_path):
    # The rule itself: data may not reach the trainer, kernels may not reach the loss API.
    assert rank_of(group_of("mixpo.train.trainer")) > rank_of(group_of("mixpo.data.io"))
    assert rank_of(group_of("mixpo.losses")) > rank_of(group_of("mixpo.kernels.pair_loss"))
    assert group_of("mixpo.data.kinds") == "mixpo.data.kinds"
    assert rank_of(group_of("mixpo.scoring.cli")) == rank_of(group_of("mixpo.train.cli"))


def test_performance_tooling_lives_beside_the_benchmarks():
    assert not (PACKAGE / "roofline.py").exists() and not (PACKAGE / "testing.py").exists()
    assert (PACKAGE.parent / "benchmarks" / "roofline.py").is_file()


def benchmark_rank(module: str) -> int:
    return next(index for index, layer in enumerate(BENCHMARK_LAYERS) if module in layer)


def benchmark_violations(folder: Path) -> list:
    """Imports in folder/*.py of a benchmarks module that is not in a lower layer."""
    names = {path.stem for path in BENCHMARKS.glob("*.py")} | {
        path.stem for path in folder.glob("*.py")}
    violations = []
    for path in sorted(folder.glob("*.py")):
        for target in imported_modules(path, path.stem):
            top = target.split(".")[0]
            if top in names and benchmark_rank(top) >= benchmark_rank(path.stem):
                violations.append(f"{path.stem} imports {top}")
    return violations


def test_benchmarks_import_mixpo_and_lower_benchmark_modules_only():
    modules = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert len(modules) > 10
    listed = [module for layer in BENCHMARK_LAYERS for module in layer]
    assert sorted(listed) == modules, "every benchmarks/ module is in one BENCHMARK_LAYERS layer"
    assert not benchmark_violations(BENCHMARKS), "\n".join(benchmark_violations(BENCHMARKS))


def test_mixpo_imports_no_benchmarks_module():
    names = {path.stem for path in BENCHMARKS.glob("*.py")} | {"benchmarks"}
    found = [f"{module_name(path)} imports {target}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for target in imported_modules(path, module_name(path))
             if target.split(".")[0] in names]
    assert not found, "\n".join(found)


def test_the_benchmark_checker_sees_a_cycle(tmp_path):
    # The old cycle: gpu_check_common importing the script that imports it.
    (tmp_path / "gpu_check_common.py").write_text("from gpu_check import SCRIPT\n")
    (tmp_path / "gpu_stage_speed.py").write_text("def f():\n    import bench_linear\n")
    (tmp_path / "harness.py").write_text("import torch\nimport mixpo\n")
    assert benchmark_violations(tmp_path) == ["gpu_check_common imports gpu_check",
                                              "gpu_stage_speed imports bench_linear"]
