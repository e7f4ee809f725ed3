import zipfile

import pytest

from mcl_ray.data import package_data


def fake_wheel(cache, dist: str, module: str, subdir: str, members: dict[str, str]) -> package_data.PackageData:
    """A wheel '<dist>-1.0-py3-none-any.whl' in the cache's wheel folder with the given members."""
    (cache / "wheels").mkdir(exist_ok=True)
    with zipfile.ZipFile(cache / "wheels" / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl", "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return package_data.PackageData(dist, "1.0", module, subdir)


def test_unpacks_only_the_data_folder_from_a_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_RAY_CACHE", str(tmp_path))
    pd = fake_wheel(tmp_path, "fake-pkg", "fake_pkg_xyz", "dataset_example/d", {
        "fake_pkg_xyz/__init__.py": "raise RuntimeError('must not be imported')",
        "fake_pkg_xyz/dataset_example/d/a.inter": "user_id:token\n1\n"})
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
    pd = fake_wheel(tmp_path, "evil-pkg", "evil_pkg_xyz", "d", {"evil_pkg_xyz/d/../../../../escape.txt": "x"})
    with pytest.raises(package_data.PackageDataError):
        package_data.locate(pd, fetch=False)
    assert not (tmp_path.parent / "escape.txt").exists()
