"""A Python toolchain that runs every py_binary / py_test with the project's venv.

Bazel 4's default toolchain runs whatever `python3` the action's PATH finds; the
tests need the venv that has TensorFlow, Keras, absl and pytest. The interpreter
is, in order:

1. `$TF_BILEVEL_PYTHON` (tools/bazel_test.sh passes it with --repo_env);
2. `<workspace>/.venv/bin/python` (the venv .ci/run creates in the clone);
3. `python3` on PATH.
"""

_ENV = "TF_BILEVEL_PYTHON"

def _find_python(rctx):
    python = rctx.os.environ.get(_ENV, "")
    if python:
        if not rctx.path(python).exists:
            fail("%s=%s does not exist: point it at the venv's python" % (_ENV, python))
        return python
    venv_python = rctx.path(Label("//:WORKSPACE")).dirname.get_child(".venv").get_child("bin").get_child("python")
    if venv_python.exists:
        return str(venv_python)
    found = rctx.which("python3")
    if found == None:
        fail("no Python interpreter: set %s to the venv's python (e.g. --repo_env=%s=$PWD/.venv/bin/python)" % (_ENV, _ENV))
    return str(found)

def _python_venv_impl(rctx):
    python = _find_python(rctx)
    result = rctx.execute([python, "-c", "import sys; print(sys.version_info[0])"])
    if result.return_code != 0 or result.stdout.strip() != "3":
        fail("%s does not run as Python 3: %s%s" % (python, result.stdout, result.stderr))
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

# Interpreter chosen by //third_party/bazel:python_venv.bzl.
py_runtime(
    name = "python3",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(name = "runtime_pair", py3_runtime = ":python3")

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

python_venv = repository_rule(
    implementation = _python_venv_impl,
    environ = [_ENV],
    local = True,
)
