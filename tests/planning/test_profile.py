"""Device profiles: versioned JSON in the cache dir, clear errors for corrupt or mismatched files, fallback
to defaults only on request; calibration writes a profile that loads back."""

import json

import pytest
import torch

from einfx.errors import ProfileError
from einfx.planning import DeviceProfile, calibrate, default_profile, load_profile, save_profile
from einfx.planning.profile import PROFILE_VERSION, cache_dir, profile_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_env_override_and_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("EINFX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "einfx"
    monkeypatch.setenv("EINFX_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


def test_save_load_round_trip(cache):
    prof = default_profile("cpu")
    path = save_profile(prof)
    assert path == profile_path("cpu") and path.parent == cache
    assert json.loads(path.read_text())["version"] == PROFILE_VERSION
    assert load_profile("cpu") == prof
    assert not list(cache.glob(".profile-*"))  # the temp file was renamed away


def test_missing_file_errors_unless_fallback(cache):
    with pytest.raises(ProfileError, match=r"cannot be read.*einfx.calibrate\('cpu'\)"):
        load_profile("cpu")
    assert load_profile("cpu", fallback=True) == default_profile("cpu")


def test_corrupt_file_names_the_file_and_falls_back_only_when_asked(cache):
    path = profile_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="corrupt JSON") as info:
        load_profile("cpu")
    assert str(path) in str(info.value)
    assert load_profile("cpu", fallback=True) == default_profile("cpu")


@pytest.mark.parametrize("change, message", [
    ({"version": 0}, "version 0 is not supported"),
    ({"flops_fp32": "fast"}, "'flops_fp32' must be a finite number"),
    ({"extra": 1}, r"unknown fields \['extra'\]"),
    ({"device": "tpu"}, "device 'tpu' unknown"),
])
def test_invalid_fields_are_rejected(cache, change, message):
    data = {**default_profile("cpu").to_dict(), **change}
    path = cache / "p.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        load_profile("cpu", path)


def test_profile_of_another_device_is_a_mismatch(cache):
    path = save_profile(default_profile("cuda"), cache / "gpu.json")
    with pytest.raises(ProfileError, match="measured on device 'cuda', requested for 'cpu'"):
        load_profile("cpu", path)
    assert load_profile("cpu", path, fallback=True).device == "cpu"


def test_unknown_device_and_backend():
    with pytest.raises(ProfileError, match="valid: cpu, cuda"):
        default_profile("mps")
    with pytest.raises(ProfileError, match="valid: torch, onnxruntime"):
        default_profile().with_backend("tvm")
    ort = default_profile().with_backend("onnxruntime")
    assert not ort.strided_gemm and ort.with_backend("torch") == default_profile()


@pytest.mark.slow
def test_calibrate_stores_a_loadable_profile(cache):
    prof = calibrate("cpu")
    assert isinstance(prof, DeviceProfile) and prof.name == "cpu-calibrated"
    assert prof.flops_fp32 > 0 and prof.copy_bandwidth > 0 and prof.launch_s > 0
    assert prof.threads == torch.get_num_threads() and prof.transposed_read >= 1.0
    assert load_profile("cpu") == prof


def test_cpu_default_scales_with_threads_and_cuda_does_not():
    one, four = default_profile("cpu", threads=1), default_profile("cpu", threads=4)
    assert (one.threads, four.threads) == (1, 4) and one.name == "cpu-default"
    assert four.flops_fp32 == pytest.approx(one.flops_fp32 * 3.7)
    assert four.copy_bandwidth == pytest.approx(one.copy_bandwidth * 3.7)
    assert (four.launch_s, four.view_s, four.gemm_half_dim) == (one.launch_s, one.view_s, one.gemm_half_dim)
    assert default_profile("cpu") == default_profile("cpu", threads=torch.get_num_threads())
    assert default_profile("cuda") is default_profile("cuda", threads=8)


def test_version_1_files_are_refused_with_the_fix(cache):
    data = default_profile("cpu").to_dict()
    del data["transposed_read"], data["threads"]
    data["version"] = 1
    path = cache / "old.json"
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"old\.json: version 1 is not supported .*calibrate"):
        load_profile("cpu", path)
    assert load_profile("cpu", path, fallback=True) == default_profile("cpu")
