"""Code shape, so that each function can be read whole and each call read without its def:

* no function of the package is longer than 80 lines (a screenful and a half, from its def line
  to its last line); longer work is split into named helpers. A Scipion form definition
  (``_defineParams``: one statement per form field, in the order the form shows them) is exempt
  by name;
* no function takes more than 4 positional parameters (self/cls not counted): the rest are
  keyword-only (``*,``), so that a call names its settings. Numba kernels are spared (numba
  cannot take keyword-only arguments), and the files in POSITIONAL_EXEMPT for now."""

import ast
from pathlib import Path

MAX_LINES = 80
EXEMPT_NAMES = {"_defineParams"}
# (file relative to the package, function) exempt from MAX_LINES, with the reason; none now
EXEMPT = set()
MAX_POSITIONAL = 4
NUMBA_DECORATORS = {"njit", "jit"}
# files (or folders, ending in /) relative to the package exempt from MAX_POSITIONAL, with the
# reason; remove an entry once its functions take keyword-only arguments
POSITIONAL_EXEMPT = {}
PACKAGE = Path(__file__).resolve().parents[1]


def _modules(root):
    """(path relative to root, parsed module) of every .py file under root, in path order."""
    for path in sorted(Path(root).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _functions(node, prefix=""):
    """(qualified name, def node, whether it is a method) of every function under node, nested
    ones too, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child, isinstance(node, ast.ClassDef)
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


def long_functions(root, limit=MAX_LINES):
    """(file relative to root, line, qualified name, length in lines) of every function or
    method under root longer than ``limit`` lines (decorators not counted), nested ones too."""
    found = []
    for rel, tree in _modules(root):
        for name, fn, _ in _functions(tree):
            length = fn.end_lineno - fn.lineno + 1
            exempt = fn.name in EXEMPT_NAMES or (rel, fn.name) in EXEMPT
            if length > limit and not exempt:
                found.append((rel, fn.lineno, name, length))
    return found


def _decorator_names(fn):
    """The bare names of a function's decorators: njit for @njit, @numba.njit(...) alike."""
    out = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return out


def positional_parameters(fn, is_method):
    """How many parameters a call can pass by position (self/cls not counted)."""
    n = len(fn.args.posonlyargs) + len(fn.args.args)
    return n - 1 if is_method and "staticmethod" not in _decorator_names(fn) and n else n


def many_positional(root, limit=MAX_POSITIONAL, exempt=POSITIONAL_EXEMPT):
    """(file relative to root, line, qualified name, positional parameters) of every function
    under root, tests/ left out, that takes more than ``limit`` positional parameters; numba
    kernels and the files (or folders, ending in /) in ``exempt`` are spared."""
    found = []
    for rel, tree in _modules(root):
        if rel.startswith("tests/") or any(rel.startswith(e) for e in exempt):
            continue
        for name, fn, is_method in _functions(tree):
            n = positional_parameters(fn, is_method)
            if n > limit and not _decorator_names(fn) & NUMBA_DECORATORS:
                found.append((rel, fn.lineno, name, n))
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = long_functions(PACKAGE)
    assert not too_long, (
        f"functions longer than {MAX_LINES} lines (split them into named helpers):\n"
        + "\n".join(
            f"  sort3ddepth/{rel}:{line} {name} ({n} lines)" for rel, line, name, n in too_long
        )
    )


def test_the_check_names_a_long_function_and_spares_the_form(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "def short():\n"  # 80 lines: allowed
        + "    x = 1\n" * 79
        + "\n\nclass Form:\n    def _defineParams(self, form):\n"  # exempt by name
        + "        x = 1\n" * 100
        + "\n    def long(self):\n"  # 81 lines, from line 186
        + "        x = 1\n" * 80
    )
    assert long_functions(tmp_path) == [("pkg/m.py", 186, "Form.long", 81)]


def test_no_function_takes_more_than_4_positional_parameters():
    many = many_positional(PACKAGE)
    assert not many, (
        f"functions with more than {MAX_POSITIONAL} positional parameters (make the later ones "
        "keyword-only with *, and name them at every call):\n"
        + "\n".join(
            f"  sort3ddepth/{rel}:{line} {name} ({n} positional)" for rel, line, name, n in many
        )
    )


def test_the_check_names_positional_heavy_functions_and_spares_numba_kernels(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_m.py").write_text("def helper(a, b, c, d, e):\n    pass\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "m.py").write_text("def lead(a, b, c, d, e):\n    pass\n")
    (tmp_path / "m.py").write_text(
        "import numba\n"
        "from numba import njit\n\n\n"
        "def four(a, b, c, d, *, e, f):\n    pass\n\n\n"  # allowed: e, f keyword-only
        "def five(a, b, c, d, e=1):\n"  # line 9
        "    def inner(a, /, b, c, d, e):\n        pass\n\n\n"  # line 10
        "@njit(cache=True)\n"
        "def kernel(a, b, c, d, e, f):\n    pass\n\n\n"
        "@numba.jit\n"
        "def kernel2(a, b, c, d, e):\n    pass\n\n\n"
        "class C:\n"
        "    def method(self, a, b, c, d):\n        pass\n\n"  # self not counted
        "    @classmethod\n"
        "    def make(cls, a, b, c, d, e):\n        pass\n\n"  # line 29
        "    @staticmethod\n"
        "    def plain(a, b, c, d, e):\n        pass\n"  # line 33
    )
    assert many_positional(tmp_path, exempt={"old/": "reworked elsewhere"}) == [
        ("m.py", 9, "five", 5),
        ("m.py", 10, "five.inner", 5),
        ("m.py", 29, "C.make", 5),
        ("m.py", 33, "C.plain", 5),
    ]
