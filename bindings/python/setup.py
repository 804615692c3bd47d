"""Install hook of the optiml package: makes sure liboptiml exists and ships
it inside the package.

The library is taken from, in this order: the file named by the environment
variable OPTIML_LIBRARY; <repo>/build/lib/liboptiml.so; a fresh build of
the CMake target optiml_shared into <repo>/build. A regular install copies
it into the installed package; an editable install leaves it where it is
(the package finds <repo>/build/lib at run time) unless it came from
OPTIML_LIBRARY, which is then copied next to the package sources.
"""
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py as _build_py

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIBRARY_NAME = "liboptiml.dylib" if sys.platform == "darwin" else "liboptiml.so"


def find_or_build_library() -> pathlib.Path:
    env = os.environ.get("OPTIML_LIBRARY")
    if env:
        p = pathlib.Path(env)
        if not p.is_file():
            sys.exit(f"optiml: OPTIML_LIBRARY={env} is not a file")
        return p
    built = REPO / "build" / "lib" / LIBRARY_NAME
    if built.is_file():
        return built
    if not (REPO / "include" / "optiml.h").is_file() or not (REPO / "CMakeLists.txt").is_file():
        sys.exit(f"optiml: {LIBRARY_NAME} not found and no OptiML source tree at {REPO}: "
                 "set OPTIML_LIBRARY to the library's path")
    build = REPO / "build"
    print(f"optiml: building {LIBRARY_NAME} in {build}", file=sys.stderr)
    subprocess.check_call(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    subprocess.check_call(["cmake", "--build", str(build), "--target", "optiml_shared", "-j",
                           str(os.cpu_count() or 2)])
    if not built.is_file():
        sys.exit(f"optiml: the build did not produce {built}")
    return built


class build_py(_build_py):
    """build_py that also puts liboptiml into the package."""

    def run(self) -> None:
        super().run()
        src = find_or_build_library()
        if getattr(self, "editable_mode", False):
            if os.environ.get("OPTIML_LIBRARY"):
                shutil.copy2(src, HERE / "optiml" / LIBRARY_NAME)
            return
        dst = pathlib.Path(self.build_lib) / "optiml" / LIBRARY_NAME
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


class BinaryDistribution(Distribution):
    """The wheel carries a shared library: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


def build_options() -> dict:
    """OPTIML_PY_BUILD_DIR moves setuptools' build/ and egg-info out of the
    source tree (the tests use it so that concurrent installs do not share
    one build directory)."""
    base = os.environ.get("OPTIML_PY_BUILD_DIR")
    if not base:
        return {}
    pathlib.Path(base).mkdir(parents=True, exist_ok=True)
    return {"build": {"build_base": os.path.join(base, "build")}, "egg_info": {"egg_base": base}}


setup(cmdclass={"build_py": build_py}, distclass=BinaryDistribution, options=build_options())
