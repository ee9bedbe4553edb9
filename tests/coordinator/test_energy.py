"""Energy and carbon arithmetic against hand-computed values; Jain's index."""

import math

import pytest

from coordinator.energy import client_energy, compute_seconds, energy_markdown, jain_index, reference_seconds, run_energy, total_fields
from protos.profile import DeviceProfile

PHONE = DeviceProfile("phone", speed=0.25, train_watts=4.0, joules_per_mb_sent=2.0, joules_per_mb_received=0.5, battery_wh=15.0, carbon_intensity=100.0)


def test_client_energy_matches_hand_computed_values():
    # 3 s measured on the simulating machine, a phone at speed 0.25: 12 s of device compute
    seconds = compute_seconds(PHONE, 3.0, simulated=True)
    assert seconds == 12.0
    energy = client_energy(PHONE, seconds, upload_bytes=2_500_000, download_bytes=4_000_000)
    # 4 W x 12 s = 48 J; 2 J/MB x 2.5 MB = 5 J; 0.5 J/MB x 4 MB = 2 J
    assert (energy.compute_joules, energy.upload_joules, energy.download_joules) == (48.0, 5.0, 2.0)
    assert energy.joules == 55.0
    assert energy.wh == pytest.approx(55.0 / 3600)
    assert energy.gco2e == pytest.approx(55.0 / 3.6e6 * 100.0)  # 1.5278e-3 g
    assert energy.fields()["energy_joules"] == 55.0


def test_deployed_seconds_are_taken_as_measured_and_capped():
    assert compute_seconds(PHONE, 3.0, simulated=False) == 3.0
    assert compute_seconds(PHONE, 1e12, simulated=False, cap=3600.0) == 3600.0
    assert compute_seconds(PHONE, -5.0, simulated=True) == 0.0


def test_simulated_seconds_from_counted_flops_ignore_the_measured_ones():
    # 60 GFLOPs at 20 GFLOP/s: 3 s on a speed-1 device, 12 s on the phone (speed 0.25), whatever was measured
    assert reference_seconds(99.0, gflops=60.0, simulated_gflops=20.0) == 3.0
    assert compute_seconds(PHONE, 99.0, simulated=True, gflops=60.0, simulated_gflops=20.0) == 12.0
    assert compute_seconds(PHONE, 3.0, simulated=True, gflops=0.0, simulated_gflops=20.0) == 12.0  # nothing counted: measured
    assert compute_seconds(PHONE, 3.0, simulated=False, gflops=60.0, simulated_gflops=20.0) == 3.0  # a device's own seconds
    assert compute_seconds(PHONE, 1.0, simulated=True, cap=5.0, gflops=60.0, simulated_gflops=20.0) == 5.0


def test_round_and_run_totals():
    a = client_energy(PHONE, 10.0, 0, 0)  # 40 J at 100 g/kWh
    b = client_energy(DeviceProfile("laptop", train_watts=20.0, carbon_intensity=500.0), 9.0, 0, 0)  # 180 J at 500 g/kWh
    fields = total_fields([a, b])
    assert fields["energy_joules"] == 220.0
    assert fields["energy_wh"] == pytest.approx(220.0 / 3600)
    assert fields["gco2e"] == pytest.approx(40 / 3.6e6 * 100 + 180 / 3.6e6 * 500)
    rounds = [{"round": 1, **fields, "jain_index": 0.5}, {"round": 2, "energy_joules": 80.0, "energy_wh": 80 / 3600, "gco2e": 0.01, "jain_index": 0.9}]
    totals = run_energy(rounds)
    assert totals["energy_joules"] == 300.0 and totals["energy_wh"] == pytest.approx(300 / 3600)
    assert totals["gco2e"] == pytest.approx(fields["gco2e"] + 0.01) and totals["jain_index"] == 0.9
    assert run_energy([{"round": 1}]) is None and energy_markdown([{"round": 1}]) == []
    assert any("300.0" in line for line in energy_markdown(rounds))


def test_jain_index():
    assert jain_index([3, 3, 3, 3]) == 1.0
    assert jain_index([4, 0, 0, 0]) == 0.25  # one client has everything: 1/n
    assert jain_index([1, 2, 3]) == pytest.approx(36 / (3 * 14))
    assert jain_index([]) is None and jain_index([0, 0]) is None


@pytest.mark.parametrize("key", ["train_watts", "joules_per_mb_sent", "joules_per_mb_received", "battery_wh", "carbon_intensity"])
def test_power_figures_are_validated(key):
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=key.replace("_", "-")):
            DeviceProfile("p", **{key: bad}).validate()
