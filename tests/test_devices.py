import pytest

from moe2lib.core import devices
from moe2lib.errors import InputError


def test_catalogue_has_the_papers_devices_with_spec_figures():
    gpu = devices.get("rtx4090")
    orin = devices.get("jetson-agx-orin-64gb")
    assert gpu.bandwidth == pytest.approx(1008e9) and gpu.tdp_w == 450
    assert orin.bandwidth == pytest.approx(204.8e9) and orin.tdp_w == 60
    # the 4090 out-computes and out-streams the Orin
    assert gpu.peak_flops > orin.peak_flops and gpu.bandwidth > orin.bandwidth
    for d in (gpu, orin):
        assert 0 < d.eta_flops <= 1 and 0 < d.eta_bandwidth <= 1 and d.idle_w < d.tdp_w


def test_unknown_device_names_it_and_lists_known():
    with pytest.raises(InputError) as err:
        devices.get("tpu-v9")
    msg = str(err.value)
    assert "tpu-v9" in msg and "rtx4090" in msg and "cpu-local" in msg and "jetson-agx-orin-64gb" in msg


def test_local_cpu_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    d = devices.get("cpu-local", n_threads=1)
    assert d.source.startswith("measured:")
    assert 1e8 < d.peak_flops < 1e13 and 1e8 < d.bandwidth < 1e12
    assert d.link_rate is None and d.busy_w == pytest.approx(devices.WATTS_PER_CORE)
    cached = list((tmp_path / "devices").glob("cpu-local-*.json"))
    assert len(cached) == 1
    assert devices.get("cpu-local", n_threads=1).peak_flops == d.peak_flops   # read back, not re-measured


def test_with_power_overrides_and_rejects_nonpositive():
    d = devices.with_power(devices.get("rtx4090"), 300)
    assert d.busy_w == 300 and devices.get("rtx4090").busy_w == 450
    with pytest.raises(InputError, match="power_watts"):
        devices.with_power(d, 0)
