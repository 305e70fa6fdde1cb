"""DPO and SPIN warn before a configuration is likely to run out of memory, as the RM does."""

import pytest
from test_dpo import cfg as dpo_cfg
from test_dpo import data  # noqa: F401  (fixture)
from test_spin import sft_file, spin_cfg

from alignforge.recipes import dpo, memory, spin


class Stop(Exception):
    pass


def stop(*args, **kwargs):
    raise Stop


@pytest.fixture
def small_device(monkeypatch):
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 10_000)


def test_dpo_warns_before_training(tiny_model_dir, data, tmp_path, small_device, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dpo, "place_frozen", stop)  # the next step after the check
    with pytest.warns(UserWarning, match="max_length 64: .* likely run out of memory"):
        with pytest.raises(Stop):
            dpo.run(dpo_cfg(tiny_model_dir, data, tmp_path / "dpo"))


def test_spin_warns_before_training(tiny_model_dir, tmp_path, small_device, monkeypatch):
    monkeypatch.setattr(spin, "run_iteration", stop)
    with pytest.warns(UserWarning, match="max_length 96: .* likely run out of memory"):
        with pytest.raises(Stop):
            spin.run(spin_cfg(tiny_model_dir, sft_file(tmp_path), tmp_path / "spin"))
