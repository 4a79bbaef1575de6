"""Failpoints for tests/test_faults.py: a controlled point in a checkpoint save or rotation where a run stops dead.

Python imports this module at startup in every process that has this directory on PYTHONPATH, which, for a run
started by the test, includes the command and every process of the Ray instance it starts. It does nothing unless
RLLIB_CVPO_FAILPOINT is set:

- ``save:K``: the K-th checkpoint that Tune copies from the trainable's temporary directory into the trial directory
  is copied half (the first half of its files, in sorted order);
- ``rotate:K``: the K-th checkpoint that Tune's rotation deletes is deleted half (its ``learner_group`` tree).

Then the process touches the file named by RLLIB_CVPO_FAILPOINT_MARKER and sleeps, so the test can SIGKILL every
process of the run at exactly that point.
"""

import os

_SPEC = os.environ.get("RLLIB_CVPO_FAILPOINT", "")


def _stop_here() -> None:
    import time

    with open(os.environ["RLLIB_CVPO_FAILPOINT_MARKER"], "w") as fh:
        fh.write(f"{_SPEC} {os.getpid()}\n")
    while True:
        time.sleep(60)


def _patch_storage(module) -> None:
    original = module._pyarrow_fs_copy_files
    count = [0]

    def copy(source, destination, *args, **kwargs):
        if os.path.basename(str(destination).rstrip("/")).startswith("checkpoint_"):
            count[0] += 1
            if count[0] == int(_SPEC.split(":")[1]):
                import shutil
                from pathlib import Path

                files = sorted(p for p in Path(source).rglob("*") if p.is_file())
                for path in files[: len(files) // 2]:
                    target = Path(destination) / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                _stop_here()
        return original(source, destination, *args, **kwargs)

    module._pyarrow_fs_copy_files = copy


def _patch_rotation(module) -> None:
    original = module._delete_fs_path
    count = [0]

    def delete(fs, fs_path):
        count[0] += 1
        if count[0] == int(_SPEC.split(":")[1]):
            import shutil

            shutil.rmtree(os.path.join(fs_path, "learner_group"))
            _stop_here()
        return original(fs=fs, fs_path=fs_path)

    module._delete_fs_path = delete


_PATCHES = {"save": ("ray.train._internal.storage", _patch_storage),
            "rotate": ("ray.train._internal.checkpoint_manager", _patch_rotation)}

if _SPEC:
    import importlib.abc
    import importlib.machinery
    import sys

    _TARGET, _PATCH = _PATCHES[_SPEC.split(":")[0]]

    class _Finder(importlib.abc.MetaPathFinder):
        """Patches the target module right after it is executed, wherever it is first imported from."""

        def find_spec(self, name, path=None, target=None):
            if name != _TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return None
            loader_exec = spec.loader.exec_module

            def exec_module(module):
                loader_exec(module)
                _PATCH(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
