"""Makes this venv see the packages of the venv it was made from.

    VENV/bin/python scripts/venv_parent_site.py PARENT_PYTHON

`python -m venv --system-site-packages` run by a venv's python gives the new
venv the *base* interpreter's site-packages, not the parent venv's (the new
pyvenv.cfg names the base interpreter). Where PARENT_PYTHON is a venv, this
writes a .pth file into this venv that adds the parent's site directories
(processing their own .pth files too) after this venv's own. Where it is not
a venv, --system-site-packages already reaches its packages: nothing to do.
"""
import json
import os
import subprocess
import sys
import sysconfig

PTH_NAME = "_parent_venv_site.pth"

ASK_PARENT = (
    "import json, site, sys; "
    "print(json.dumps({'venv': sys.prefix != sys.base_prefix, 'site': site.getsitepackages()}))")


def parent_site_dirs(parent_python: str) -> list:
    """The parent's site-packages directories where it is a venv, else []."""
    answer = json.loads(subprocess.run([parent_python, "-c", ASK_PARENT], check=True,
                                       capture_output=True, text=True).stdout)
    return [d for d in answer["site"] if os.path.isdir(d)] if answer["venv"] else []


def main(parent_python: str) -> None:
    dirs = parent_site_dirs(parent_python)
    if not dirs:
        return
    own = sysconfig.get_paths()["purelib"]
    # A .pth line that starts with "import" is executed: addsitedir also reads
    # the parent's own .pth files (its editable installs, its own parent).
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    with open(os.path.join(own, PTH_NAME), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"   the parent venv's packages: {', '.join(dirs)} (via {PTH_NAME})")


if __name__ == "__main__":
    main(sys.argv[1])
