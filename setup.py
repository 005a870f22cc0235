"""The one build step pyproject.toml cannot say: files that live outside the packages but ship inside the wheel.

- cards/*.j2 (the model-card templates, edited where they are) -> hubquant/cards/ package data;
- hubquant/optimum_register.py -> optimum/commands/register/register_hubquant.py, a portion of optimum's PEP 420
  namespace, as optimum's own subpackages ship theirs: `optimum-cli hubquant` works after `pip install`.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

EXTRA_FILES = [(f"cards/{p.name}", f"hubquant/cards/{p.name}") for p in sorted(Path("cards").glob("*.j2"))]
EXTRA_FILES.append(("hubquant/optimum_register.py", "optimum/commands/register/register_hubquant.py"))


class BuildPyWithExtras(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads cards/ from the checkout
        for src, dst in EXTRA_FILES:
            target = Path(self.build_lib) / dst
            self.mkpath(str(target.parent))
            self.copy_file(src, str(target))


setup(cmdclass={"build_py": BuildPyWithExtras})
