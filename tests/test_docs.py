"""The READMEs cannot rot: what they show is checked against the current code.

- Every command shown (in a code block, or as an inline span that starts like a command) names a
  script that exists, and the script's own parser accepts every flag: train.py's argparse and then
  its `--key=value` overrides, checked as infra/configurator.py checks them (key, type, range),
  the other scripts' argparse parsers (run up to the moment they read their command line, not
  further), and torchrun's own parser for the launcher's flags. Shell placeholders are substituted
  from PLACEHOLDERS, a synopsis's brackets from SYNOPSIS; a placeholder not listed there is a
  failure.
- README.zh-CN.md shows exactly the commands and Python snippets of the English sections it
  translates (TRANSLATED), and each README links to the other.
- Every relative link points at a file, every `file.py` `Name` / `file.py` `Class.attr` pair at a
  top-level function, class or assignment (or a class member) of that file (read with ast), and
  every `test_...` name at a test in tests/; a flag named on its own in the text (`--text-field`)
  is one of a script's options or a config key.
- The ```python snippets run, in a temporary folder, with the files they read made at tiny size.
"""

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import re
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from config import ConfigError
from infra.configurator import load_file, parse_overrides, valid_keys, with_values

ROOT = Path(__file__).resolve().parent.parent
README, README_ZH = ROOT / "README.md", ROOT / "README.zh-CN.md"
# The English sections README.zh-CN.md translates: their commands and snippets are the Chinese ones.
TRANSLATED = ("Quick start", "Read the code", "Fork it", "Chat demo")

# Shell variables the commands use, and what stands in for them when the command line is parsed.
PLACEHOLDERS = {"$NODE_RANK": "0", "$MASTER_HOST": "localhost", "$SLURM_ARRAY_TASK_ID": "0"}
# In a synopsis (a command with [optional] parts), the words that stand for something: None drops
# them.
SYNOPSIS = {"CONFIG": "config/7b.py", "--key=value": None, "...": None}
# Programs that are not this project's: their command lines are the user's business.
EXTERNAL = {"huggingface-cli"}
# Scripts beside the project, not in a clone of it: the peers the benchmarks compare against.
EXTERNAL_SCRIPTS = {"../shared/peers/vs_nanogpt.py"}
PYTEST_FLAGS = {"-q", "-x"}  # pytest's own flags that the READMEs use
# Flags named in the text on their own are options of these scripts (or config keys); these stand
# for any.
FLAG_SCRIPTS = (
    "train.py",
    "sample.py",
    "infra/prepare.py",
    "infra/tokenizer_cli.py",
    "bench/chat_demo.py",
)
FLAG_PLACEHOLDERS = {"--key=value", "--model.KEY", "--model.*"}
COMMAND_START = re.compile(
    r"^(?:[A-Z_]+=\S* )*(?:python3?|torchrun|pip|sbatch|echo|huggingface-cli) "
)
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```[ \t]*$", re.S | re.M)


# ----------------------------------------------------------------------------- reading the READMEs


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of each ``` block."""
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside ``` blocks (blocks become blank lines, so line numbers stay)."""
    return FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)


def joined_lines(text: str):
    """(line number, line) with shell continuations (a trailing backslash) joined."""
    lines, start, held = [], 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if not held:
            start = number
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
            continue
        lines.append((start, held + line))
        held = ""
    return lines


def commands(text: str) -> list[tuple[int, str]]:
    """(line, command) for every command shown: lines of indented or fenced shell blocks, and inline
    spans, that start like a command (`python ...`, `torchrun ...`, `pip install ...`, ...)."""
    found = []
    for language, code, first in fenced_blocks(text):
        if language in ("", "bash", "sh", "shell", "console"):
            found += [(first + n - 1, line.strip()) for n, line in joined_lines(code)]
    outside = prose(text)
    found += [(n, line.strip()) for n, line in joined_lines(outside) if line.startswith("    ")]
    for span in re.finditer(r"`([^`]+)`", outside):
        found.append((outside.count("\n", 0, span.start()) + 1, " ".join(span[1].split())))
    return sorted((n, " ".join(c.split())) for n, c in found if COMMAND_START.match(c))


def sections(text: str) -> dict[str, str]:
    """The text of each `## ` section (and its subsections) by title; "" holds what comes before."""
    parts, title, current = {}, "", []
    for line in prose(text).splitlines(keepends=True):
        if line.startswith("## "):
            parts[title] = "".join(current)
            title, current = line[3:].strip(), []
        current.append(line)
    parts[title] = "".join(current)
    return parts


# ----------------------------------------------------------------------------- checking a command


class OptionalPackageMissing(Exception):
    """The script imports an optional package (requirements-dev.txt) that is not installed here."""


class _Parsed(BaseException):  # not an Exception: a script's `except Exception` lets it through
    def __init__(self, result):
        self.result = result


@contextlib.contextmanager
def stop_after_parsing(parse: bool = True):
    """The outermost ArgumentParser.parse_args / parse_known_args call raises _Parsed with its
    result instead of returning it, so a script's main() stops as soon as it has read its command
    line (parse=False: with the parser itself, before it reads anything). Nested calls, as
    subparsers and parse_args itself make, return as usual."""
    depth = 0
    originals = {
        name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")
    }

    def stopping(name):
        def method(self, *args, **kwargs):
            nonlocal depth
            if depth == 0 and not parse:
                raise _Parsed(self)
            depth += 1
            try:
                result = originals[name](self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                raise _Parsed(result)
            return result

        return method

    with mock.patch.multiple(
        argparse.ArgumentParser, **{name: stopping(name) for name in originals}
    ):
        yield


def parse_with(parse, what: str):
    """parse()'s result, or AssertionError with what argparse said when it refused the arguments."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse()
    except SystemExit:
        said = stderr.getvalue().strip().splitlines() or ["exited without a message"]
        raise AssertionError(f"{what}: {said[-1]}") from None


def script_arguments(script: str, args: list[str], parse: bool = True):
    """Run `script` (a path under the repository) as __main__ with `args` until it has parsed them;
    the parse result (a Namespace, or (Namespace, extras) for parse_known_args), or with parse=False
    its ArgumentParser. A script in a package runs as `python -m` runs it."""
    path = ROOT / script
    assert path.is_file() and path.suffix == ".py", f"no script {script}"
    module = script[: -len(".py")].replace("/", ".")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    try:
        with stop_after_parsing(parse):
            parse_with(
                lambda: (
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                    if "/" in script
                    else runpy.run_path(str(path), run_name="__main__")
                ),
                f"{script} {' '.join(args)}",
            )
    except _Parsed as parsed:
        return parsed.result
    except ModuleNotFoundError as error:
        if error.name and re.search(
            rf"^{re.escape(error.name)}\b", (ROOT / "requirements-dev.txt").read_text(), re.M
        ):
            raise OptionalPackageMissing(
                f"{script} needs {error.name}, which is not installed"
            ) from None
        raise
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{script} ended without parsing a command line")


def check_python(args: list[str], command: str):
    if args[:2] == ["-m", "pytest"]:
        for arg in args[2:]:
            assert arg in PYTEST_FLAGS or (not arg.startswith("-") and (ROOT / arg).exists()), (
                f"{command}: pytest argument {arg} (add pytest's flag to PYTEST_FLAGS)"
            )
        return
    if args[:1] == ["-m"] and len(args) > 1:  # python -m package.module: the file it runs
        args = [args[1].replace(".", "/") + ".py", *args[2:]]
    assert args and not args[0].startswith("-"), f"{command}: expected python SCRIPT ..."
    script, rest = args[0], args[1:]
    if script in EXTERNAL_SCRIPTS:
        return
    result = script_arguments(script, rest)
    if script == "train.py":
        namespace, overrides = result
        # as train.py builds its config: the file, then each --key=value checked by name, type
        # and range
        try:
            with_values(load_file(namespace.config), parse_overrides(overrides))
        except ConfigError as error:
            raise AssertionError(f"{command}: {error}") from None


def check_torchrun(args: list[str], command: str):
    from torch.distributed.run import get_args_parser

    if args[-1:] == ["..."]:
        args = args[:-1]
    if not any(
        arg.endswith(".py") for arg in args
    ):  # `torchrun --flag [...]`: the launcher's flags alone
        args = args + ["train.py"]
    launch = parse_with(lambda: get_args_parser().parse_args(args), command)
    assert not launch.module and not launch.no_python, f"{command}: expected torchrun ... SCRIPT"
    check_python([launch.training_script, *launch.training_script_args], command)


def check_pip(args: list[str], command: str):
    assert args[:1] == ["install"], f"{command}: expected pip install"
    declared = "".join(p.read_text() for p in ROOT.glob("requirements*.txt"))
    words = iter(args[1:])
    for word in words:
        if word == "-r":
            requirements = next(words, "")
            assert (ROOT / requirements).is_file(), f"{command}: no file {requirements}"
        else:
            assert re.search(rf"^{re.escape(word)}\b", declared, re.M), (
                f"{command}: {word} is in no requirements file"
            )


def check_command(command: str):
    """AssertionError saying what is wrong if `command`, as a README shows it, would not be
    accepted."""
    if re.search(
        r"\[[-A-Z]", command
    ):  # a synopsis: every optional part at once, placeholders filled in
        words = command.replace("[", "").replace("]", "").replace(" | ", " ").split()
        command = " ".join(SYNOPSIS.get(w, w) for w in words if SYNOPSIS.get(w, w) is not None)
    for name, value in PLACEHOLDERS.items():
        command = command.replace(name, value)
    assert "$" not in command, f"{command}: a shell variable without a stand-in in PLACEHOLDERS"
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments = [[]]
    for token in lexer:
        if token in ("&&", "|", ";", "||"):
            segments.append([])
        else:
            segments[-1].append(token)
    for words in segments:
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # an environment assignment, e.g. PYTHONPATH=.
        program, args = words[0], words[1:]
        if program in ("python", "python3"):
            check_python(args, command)
        elif program == "torchrun":
            check_torchrun(args, command)
        elif program == "pip":
            check_pip(args, command)
        elif program == "sbatch":
            assert "--wrap" in args, f"{command}: expected sbatch ... --wrap 'COMMAND'"
            check_command(args[args.index("--wrap") + 1])
        elif (
            program == "ruff"
        ):  # the linter: in requirements-dev.txt, its settings in pyproject.toml
            assert args[:1] in (["check"], ["format"]), f"{command}: ruff check or ruff format"
            dev = (ROOT / "requirements-dev.txt").read_text()
            assert re.search(r"^ruff\b", dev, re.M), (
                f"{command}: ruff is not in requirements-dev.txt"
            )
        else:
            assert program == "echo" or program in EXTERNAL, f"{command}: unknown program {program}"


# ----------------------------------------------------------------------------- names in the code


@functools.lru_cache
def defined(path: Path) -> dict[str, set]:
    """{top-level name: names defined in its body (methods, class attributes)} of a Python file."""
    names = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members = set()
            for item in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            names[node.name] = members
        elif isinstance(node, ast.Assign):
            names |= {t.id: set() for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
    return names


NAME = r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`"
# `file.py` `Name`, then more names of the same file: `file.py` `a`, `b` and `c`
CODE_REFERENCE = re.compile(
    rf"`([\w./-]+\.py)`\s+{NAME}((?:(?:\s*,\s*(?:and\s+)?|\s+and\s+){NAME})*)"
)


def code_references(text: str) -> list[tuple[str, str]]:
    found = []
    for match in CODE_REFERENCE.finditer(prose(text)):
        found += [(match[1], match[2])] + [(match[1], name) for name in re.findall(NAME, match[3])]
    return found


def missing_reference(base: Path, file: str, name: str) -> str | None:
    path = base / file
    if not path.is_file():
        return f"{file} does not exist"
    top, _, member = name.partition(".")
    names = defined(path)
    if top not in names:
        return f"{file} defines no {top}"
    if member and member not in names[top]:
        return f"{file}: {top} has no {member}"
    return None


def links(text: str) -> list[str]:
    """Relative link targets (no URLs, no in-page anchors), without their #anchor."""
    targets = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z+.-]*:|#", t)]


def defined_tests():
    """Every test_... function of tests/."""
    return {
        name
        for path in (ROOT / "tests").glob("test_*.py")
        for name in defined(path)
        if name.startswith("test_")
    }


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module", autouse=True)
def in_root():
    # The commands are shown as run from the repository's folder (config/7b.py is relative to it).
    with contextlib.chdir(ROOT):
        yield


@pytest.mark.parametrize("readme", [README, README_ZH], ids=lambda p: p.name)
def test_every_command_is_accepted_by_the_current_code(readme):
    shown = commands(readme.read_text())
    assert len(shown) >= (20 if readme == README else 3), (
        "the commands are no longer found: fix commands()"
    )
    failures, unchecked = [], []
    for line, command in shown:
        try:
            check_command(command)
        except AssertionError as error:
            failures.append(f"{readme.name}:{line}: {command}\n    {error}")
        except OptionalPackageMissing as missing:
            unchecked.append(f"{readme.name}:{line}: {missing}")
    assert not failures, "\n".join(failures)
    if unchecked:
        pytest.skip("not checked: " + "; ".join(unchecked))


def test_the_chinese_readme_shows_the_commands_and_snippets_of_the_sections_it_translates():
    english, chinese = README.read_text(), README_ZH.read_text()
    parts = sections(english)
    assert set(TRANSLATED) <= set(parts), (
        f"README.md has no section {set(TRANSLATED) - set(parts)}: update TRANSLATED"
    )
    translated = "".join(parts[title] for title in TRANSLATED)
    assert {c for _, c in commands(chinese)} == {c for _, c in commands(translated)}
    assert {c for _, c in commands(chinese)} <= {c for _, c in commands(english)}
    english_snippets = {
        code for language, code, _ in fenced_blocks(english) if language == "python"
    }
    chinese_snippets = {
        code for language, code, _ in fenced_blocks(chinese) if language == "python"
    }
    assert chinese_snippets and chinese_snippets <= english_snippets
    assert "README.zh-CN.md" in links(sections(english)[""]), (
        "README.md links to README.zh-CN.md at the top"
    )
    assert "README.md" in links(sections(chinese)[""]), (
        "README.zh-CN.md links back to README.md at the top"
    )


@pytest.mark.parametrize("readme", [README, README_ZH], ids=lambda p: p.name)
def test_every_file_and_name_the_readme_points_at_exists(readme):
    text = readme.read_text()
    references = code_references(text)
    assert len(references) >= 20, (
        "the `file.py` `Name` references are no longer found: fix CODE_REFERENCE"
    )
    problems = [
        f"link {target}: no such file"
        for target in links(text)
        if not (readme.parent / target).exists()
    ]
    problems += [
        f"`{file}` `{name}`: {why}"
        for file, name in references
        if (why := missing_reference(readme.parent, file, name))
    ]
    paths = re.findall(r"`([\w-]+(?:/[\w.-]+)*\.py)`", prose(text))
    problems += [
        f"`{path}`: no such file" for path in paths if not (readme.parent / path).is_file()
    ]
    tests = defined_tests()
    problems += [
        f"`{name}`: no such test in tests/"
        for name in re.findall(r"`(test_\w+)`", prose(text))
        if name not in tests
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("readme", [README, README_ZH], ids=lambda p: p.name)
def test_every_flag_named_in_the_text_exists(readme):
    """Flags named on their own (`--text-field`, `--grad_clip=0`): an option of one of the main
    scripts or of torchrun, or a config key (then its value, if given, is checked as an
    override)."""
    from torch.distributed.run import get_args_parser

    options = set(get_args_parser()._option_string_actions)
    for script in FLAG_SCRIPTS:
        options |= set(script_arguments(script, [], parse=False)._option_string_actions)
    keys = set(valid_keys())
    spans = [
        span
        for span in re.findall(r"`([^`]+)`", prose(readme.read_text()))
        if span.startswith("--")
    ]
    assert spans, "no flag found in the text: fix the search"
    problems = []
    for word in (word for span in spans for word in shlex.split(span) if word.startswith("--")):
        name, is_set, _ = word.partition("=")
        name = name.split("[")[0]
        if word in FLAG_PLACEHOLDERS or name in options:
            continue
        if name[2:].replace("-", "_") not in keys:
            problems.append(f"{word}: no script's option and no config key")
        elif is_set:
            try:
                parse_overrides([word])
            except ConfigError as error:
                problems.append(str(error))
    assert not problems, "\n".join(problems)


def make_tokenizer(path: Path):
    from tokenizer import Tokenizer

    Tokenizer.train([(ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000]], 300).save(path)


# Files a snippet reads, made at tiny size (a snippet naming one gets it, in its temporary folder).
SNIPPET_FILES = {"out/default/tokenizer.json": make_tokenizer}


def python_snippets():
    found = {}
    for readme in (README, README_ZH):
        for language, code, line in fenced_blocks(readme.read_text()):
            if language == "python":
                found.setdefault(code, f"{readme.name}:{line}")
    return [pytest.param(code, where, id=where) for code, where in found.items()]


@pytest.mark.parametrize("code,where", python_snippets())
def test_python_snippets_run(code, where, tmp_path):
    for node in ast.walk(ast.parse(code)):
        for module in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom)
            else []
        ):
            if importlib.util.find_spec(module.split(".")[0]) is None:
                pytest.skip(f"{where} needs {module}, which is not installed")
    for relative, make in SNIPPET_FILES.items():
        if relative in code:
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            make(tmp_path / relative)
    with contextlib.chdir(tmp_path):
        exec(compile(code, where, "exec"), {"__name__": "__readme__"})


# ----------------------------------------------------------------------------- the checks can fail


@pytest.mark.parametrize(
    "command,message",
    [
        ("python train.py --no_such_key=1", "unknown config key 'no_such_key'"),
        ("python train.py --max_steps=many", "expected a value of type int"),
        ("python train.py --model.n_heads=5", "not divisible by n_heads"),
        ("python train.py config/13b.py", "config file config/13b.py not found"),
        ("python train.py --dryrun", "cannot read '--dryrun'"),
        ("python -m infra.prepare --input a --vocab_size 3", "unrecognized arguments"),
        ("python -m infra.prepare --merge /x --part 3/2", "expected I/N"),
        ("echo hi | python sample.py --prompt x", "the following arguments are required: --ckpt"),
        ("python bench/bench_hf.py tail", "invalid choice: 'tail'"),
        ("python no_such.py", "no script no_such.py"),
        ("python -m infra.no_such", "no script infra/no_such.py"),
        ("torchrun --nproc-per-node=2 --no-such-flag train.py", "unrecognized arguments"),
        ("torchrun --standalone train.py --lr=fast", "expected a value of type float"),
        ("pip install -r requirements-gpu.txt", "no file requirements-gpu.txt"),
        ("python train.py --out_dir=$OUT", "without a stand-in"),
        ("sbatch --wrap 'python -m infra.prepare --part $SLURM_ARRAY_TASK_ID'", "expected I/N"),
    ],
)
def test_a_wrong_command_is_reported(command, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(command)


def test_a_wrong_reference_is_reported(tmp_path):
    (tmp_path / "m.py").write_text(
        "class A:\n    x: int = 1\n    def f(self): pass\ndef g(): pass\nY = 2\n"
    )
    text = (
        "`m.py` `A.f`, `A.x` and `g`; `m.py` `Y`; `m.py` `A.h`, `k`; `n.py` `g`; "
        "[m](m.py) [n](n.py#top)"
    )
    problems = [missing_reference(tmp_path, file, name) for file, name in code_references(text)]
    assert problems == [
        None,
        None,
        None,
        None,
        "m.py: A has no h",
        "m.py defines no k",
        "n.py does not exist",
    ]
    assert links(text) == ["m.py", "n.py"]
