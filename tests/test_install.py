"""What the install promises: no package that fetches code at run time."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def test_the_kernels_package_is_not_installed():
    # transformers 5.2x requires it; with it, bitsandbytes' CPU 4-bit path downloads a kernel from the hub.
    assert importlib.util.find_spec("kernels") is None


def test_importing_misp_turns_hub_kernels_off_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    code = "import os, misp; print(os.environ['USE_HUB_KERNELS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "NO"
    out = subprocess.run([sys.executable, "-c", code], env=env | {"USE_HUB_KERNELS": "YES"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "YES"
