"""Print `name==floor` for the loading stack's lower bounds in pyproject.toml (scripts/test.sh installs them into a
second venv and runs tests/loading there). torch is shared with the main venv: older torch wheels on PyPI pull
multi-GB CUDA libraries, so the torch floor is the oldest torch tests/loading ran with elsewhere (docs/formats.md)."""
import re
import sys
from pathlib import Path

import tomllib

STACK = ("transformers", "compressed-tensors", "huggingface_hub", "accelerate", "safetensors", "bitsandbytes")
project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
for spec in specs:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?>=([0-9][^,;\s]*)", spec.strip())
    if m and m.group(1) in STACK:
        print(f"{m.group(1)}=={m.group(2)}")
