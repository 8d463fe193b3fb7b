import time

import pytest

from moe2lib.errors import InputError, ResourceUnavailable
from moe2lib.models import energy


def test_estimate_meter_labels_itself_and_multiplies_time_by_power():
    m = energy.make_meter("estimate", power_watts=8.0, how="2 cores x 4 W")
    assert m.source == "estimated:busy_time*8W(2 cores x 4 W)"
    m.begin("w")
    time.sleep(0.05)
    r = m.end("w")
    assert r.source.startswith("estimated:")
    assert r.time_s >= 0.05 and r.energy_j == pytest.approx(8.0 * r.time_s)


def test_windows_must_pair_and_may_overlap():
    m = energy.EstimateMeter(1.0)
    m.begin("a")
    m.begin("b")
    with pytest.raises(InputError, match="already open"):
        m.begin("a")
    assert m.end("b").energy_j >= 0 and m.end("a").energy_j >= 0
    with pytest.raises(InputError, match="never begun"):
        m.end("a")


def test_registry_and_auto_fallback():
    assert set(energy.METERS) >= {"zeus", "estimate"}
    with pytest.raises(InputError, match="'joulescope'"):
        energy.make_meter("joulescope")
    with pytest.raises(InputError, match="power_watts"):
        energy.make_meter("estimate")
    m = energy.make_meter("auto", power_watts=5.0)
    z = energy.ZeusMeter()
    if z.available():   # a machine with NVML, RAPL or Jetson rails: auto measures
        assert isinstance(m, energy.ZeusMeter) and m.source.startswith("measured:zeus(")
    else:               # here: no GPU, no RAPL access
        assert isinstance(m, energy.EstimateMeter) and m.source.startswith("estimated:")
        with pytest.raises(ResourceUnavailable, match="estimate"):
            z.begin("x")
