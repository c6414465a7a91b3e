"""scripts/setup_venv.sh on a machine whose python3 is itself a venv holding torch.

A venv made by a venv's python with --system-site-packages sees the *base*
interpreter's packages, not the parent venv's; the script must make the new
venv use the parent's torch (the GPU machine: no registry to install one).
A tiny fake torch in a throwaway parent venv stands in for the real one.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "setup_venv.sh")

pytestmark = pytest.mark.slow  # two venvs (with pip) on a busy machine: 10-30 s


def make_venv(path, *args):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *args, str(path)], check=True, timeout=300)
    return path / "bin" / "python"


def site_packages(python):
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def setup_venv_only(parent_python, venv):
    env = dict(os.environ, PYTHON=str(parent_python), SETUP_VENV_ONLY="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", SCRIPT, str(venv)], check=True, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def ask(python, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=120)


def test_nested_venv_uses_the_parent_venvs_torch(tmp_path):
    parent = make_venv(tmp_path / "parent")
    fake_torch = os.path.join(site_packages(parent), "torch")
    os.makedirs(fake_torch)
    with open(os.path.join(fake_torch, "__init__.py"), "w") as f:
        f.write("__version__ = '0.0+parent-venv'\n")
    result = setup_venv_only(parent, tmp_path / "child")
    assert "using the torch of" in result.stdout and "0.0+parent-venv" in result.stdout
    child = tmp_path / "child" / "bin" / "python"
    seen = ask(child, "import sys, torch; print(torch.__version__, torch.__file__, sys.prefix)")
    assert seen.returncode == 0, seen.stderr
    version, location, prefix = seen.stdout.split()
    assert version == "0.0+parent-venv"
    assert location.startswith(str(tmp_path / "parent"))
    assert prefix == str(tmp_path / "child")  # packages installed later go to the child, not the parent
    # The child's own site-packages come first: what the script installs there wins.
    order = ask(child, "import os, sys, sysconfig, torch; own = sysconfig.get_paths()['purelib']; "
                       "parent = os.path.dirname(os.path.dirname(torch.__file__)); "
                       "print(sys.path.index(own) < sys.path.index(parent))")
    assert order.stdout.strip() == "True", order.stderr


def test_parent_without_torch_gets_a_plain_venv(tmp_path):
    parent = make_venv(tmp_path / "parent")
    setup_venv_only(parent, tmp_path / "child")
    child = tmp_path / "child"
    with open(child / "pyvenv.cfg") as f:
        assert "include-system-site-packages = false" in f.read()
    assert not list(child.glob("lib/python*/site-packages/_parent_venv_site.pth"))
