"""The engine's modules after the split by idea: every name plugins imported still resolves to the one object at
its old path, no module of the engine, the preferences or the parameter contract is over 500 lines or in an import
circle, private names stay in their module, and the pipeline's table of words names real parameters."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import warnings
from pathlib import Path

import pytest

import mergebench_core

CORE = Path(mergebench_core.__file__).parent
REPO = CORE.parent

# Every public name of the four modules before they were split, as plugins may import them.
BEFORE_THE_SPLIT = {
    "tensors": [
        "TensorSource", "SupportsReadInto", "SupportsReadSlices", "StateDictSource", "SafetensorsSource",
        "resolve_checkpoint_files", "input_root", "resolves_inside", "copy_side_files", "MAX_HEADER_BYTES_ENV",
        "MAX_TENSORS_ENV", "max_header_bytes", "max_tensors", "read_safetensors_header", "StreamingSafetensorsWriter",
        "check_compatible", "check_finite", "task_vectors", "is_mergeable", "polar_factor", "save_state_dict",
        "load_state_dict", "TRUST_PICKLE_ENV", "read_pickle_checkpoint", "convert_pickle_checkpoint",
    ],
    "merging": [
        "DEFAULT_BLOCK_ENTRIES", "Sink", "BlockSink", "DictSink", "Block", "MergeStream", "TensorMergeMethod",
        "TaskVectorMethod", "MatrixTaskVectorMethod", "TensorSourcePool", "pool_source", "file_merge_refusal",
        "checkpoint_task_names", "merge_sources",
    ],
    "sparsify": [
        "keep_count", "magnitude_bits", "topk_mask", "bottomk_mask", "StreamingTopK", "Thresholds", "Sample",
        "sample_plan", "build_sample", "Bracket", "bracket_thresholds", "find_thresholds",
    ],
    "pipeline": [
        "SIGN_RULE", "Pipeline", "drop_keep", "drop_", "sum_rows", "elect_sign", "combine", "max_magnitude", "apply",
        "TaskVectorPipelineMethod", "agreeing_task_vectors",
    ],
}

MY_ROOMS = ("engine/", "preferences/", "contract/config.py", "contract/registry.py", "testing.py")


def _modules() -> dict[str, Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported core module, names taken from it) for every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.append((f"{base}.{alias.name}", []))
                elif base in modules:
                    found.append((base, [alias.name]))
    return found


def _mine(path: Path) -> bool:
    rel = path.relative_to(CORE).as_posix()
    return any(rel == room or rel.startswith(room) for room in MY_ROOMS)


@pytest.mark.parametrize("module", sorted(BEFORE_THE_SPLIT))
def test_every_name_plugins_imported_is_the_same_object_at_its_old_path(module):
    face = importlib.import_module(f"mergebench_core.engine.{module}")
    flat = importlib.import_module(f"mergebench_core.{module}")  # the path before the core had rooms
    assert flat is face
    for name in BEFORE_THE_SPLIT[module]:
        obj = getattr(face, name)
        assert name in face.__all__, name
        home = getattr(obj, "__module__", None)
        if home and home.startswith("mergebench_core.") and home != face.__name__:
            assert getattr(importlib.import_module(home), name) is obj, name  # re-exported, not copied
    assert set(face.__all__) <= {n for n in dir(face) if not n.startswith("_")}


def test_the_whole_model_reference_moved_to_testing_and_old_imports_still_find_it():
    from mergebench_core import testing
    from mergebench_core.engine import pipeline

    for name in ("reference_merge", "reference_outputs", "ReferenceTensor"):
        with pytest.warns(DeprecationWarning, match=f"moved to mergebench_core.testing.{name}"):
            assert getattr(pipeline, name) is getattr(testing, name)
    with pytest.raises(AttributeError, match="no attribute 'reference_nothing'"):
        pipeline.reference_nothing  # noqa: B018 - the lookup is the test
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from mergebench_core.testing import reference_outputs  # the new home warns about nothing
    assert reference_outputs is testing.reference_outputs


def test_the_heavy_levels_path_is_gone():
    from mergebench_core.engine import sparsify, threshold_search

    assert [f.name for f in dataclasses.fields(threshold_search.Bracket)] == ["lo", "hi"]
    assert not hasattr(sparsify, "MAX_LEVELS") and not hasattr(threshold_search, "MAX_LEVELS")


def test_no_module_of_these_rooms_is_over_500_lines():
    long = {p.relative_to(CORE).as_posix(): n for p in CORE.rglob("*.py") if _mine(p)
            and (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


def test_no_import_circle_goes_through_these_rooms():
    """Every import counts, a lazy one inside a function too: an arrow is an arrow."""
    modules = _modules()
    graph = {name: {target for target, _ in _imports(path, name, modules) if target != name}
             for name, path in modules.items()}
    mine = {name for name, path in modules.items() if _mine(path)}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted((a, b) for a in mine for b in graph[a] if reaches(b, a))
    assert circles == []


def test_private_names_of_these_rooms_stay_in_their_module():
    """Library and plugin code import only public names from these modules (tests may reach inside)."""
    modules = _modules()
    sources = [p for p in REPO.rglob("*.py")
               if "tests" not in p.relative_to(REPO).parts and not p.relative_to(REPO).parts[0].startswith(".")
               and p.relative_to(REPO).parts[0] in ("mergebench_core", "plugins", "modelpools", "taskpools", "bench")]
    offenders = []
    for path in sources:
        rel = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(rel)
        for target, names in _imports(path, name, modules):
            if _mine(modules[target]):
                offenders += [f"{path.relative_to(REPO)}: {target}.{n}" for n in names if n.startswith("_")]
    assert offenders == []


def test_the_pipeline_table_of_words_names_real_parameters_that_feed_those_stages():
    """Each `word <- method.parameter` of the pipeline's docstring: the method has that parameter, and a method built
    on the pipeline passes its value to that field of `Pipeline`."""
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.engine import pipeline as pipeline_module
    from mergebench_core.engine.pipeline import TaskVectorPipelineMethod

    doc = pipeline_module.__doc__
    mapping = []
    for word, names in re.findall(r"- `(\w+)` <- ((?:`[\w.]+`(?:,\s*)?)+)", doc):
        mapping += [(word, *name.split(".")) for name in re.findall(r"`(\w+\.\w+)`", names)]
    assert len(mapping) >= 10
    assert {word for word, _, _ in mapping} == {"keep", "skip_top", "drop"}
    registry = get_registry()
    checked = 0
    for word, method_name, param in mapping:
        method = registry.method(method_name)
        assert param in {f.name for f in dataclasses.fields(method.Params)}, (method_name, param)
        if not issubclass(method, TaskVectorPipelineMethod):
            continue
        extra = {"multitask": "ties"} if "multitask" in {f.name for f in dataclasses.fields(method.Params)} else {}
        pipe = method(method.Params(**{param: 0.375, **extra})).pipeline()
        assert getattr(pipe, word) == 0.375, (method_name, param, word)
        checked += 1
    assert checked >= 7
