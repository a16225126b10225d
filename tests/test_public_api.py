"""The public surface of `loopbridge`: a sorted `__all__` of importable, public names."""

from __future__ import annotations

import importlib

import loopbridge as lb


class TestAll:
    """`loopbridge.__all__` is the exact, sorted list of the public names."""

    def test_sorted(self) -> None:
        """`__all__` is in plain sorted order."""
        assert lb.__all__ == sorted(lb.__all__)

    def test_no_duplicates(self) -> None:
        """Each name appears once."""
        assert len(lb.__all__) == len(set(lb.__all__))

    def test_every_name_importable(self) -> None:
        """`from loopbridge import <name>` works for every name in `__all__`."""
        module = importlib.import_module("loopbridge")
        missing = [name for name in lb.__all__ if not hasattr(module, name)]
        assert missing == []

    def test_no_private_names(self) -> None:
        """No exported name starts with an underscore."""
        assert [name for name in lb.__all__ if name.startswith("_")] == []

    def test_exported_objects_live_in_loopbridge(self) -> None:
        """Every exported class or function is defined inside the loopbridge package."""
        foreign = [
            name
            for name in lb.__all__
            if hasattr(getattr(lb, name), "__module__")
            and not getattr(lb, name).__module__.startswith("loopbridge")
        ]
        assert foreign == []

    def test_contract_types_exported(self) -> None:
        """The types the hooks receive and the runners return are all public."""
        wanted = {
            "ArmResult",
            "Bridge",
            "Callback",
            "CallbackList",
            "DrainReport",
            "EvalResult",
            "Experiment",
            "ExperimentResult",
            "LogContext",
            "LoopArtifacts",
            "LoopState",
            "ManifestRow",
            "RunResult",
            "TaskFuture",
            "TrainLoop",
            "TrainingBatch",
        }
        assert wanted <= set(lb.__all__)

    def test_testing_module_public(self) -> None:
        """`loopbridge.testing` exports RecordingCallback in a sorted `__all__`."""
        testing = importlib.import_module("loopbridge.testing")
        assert "RecordingCallback" in testing.__all__
        assert testing.__all__ == sorted(testing.__all__)
        assert all(hasattr(testing, name) for name in testing.__all__)
