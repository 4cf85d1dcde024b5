"""Every torchvision classification model is certified soundly or refused by name.

Random weights (nothing downloaded), ``num_classes=10``, evaluation mode, 3×32×32 inputs
(larger where the architecture needs it: see ``tests/soundness/zoo.py``). The table of the
last full run is ``tests/soundness/zoo_table.md`` (``python tests/soundness/make_zoo_table.py``).
"""

from __future__ import annotations

import pytest
import torchvision

from tests.soundness.zoo import ZOO, run_zoo_model

pytestmark = pytest.mark.slow


def test_zoo_is_every_classification_model() -> None:
    assert sorted(torchvision.models.list_models(module=torchvision.models)) == ZOO
    assert len(ZOO) >= 80


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_sound_or_refused(name: str, record_property: pytest.RecordProperty) -> None:
    row = run_zoo_model(name)
    record_property("status", row.status)
    record_property("upper", row.upper)
    record_property("oracle_lower", row.lower)
    record_property("reason", row.reason)
    record_property("seconds", round(row.seconds, 2))
    assert row.ok, f"{name} at {row.input_shape}: {row.status}: {row.reason}"
