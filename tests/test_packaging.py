"""The wheel: `pip wheel --no-build-isolation --no-deps .` builds one that works outside the source tree.

One build (a few minutes on two cores) from a copy of the sources in a
temporary folder, then the wheel unpacked onto sys.path of a fresh process
that runs from elsewhere: it must load the compiled backend from the wheel,
agree with torch.nn, carry its metadata (dependencies, license) and no debug
info. Skipped where pip cannot build offline here.
"""
import email
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "csrc", "torch_bn_manual"]

pytestmark = pytest.mark.slow


def copy_sources(dest):
    """The files a build needs, without this tree's compiled library or build folder."""
    for name in SOURCES:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("*.so", "__pycache__", "_cpu_requirements.py"))
        else:
            shutil.copy(src, dest)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    try:
        import setuptools  # noqa: F401
        subprocess.run([sys.executable, "-m", "pip", "--version"], check=True, capture_output=True)
    except (ImportError, subprocess.CalledProcessError) as error:
        pytest.skip(f"pip/setuptools not usable here: {error}")
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheels")
    copy_sources(src)
    env = dict(os.environ, TORCH_BN_MANUAL_CUDA="0", MAX_JOBS=str(os.cpu_count() or 2),
               PIP_NO_INDEX="1")  # offline: everything the build needs is already installed
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "-w", str(out), str(src)], env=env, cwd=str(src), capture_output=True, text=True,
                            timeout=1500)
    if result.returncode != 0:
        if "No matching distribution" in result.stderr or "Could not find" in result.stderr:
            pytest.skip("pip cannot build offline here:\n" + result.stderr[-2000:])
        pytest.fail("pip wheel failed:\n" + (result.stdout + result.stderr)[-6000:])
    wheels = glob.glob(os.path.join(out, "torch_bn_manual-*.whl"))
    assert len(wheels) == 1, os.listdir(out)
    return wheels[0]


def test_wheel_holds_the_extension_metadata_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        libraries = [n for n in names if n.startswith("torch_bn_manual/_C") and n.endswith(".so")]
        assert len(libraries) == 1, names
        assert "torch_bn_manual/ops.py" in names and "torch_bn_manual/_cpu_requirements.py" in names
        assert not any(n.startswith(("csrc/", "tests/")) for n in names)
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(z.read(metadata_name))
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
        library = z.getinfo(libraries[0])
    requires = [r.split(";")[0].strip() for r in metadata.get_all("Requires-Dist")]
    assert "numpy" in requires
    major, minor = torch.__version__.split(".")[:2]
    assert f"torch=={major}.{minor}.*" in requires  # the release it is compiled against
    assert metadata["Name"] == "torch_bn_manual"
    # Release build: no debug info (the -g build was 19.7 MB).
    assert library.file_size < 8 << 20, library.file_size


def test_wheel_has_no_debug_sections(wheel, tmp_path):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.startswith("torch_bn_manual/_C"))
        path = z.extract(name, tmp_path)
    sections = subprocess.run([readelf, "-S", "-W", path], check=True, capture_output=True, text=True).stdout
    assert ".debug_info" not in sections and ".symtab" not in sections
    assert ".dynsym" in sections


def test_build_without_torch_stops_at_once_naming_the_flag():
    """What plain `pip install .` meets: build isolation hides torch (pyproject.toml does not list it)."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        build_system = f.read().split("[build-system]")[1].split("[project]")[0]
    assert '"torch"' not in build_system


CHECK_INSTALLED = r"""
import sys, torch, torch_bn_manual as bnm, torch_bn_manual._C as C
assert bnm.__file__.startswith(sys.argv[1]), bnm.__file__
assert bnm.available_backends() == ["python", "cpp"], bnm.available_backends()
g = torch.Generator().manual_seed(int(sys.argv[2]))
x = torch.randn(8, 6, 5, 4, generator=g) * 2 + 1
ours, ref = bnm.BatchNorm2d(6, backend="cpp"), torch.nn.BatchNorm2d(6)
with torch.no_grad():
    ours.weight.copy_(torch.rand(6, generator=g) + 0.5); ref.weight.copy_(ours.weight)
y, y_ref = ours(x), ref(x)
err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
assert err < 1e-5, err
assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-5)
print("ok", C.cpu_capability())
"""


def test_unpacked_wheel_imports_and_runs_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    seed = str(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run
    result = subprocess.run([sys.executable, "-c", CHECK_INSTALLED, str(site), seed], env=env,
                            cwd=str(elsewhere), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("ok")
