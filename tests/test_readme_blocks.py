"""The code blocks of the README and its guide pages (docs/guide/*.md, docs/backends.md) name what exists, checked
without loading a model.

A newcomer copies the blocks into a notebook or a shell, the README's first and then a guide page's. The blocks that
run on the bundled toy are executed by test_docs, test_examples, test_sae, test_sharded and test_toy; most others need
a released checkpoint. So here, statically (ast + inspect): every nla_lens name a ```python block uses exists, every
keyword it passes an nla_lens callable is one that callable takes, no block reads a variable that neither it nor a
block before it defines, and every `nla-lens` command of a ```bash block parses with that command's own parser. The
README and then each guide page are read as one session: a guide page's block may use what a README block defined.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import re
import shlex
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import docs_text
import pytest

import nla_lens
from nla_lens.cli import build_parser
from nla_lens.errors import BackendError

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDES = [(str(path.relative_to(ROOT)), docs_text.read(path)) for path in docs_text.guide_pages()]
DOCS = [("README.md", README), *GUIDES]


def with_readme(readme: str) -> list[tuple[str, str]]:
    """The docs with another README text before the guide pages (the same session, one line changed)."""
    return [("README.md", readme), *GUIDES]


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line of the block's first code line in `text`, its code) for each ```language block."""
    return [(text.count("\n", 0, found.start(1)) + 1, found.group(1))
            for found in re.finditer(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)]


@dataclass(frozen=True)
class Instance:
    """An instance of an nla_lens class: what a call to that class or to a function annotated to return it gives."""

    cls: type


@dataclass(frozen=True)
class Method:
    """A method looked up on an `Instance`: called without its `self`."""

    function: object


def _is_ours(obj: object) -> bool:
    """A module of nla_lens, or a class or function defined in one."""
    name = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None) or ""
    return name == "nla_lens" or name.startswith("nla_lens.")


def _named_class(annotation: object, module_name: str) -> Instance | None:
    """The nla_lens class an annotation names (`"RoundTrip"`, `"Capture | None"`), looked up where its module finds
    it (its globals, or an import under TYPE_CHECKING or inside a function), then in `nla_lens`; None for anything
    else (`list[...]`, a tensor)."""
    if isinstance(annotation, type):
        return Instance(annotation) if _is_ours(annotation) else None
    plain = re.fullmatch(r"(\w+)(?: \| None)?", annotation) if isinstance(annotation, str) else None
    if plain is None:
        return None
    module = sys.modules.get(module_name)
    found = getattr(module, plain[1], None) or _imported_in(module, plain[1]) or getattr(nla_lens, plain[1], None)
    return Instance(found) if isinstance(found, type) and _is_ours(found) else None


def _imported_in(module: ModuleType | None, name: str) -> object:
    """What `from nla_lens... import name` anywhere in `module`'s source (a TYPE_CHECKING block, a function) gives."""
    if module is None or not _is_ours(module):
        return None
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nla_lens"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return getattr(importlib.import_module(node.module), alias.name, None)
    return None


def _returns(callable_: object) -> Instance | None:
    """What calling an nla_lens class or function gives, as far as its annotations say."""
    if isinstance(callable_, type):
        return Instance(callable_)
    function = callable_.function if isinstance(callable_, Method) else callable_
    try:
        annotation = inspect.signature(function).return_annotation
    except (TypeError, ValueError):
        return None
    return _named_class(annotation, getattr(function, "__module__", ""))


@functools.cache
def _self_attributes(cls: type) -> dict[str, object]:
    """`self.name = ...` of the nla_lens classes in `cls.__mro__`, each with its annotation where one says it (its
    own, or that of the parameter assigned to it)."""
    found: dict[str, object] = {}
    for klass in reversed([k for k in cls.__mro__ if _is_ours(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            parameters = {a.arg: ast.unparse(a.annotation) for a in function.args.args + function.args.kwonlyargs
                          if a.annotation is not None}
            for node in ast.walk(function):
                target, value, annotation = None, None, None
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, value = node.targets[0], node.value
                elif isinstance(node, ast.AnnAssign):
                    target, value, annotation = node.target, node.value, ast.unparse(node.annotation)
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "self"):
                    if annotation is None and isinstance(value, ast.Name):
                        annotation = parameters.get(value.id)
                    found[target.attr] = annotation
    return found


def _class_annotations(cls: type) -> dict[str, object]:
    return {name: annotation for klass in reversed(cls.__mro__) for name, annotation in
            vars(klass).get("__annotations__", {}).items()}


class BlockChecker:
    """Walks the docs' python blocks in order, as one notebook session, and collects what does not exist."""

    def __init__(self) -> None:
        self.env: dict[str, object] = {}
        self.problems: list[str] = []
        self.file = "README.md"
        self.line = 0

    def problem(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.file}:{self.line + getattr(node, 'lineno', 1) - 1}: {message}")

    def check(self, file: str, first_line: int, code: str) -> None:
        self.file, self.line = file, first_line
        self.statements(ast.parse(code).body)

    def module(self, node: ast.AST, name: str) -> ModuleType | None:
        """The nla_lens module `name`, imported; None for another package's and for one this TransformerLens lacks."""
        if name.split(".")[0] != "nla_lens":
            return None
        try:
            return importlib.import_module(name)
        except BackendError:
            return None
        except ImportError:
            self.problem(node, f"no module {name}")
            return None

    def statements(self, body: list[ast.stmt]) -> None:
        for statement in body:
            self.statement(statement)

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                module, top = self.module(node, alias.name), alias.name.split(".")[0]
                self.env[alias.asname or top] = module if alias.asname else (nla_lens if top == "nla_lens" else None)
        elif isinstance(node, ast.ImportFrom):
            module = self.module(node, node.module or "")
            for alias in node.names:
                self.env[alias.asname or alias.name] = self.attribute(node, module, alias.name)
        elif isinstance(node, ast.With):
            for item in node.items:
                value = self.expression(item.context_expr)
                if isinstance(item.optional_vars, ast.Name):
                    enter = self.attribute(node, value, "__enter__") if isinstance(value, Instance) else None
                    self.env[item.optional_vars.id] = _returns(enter) if enter is not None else None
            self.statements(node.body)
        elif isinstance(node, ast.For):
            self.expression(node.iter)
            self.bind(node.target, None)
            self.statements(node.body)
        elif isinstance(node, ast.FunctionDef):
            self.env[node.name] = None
            self.shadowed([a.arg for a in node.args.args], lambda: self.statements(node.body))
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Tuple) for t in node.targets) and isinstance(
                node.value, ast.Tuple):  # sft, rl = nl.toy.load(pair="sft"), nl.toy.load(pair="rl")
            values = [self.expression(element) for element in node.value.elts]
            for target in node.targets:
                for element, value in zip(target.elts, values, strict=True):
                    self.bind(element, value)
        elif isinstance(node, ast.Assign):
            value = self.expression(node.value)
            for target in node.targets:
                self.bind(target, value)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expression(child)

    def shadowed(self, parameters: list[str], check: Callable[[], object]) -> None:
        """Run `check` on a function's body, where its parameters hide the session's names of theirs."""
        saved = dict(self.env)
        self.env.update(dict.fromkeys(parameters))
        check()
        self.env = saved

    def bind(self, target: ast.expr, value: object) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        else:  # a tuple, an item or an attribute: what it holds is not tracked
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store):
                    self.env[name.id] = None
            self.expression(target)

    def expression(self, node: ast.expr) -> object:
        """What `node` evaluates to where that is an nla_lens module, class, function or instance, else None;
        every call and attribute inside it checked on the way."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, self.expression(node.value), node.attr)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Lambda):
            self.shadowed([a.arg for a in node.args.args], lambda: self.expression(node.body))
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expression(child)
            elif isinstance(child, ast.comprehension):
                self.expression(child.iter)
        return None

    def attribute(self, node: ast.AST, owner: object, name: str) -> object:
        if isinstance(owner, Instance):
            return self.instance_attribute(node, owner.cls, name)
        if owner is None or not _is_ours(owner):
            return None
        try:
            if hasattr(owner, name):
                return getattr(owner, name)
            if isinstance(owner, ModuleType):
                return importlib.import_module(f"{owner.__name__}.{name}")
        except BackendError:  # sae-lens's names under TransformerLens 4: the README says they raise there
            return None
        except ImportError:
            pass
        self.problem(node, f"{getattr(owner, '__name__', owner)} has no attribute {name!r}")
        return None

    def instance_attribute(self, node: ast.AST, cls: type, name: str) -> object:
        static = next((vars(k)[name] for k in cls.__mro__ if name in vars(k)), None)
        if isinstance(static, property):
            return _returns(static.fget)
        if isinstance(static, (staticmethod, classmethod)):
            return getattr(cls, name)
        if inspect.isfunction(static):
            return Method(static)
        annotations = {**_self_attributes(cls), **_class_annotations(cls)}
        if name in annotations:
            return _named_class(annotations[name], cls.__module__)
        if static is None and not hasattr(cls, name):
            self.problem(node, f"{cls.__name__} instances have no attribute {name!r}")
        return None

    def call(self, node: ast.Call) -> object:
        function = self.expression(node.func)
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            self.expression(argument)
        if function is None or not (isinstance(function, Method) or _is_ours(function)):
            return None
        self.check_arguments(node, function)
        return _returns(function)

    def check_arguments(self, node: ast.Call, function: object) -> None:
        """The call's keywords (and, without a `*args`, its count of positional arguments) fit the signature."""
        target = function.function if isinstance(function, Method) else function
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        if isinstance(function, Method):
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        signature = _with_verbalize_keywords(signature)
        starred = any(isinstance(a, ast.Starred) for a in node.args)
        positional = [] if starred else [None] * len(node.args)
        keywords = {k.arg: None for k in node.keywords if k.arg is not None}
        try:
            signature.bind_partial(*positional, **keywords)
        except TypeError as error:
            self.problem(node, f"{getattr(target, '__qualname__', target)}{signature}: {error}")


def _with_verbalize_keywords(signature: inspect.Signature) -> inspect.Signature:
    """`**verbalize_kwargs` (round_trip, explain, the helpers) spelled out as the keywords `av.verbalize` takes, which
    it hands them to: any other keyword would fail there, not at the call."""
    parameters = list(signature.parameters.values())
    if not parameters or parameters[-1].name != "verbalize_kwargs":
        return signature
    own = {p.name for p in parameters}
    verbalize = inspect.signature(nla_lens.ActivationVerbalizer.verbalize).parameters.values()
    return signature.replace(parameters=parameters[:-1] + [
        p for p in verbalize if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in own])


def check_python_blocks(pages: list[tuple[str, str]]) -> list[str]:
    checker = BlockChecker()
    for file, text in pages:
        for first_line, code in code_blocks(text, "python"):
            checker.check(file, first_line, code)
    return checker.problems


def test_readme_python_blocks_use_only_names_and_keywords_that_exist():
    """Read as one session: `nl.X`, `from nla_lens... import X`, the methods and attributes of what nla_lens calls
    return, and the keywords of every call to nla_lens."""
    blocks = [block for _, text in DOCS for block in code_blocks(text, "python")]
    assert len(blocks) >= 17
    assert check_python_blocks(DOCS) == []


def test_a_guide_pages_python_blocks_are_checked_too():
    """A block moved from the README to a guide page is still checked: the job-record block of the scaling guide."""
    original = "import json, pyarrow.parquet as pq"
    assert original in dict(GUIDES)["docs/guide/scaling.md"] and original not in README
    typo = [(file, text.replace(original, original + "\nfrom nla_lens import shardz", 1)) for file, text in DOCS]
    problems = check_python_blocks(typo)
    assert len(problems) == 1 and problems[0].startswith("docs/guide/scaling.md:") and "shardz" in problems[0], problems


@pytest.mark.parametrize(("original", "typo", "problem"), [
    ("nl.ActivationVerbalizer.from_pretrained(", "nl.ActivationVerbaliser.from_pretrained(",
     "has no attribute 'ActivationVerbaliser'"),
    ("av.verbalize(vectors, max_new_tokens=150)", "av.verbalize(vectors, max_new_token=150)",
     "got an unexpected keyword argument 'max_new_token'"),
    ("import Sampling, round_trip_file, verbalize_file", "import Sampling, round_trip_file, verbalize_files",
     "has no attribute 'verbalize_files'"),
    ("toy.nla.explain(toy.base,", "toy.nla.explian(toy.base,", "NLA instances have no attribute 'explian'"),
    ("result.fwd_hooks(alpha=2.0)", "result.fwd_hooks(alhpa=2.0)", "got an unexpected keyword argument 'alhpa'"),
    ("rl.nla.round_trip(vectors, baseline=0.78)", "rl.nla.round_trip(vectors, baseline=0.78, max_new_token=48)",
     "got an unexpected keyword argument 'max_new_token'"),  # a keyword round_trip hands on to av.verbalize
])
def test_a_typo_in_a_readme_python_block_is_found(original, typo, problem):
    assert original in README
    problems = check_python_blocks(with_readme(README.replace(original, typo, 1)))
    assert len(problems) == 1 and problem in problems[0], problems


def _names_bound(tree: ast.AST) -> set[str]:
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound


def names_read_before_defined(pages: list[tuple[str, str]]) -> list[str]:
    """`file:line: name` for each variable a python block reads that neither it nor any block before it defines."""
    bound, unbound = set(dir(builtins)), []
    for file, text in pages:
        for first_line, code in code_blocks(text, "python"):
            tree = ast.parse(code)
            bound |= _names_bound(tree)
            unbound += [f"{file}:{first_line + node.lineno - 1}: {node.id}" for node in ast.walk(tree)
                        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound]
    return unbound


def test_readme_python_blocks_read_only_variables_the_readme_defines():
    """The SAE block read `sae` and `texts`, the FSDP block `base_folder`, `meta`, `train` and `held_out`, the
    Scores block `nla_sft` and `nla_rl`: defined by no block, so a newcomer's copy stopped at a NameError."""
    assert names_read_before_defined(DOCS) == []
    renamed = README.replace("\nK = av.meta.layer", "\nk = av.meta.layer", 1)
    assert renamed != README
    assert [line.split(": ")[1] for line in names_read_before_defined(with_readme(renamed))] == ["K", "K", "K"]


def shell_commands(pages: list[tuple[str, str]]) -> list[list[str]]:
    """Each command of the pages' ```bash blocks as shell words, comments dropped and continued lines joined."""
    commands = []
    for _, code in [block for _, text in pages for block in code_blocks(text, "bash")]:
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = next((i for i, w in enumerate(words) if w in ("&&", ";", "||")), len(words))
                commands.append(words[:end])
                words = words[end + 1:]
    return [command for command in commands if command]


def nla_lens_arguments(command: list[str]) -> list[str] | None:
    """The arguments an `nla-lens ...` or `torchrun ... -m nla_lens.cli ...` command hands nla-lens."""
    if command[0] == "nla-lens":
        return command[1:]
    if "-m" in command and command[command.index("-m") + 1:][:1] == ["nla_lens.cli"]:
        return command[command.index("-m") + 2:]
    return None


def unparsable_nla_lens_commands(pages: list[tuple[str, str]]) -> list[str]:
    """The commands nla-lens's parser refuses, each flag spelled out whole: argparse takes `--save-vector` for
    `--save-vectors`, a prefix the README should not lean on."""
    parser = build_parser()
    for command in next(a for a in parser._actions if a.dest == "command").choices.values():
        command.allow_abbrev = False
    failed = []
    for command in shell_commands(pages):
        arguments = nla_lens_arguments(command)
        if arguments is None:
            continue
        try:
            parser.parse_args(arguments)
        except SystemExit:
            failed.append(shlex.join(command))
    return failed


def test_readme_bash_blocks_run_nla_lens_commands_that_parse(capsys):
    """Each `nla-lens CMD ...` of a ```bash block names a command and flags its parser has, with values it takes."""
    commands = [nla_lens_arguments(c) for c in shell_commands(DOCS)]
    assert len([c for c in commands if c is not None]) >= 15
    assert unparsable_nla_lens_commands(DOCS) == []
    wrong = README.replace("--save-vectors delta.safetensors", "--save-vector delta.safetensors", 1)
    assert unparsable_nla_lens_commands(with_readme(wrong)) == [
        "nla-lens steer-words --av nla_lens/toy/checkpoints/av --ar nla_lens/toy/checkpoints/ar --text 'Romeo: I "
        "will not hear you, for I am' --replace '\" not\"' '\" the\"' --alpha 2 --output steer.parquet "
        "--save-vector delta.safetensors"]
    assert "unrecognized arguments: --save-vector" in capsys.readouterr().err


def test_readme_bash_blocks_name_files_and_extras_that_exist():
    """The repository files the commands run (examples/*.yaml, examples/label.py, .ci/*.sh) exist, and every
    `pip install` names extras pyproject.toml declares and its torch pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    words = [word for command in shell_commands(DOCS) for word in command]
    paths = [w for w in words if re.match(r"(examples|\.ci|nla_lens|tutorials)/", w)]
    assert len(paths) >= 10 and [p for p in paths if not (ROOT / p).exists()] == []
    installs = [c for c in shell_commands(DOCS) if c[:2] == ["pip", "install"]]
    extras = {e for c in installs for w in c for found in re.findall(r"\[([\w,]+)\]", w) for e in found.split(",")}
    assert {"tl3", "tl4", "test", "sae", "docs"} <= extras <= set(project["optional-dependencies"])
    pins = {w for c in installs for w in c if w.startswith("torch")}
    assert pins == {torch_pin}
